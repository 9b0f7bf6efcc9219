"""3D chest CT segmentation: train a MONAI SegResNet, export it as a MONAI bundle, evaluate bundles.

Why: the node's segmentation worker runs a MONAI bundle; this module produces
one from a Decathlon-layout dataset (the synthetic chest phantoms of
:mod:`training.phantoms`, or any CT set with the same labels) and measures a
bundle on held-out data through MONAI's own bundle API, i.e. exactly the way
the bundle will be run in production.

What:

* :func:`train_segmentation` - DiceCE training on random patches (class-balanced
  crops oversample nodules), sliding-window validation with per-label Dice, best
  checkpoint exported with :func:`training.bundle.write_bundle`, ``metrics.json``
  and plots (``plots/loss.png``, ``plots/dice.png``, ``plots/validation_slices.png``).
* :func:`evaluate_segmentation` - loads a bundle with ``monai.bundle.ConfigParser``
  (its ``configs/inference.json`` + ``models/model.pt``), runs it on every case of a
  dataset and reports per-label Dice in each case's original grid.
* :func:`preprocessing_config`, :func:`inference_config`, :func:`network_def` - the MONAI
  configs the training uses and the bundle ships: training and serving build the
  preprocessing from the same config, so they cannot drift apart.

Conventions: arrays inside MONAI are channel-first and RAS-oriented, spatial axes
(x, y, z); ``spacing_mm`` and ``patch_size`` are given in that order.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import dicom_node_section, read_bundle_metadata, target_name, write_bundle
from training.labels import BACKGROUND, CHEST_LABELS, LESION_CATEGORY_VALUE, LabelSpec
from training.lesion_plots import LesionCrop, lesion_crop, plot_lesion_gallery
from training.metrics import (
    LesionMatch,
    dice_per_label,
    lesion_band,
    lesion_band_names,
    lesion_matches,
    lesion_summary,
)
from workers.models.postprocessing import KeepInsideBodyd

__all__ = [
    "BODY_TISSUE_LABELS",
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_SPACING_MM",
    "DEFAULT_WINDOW_HU",
    "INSIDE_BODY_LABELS",
    "evaluate_segmentation",
    "inference_config",
    "network_def",
    "preprocessing_config",
    "train_segmentation",
]

logger = logging.getLogger(__name__)

#: Target voxel spacing (x, y, z mm): the phantoms' native grid (2.2 mm in-plane, 2.5 mm slices).
DEFAULT_SPACING_MM: tuple[float, float, float] = (2.2, 2.2, 2.5)
#: HU range scaled to 0..1 (clipped): air to dense bone.
DEFAULT_WINDOW_HU: tuple[float, float] = (-1000.0, 500.0)
#: Training patch and sliding-window size (x, y, z voxels), multiples of 8 (SegResNet's 3 downsamplings):
#: 14 x 14 x 12 cm at the default spacing, enough context to tell lung from outside air and find the heart.
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (64, 64, 48)
#: Chest labels that exist only inside the body, and the tissue labels that outline the body: the bundle's
#: postprocessing clears the first outside the second (the network labels some outside air as lung).
INSIDE_BODY_LABELS: tuple[str, ...] = ("lung", "heart", "nodule")
BODY_TISSUE_LABELS: tuple[str, ...] = ("body", "bone")
#: Lung window for the plots (level, width) in HU.
_LUNG_WINDOW = (-600.0, 1500.0)


# --------------------------------------------------------------------------- configs


def network_def(*, out_channels: int, init_filters: int = 8, dropout_prob: float | None = None) -> dict[str, Any]:
    """MONAI config of the SegResNet (the bundle's ``network_def``); ``init_filters`` a multiple of 8 (GroupNorm)."""
    if init_filters < 8 or init_filters % 8:
        raise ValueError(f"init_filters must be a positive multiple of 8 (SegResNet's 8 norm groups), got {init_filters}")
    config: dict[str, Any] = {
        "_target_": "SegResNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": int(out_channels),
        "init_filters": int(init_filters),
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
    }
    if dropout_prob:
        config["dropout_prob"] = float(dropout_prob)
    return config


def preprocessing_config(
    *,
    image_key: str = "@image_key",
    label_key: str | None = None,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
) -> dict[str, Any]:
    """The MONAI ``Compose`` config that prepares a CT (and its label map) for the network.

    Load, channel first, RAS orientation, resample to ``spacing_mm`` (bilinear for
    the image, nearest for labels), ``window_hu`` scaled to 0..1 and clipped.
    """
    keys: Any = image_key if label_key is None else [image_key, label_key]
    modes: Any = "bilinear" if label_key is None else ["bilinear", "nearest"]
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": keys, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": keys, "pixdim": [float(v) for v in spacing_mm], "mode": modes},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": image_key,
                "a_min": float(window_hu[0]),
                "a_max": float(window_hu[1]),
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": keys},
        ],
    }


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


