"""What a detection bundle ships besides its weights: ``network_def``, ``configs/inference.json``, metadata.

Why: the network, its configuration and decoding are what the worker serves
(:mod:`workers.models.detection_network`); the bundle's configs name them, and
:func:`write_detection_bundle` writes them with :func:`training.bundle.write_bundle`
like every bundle of this package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.bundle import ct_network_data_format, dicom_node_section, target_name, write_bundle
from training.detection.evaluate import jsonable
from training.labels import label_by_name
from workers.models.detection_network import (
    HEATMAP_CHANNEL,
    N_OUTPUT_CHANNELS,
    OFFSET_CHANNELS,
    SIZE_CHANNELS,
    CenterNetDetector,
    DetectorConfig,
)

__all__ = ["bundle_metadata", "inference_config", "network_def", "write_detection_bundle"]


def network_def(config: DetectorConfig) -> dict[str, Any]:
    """MONAI config that rebuilds the network (the bundle's ``network_def``)."""
    return {
        "_target_": target_name(CenterNetDetector),
        "in_channels": 1,
        "features": [int(f) for f in config.features],
        "head_channels": int(config.head_channels),
        "output_stride": int(config.output_stride),
    }


def inference_config(config: DetectorConfig) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``: MONAI preprocessing + the detector's settings.

    ``preprocessing`` is the MONAI ``Compose`` that gives the network its input from
    an image file (RAS, ``spacing_mm``, ``window_hu`` to 0..1); ``inferer`` the
    sliding window used beyond ``roi_size``; ``postprocessing`` documents the output
    channels and the peak decoding that :func:`~workers.models.detection_network.detect`
    implements; ``detection`` is the full :class:`~workers.models.detection_network.DetectorConfig`
    (what :func:`~workers.models.detection_network.load_detector` reads).
    """
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": list(config.spacing_mm), "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "@image_key",
                    "a_min": float(config.window_hu[0]),
                    "a_max": float(config.window_hu[1]),
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "DivisiblePadd", "keys": "@image_key", "k": config.size_divisor, "method": "end",
                 "mode": "constant"},
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(config.roi_size),
            "sw_batch_size": 1,
            "overlap": float(config.overlap),
            "mode": "gaussian",
            "_desc_": "used only when the image exceeds roi_size; otherwise the whole image in one pass",
        },
        "postprocessing": {
            "output_channels": {
                "heatmap_logits": [HEATMAP_CHANNEL],
                "log_size_mm_xyz": list(SIZE_CHANNELS),
                "centre_offset_xyz": list(OFFSET_CHANNELS),
            },
            "output_stride": config.output_stride,
            "decoding": "score = sigmoid(heatmap); peaks = voxels equal to max_pool3d(score, peak_kernel, stride 1); "
            "keep the max_detections best with score >= score_threshold; centre (input voxels, RAS grid) = "
            "output_stride * (peak + offset); box size mm = exp(log_size); drop a detection whose centre lies "
            "within half the mean size of a higher-scoring one (suppress_inside)",
            "peak_kernel": config.peak_kernel,
            "score_threshold": config.score_threshold,
            "max_detections": config.max_detections,
            "suppress_inside": config.suppress_inside,
            "box_mode": "cccwhd",
            "classes": ["nodule"],
        },
        "detection": config.to_dict(),
    }


def bundle_metadata(config: DetectorConfig, evaluation: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    patch = [int(v) for v in config.patch_size]
    out_patch = [math.ceil(v / config.output_stride) for v in patch]
    return {
        "name": "Lung nodule detection (CenterNet 3D)",
        "task": "Lung nodule detection in chest CT",
        "description": (
            "A CenterNet-style 3D detector (MONAI BasicUNet trunk, heatmap / size / offset heads) that "
            "reports lung nodules as boxes with a confidence. Trained by the dicom-node training package "
            "(training/detection/) with the penalty-reduced focal loss and L1 size/offset losses."
        ),
        "data_source": str(training.get("dataset", "synthetic chest CT phantoms (training.phantoms)")),
        "image_classes": "single channel CT in HU, RAS, resampled to "
        f"{list(config.spacing_mm)} mm and scaled to [0, 1] from {list(config.window_hu)} HU",
        "label_classes": "boxes (cccwhd, world mm) of class 0: nodule",
        "pred_classes": "7 channels at 1/output_stride resolution: heatmap logits, log size mm (x, y, z), "
        "centre offset (x, y, z)",
        "eval_metrics": {
            "cpm": evaluation.get("all", {}).get("cpm"),
            "cpm_6mm": evaluation.get("large", {}).get("cpm"),
        },
        "network_data_format": ct_network_data_format(patch, {
            "type": "object",
            "format": "centernet",
            "num_channels": N_OUTPUT_CHANNELS,
            "spatial_shape": out_patch,
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": True,
            "channel_def": {
                "0": "heatmap logits",
                "1": "log size x (mm)",
                "2": "log size y (mm)",
                "3": "log size z (mm)",
                "4": "offset x",
                "5": "offset y",
                "6": "offset z",
            },
        }),
        "training": dict(training),
        "dicom_node": dicom_node_section(
            kind="detection",
            spacing_mm=config.spacing_mm,
            intensity_window_hu=config.window_hu,
            labels=[label_by_name("nodule")],
            evaluation=evaluation,
            detection={
                "classes": ["nodule"],
                "box_mode": "cccwhd",
                "coordinates": "detect() reports LPS patient mm; box lists are RAS world mm",
                "score_threshold": config.score_threshold,
                "max_detections": config.max_detections,
            },
        ),
    }


def write_detection_bundle(
    out: Path, network: nn.Module, config: DetectorConfig, record: Mapping[str, Any], dataset_dir: Any
) -> dict[str, Any]:
    evaluation = {
        "split": "validation",
        "note": "validation cases of the training run (used to pick the checkpoint and the score threshold)",
        **jsonable(record["validation"]),
        "operating_point": jsonable(record["operating_point"]),
    }
    training = {
        "dataset": str(dataset_dir),
        "cases": {"train": len(record["train_cases"]), "validation": len(record["validation_cases"])},
        "epochs": record["settings"]["epochs"],
        "best_epoch": record["best_epoch"],
        "batch_size": record["settings"]["batch_size"],
        "steps_per_epoch": record["settings"]["steps_per_epoch"],
        "learning_rate": record["settings"]["learning_rate"],
        "training_seconds": round(float(record["training_seconds"]), 1),
        "device": record["device"],
    }
    write_bundle(
        out,
        network=network,
        network_def=network_def(config),
        inference_config=inference_config(config),
        metadata=bundle_metadata(config, evaluation, training),
        example_input=torch.rand(1, 1, *config.patch_size),
    )
    return {"path": str(out), "torchscript": (out / "models" / "model.ts").exists()}

