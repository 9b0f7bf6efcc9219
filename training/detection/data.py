"""Detection data: a dataset's cases on the network grid, and training batches of patches with their targets.

Why: the detector trains on patches that mostly hold a nodule, some centred on
false positives mined during training (vessels seen end-on are the typical
ones), the rest anywhere; :class:`PatchSampler` draws them from one seeded
generator, so a run is reproducible.

Conventions: those of :mod:`workers.models.detection_network` (network grid RAS
x, y, z). Box lists (``boxes.json``) are MONAI detection box lists: ``cccwhd`` in
RAS world mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from training.detection.loss import centernet_targets
from training.metrics import Reference
from workers.models.detection_network import DetectorConfig, NetworkGrid, lps_to_ras, ras_to_lps, to_network_grid

__all__ = ["DetectionCase", "PatchSampler", "case_from_volume", "case_name", "crop", "load_detection_cases"]


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
                    name=case_name(image_path),
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


def case_name(path: str | Path) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def crop(image: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
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


class PatchSampler:
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

    @property
    def hard_negative_count(self) -> int:
        """How many mined false positives patches can be centred on."""
        return len(self._hard_list)

    def set_hard_negatives(self, case_index: int, centres: npt.NDArray[np.float64]) -> None:
        """Replace the mined false positives of one case by ``centres`` (network-grid voxels)."""
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
        """``batch_size`` patches (``image``) with their CenterNet targets (``heatmap``, ``size``, ``offset``, ``mask``)."""
        images, heat, size, offset, mask = [], [], [], [], []
        cfg = self.config
        for _ in range(batch_size):
            ci, start = self._start()
            case = self.cases[ci]
            image = crop(case.image, start, self.patch)
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
