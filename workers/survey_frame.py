"""The body-region survey's working frame: a CT volume read on a coarse grid, level by level.

Why a module of its own: every judgement of :mod:`workers.body_regions` (body, lungs,
skull, the per-level profile, the regions) is made per axial level on the same strided
grid, with the same in-plane labelling helpers. :func:`survey_step` picks the strides
(about :data:`SURVEY_VOXEL_MM` per axis, bounded cost), :class:`SurveyFrame` is the strided
volume with its superior-inferior index axis first and running inferior to superior (no
resampling: the volume may lie in any orientation), and the helpers below label, fill and
measure masks level by level on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from workers.volume import Volume

__all__ = ["CROSS", "MAX_CELLS", "MAX_LEVELS", "SQUARE", "SURVEY_VOXEL_MM", "SurveyFrame", "border_labels",
           "fill_holes_per_level", "label_table", "largest_piece_cm2", "level_runs", "main_run", "survey_step"]

#: Target edge (mm) of a survey voxel: each axis is read with the stride closest to it.
SURVEY_VOXEL_MM = 5.0
#: At most this many survey cells along an in-plane axis, and levels along the superior-inferior
#: axis (the stride grows instead).
MAX_CELLS = 128
MAX_LEVELS = 256

# In-plane neighbourhoods on the (level, row, column) working grid: no connection between levels.
_CROSS_2D = ndimage.generate_binary_structure(2, 1)
_SQUARE_2D = ndimage.generate_binary_structure(2, 2)
CROSS = np.zeros((3, 3, 3), dtype=bool)
CROSS[1] = _CROSS_2D
SQUARE = np.zeros((3, 3, 3), dtype=bool)
SQUARE[1] = _SQUARE_2D


def survey_step(volume: Volume) -> tuple[int, int, int]:
    """Strides that read ``volume`` at about :data:`SURVEY_VOXEL_MM` per axis (at least 1), and
    coarser where an in-plane axis would have more than :data:`MAX_CELLS` cells (a wide field of
    view on coarse pixels) or the superior-inferior axis more than :data:`MAX_LEVELS` levels,
    so the cost stays bounded."""
    si = int(np.argmax(np.abs(np.asarray(volume.axes, dtype=np.float64)[:, 2])))
    steps = []
    for axis, (spacing, size) in enumerate(zip(volume.spacing_mm, volume.array.shape)):
        s = float(spacing)
        step = max(1, round(SURVEY_VOXEL_MM / s)) if math.isfinite(s) and s > 0 else 1
        steps.append(max(step, -(-int(size) // (MAX_LEVELS if axis == si else MAX_CELLS))))
    return (steps[0], steps[1], steps[2])


@dataclass(frozen=True, eq=False)
class SurveyFrame:
    """The strided volume seen level by level, inferior to superior.

    ``hu[level, u, v]`` is ``volume.array[::step]`` with the superior-inferior index axis
    ``si`` moved first and, when that axis runs inferior (feet-first), reversed.
    ``source`` is ``volume.array`` (read again only by :meth:`bone_blocks`). ``z_mm[level]``:
    patient z of the level's centre; ``x_mm[u, v]``: patient x (LPS: + is the patient's
    left) of each cell at the middle level.
    """

    hu: npt.NDArray[np.float32]
    source: npt.NDArray[np.floating]
    si: int
    descending: bool
    rest: tuple[int, int]
    step: tuple[int, int, int]
    level_mm: float
    grid_mm: tuple[float, float, float]
    cell_cm2: float
    cell_ml: float
    z_mm: npt.NDArray[np.float64]
    x_mm: npt.NDArray[np.float64]
    obliquity: float

    @classmethod
    def of(cls, volume: Volume, step: tuple[int, int, int]) -> SurveyFrame:
        axes = np.asarray(volume.axes, dtype=np.float64)
        si = int(np.argmax(np.abs(axes[:, 2])))
        descending = bool(axes[si, 2] < 0)
        rest = tuple(a for a in range(3) if a != si)
        grid = np.asarray(volume.array[::step[0], ::step[1], ::step[2]], dtype=np.float32)
        hu = np.moveaxis(grid, si, 0)
        if descending:
            hu = hu[::-1]
        # Contiguous and NaN-free: the strided gather is the only pass over the source voxels.
        hu = np.nan_to_num(np.ascontiguousarray(hu), nan=-1024.0, posinf=3071.0, neginf=-1024.0)
        grid_spacing = [float(volume.spacing_mm[a]) * step[a] for a in range(3)]
        levels, nu, nv = hu.shape
        cell_cm2 = grid_spacing[rest[0]] * grid_spacing[rest[1]] / 100.0
        level_mm = grid_spacing[si] * abs(float(axes[si, 2]))
        index = np.zeros((levels, 3))
        grid_levels = np.arange(levels)[::-1] if descending else np.arange(levels)
        index[:, si] = grid_levels * step[si]
        index[:, rest[0]] = (nu - 1) / 2 * step[rest[0]]
        index[:, rest[1]] = (nv - 1) / 2 * step[rest[1]]
        z_mm = volume.index_to_world(index)[:, 2]
        uu, vv = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
        plane = np.zeros((nu * nv, 3))
        plane[:, si] = (levels // 2) * step[si]
        plane[:, rest[0]] = uu.ravel() * step[rest[0]]
        plane[:, rest[1]] = vv.ravel() * step[rest[1]]
        x_mm = volume.index_to_world(plane)[:, 0].reshape(nu, nv)
        return cls(hu=hu, source=volume.array, si=si, descending=descending, rest=(rest[0], rest[1]), step=step,
                   level_mm=level_mm, grid_mm=(grid_spacing[0], grid_spacing[1], grid_spacing[2]),
                   cell_cm2=cell_cm2, cell_ml=cell_cm2 * grid_spacing[si] / 10.0, z_mm=z_mm, x_mm=x_mm,
                   obliquity=float(abs(axes[si, 2])))

    def to_grid(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """A working-frame mask on the survey grid ``volume.array[::step]`` (its own memory)."""
        m = mask[::-1] if self.descending else mask
        return np.ascontiguousarray(np.moveaxis(m, 0, self.si))

    def bone_blocks(self, levels: npt.NDArray[np.bool_], cells: npt.NDArray[np.bool_],
                    threshold_hu: float) -> npt.NDArray[np.bool_]:
        """Bone-dense cells: some voxel of the cell's in-plane block (the step x step voxels from
        its sample on) is above ``threshold_hu``, at the chosen ``levels`` and within the bounding
        box of ``cells`` (u, v); elsewhere the strided sample decides.

        Why: a strided sample misses the thin temporal and frontal bone, so the skull ring
        would open; a block does not. Reading full resolution only at the survey levels of
        small cross-section (the head), inside the head's box, keeps the cost low.
        """
        bone = self.hu > threshold_hu
        if not levels.any() or not cells.any():
            return bone
        rows, columns = np.nonzero(cells.any(axis=1))[0], np.nonzero(cells.any(axis=0))[0]
        u0, u1, v0, v1 = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
        s_u, s_v = self.step[self.rest[0]], self.step[self.rest[1]]
        n_u, n_v = self.source.shape[self.rest[0]], self.source.shape[self.rest[1]]
        for level in np.nonzero(levels)[0]:
            take: list[Any] = [slice(None)] * 3
            take[self.si] = self.slice_index(int(level))
            plane = self.source[tuple(take)]  # 2-D, axes in the order of ``rest``
            block = plane[u0 * s_u:min(u1 * s_u, n_u), v0 * s_v:min(v1 * s_v, n_v)] > threshold_hu
            cu, cv = -(-block.shape[0] // s_u), -(-block.shape[1] // s_v)
            padded = np.zeros((cu * s_u, cv * s_v), dtype=bool)
            padded[:block.shape[0], :block.shape[1]] = block
            bone[level, u0:u0 + cu, v0:v0 + cv] |= padded.reshape(cu, s_u, cv, s_v).any(axis=(1, 3))
        return bone

    def slice_index(self, level: int) -> int:
        """Index into the volume, along ``si``, of a survey level."""
        grid_level = self.hu.shape[0] - 1 - level if self.descending else level
        return int(grid_level * self.step[self.si])


# --------------------------------------------------------------------------------------
# Masks and runs of levels
# --------------------------------------------------------------------------------------


def fill_holes_per_level(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``mask`` with every in-plane hole filled, level by level (one labelling for all levels)."""
    background, count = ndimage.label(~mask, structure=CROSS)
    return ~label_table(count, border_labels(background))[background]