def _values(labels: Sequence[LabelSpec], names: Sequence[str]) -> list[int]:
    """The values of the labels named ``names`` (those ``labels`` has, in value order)."""
    return sorted(spec.value for spec in labels if spec.name in names)


def _metadata(
    *,
    labels: Sequence[LabelSpec],
    spacing_mm: Sequence[float],
    window_hu: Sequence[float],
    patch_size: Sequence[int],
    evaluation: Mapping[str, Any],
    training: Mapping[str, Any],
) -> dict[str, Any]:
    channel_def = {"0": BACKGROUND, **{str(spec.value): spec.name for spec in labels}}
    n_channels = len(channel_def)
    names = ", ".join(f"{spec.value} {spec.name}" for spec in labels)
    mean_dice = evaluation.get("mean_dice")
    return {
        "name": "Chest CT segmentation (SegResNet)",
        "task": "Chest CT segmentation: " + ", ".join(spec.name for spec in labels),
        "description": (
            "A 3D SegResNet that segments chest CT into " + names + ". Trained by the dicom-node "
            "training package (training/segmentation.py) with DiceCE loss on class-balanced random patches."
        ),
        "data_source": training.get("dataset", "synthetic chest CT phantoms (training.phantoms)"),
        "image_classes": "single channel CT in HU, resampled and scaled to [0, 1] from "
        f"[{window_hu[0]:g}, {window_hu[1]:g}] HU",
        "label_classes": f"single channel label map: 0 {BACKGROUND}, {names}",
        "pred_classes": f"{n_channels} channels (softmax), channel i is label value i",
        "eval_metrics": {"mean_dice": mean_dice} if mean_dice is not None else {},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [int(v) for v in patch_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": n_channels,
                    "spatial_shape": [int(v) for v in patch_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
        "training": dict(training),
        "dicom_node": dicom_node_section(
            kind="segmentation",
            spacing_mm=spacing_mm,
            intensity_window_hu=window_hu,
            labels=labels,
            evaluation=evaluation,
        ),
    }


# --------------------------------------------------------------------------- data


def _cases(dataset_dir: Path, *, include_test: bool = False) -> list[dict[str, str]]:
    """``[{"image", "label", "name"}]`` for every labelled case of a Decathlon dataset.

    Training uses the ``training`` list only; evaluation (``include_test``) also the
    test images that have a ``labelsTs`` label map.
    """
    from training.data.decathlon import read_decathlon

    cases = [
        {"image": str(case.image), "label": str(case.label), "name": case.name}
        for case in read_decathlon(dataset_dir, include_test=include_test)
        if case.label is not None
    ]
    if not cases:
        raise ValueError(f"no labelled case in the dataset {dataset_dir}")
    return cases


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation); at least one of each when n >= 2."""
    if n < 2:
        raise ValueError(f"need at least 2 labelled cases (training + validation), got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _parse(config: Mapping[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser({"imports": ["$import numpy"], "image_key": "image", "x": copy.deepcopy(dict(config))})
    return parser.get_parsed_content("x")


def _train_transforms(
    patch_size: Sequence[int], n_classes: int, class_ratios: Sequence[float], num_samples: int,
    balance_label: int | None = None, balance_offset: Sequence[int] | None = None,
) -> tuple[list[Any], list[Any]]:
    """(deterministic part, cached; random part) of the training transform chain.

    With ``balance_label``, patches drawn for that label centre on each of its
    connected components equally often (:class:`training.sampling.BalanceComponentIndicesd`)
    instead of on each of its voxels, and with ``balance_offset`` (voxels per axis)
    up to that far from the component, so it is not always at the patch centre.
    """
    from monai.transforms import (
        ClassesToIndicesd,
        RandCropByLabelClassesd,
        RandGaussianNoised,
        RandScaleIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    deterministic = [
        SpatialPadd(keys, spatial_size=list(patch_size), mode="constant"),
        # Class voxel indices once per case, so each random crop need not scan the volume.
        ClassesToIndicesd("label", num_classes=n_classes, max_samples_per_class=20_000),
    ]
    if balance_label is not None:
        from training.sampling import BalanceComponentIndicesd

        deterministic.append(BalanceComponentIndicesd("label", "label_cls_indices", balance_label,
                                                      offset=balance_offset))
    random = [
        RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=list(patch_size),
            ratios=list(class_ratios),
            num_classes=n_classes,
            num_samples=num_samples,
            indices_key="label_cls_indices",
            warn=False,
        ),
        # Light, contrast-preserving augmentation only: lung (-850 HU) and outside air (-1000 HU) differ by
        # 0.1 on the 0..1 scale, so an intensity *shift* would erase the cue that separates them.
        RandScaleIntensityd("image", factors=0.05, prob=0.5),
        RandGaussianNoised("image", prob=0.2, std=0.01),
    ]
    return deterministic, random


# --------------------------------------------------------------------------- training


def train_segmentation(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 20,
    device: str = "cpu",
    seed: int = 0,
    patch_size: Sequence[int] = DEFAULT_PATCH_SIZE,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    val_fraction: float = 0.2,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
    init_filters: int = 8,
    class_ratios: Sequence[float] | None = None,
    class_weights: Sequence[float] | None = None,
    val_interval: int = 1,
    sw_batch_size: int = 2,
    progress: bool = True,
    init_bundle: str | Path | None = None,
) -> dict[str, Any]:
    """Train a SegResNet on ``dataset_dir`` (Decathlon layout) and write its bundle to ``out_dir``.

    ``init_bundle``: start from the weights of an earlier bundle of the same network
    (fine-tuning, e.g. a second stage that teaches small lesions to a network that
    already knows the anatomy) instead of random ones.

    One epoch visits every training case once; each optimiser step uses
    ``batch_size`` patches of ``patch_size`` voxels cropped from one case, their
    centres drawn per label with ``class_ratios`` (default: nodules 6 times as
    often as each other label); ``class_weights`` weigh the labels in the DiceCE loss. The checkpoint with the best mean foreground
    validation Dice is exported. Returns the training record, also written to
    ``out_dir/metrics.json``. Deterministic for a given ``seed`` on CPU.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss
    from monai.transforms import Compose
    from monai.utils import set_determinism
    from tqdm.auto import tqdm

    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    patch_size = tuple(int(v) for v in patch_size)
    if len(patch_size) != 3 or any(v <= 0 or v % 8 for v in patch_size):
        raise ValueError(f"patch_size must be 3 positive multiples of 8 (x, y, z), got {patch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = tuple(CHEST_LABELS)
    n_classes = 1 + max(spec.value for spec in labels)
    if class_ratios is None:
        class_ratios = [1.0] * n_classes
        class_ratios[max(spec.value for spec in labels if spec.name == "nodule")] = 6.0
    if len(class_ratios) != n_classes:
        raise ValueError(f"class_ratios needs {n_classes} values (one per label value), got {len(class_ratios)}")
    if class_weights is not None and len(class_weights) != n_classes:
        raise ValueError(f"class_weights needs {n_classes} values (one per label value), got {len(class_weights)}")
    dev = torch.device(device)
    use_amp = dev.type == "cuda"

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    cases = _cases(dataset_dir)
    train_idx, val_idx = _split(len(cases), val_fraction, seed)
    train_cases = [cases[i] for i in train_idx]
    val_cases = [cases[i] for i in val_idx]
    logger.info("segmentation: %d training, %d validation cases", len(train_cases), len(val_cases))

    preprocess = _parse(preprocessing_config(image_key="image", label_key="label", spacing_mm=spacing_mm,
                                             window_hu=window_hu))
    det, rnd = _train_transforms(patch_size, n_classes, class_ratios, batch_size)
    files = lambda cs: [{"image": c["image"], "label": c["label"]} for c in cs]  # noqa: E731
    train_transform = Compose([*preprocess.transforms, *det, *rnd])
    train_transform.set_random_state(seed=seed)
    train_ds = CacheDataset(files(train_cases), transform=train_transform, num_workers=0, progress=False)
    val_ds = CacheDataset(files(val_cases), transform=preprocess, num_workers=0, progress=False)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=1, shuffle=True, num_workers=0, generator=generator)

    net_config = network_def(out_channels=n_classes, init_filters=init_filters)
    network = _parse(net_config).to(dev)
    if init_bundle is not None:
        weights = Path(init_bundle) / "models" / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"init_bundle {init_bundle} has no models/model.pt")
        try:
            network.load_state_dict(torch.load(weights, map_location=dev, weights_only=True))
        except RuntimeError as exc:
            raise ValueError(f"init_bundle {init_bundle}: weights do not fit this network ({exc})") from exc
    weight = torch.as_tensor(list(class_weights), dtype=torch.float32, device=dev) if class_weights else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
    optimisation = _Optimisation.for_network(network, learning_rate, epochs * len(train_loader), use_amp)
    inferer = SlidingWindowInferer(roi_size=list(patch_size), sw_batch_size=sw_batch_size, overlap=0.25,
                                   mode="gaussian", padding_mode="replicate")

    record: dict[str, Any] = {
        "kind": "segmentation",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dataset": str(dataset_dir),
        "train_cases": [c["name"] for c in train_cases],
        "validation_cases": [c["name"] for c in val_cases],
        "settings": {
            "epochs": epochs,
            "patch_size": list(patch_size),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "spacing_mm": [float(v) for v in spacing_mm],
            "window_hu": [float(v) for v in window_hu],
            "init_filters": init_filters,
            "class_ratios": [float(v) for v in class_ratios],
            "class_weights": [float(v) for v in class_weights] if class_weights else None,
            "val_fraction": val_fraction,
            "amp": use_amp,
            "init_bundle": str(init_bundle) if init_bundle is not None else None,
        },
        "epochs": [],
    }
    best_score, best_state, best_epoch = -math.inf, None, 0
    best_dice: dict[str, float] = {}
    started = time.perf_counter()
    epoch_bar = tqdm(range(1, epochs + 1), desc="segmentation", unit="epoch", disable=not progress)
    for epoch in epoch_bar:
        epoch_start = time.perf_counter()
        entry = optimisation.epoch(network, train_loader, loss_fn, lambda labels: labels, dev, epoch=epoch,
                                   progress=progress)
        if epoch % val_interval == 0 or epoch == epochs:
            val_start = time.perf_counter()
            dice = _validate(network, val_ds, inferer, labels, dev, use_amp)
            entry["validation_dice"] = dice
            entry["validation_mean_dice"] = float(np.mean(list(dice.values())))
            entry["validation_seconds"] = time.perf_counter() - val_start
            if entry["validation_mean_dice"] > best_score:
                best_score, best_epoch, best_dice = entry["validation_mean_dice"], epoch, dice
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
        entry["seconds"] = time.perf_counter() - epoch_start
        record["epochs"].append(entry)
        logger.info(
            "epoch %d/%d: loss %.4f, %.1f s%s", epoch, epochs, entry["loss"], entry["seconds"],
            "" if "validation_dice" not in entry else ", validation Dice "
            + ", ".join(f"{k} {v:.3f}" for k, v in entry["validation_dice"].items()),
        )
        epoch_bar.set_postfix(loss=f"{entry['loss']:.3f}", dice=f"{entry.get('validation_mean_dice', float('nan')):.3f}")
    record["training_seconds"] = time.perf_counter() - started
    record["best_epoch"] = best_epoch
    record["best_validation_dice"] = best_dice
    record["best_validation_mean_dice"] = best_score

    assert best_state is not None  # the last epoch always validates
    network.load_state_dict(best_state)
    network.eval()
    evaluation = {
        "split": "validation",
        "note": "validation cases of the training run (used to pick the checkpoint); "
        "see held_out for figures on data never seen in training",
        "cases": len(val_cases),
        "dice": best_dice,
        "mean_dice": best_score,
    }
    training = {
        "dataset": str(dataset_dir),
        "cases": {"train": len(train_cases), "validation": len(val_cases)},
        **record["settings"],
        "seed": seed,
        "best_epoch": best_epoch,
        "training_seconds": round(record["training_seconds"], 1),
        "device": str(dev),
    }
    write_bundle(
        out,
        network=network,
        network_def=net_config,
        inference_config=inference_config(spacing_mm=spacing_mm, window_hu=window_hu, roi_size=patch_size,
                                          sw_batch_size=sw_batch_size,
                                          inside_labels=_values(labels, INSIDE_BODY_LABELS),
                                          body_labels=_values(labels, BODY_TISSUE_LABELS)),
        metadata=_metadata(labels=labels, spacing_mm=spacing_mm, window_hu=window_hu, patch_size=patch_size,
                           evaluation=evaluation, training=training),
        example_input=torch.rand(1, 1, *patch_size),
    )
    record["bundle"] = str(out)
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot_training(record, labels, out / "plots")
    _plot_validation_slices(network, val_ds, inferer, labels, dev, out / "plots" / "validation_slices.png")
    return record


