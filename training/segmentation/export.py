"""What a segmentation bundle ships besides its weights: ``configs/inference.json`` and the metadata.

Why: the node serves the bundle through MONAI's bundle API, so its inference
config is a complete Model Zoo config (runnable by ``python -m monai.bundle
run``) built from the same preprocessing the training used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from training.bundle import ct_network_data_format, dicom_node_section, target_name
from training.labels import BACKGROUND, LabelSpec
from training.segmentation.data import DEFAULT_PATCH_SIZE, DEFAULT_SPACING_MM, DEFAULT_WINDOW_HU, preprocessing_config
from workers.models.postprocessing import KeepInsideBodyd

__all__ = ["BODY_TISSUE_LABELS", "INSIDE_BODY_LABELS", "bundle_metadata", "inference_config", "label_values"]

#: Chest labels that exist only inside the body, and the tissue labels that outline the body: the bundle's
#: postprocessing clears the first outside the second (the network labels some outside air as lung).
INSIDE_BODY_LABELS: tuple[str, ...] = ("lung", "heart", "nodule")
BODY_TISSUE_LABELS: tuple[str, ...] = ("body", "bone")


def inference_config(
    *,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
    roi_size: Sequence[int] = DEFAULT_PATCH_SIZE,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    inside_labels: Sequence[int] = (),
    body_labels: Sequence[int] = (),
) -> dict[str, Any]:
    """The bundle's ``configs/inference.json`` (Model Zoo layout, runnable by ``monai.bundle run``).

    ``network_def`` is left out: :func:`training.bundle.write_bundle` puts it in.
    ``inside_labels`` (label values): organs that exist only inside the body; when
    given, the postprocessing clears them outside the body that ``body_labels``
    outline, after the argmax (:class:`~workers.models.postprocessing.KeepInsideBodyd`).
    """
    post: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if inside_labels:
        post.append({"_target_": target_name(KeepInsideBodyd), "keys": "pred",
                     "inside_labels": [int(v) for v in inside_labels], "body_labels": [int(v) for v in body_labels]})
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "output_postfix": "seg",
        "separate_folder": False,
        "load_pretrain": True,
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing_config(spacing_mm=spacing_mm, window_hu=window_hu),
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(v) for v in roi_size],
            "sw_batch_size": int(sw_batch_size),
            "overlap": float(overlap),
            "mode": "gaussian",
            "padding_mode": "replicate",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                *post,
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_ext": "@output_ext",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "@output_postfix",
                    "separate_folder": "@separate_folder",
                    "resample": False,
                },
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "$torch.cuda.is_available()",
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)", "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def label_values(labels: Sequence[LabelSpec], names: Sequence[str]) -> list[int]:
    """The values of the labels named ``names`` (those ``labels`` has, in value order)."""
    return sorted(spec.value for spec in labels if spec.name in names)


def bundle_metadata(
    *,
    labels: Sequence[LabelSpec],
    spacing_mm: Sequence[float],
    window_hu: Sequence[float],
    patch_size: Sequence[int],
    evaluation: Mapping[str, Any],
    training: Mapping[str, Any],
) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json``: MONAI's fields, the figures of ``evaluation``, the ``dicom_node`` section."""
    channel_def = {"0": BACKGROUND, **{str(spec.value): spec.name for spec in labels}}
    n_channels = len(channel_def)
    names = ", ".join(f"{spec.value} {spec.name}" for spec in labels)
    mean_dice = evaluation.get("mean_dice")
    return {
        "name": "Chest CT segmentation (SegResNet)",
        "task": "Chest CT segmentation: " + ", ".join(spec.name for spec in labels),
        "description": (
            "A 3D SegResNet that segments chest CT into " + names + ". Trained by the dicom-node "
            "training package (training/segmentation/) with DiceCE loss on class-balanced random patches."
        ),
        "data_source": training.get("dataset", "synthetic chest CT phantoms (training.phantoms)"),
        "image_classes": "single channel CT in HU, resampled and scaled to [0, 1] from "
        f"[{window_hu[0]:g}, {window_hu[1]:g}] HU",
        "label_classes": f"single channel label map: 0 {BACKGROUND}, {names}",
        "pred_classes": f"{n_channels} channels (softmax), channel i is label value i",
        "eval_metrics": {"mean_dice": mean_dice} if mean_dice is not None else {},
        "network_data_format": ct_network_data_format(patch_size, {
            "type": "image",
            "format": "segmentation",
            "num_channels": n_channels,
            "spatial_shape": [int(v) for v in patch_size],
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": True,
            "channel_def": channel_def,
        }),
        "training": dict(training),
        "dicom_node": dicom_node_section(
            kind="segmentation",
            spacing_mm=spacing_mm,
            intensity_window_hu=window_hu,
            labels=labels,
            evaluation=evaluation,
        ),
    }
