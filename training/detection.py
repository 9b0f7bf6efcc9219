"""3D lung nodule detection: training, export and evaluation of the CenterNet detector.

Why: the node's detection worker runs a MONAI bundle that finds lung nodules in a CT
and reports each as a box with a class and a confidence. This module trains such a
network on a Decathlon-layout dataset with a MONAI detection box list (the synthetic
chest phantoms of :mod:`training.phantoms`, or LUNA16-like data), exports it as a
bundle with :func:`training.bundle.write_bundle` and measures bundles by LUNA16-style
FROC (:func:`training.metrics.froc`).

The network, its configuration, pre-processing and decoding are what the worker
serves, so they live in :mod:`workers.models.detection_network` (serving never
imports this package) and are imported from there. Training adds:

* the penalty-reduced focal loss of CenterNet on Gaussian heatmap targets (sigma
  from the nodule size) plus L1 losses on size and offset at the centre voxels
  (:func:`centernet_targets`, :func:`centernet_loss`);
* patches that mostly contain a nodule, a quarter centred on false positives mined
  from the training cases during training (vessels seen end-on are the typical
  ones), with random flips;
* the bundle's ``configs/inference.json`` (:func:`inference_config`, key ``detection``:
  the :class:`~workers.models.detection_network.DetectorConfig`) and metadata;
* FROC evaluation of a bundle on a dataset (:func:`evaluate_detection`).

Conventions: those of :mod:`workers.models.detection_network` (network grid RAS
x, y, z; :func:`~workers.models.detection_network.detect` takes an axial LPS series
and reports LPS mm). Box lists (``boxes.json``) are MONAI detection box lists:
``cccwhd`` in RAS world mm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from training.bundle import target_name
from training.metrics import DEFAULT_FP_RATES, FrocResult, Reference, froc

# CenterNetDetector also stays importable here: bundles exported before the network moved to workers.models name
# `training.detection.CenterNetDetector` as their network_def target, and load where this package is installed.
from workers.models.detection_network import (
    HEATMAP_CHANNEL,
    N_OUTPUT_CHANNELS,
    OFFSET_CHANNELS,
    SIZE_CHANNELS,
    CenterNetDetector,
    Detection,
    DetectorConfig,
    NetworkGrid,
    build_network,
    decode_heads,
    detections_on_grid,
    load_detector,
    lps_to_ras,
    predict_heads,
    ras_to_lps,
    to_network_grid,
)

__all__ = [
    "CenterNetDetector",
    "DetectionCase",
    "Heads",
    "case_from_volume",
    "centernet_loss",
    "centernet_targets",
    "evaluate_detection",
    "inference_config",
    "load_detection_cases",
    "network_def",
    "train_detection",
]

logger = logging.getLogger(__name__)

#: Diameter (mm) from which nodules count for the "large" FROC figures (LUNA16's >= 6 mm).
LARGE_NODULE_MM = 6.0


def network_def(config: DetectorConfig) -> dict[str, Any]:
    """MONAI config that rebuilds the network (the bundle's ``network_def``)."""
    return {
        "_target_": target_name(CenterNetDetector),
        "in_channels": 1,
        "features": [int(f) for f in config.features],
        "head_channels": int(config.head_channels),
        "output_stride": int(config.output_stride),
    }


# --------------------------------------------------------------------------- targets, loss, decoding


@dataclass
class Heads:
    """Training targets on the output grid (numpy, spatial axes x, y, z)."""

    heatmap: npt.NDArray[np.float32]  # (X, Y, Z) in [0, 1], exactly 1 at centre voxels
    size: npt.NDArray[np.float32]  # (3, X, Y, Z) log size mm at centre voxels
    offset: npt.NDArray[np.float32]  # (3, X, Y, Z) centre - centre voxel (output voxels)
    mask: npt.NDArray[np.float32]  # (X, Y, Z) 1 at centre voxels


def centernet_targets(
    output_shape: Sequence[int],
    centres_vox: npt.ArrayLike,
    sizes_mm: npt.ArrayLike,
    spacing_mm: Sequence[float],
    *,
    output_stride: int = 2,
    sigma_scale: float = 0.5,
    min_sigma: float = 0.8,
) -> Heads:
    """Heatmap, size and offset targets of objects on an output grid.

    ``centres_vox`` (N, 3) are continuous indices of the *input* grid (x, y, z), which
    may lie outside it (then only the Gaussian's tail is drawn); ``sizes_mm`` (N, 3)
    are box sizes in mm; ``spacing_mm`` the input grid's spacing. Each object's
    centre voxel is ``round(centre / output_stride)``; its Gaussian has, per axis,
    ``sigma = max(min_sigma, sigma_scale * size / 2 / (spacing * stride))`` output voxels.
    """
    shape = tuple(int(s) for s in output_shape)
    heat = np.zeros(shape, dtype=np.float32)
    size = np.zeros((3, *shape), dtype=np.float32)
    offset = np.zeros((3, *shape), dtype=np.float32)
    mask = np.zeros(shape, dtype=np.float32)
    centres = np.asarray(centres_vox, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(sizes_mm, dtype=np.float64).reshape(-1, 3)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    for centre, extent in zip(centres, sizes):
        c_out = centre / output_stride
        peak = np.floor(c_out + 0.5).astype(np.int64)
        sigma = np.maximum(min_sigma, sigma_scale * (extent / 2.0) / (spacing * output_stride))
        reach = np.ceil(3.0 * sigma).astype(np.int64)
        lo = np.maximum(peak - reach, 0)
        hi = np.minimum(peak + reach + 1, shape)
        if np.any(hi <= lo):
            continue
        axes = [
            np.exp(-0.5 * ((np.arange(lo[a], hi[a]) - peak[a]) / sigma[a]) ** 2).astype(np.float32) for a in range(3)
        ]
        gauss = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        np.maximum(heat[window], gauss, out=heat[window])
        if np.all(peak >= 0) and np.all(peak < shape):
            p = (int(peak[0]), int(peak[1]), int(peak[2]))
            mask[p] = 1.0
            heat[p] = 1.0
            offset[(slice(None), *p)] = (c_out - peak).astype(np.float32)
            size[(slice(None), *p)] = np.log(np.maximum(extent, 1e-3)).astype(np.float32)
    return Heads(heatmap=heat, size=size, offset=offset, mask=mask)


def centernet_loss(
    output: torch.Tensor,
    heatmap: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    *,
    size_weight: float = 1.0,
    offset_weight: float = 1.0,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> dict[str, torch.Tensor]:
    """CenterNet loss of a batch: penalty-reduced focal loss + L1 on size and offset at centres.

    ``output`` (B, 7, X, Y, Z) as from :class:`~workers.models.detection_network.CenterNetDetector`; ``heatmap`` and
    ``mask`` (B, X, Y, Z); ``size``, ``offset`` (B, 3, X, Y, Z). Sums are normalised by
    the number of centre voxels in the batch (at least 1). Computed in float32.
    """
    output = output.float()
    logits = output[:, HEATMAP_CHANNEL]
    pos = mask
    n_pos = pos.sum().clamp(min=1.0)
    prob = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    pos_term = torch.pow(1.0 - prob, alpha) * log_p * pos
    neg_term = torch.pow(1.0 - heatmap, beta) * torch.pow(prob, alpha) * log_not_p * (1.0 - pos)
    heat_loss = -(pos_term.sum() + neg_term.sum()) / n_pos
    m = pos.unsqueeze(1)
    size_loss = (torch.abs(output[:, 1:4] - size) * m).sum() / n_pos
    offset_loss = (torch.abs(output[:, 4:7] - offset) * m).sum() / n_pos
    total = heat_loss + size_weight * size_loss + offset_weight * offset_loss
    return {"loss": total, "heatmap": heat_loss, "size": size_loss, "offset": offset_loss}


# --------------------------------------------------------------------------- data


@dataclass
class DetectionCase:
    """One case on the network grid: normalised RAS image and its nodules."""

    name: str
    image: torch.Tensor  # (X, Y, Z) float32 in [0, 1]
    grid: NetworkGrid
    centres_vox: npt.NDArray[np.float64]  # (N, 3) continuous network-grid indices (x, y, z)
    sizes_mm: npt.NDArray[np.float64]  # (N, 3) box sizes (x, y, z) in mm
    references: list[Reference] = field(default_factory=list)  # LPS, for FROC
    split: str = "training"  # the box-list section it came from


def case_from_volume(
    name: str,
    volume_hu: npt.ArrayLike,
    spacing_mm: Sequence[float],
    origin_xyz_mm: Sequence[float],
    references: Sequence[Reference],
    config: DetectorConfig,
) -> DetectionCase:
    """A :class:`DetectionCase` from a ``(z, y, x)`` HU array (axial, LPS) and its reference nodules (LPS)."""
    image, grid = to_network_grid(volume_hu, spacing_mm, origin_xyz_mm, config)
    centres_ras = lps_to_ras(np.asarray([r.centre_xyz_mm for r in references], dtype=np.float64).reshape(-1, 3))
    sizes = np.asarray([[r.diameter_mm] * 3 for r in references], dtype=np.float64).reshape(-1, 3)
    return DetectionCase(
        name=name,
        image=image,
        grid=grid,
        centres_vox=grid.to_index(centres_ras).reshape(-1, 3),
        sizes_mm=sizes,
        references=list(references),
    )


def load_detection_cases(
    dataset_dir: str | Path, config: DetectorConfig, *, splits: Sequence[str] | None = None
) -> list[DetectionCase]:
    """The cases of a dataset's box list (``boxes.json``), on the network grid.

    Images are read with :func:`training.data.decathlon.load_case` (paths relative
    to ``dataset_dir``), boxes (``cccwhd`` RAS world mm, class 0 = nodule) with
    :func:`training.data.boxes.read_box_list`. ``splits`` picks box-list sections
    (default: all, in file order). A reference's diameter is the list's
    ``diameter_mm`` when present, else the mean box extent.
    """
    from training.data.boxes import NODULE_CLASS, read_box_list
    from training.data.decathlon import load_case

    dataset_dir = Path(dataset_dir)
    box_path = dataset_dir / "boxes.json"
    box_list = read_box_list(box_path)
    cases = []
    for split, entries in box_list.items():
        if splits is not None and split not in splits:
            continue
        for entry in entries:
            image_path = Path(entry.image)
            if not image_path.is_absolute():
                image_path = dataset_dir / image_path
            loaded = load_case(image_path)
            image, grid = to_network_grid(loaded.volume_hu, loaded.spacing_mm, loaded.origin_xyz_mm, config)
            keep = [i for i, label in enumerate(entry.label) if label == NODULE_CLASS]
            boxes = np.asarray([entry.box[i] for i in keep], dtype=np.float64).reshape(-1, 6)
            diameters = [
                float(entry.diameter_mm[i]) if entry.diameter_mm else float(np.mean(boxes[n, 3:]))
                for n, i in enumerate(keep)
            ]
            references = [
                Reference(centre_xyz_mm=tuple(float(v) for v in ras_to_lps(b[:3])), diameter_mm=d)
                for b, d in zip(boxes, diameters)
            ]
            cases.append(
                DetectionCase(
                    name=_case_name(image_path),
                    image=image,
                    grid=grid,
                    centres_vox=grid.to_index(boxes[:, :3]).reshape(-1, 3),
                    sizes_mm=boxes[:, 3:],
                    references=references,
                    split=split,
                )
            )
    if not cases:
        raise ValueError(f"{box_path} lists no case" + (f" in {list(splits)}" if splits else ""))
    return cases


def _case_name(path: str | Path) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _crop(image: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``image[start : start + size]`` per axis, padded with 0 (air) outside."""
    out = torch.zeros(tuple(int(s) for s in size), dtype=image.dtype)
    src, dst = [], []
    for a in range(3):
        lo = max(0, int(start[a]))
        hi = min(int(image.shape[a]), int(start[a]) + int(size[a]))
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[a]), hi - int(start[a])))
    out[tuple(dst)] = image[tuple(src)]
    return out


class _PatchSampler:
    """Training batches with targets: patches around a nodule (``positive_fraction``), around a
    mined false positive (``hard_negative_fraction``) or anywhere, flipped at random."""

    def __init__(self, cases: Sequence[DetectionCase], config: DetectorConfig, seed: int) -> None:
        self.cases = list(cases)
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.nodules = [(i, k) for i, c in enumerate(self.cases) for k in range(len(c.centres_vox))]
        self.patch = np.asarray(config.patch_size, dtype=np.int64)
        self.out_shape = [math.ceil(int(p) / config.output_stride) for p in config.patch_size]
        #: case index -> mined false-positive centres (network-grid voxels) of that case
        self.hard_negatives: dict[int, npt.NDArray[np.float64]] = {}
        self._hard_list: list[tuple[int, npt.NDArray[np.float64]]] = []
        self._next_mined = 0

    def set_hard_negatives(self, case_index: int, centres: npt.NDArray[np.float64]) -> None:
        self.hard_negatives[case_index] = centres
        self._hard_list = [(ci, c) for ci, cs in sorted(self.hard_negatives.items()) for c in cs]

    def next_cases_to_mine(self, count: int) -> list[int]:
        """The next ``count`` training cases, round robin."""
        n = len(self.cases)
        picked = [(self._next_mined + i) % n for i in range(min(count, n))]
        self._next_mined = (self._next_mined + len(picked)) % n
        return picked

    def _around(self, centre: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        margin = np.maximum(self.patch // 6, 1)
        where = self.rng.integers(margin, self.patch - margin)  # the point's position inside the patch
        return np.floor(centre).astype(np.int64) - where

    def _start(self) -> tuple[int, npt.NDArray[np.int64]]:
        rng, patch = self.rng, self.patch
        draw = rng.random()
        if self.nodules and draw < self.config.positive_fraction:
            ci, k = self.nodules[int(rng.integers(len(self.nodules)))]
            return ci, self._around(self.cases[ci].centres_vox[k])
        if self._hard_list and draw < self.config.positive_fraction + self.config.hard_negative_fraction:
            ci, centre = self._hard_list[int(rng.integers(len(self._hard_list)))]
            return ci, self._around(centre)
        ci = int(rng.integers(len(self.cases)))
        shape = np.asarray(self.cases[ci].image.shape, dtype=np.int64)
        high = np.maximum(shape - patch, 0) + 1
        return ci, rng.integers(0, high)

    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        images, heat, size, offset, mask = [], [], [], [], []
        cfg = self.config
        for _ in range(batch_size):
            ci, start = self._start()
            case = self.cases[ci]
            image = _crop(case.image, start, self.patch)
            centres = case.centres_vox - start[None, :]
            if cfg.flip:
                for axis in range(3):
                    if self.rng.random() < 0.5:
                        image = torch.flip(image, dims=(axis,))
                        centres[:, axis] = (self.patch[axis] - 1) - centres[:, axis]
            if cfg.intensity_jitter > 0:
                scale = 1.0 + self.rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter)
                shift = self.rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter)
                image = image * float(scale) + float(shift)
            targets = centernet_targets(
                self.out_shape,
                centres,
                case.sizes_mm,
                case.grid.spacing,
                output_stride=cfg.output_stride,
                sigma_scale=cfg.sigma_scale,
                min_sigma=cfg.min_sigma,
            )
            images.append(image[None])
            heat.append(torch.from_numpy(targets.heatmap))
            size.append(torch.from_numpy(targets.size))
            offset.append(torch.from_numpy(targets.offset))
            mask.append(torch.from_numpy(targets.mask))
        return {
            "image": torch.stack(images),
            "heatmap": torch.stack(heat),
            "size": torch.stack(size),
            "offset": torch.stack(offset),
            "mask": torch.stack(mask),
        }


@torch.no_grad()
def _mine_hard_negatives(
    network: nn.Module, sampler: _PatchSampler, config: DetectorConfig, device: torch.device
) -> int:
    """Run the network on the next few training cases and remember their best false positives.

    A peak with a score of at least ``mine_min_score`` whose centre is not inside any
    nodule (radius: half its mean box size, plus one output voxel) is a false positive;
    the ``mine_per_case`` best of a case replace those mined from it before. Returns
    how many were found.
    """
    found = 0
    for ci in sampler.next_cases_to_mine(config.mine_cases):
        case = sampler.cases[ci]
        heads = predict_heads(network, case.image, config, device=device)
        centres, _, scores = decode_heads(
            heads, output_stride=config.output_stride, score_threshold=config.mine_min_score,
            max_detections=4 * config.mine_per_case, peak_kernel=config.peak_kernel,
        )
        spacing = case.grid.spacing
        keep = []
        for centre in centres:
            if len(case.centres_vox):
                dist = np.linalg.norm((case.centres_vox - centre) * spacing, axis=1)
                reach = case.sizes_mm.mean(axis=1) / 2 + config.output_stride * float(spacing.max())
                if np.any(dist <= reach):
                    continue
            keep.append(centre)
            if len(keep) == config.mine_per_case:
                break
        sampler.set_hard_negatives(ci, np.asarray(keep, dtype=np.float64).reshape(-1, 3))
        found += len(keep)
    return found


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation); at least one of each when n >= 2."""
    if n < 2:
        raise ValueError(f"need at least 2 cases (training + validation), got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------- training


def _froc_pair(
    detections: Sequence[Sequence[Detection]], references: Sequence[Sequence[Reference]]
) -> dict[str, FrocResult]:
    return {
        "all": froc(detections, references, DEFAULT_FP_RATES),
        "large": froc(detections, references, DEFAULT_FP_RATES, min_diameter_mm=LARGE_NODULE_MM),
    }


def _evaluate_cases(
    network: nn.Module | torch.jit.ScriptModule,
    cases: Sequence[DetectionCase],
    config: DetectorConfig,
    device: str | torch.device,
) -> tuple[list[list[Detection]], dict[str, FrocResult]]:
    detections = []
    for case in cases:
        heads = predict_heads(network, case.image, config, device=device)
        detections.append(
            detections_on_grid(heads, case.grid, config, config.froc_score_threshold, config.froc_max_detections)
        )
    return detections, _froc_pair(detections, [c.references for c in cases])


def _summary(result: FrocResult) -> dict[str, Any]:
    d = result.to_dict()
    return {
        "sensitivity_at": d["sensitivity_at"],
        "cpm": d["cpm"],
        "threshold_at": d["threshold_at"],
        "n_references": d["n_references"],
        "n_scans": d["n_scans"],
    }


def train_detection(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 60,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 4,
    learning_rate: float = 2e-3,
    val_fraction: float | None = 0.2,
    progress: bool = True,
    steps_per_epoch: int = 16,
    val_interval: int = 10,
    config: DetectorConfig | None = None,
    cases: Sequence[DetectionCase] | None = None,
    calibrate_fp_per_scan: float | None = 1.0,
) -> dict[str, Any]:
    """Train the CenterNet detector on ``dataset_dir`` and write its bundle to ``out_dir``.

    ``dataset_dir``: Decathlon layout with ``boxes.json``; every listed case is pooled
    and split at random (``seed``) by ``val_fraction``, or, with ``val_fraction=None``,
    the box list's own "validation" section is the validation set. An epoch is ``steps_per_epoch``
    optimiser steps of ``batch_size`` patches (AdamW, warm-up then cosine decay of
    ``learning_rate``). Every ``val_interval`` epochs (and after the last) the whole
    validation volumes are run and scored by FROC; the checkpoint with the best
    sum of the CPMs of nodules >= 6 mm and of all nodules (ties: the later) is
    exported. Every ``config.mine_interval`` epochs the network runs on a few
    training cases in turn and their best false positives become centres of
    hard-negative patches.
    The exported ``score_threshold`` (the product's operating point) is calibrated on
    that validation: the lowest score with at most ``calibrate_fp_per_scan`` false
    positives per scan (all nodules counted; None keeps ``config.score_threshold``).
    Writes ``out_dir``: the bundle, ``metrics.json`` and ``plots/``; returns the
    metrics. ``cases`` (already loaded :class:`DetectionCase` s) replaces reading the
    dataset. Deterministic for a given ``seed`` on CPU.
    """
    from monai.utils import set_determinism
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1 or steps_per_epoch < 1 or val_interval < 1:
        raise ValueError("epochs, batch_size, steps_per_epoch and val_interval must be >= 1")
    config = config or DetectorConfig()
    out = Path(out_dir)
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    set_determinism(seed=seed)

    load_start = time.perf_counter()
    all_cases = list(cases) if cases is not None else load_detection_cases(dataset_dir, config)
    if val_fraction is None:
        train_cases = [c for c in all_cases if c.split != "validation"]
        val_cases = [c for c in all_cases if c.split == "validation"]
        if not train_cases or not val_cases:
            raise ValueError("val_fraction=None needs both training and validation cases in boxes.json")
    else:
        train_idx, val_idx = _split(len(all_cases), val_fraction, seed)
        train_cases = [all_cases[i] for i in train_idx]
        val_cases = [all_cases[i] for i in val_idx]
    load_seconds = time.perf_counter() - load_start
    logger.info("detection: %d training, %d validation cases", len(train_cases), len(val_cases))

    network = build_network(config).to(dev)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, min(total_steps // 20, 100))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    sampler = _PatchSampler(train_cases, config, seed)

    record: dict[str, Any] = {
        "kind": "detection",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dataset": str(dataset_dir),
        "train_cases": [c.name for c in train_cases],
        "validation_cases": [c.name for c in val_cases],
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "learning_rate": learning_rate,
            "val_fraction": val_fraction,
            "val_interval": val_interval,
            "amp": use_amp,
            "detector": config.to_dict(),
        },
        "load_seconds": load_seconds,
        "epochs": [],
        "validations": [],
    }
    best_key: tuple[float, float, int] = (-math.inf, -math.inf, 0)
    best_state: dict[str, torch.Tensor] | None = None
    best_detections: list[list[Detection]] = []
    best_froc: dict[str, FrocResult] = {}
    started = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="detection", unit="epoch", disable=not progress)
    for epoch in bar:
        epoch_start = time.perf_counter()
        network.train()
        sums = {"loss": 0.0, "heatmap": 0.0, "size": 0.0, "offset": 0.0}
        for _ in range(steps_per_epoch):
            batch = {k: v.to(dev) for k, v in sampler.batch(batch_size).items()}
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                output = network(batch["image"])
            losses = centernet_loss(
                output, batch["heatmap"], batch["size"], batch["offset"], batch["mask"],
                size_weight=config.size_loss_weight, offset_weight=config.offset_loss_weight,
            )
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key in sums:
                sums[key] += float(losses[key].detach())
        entry: dict[str, Any] = {
            "epoch": epoch,
            **{key: value / steps_per_epoch for key, value in sums.items()},
            "learning_rate": float(scheduler.get_last_lr()[0]),
            "train_seconds": time.perf_counter() - epoch_start,
        }
        if epoch % val_interval == 0 or epoch == epochs:
            val_start = time.perf_counter()
            detections, result = _evaluate_cases(network, val_cases, config, dev)
            validation = {
                "epoch": epoch,
                "seconds": time.perf_counter() - val_start,
                "all": result["all"].to_dict(),
                "large": result["large"].to_dict(),
            }
            record["validations"].append(validation)
            entry["validation_cpm"] = result["all"].cpm
            entry["validation_cpm_large"] = result["large"].cpm
            # CPM >= 6 mm plus CPM of all nodules: the larger count makes the choice less noisy
            key = (_nan_low(result["large"].cpm) + _nan_low(result["all"].cpm), _nan_low(result["large"].cpm), epoch)
            if key >= best_key:
                best_key = key
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
                best_detections, best_froc = detections, result
        if config.hard_negative_fraction > 0 and epoch % config.mine_interval == 0 and epoch < epochs:
            mine_start = time.perf_counter()
            entry["hard_negatives_found"] = _mine_hard_negatives(network, sampler, config, dev)
            entry["hard_negative_pool"] = len(sampler._hard_list)
            entry["mining_seconds"] = time.perf_counter() - mine_start
        entry["seconds"] = time.perf_counter() - epoch_start
        record["epochs"].append(entry)
        logger.info(
            "detection epoch %d/%d: loss %.4f (heatmap %.4f, size %.4f, offset %.4f), %.1f s%s",
            epoch, epochs, entry["loss"], entry["heatmap"], entry["size"], entry["offset"], entry["seconds"],
            f", validation CPM {entry['validation_cpm']:.3f}, >= {LARGE_NODULE_MM:g} mm "
            f"{entry['validation_cpm_large']:.3f}" if "validation_cpm" in entry else "",
        )
        bar.set_postfix(loss=f"{entry['loss']:.3f}", cpm6=f"{entry.get('validation_cpm_large', float('nan')):.3f}")
    record["training_seconds"] = time.perf_counter() - started
    train_times = [e["train_seconds"] for e in record["epochs"]]
    record["seconds_per_epoch"] = float(np.mean(train_times))
    record["seconds_per_validation"] = float(np.mean([v["seconds"] for v in record["validations"]]))
    record["best_epoch"] = best_key[2]
    record["validation"] = {
        "epoch": best_key[2],
        "cases": len(val_cases),
        "all": _summary(best_froc["all"]),
        "large": _summary(best_froc["large"]),
        "large_min_diameter_mm": LARGE_NODULE_MM,
    }

    assert best_state is not None  # the last epoch always validates
    network.load_state_dict(best_state)
    network.eval()
    export_config = config
    if calibrate_fp_per_scan is not None:
        threshold = best_froc["all"].threshold_at(calibrate_fp_per_scan)
        if threshold is not None:
            threshold = float(min(max(threshold, config.froc_score_threshold), 0.95))
            export_config = dataclasses.replace(config, score_threshold=threshold)
    record["operating_point"] = {
        "fp_per_scan_target": calibrate_fp_per_scan,
        "score_threshold": export_config.score_threshold,
        "calibrated": export_config is not config,
        "validation_sensitivity_all": best_froc["all"].sensitivity_at(calibrate_fp_per_scan or 1.0),
        "validation_sensitivity_large": best_froc["large"].sensitivity_at(calibrate_fp_per_scan or 1.0),
    }
    bundle_info = _write_detection_bundle(out, network.to("cpu"), export_config, record, dataset_dir)
    record["bundle"] = bundle_info
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    plots = out / "plots"
    _plot_losses(record, plots / "loss.png")
    _plot_froc({"all nodules": best_froc["all"], f">= {LARGE_NODULE_MM:g} mm": best_froc["large"]},
               plots / "froc.png", title=f"validation FROC (epoch {best_key[2]}, {len(val_cases)} scans)")
    _plot_detections(val_cases, best_detections, plots / "validation_detections.png")
    return record


def _nan_low(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


# --------------------------------------------------------------------------- bundle


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
            "note": "used only when the image exceeds roi_size; otherwise the whole image in one pass",
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


def _metadata(config: DetectorConfig, evaluation: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    from training.bundle import dicom_node_section
    from training.labels import label_by_name

    patch = [int(v) for v in config.patch_size]
    out_patch = [math.ceil(v / config.output_stride) for v in patch]
    return {
        "name": "Lung nodule detection (CenterNet 3D)",
        "task": "Lung nodule detection in chest CT",
        "description": (
            "A CenterNet-style 3D detector (MONAI BasicUNet trunk, heatmap / size / offset heads) that "
            "reports lung nodules as boxes with a confidence. Trained by the dicom-node training package "
            "(training/detection.py) with the penalty-reduced focal loss and L1 size/offset losses."
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
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
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
                }
            },
        },
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


def _write_detection_bundle(
    out: Path, network: nn.Module, config: DetectorConfig, record: Mapping[str, Any], dataset_dir: Any
) -> dict[str, Any]:
    from training.bundle import write_bundle

    evaluation = {
        "split": "validation",
        "note": "validation cases of the training run (used to pick the checkpoint and the score threshold)",
        **_jsonable(record["validation"]),
        "operating_point": _jsonable(record["operating_point"]),
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
        metadata=_metadata(config, evaluation, training),
        example_input=torch.rand(1, 1, *config.patch_size),
    )
    return {"path": str(out), "torchscript": (out / "models" / "model.ts").exists()}



def evaluate_detection(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    *,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    prefer_torchscript: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """FROC of a detection bundle on every case of ``dataset_dir`` (all nodules and >= 6 mm).

    Loads the bundle with :func:`~workers.models.detection_network.load_detector` (TorchScript by default), runs
    whole-volume inference on every case listed in the dataset's ``boxes.json``
    and writes ``metrics.json`` (with the full FROC curves), ``detections.json``
    and ``froc.png`` to ``out_dir`` (default: ``<bundle_dir>/evaluation``). Returns
    the summary: sensitivity at 1/8..8 FPs per scan, CPM and the score thresholds of
    those operating points, for all nodules (``all``) and >= 6 mm (``large``).
    """
    from tqdm.auto import tqdm

    network, config = load_detector(bundle_dir, device=device, prefer_torchscript=prefer_torchscript)
    out = Path(out_dir) if out_dir is not None else Path(bundle_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cases = load_detection_cases(dataset_dir, config)
    detections = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        heads = predict_heads(network, case.image, config, device=device)
        detections.append(
            detections_on_grid(heads, case.grid, config, config.froc_score_threshold, config.froc_max_detections)
        )
    result = _froc_pair(detections, [c.references for c in cases])
    seconds = time.perf_counter() - started
    summary = {
        "kind": "detection",
        "bundle": str(bundle_dir),
        "dataset": str(dataset_dir),
        "device": str(device),
        "model": "torchscript" if isinstance(network, torch.jit.ScriptModule) else "state_dict",
        "cases": len(cases),
        "seconds": round(seconds, 2),
        "seconds_per_case": round(seconds / len(cases), 3),
        "large_min_diameter_mm": LARGE_NODULE_MM,
        "all": _summary(result["all"]),
        "large": _summary(result["large"]),
        "metrics": str(out / "metrics.json"),
    }
    metrics = {**summary, "froc": {"all": result["all"].to_dict(), "large": result["large"].to_dict()}}
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    (out / "detections.json").write_text(
        json.dumps(
            {c.name: {"detections": [d.to_dict() for d in dets],
                      "references": [dataclasses.asdict(r) for r in c.references]}
             for c, dets in zip(cases, detections)},
            indent=1,
        )
        + "\n"
    )
    _plot_froc({"all nodules": result["all"], f">= {LARGE_NODULE_MM:g} mm": result["large"]}, out / "froc.png",
               title=f"FROC on {Path(dataset_dir).name} ({len(cases)} scans)")
    return _jsonable(summary)


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_losses(record: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [e["epoch"] for e in record["epochs"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "heatmap", "size", "offset"):
        ax.plot(epochs, [e[key] for e in record["epochs"]], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    vals = record["validations"]
    ax2.plot([v["epoch"] for v in vals], [v["all"]["cpm"] for v in vals], "o-", label="CPM all")
    ax2.plot([v["epoch"] for v in vals], [v["large"]["cpm"] for v in vals], "s-", label=f"CPM >= {LARGE_NODULE_MM:g} mm")
    ax2.plot([v["epoch"] for v in vals], [v["large"]["sensitivity_at"]["1"] for v in vals], "^-",
             label=f"sens @ 1 FP/scan, >= {LARGE_NODULE_MM:g} mm")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_froc(results: Mapping[str, FrocResult], path: Path, *, title: str) -> None:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, result in results.items():
        fps = np.asarray(result.curve_fps_per_scan)
        sens = np.asarray(result.curve_sensitivity)
        if fps.size:
            ax.step(np.maximum(fps, 1 / 16), sens, where="post", label=f"{name}: CPM {result.cpm:.3f}")
        ax.plot(result.fp_rates, result.sensitivities, "o", color=ax.lines[-1].get_color() if ax.lines else None)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(DEFAULT_FP_RATES))
    ax.set_xticklabels([f"{r:g}" for r in DEFAULT_FP_RATES])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_detections(
    cases: Sequence[DetectionCase], detections: Sequence[Sequence[Detection]], path: Path,
    *, max_panels: int = 6, min_score: float = 0.1,
) -> None:
    """Axial slices through validation nodules: reference circles (green), detected boxes (red, score)."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    # nodules spread over the size range (smallest to largest), not only the easy large ones
    panels = sorted(
        ((ci, k) for ci, case in enumerate(cases) for k in range(len(case.sizes_mm))),
        key=lambda p: float(cases[p[0]].sizes_mm[p[1]].mean()),
    )
    if len(panels) > max_panels:
        panels = [panels[int(round(i))] for i in np.linspace(0, len(panels) - 1, max_panels)]
    ordered = panels
    if not ordered:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.text(0.5, 0.5, "no nodule in the validation cases", ha="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    cols = min(3, len(ordered))
    rows = math.ceil(len(ordered) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    from matplotlib.patches import Circle, Rectangle

    for ax, (ci, k) in zip(axes.ravel(), ordered):
        case = cases[ci]
        image = case.image.numpy()
        nx, ny = image.shape[0], image.shape[1]
        sx, sy, sz = case.grid.spacing
        cx, cy, cz = case.centres_vox[k]
        z = int(np.clip(round(cz), 0, image.shape[2] - 1))
        # radiological display: patient right on the image's left, anterior up
        ax.imshow(image[::-1, ::-1, z].T, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ref_d = float(case.sizes_mm[k].mean())
        dz_mm = (z - cz) * sz
        r_mm = math.sqrt(max((ref_d / 2) ** 2 - dz_mm**2, 0.25))
        col, row = nx - 1 - cx, ny - 1 - cy
        ax.add_patch(Circle((col, row), r_mm / sx, fill=False, color="lime", lw=1.2))
        for det in detections[ci]:
            if det.score < min_score:
                continue
            idx = case.grid.to_index(lps_to_ras(det.centre_xyz_mm))
            size = np.asarray(det.size_xyz_mm or (det.diameter_mm,) * 3)
            if abs(idx[2] - z) * sz > size[2] / 2:
                continue
            w, h = size[0] / sx, size[1] / sy
            dc, dr = nx - 1 - idx[0], ny - 1 - idx[1]
            ax.add_patch(Rectangle((dc - w / 2, dr - h / 2), w, h, fill=False, color="red", lw=1.0))
            ax.text(dc - w / 2, dr - h / 2 - 1, f"{det.score:.2f}", color="red", fontsize=7, clip_on=True)
        half = max(30.0, 2.5 * ref_d) / sx
        ax.set_xlim(col - half, col + half)
        ax.set_ylim(row + half, row - half)
        ax.set_title(f"{case.name} z={z}: {ref_d:.1f} mm", fontsize=9)
    fig.suptitle(f"validation: reference (green), detections >= {min_score:g} (red, score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