class _Optimisation:
    """AdamW with a one-cycle learning rate (and AMP loss scaling on CUDA): one training epoch at a time."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, use_amp: bool) -> None:
        self.optimizer, self.scheduler, self.scaler, self.use_amp = optimizer, scheduler, scaler, use_amp

    @classmethod
    def for_network(
        cls, network: torch.nn.Module, learning_rate: float, total_steps: int, use_amp: bool
    ) -> "_Optimisation":
        optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=total_steps, pct_start=min(0.1, 50 / total_steps + 0.01),
        )
        return cls(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_amp), use_amp)

    def epoch(
        self,
        network: torch.nn.Module,
        loader: Any,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        targets_of: Callable[[torch.Tensor], torch.Tensor],
        dev: torch.device,
        *,
        epoch: int,
        progress: bool,
    ) -> dict[str, Any]:
        """One pass over ``loader``; ``targets_of`` turns a batch's label patches into the loss's targets.

        Returns the epoch's record entry (losses, learning rate, seconds).
        """
        from tqdm.auto import tqdm

        started = time.perf_counter()
        network.train()
        losses = []
        for batch in tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress):
            # Plain tensors: MetaTensor's per-operation metadata handling costs ~10% of a CPU step.
            images, targets = _plain(batch["image"]).to(dev), targets_of(_plain(batch["label"])).to(dev)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.use_amp):
                loss = loss_fn(network(images), targets)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(float(loss.detach()))
        return {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "step_losses": losses,
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "train_seconds": time.perf_counter() - started,
        }


def _plain(tensor: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or anything tensor-like) as a plain torch.Tensor."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


@torch.no_grad()
def _predict(network: torch.nn.Module, image: torch.Tensor, inferer: Any, dev: torch.device, use_amp: bool) -> np.ndarray:
    """Argmax label map (x, y, z) of a channel-first preprocessed image."""
    network.eval()
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
        logits = inferer(_plain(image)[None].to(dev), network)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


def _validate(
    network: torch.nn.Module, val_ds: Any, inferer: Any, labels: Sequence[LabelSpec], dev: torch.device, use_amp: bool
) -> dict[str, float]:
    """Mean Dice per label name over the validation cases (in the preprocessed grid)."""
    per_label: dict[str, list[float]] = {spec.name: [] for spec in labels}
    for item in val_ds:
        pred = _predict(network, item["image"], inferer, dev, use_amp)
        ref = np.asarray(item["label"][0]).astype(np.uint8)
        scores = dice_per_label(pred, ref, [spec.value for spec in labels])
        for spec in labels:
            per_label[spec.name].append(scores[spec.value])
    return {name: float(np.mean(values)) for name, values in per_label.items()}


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _plot_training(record: Mapping[str, Any], labels: Sequence[LabelSpec], plots_dir: Path) -> None:
    plt = _plt()
    plots_dir.mkdir(parents=True, exist_ok=True)
    epochs = [e["epoch"] for e in record["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [e["loss"] for e in record["epochs"]], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("DiceCE loss (training)")
    ax.set_title("Segmentation training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots_dir / "loss.png", dpi=100)
    plt.close(fig)

    validated = [e for e in record["epochs"] if "validation_dice" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in labels:
        ax.plot([e["epoch"] for e in validated], [e["validation_dice"][spec.name] for e in validated],
                marker="o", label=spec.name, color=np.asarray(spec.color_rgb) / 255.0)
    ax.plot([e["epoch"] for e in validated], [e["validation_mean_dice"] for e in validated],
            marker="s", color="black", linestyle="--", label="mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice (validation)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Validation Dice per label")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(plots_dir / "dice.png", dpi=100)
    plt.close(fig)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """An axial RAS (x, y) slice as a radiological image: patient right on the left, anterior up."""
    return np.swapaxes(np.asarray(slice_xy), 0, 1)[::-1, ::-1]


def _blank_grid(plt: Any, rows: int, columns: int, cell_inches: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes[row][column]) of a grid of panels, axes hidden: panels left empty stay blank."""
    width, height = cell_inches
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _save_figure(plt: Any, fig: Any, path: Path, dpi: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _draw_ct(ax: Any, slice_xy: np.ndarray, window: tuple[float, float]) -> None:
    """An axial RAS slice of HU on ``ax``, radiologically, in the (level, width) window."""
    level, width = window
    ax.imshow(_display(slice_xy), cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
              interpolation="nearest")


def _label_rgba(labelmap: np.ndarray, labels: Sequence[LabelSpec], alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros((*labelmap.shape, 4), dtype=np.float32)
    for spec in labels:
        mask = labelmap == spec.value
        rgba[mask, :3] = np.asarray(spec.color_rgb, dtype=np.float32) / 255.0
        rgba[mask, 3] = alpha
    return rgba


def _slices_of_interest(ref: np.ndarray, count: int, nodule_value: int | None) -> list[int]:
    """Axial slice indices: through the largest nodule cross-sections first, then evenly through the body."""
    depth = ref.shape[2]
    chosen: list[int] = []
    if nodule_value is not None:
        areas = (ref == nodule_value).sum(axis=(0, 1))
        for z in np.argsort(areas)[::-1]:
            if areas[z] == 0 or len(chosen) >= max(1, count // 2):
                break
            if all(abs(int(z) - c) > 3 for c in chosen):
                chosen.append(int(z))
    body = np.flatnonzero((ref > 0).any(axis=(0, 1)))
    lo, hi = (int(body[0]), int(body[-1])) if body.size else (0, depth - 1)
    for z in np.linspace(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), count).round().astype(int):
        if len(chosen) >= count:
            break
        if all(abs(int(z) - c) > 1 for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def _overlay_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], labels: Sequence[LabelSpec], path: Path,
    *, window: tuple[float, float] = _LUNG_WINDOW, slices_per_row: int = 4,
) -> None:
    """rows: (title, CT in HU, predicted labels, reference labels), all RAS (x, y, z)."""
    plt = _plt()
    from matplotlib.patches import Patch

    nodule = next((s.value for s in labels if s.name == "nodule"), None)
    fig, axes = _blank_grid(plt, len(rows), slices_per_row, (3.2, 3.4))
    for r, (title, ct, pred, ref) in enumerate(rows):
        for c, z in enumerate(_slices_of_interest(ref, slices_per_row, nodule)):
            ax = axes[r][c]
            _draw_ct(ax, ct[:, :, z], window)
            ax.imshow(_display(_label_rgba(pred[:, :, z], labels)), interpolation="nearest")
            ref_slice = _display(ref[:, :, z])
            for spec in labels:
                mask = (ref_slice == spec.value).astype(np.float32)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=[np.asarray(spec.color_rgb) / 255.0], linewidths=0.8)
            ax.set_title(f"{title} z={z}", fontsize=8)
    handles = [Patch(color=np.asarray(s.color_rgb) / 255.0, label=s.name) for s in labels]
    fig.legend(handles=handles, loc="lower center", ncol=len(labels), fontsize=8,
               title="fill: prediction, line: reference", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save_figure(plt, fig, path)


def _plot_validation_slices(
    network: torch.nn.Module, val_ds: Any, inferer: Any, labels: Sequence[LabelSpec], dev: torch.device, path: Path,
    *, window_hu: Sequence[float] = DEFAULT_WINDOW_HU, max_cases: int = 2,
) -> None:
    rows = []
    lo, hi = float(window_hu[0]), float(window_hu[1])
    for i in range(min(max_cases, len(val_ds))):
        item = val_ds[i]
        pred = _predict(network, item["image"], inferer, dev, dev.type == "cuda")
        ct = np.asarray(item["image"][0]) * (hi - lo) + lo  # back to HU (clipped to the window)
        rows.append((f"validation {i}", ct, pred, np.asarray(item["label"][0]).astype(np.uint8)))
    _overlay_figure(rows, labels, path)


# --------------------------------------------------------------------------- evaluation


def _load_bundle(bundle_dir: Path, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """The bundle's ConfigParser (bundle_root, device set) and its network with models/model.pt loaded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = f"$torch.device({str(device)!r})"
    network = parser.get_parsed_content("network")
    state = torch.load(bundle_dir / "models" / "model.pt", map_location=device, weights_only=True)
    if isinstance(state.get("model"), Mapping):  # a CheckpointSaver-style {"model": state_dict}
        state = state["model"]
    network.load_state_dict(state)
    network.eval()
    return parser, network


def evaluate_segmentation(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    *,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    record: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a segmentation bundle on every labelled case of ``dataset_dir`` and measure Dice per label.

    The bundle is loaded through MONAI's bundle API (``ConfigParser`` on its
    ``configs/inference.json``, weights from ``models/model.pt``) and run with its own
    preprocessing, inferer and postprocessing (all but ``SaveImaged``), so the
    prediction is compared with the reference label map in the case's original
    grid. ``dice`` is the mean over cases of each case's Dice (a label absent from
    both scores 1, see :func:`training.metrics.dice_per_label`); ``dice_pooled`` the
    Dice of all cases' voxels taken together; ``dice_cases_with_label`` the mean over
    the cases whose reference holds the label, and ``false_positive_cases`` how many
    cases without it got some of it predicted. Labels of the lesion category
    (SNOMED CT 49755003) also get lesion-wise figures (``lesions``, see
    :func:`training.metrics.lesion_summary`): which lesions were found, their own Dice
    and the false-positive lesions, by lesion size. Writes ``segmentation_evaluation.json``,
    ``overlay.png`` and (with a lesion label) ``lesions.png`` to ``out_dir`` (default
    ``BUNDLE/evaluation``); with ``record`` the figures also go into the bundle's metadata
    (``dicom_node.evaluation.held_out``).
    """
    from monai.transforms import Compose, LoadImage, Orientation, SaveImaged
    from tqdm.auto import tqdm

    bundle, dataset_dir = Path(bundle_dir), Path(dataset_dir)
    out = Path(out_dir) if out_dir is not None else bundle / "evaluation"
    dev = torch.device(device)
    meta = read_bundle_metadata(bundle)
    node = meta.get("dicom_node", {})
    labels = [
        (int(e["value"]), str(e["name"]), tuple(e.get("color_rgb", (255, 0, 0)))) for e in node.get("labels", [])
    ]
    if not labels:
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = [(int(k), str(v), (255, 0, 0)) for k, v in channels.items() if int(k) != 0]
    lesion_names = [str(e["name"]) for e in node.get("labels", [])
                    if (e.get("category") or {}).get("value") == LESION_CATEGORY_VALUE]
    specs = [_PlotLabel(v, n, c) for v, n, c in labels]
    parser, network = _load_bundle(bundle, dev)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveImaged)])
    image_key = parser.get("image_key", "image")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    ras = Orientation(axcodes="RAS")

    cases = _cases(dataset_dir, include_test=True)
    per_case = []
    lesions: dict[str, list[LesionMatch]] = {name: [] for name in lesion_names}
    gallery: dict[str, list[LesionCrop]] = {band: [] for band in lesion_band_names()}
    pooled = {name: np.zeros(2, dtype=np.int64) for _, name, _ in labels}  # (2 |P & R|, |P| + |R|) summed
    rows = []
    started = time.perf_counter()
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        data = preprocessing({image_key: case["image"]})
        with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            data["pred"] = inferer(data[image_key][None].to(dev), network)[0]
        data = postprocessing(data)
        pred = data["pred"]
        ref = load(case["label"])
        if tuple(pred.shape) != tuple(ref.shape):
            raise ValueError(f"{case['name']}: prediction shape {tuple(pred.shape)} != label shape {tuple(ref.shape)}")
        pred_np = np.asarray(pred.cpu()[0]).round().astype(np.uint8)
        ref_np = np.asarray(ref[0]).round().astype(np.uint8)
        scores = dice_per_label(pred_np, ref_np, [v for v, _, _ in labels])
        per_case.append({"case": case["name"], "dice": {n: scores[v] for v, n, _ in labels},
                         "reference_voxels": {n: int((ref_np == v).sum()) for v, n, _ in labels},
                         "lesions": {}, "false_positive_lesions": {}})
        pred_ras, ref_ras = ras(pred.cpu()), ras(ref)
        # The CT is read only for pictures (lesion crops, the first overlays), and then once per case.
        ct_ras = functools.cache(lambda path=case["image"]: np.asarray(ras(load(path))[0]))
        _record_lesions(case["name"], pred_ras, ref_ras, ct_ras, labels,
                        lesions, per_case[-1], gallery, lesion_names[0] if lesion_names else None)
        for value, name, _ in labels:
            p, r = pred_np == value, ref_np == value
            pooled[name] += np.array([2 * np.logical_and(p, r).sum(), p.sum() + r.sum()], dtype=np.int64)
        if len(rows) < 3:
            rows.append((case["name"], ct_ras(),
                         np.asarray(pred_ras[0]).round().astype(np.uint8),
                         np.asarray(ref_ras[0]).round().astype(np.uint8)))
    dice = {n: float(np.mean([c["dice"][n] for c in per_case])) for _, n, _ in labels}
    # Per-case Dice only over the cases whose reference has the label (the usual lesion Dice), and how
    # many cases without it got some predicted anyway (false-positive cases).
    with_label = {
        n: [c["dice"][n] for c in per_case if c["reference_voxels"][n] > 0] for _, n, _ in labels
    }
    result = {
        "kind": "segmentation",
        "bundle": str(bundle),
        "dataset": str(dataset_dir),
        "device": str(dev),
        "cases": len(per_case),
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))),
        # Dice of all cases' voxels together: large structures weigh more; no case is "empty".
        "dice_pooled": {n: float(a / b) if b else 1.0 for n, (a, b) in pooled.items()},
        "dice_cases_with_label": {n: float(np.mean(v)) if v else None for n, v in with_label.items()},
        "cases_with_label": {n: len(v) for n, v in with_label.items()},
        "false_positive_cases": {
            n: sum(1 for c in per_case if c["reference_voxels"][n] == 0 and c["dice"][n] < 1.0) for _, n, _ in labels
        },
        "lesions": {n: lesion_summary(found, [c["false_positive_lesions"][n] for c in per_case])
                    for n, found in lesions.items()},
        "per_case": per_case,
        "seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmentation_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    _overlay_figure(rows, specs, out / "overlay.png")
    if lesion_names:
        plot_lesion_gallery([(f"{lesion_names[0]}s {band}", crops) for band, crops in gallery.items()],
                            out / "lesions.png", color_rgb=next(c for _, n, c in labels if n == lesion_names[0]))
    if record:
        from training.bundle import record_evaluation

        record_evaluation(bundle, "held_out",
                          {k: result[k] for k in ("dataset", "cases", "dice", "mean_dice", "dice_pooled",
                                                  "dice_cases_with_label", "cases_with_label",
                                                  "false_positive_cases", "lesions")})
    return result