def label_table(count: int, labels: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
    """A table over label values 0..count, True at ``labels`` (indexing with it beats np.isin)."""
    table = np.zeros(count + 1, dtype=bool)
    table[labels] = True
    return table


def border_labels(labels: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """Labels found on the in-plane border of any level."""
    edges = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    found = np.unique(edges)
    return found[found > 0]


def largest_piece_cm2(mask: npt.NDArray[np.bool_], cell_cm2: float) -> npt.NDArray[np.float64]:
    """Per level, the area of the largest in-plane connected piece of ``mask``."""
    labels, count = ndimage.label(mask, structure=SQUARE)
    largest = np.zeros(mask.shape[0])
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * cell_cm2
        level_of = np.zeros(count + 1, dtype=np.int64)
        for label, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is not None:
                level_of[label] = where[0].start
        np.maximum.at(largest, level_of[1:], sizes[1:])
    return largest


def main_run(flags: npt.NDArray[np.bool_], gap: int) -> npt.NDArray[np.bool_]:
    """``flags`` kept only in the run (gaps of up to ``gap`` levels bridged) holding the most of them.

    Why: the skull is one run of levels; a lone level with a brain-like cavity elsewhere (the
    tongue inside the mandible, seen at another sampling phase) is not the skull.
    """
    if not flags.any():
        return flags
    bridged = ndimage.binary_closing(flags, structure=np.ones(gap + 1, dtype=bool)) | flags if gap else flags
    best = max(level_runs(bridged), key=lambda r: int(flags[r[0]:r[1] + 1].sum()))
    kept = np.zeros_like(flags)
    kept[best[0]:best[1] + 1] = flags[best[0]:best[1] + 1]
    return kept


def level_runs(flags: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, last) of each run of True."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(change[::2], change[1::2])]
