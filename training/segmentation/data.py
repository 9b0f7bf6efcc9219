"""Segmentation data: the preprocessing the bundle ships, the labelled cases of a dataset, the training patches.

Why: training and serving build the preprocessing from one config
(:func:`preprocessing_config`), so they cannot drift apart; the nodule branch and
the small-nodule stage read their cases and patches the same way as the
anatomy network.

Conventions: arrays inside MONAI are channel-first and RAS-oriented, spatial axes
(x, y, z); ``spacing_mm`` and ``patch_size`` are given in that order.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_SPACING_MM",
    "DEFAULT_WINDOW_HU",
    "labelled_cases",
    "parse_config",
    "plain",
    "preprocessing_config",
    "train_transforms",
]

#: Target voxel spacing (x, y, z mm): the phantoms' native grid (2.2 mm in-plane, 2.5 mm slices).
DEFAULT_SPACING_MM: tuple[float, float, float] = (2.2, 2.2, 2.5)
#: HU range scaled to 0..1 (clipped): air to dense bone.
DEFAULT_WINDOW_HU: tuple[float, float] = (-1000.0, 500.0)
#: Training patch and sliding-window size (x, y, z voxels), multiples of 8 (SegResNet's 3 downsamplings):
#: 14 x 14 x 12 cm at the default spacing, enough context to tell lung from outside air and find the heart.
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (64, 64, 48)


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


def labelled_cases(dataset_dir: Path, *, include_test: bool = False) -> list[dict[str, str]]:
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


def parse_config(config: Mapping[str, Any]) -> Any:
    """The object a MONAI config builds (``_target_`` resolved), e.g. a ``Compose`` or a network."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"imports": ["$import numpy"], "image_key": "image", "x": copy.deepcopy(dict(config))})
    return parser.get_parsed_content("x")


def train_transforms(
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


def plain(tensor: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or anything tensor-like) as a plain torch.Tensor."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