def _record_lesions(
    case_name: str, pred_ras: Any, ref_ras: Any, load_ct: Callable[[], np.ndarray],
    labels: Sequence[tuple[int, str, Any]], lesions: dict[str, list[LesionMatch]], case_record: dict[str, Any],
    gallery: dict[str, list[LesionCrop]], gallery_label: str | None, per_band: int = 4,
) -> None:
    """One case's lesion-wise matches of every lesion label into ``lesions`` and ``case_record``.

    ``pred_ras`` and ``ref_ras`` are the RAS-oriented label maps (MetaTensors), so each
    lesion's centre is given in RAS millimetres. The first ``per_band`` lesions of
    ``gallery_label`` in each size band go to ``gallery`` as crops of the RAS CT
    array that ``load_ct`` gives (called only then).
    """
    pred_np = np.asarray(pred_ras[0]).round().astype(np.uint8)
    ref_np = np.asarray(ref_ras[0]).round().astype(np.uint8)
    affine = np.asarray(ref_ras.affine, dtype=np.float64)
    for value, name, _ in labels:
        if name not in lesions:
            continue
        matches, false_positives = lesion_matches(pred_np == value, ref_np == value,
                                                  [float(v) for v in ref_ras.pixdim])
        lesions[name] += matches
        case_record["lesions"][name] = [
            {**m.to_dict(), "centre_ras_mm": [round(float(v), 1) for v in (affine @ [*m.centre_voxel, 1.0])[:3]]}
            for m in matches
        ]
        case_record["false_positive_lesions"][name] = false_positives
        if name != gallery_label:
            continue
        for m in matches:
            band = gallery.get(lesion_band(m.diameter_mm) or "")
            if band is None or len(band) >= per_band:
                continue
            band.append(lesion_crop(load_ct(), ref_np == value, pred_np == value, m.centre_voxel,
                                    f"{case_name} {m.diameter_mm:.1f} mm, Dice {m.dice:.2f}"))


class _PlotLabel:
    """The (value, name, color_rgb) of a label read back from bundle metadata, for the plots."""

    def __init__(self, value: int, name: str, color_rgb: Sequence[int]) -> None:
        self.value, self.name, self.color_rgb = value, name, tuple(color_rgb)
