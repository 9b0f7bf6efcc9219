"""Which body regions a CT volume actually covers, judged from the image in well under a second.

Why: the header's BodyPartExamined and descriptions are often missing or wrong (issue 21: a
chest model ran on a real head CT); the applicability check
(:func:`dicom_node.model_domain.decide`) therefore also asks the image, and the image wins.
This module looks at Hounsfield units only (numpy + scipy.ndimage, no network) and answers
from anatomy that no scanner setting hides:

* **body**: tissue (> :data:`TISSUE_HU`) in the largest connected component(s), after a
  one-cell opening that detaches the table and headrest, with each level's holes filled;
* **lungs** (chest): air (< :data:`AIR_HU`) enclosed by the body at its level (not outside
  air), in 3-D components of at least :data:`LUNG_COMPONENT_ML` whose mean is parenchyma, not
  gas (>= :data:`LUNG_MEAN_HU`; outside air, airways, sinuses and bowel gas are about
  -1000 HU), :data:`CHEST_MIN_ML` together, outside the head's levels; lung-like air open to
  the image edge joins them as lung cut by the field of view; the trachea is dropped where a
  level shows it apart; the mask is closed in-plane (nodules against the chest wall) and its
  holes (vessels, nodules) filled;
* **skull** (head): a bone ring (> :data:`SKULL_HU`, read at full in-plane resolution at the
  levels of small cross-section, gaps of up to ~2 cm bridged) enclosing at least
  :data:`CRANIAL_MIN_CM2` of uniform brain-density tissue (mean 0..80 HU, sd <= 40 HU) at
  levels whose body cross-section is at most :data:`HEAD_MAX_CM2`;
* neck, abdomen, pelvis, extremities and whole body, best effort, from the cross-section,
  the order of the regions along the patient and lateral bone (see :func:`_regions`).

The volume may lie in any orientation: the index axis closest to the patient's
superior-inferior axis (LPS +z, from ``Volume.axes``) is the level axis, and the strided
array is transposed (no resampling) so every judgement is per axial level, inferior to
superior. Everything runs on a grid of about :data:`SURVEY_VOXEL_MM` voxels taken with
integer strides (``step``), so a 300-slice 512x512 CT costs well under 0.1 s on one core
(``bench/body_regions.py``). The heuristics and what is reliable: ``docs/applicability.md``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.model_domain import BODY_REGIONS, BodyRegion, ImageRegions
from workers.volume import Volume

__all__ = ["BodyRegionSurvey", "RegionExtent", "survey_body_regions", "survey_step"]

logger = logging.getLogger(__name__)

#: Target edge (mm) of a survey voxel: each axis is read with the stride closest to it.
SURVEY_VOXEL_MM = 5.0
#: At most this many survey cells along an in-plane axis, and levels along the superior-inferior
#: axis (the stride grows instead).
MAX_CELLS = 128
MAX_LEVELS = 256
#: Fewer survey levels than this along the superior-inferior axis: the image is not judged.
MIN_LEVELS = 5
#: Fewer survey cells than this across a level (either in-plane axis): not judged.
MIN_CELLS = 8
#: Tissue: anything denser than this is body (fat is about -100 HU, lung -850, air -1000).
TISSUE_HU = -500.0
#: Air: lungs, airways, gas and the outside.
AIR_HU = -400.0
#: Below this a voxel lies outside the reconstructed field of view (padding -2000, -3024).
OUTSIDE_FOV_HU = -1100.0
#: Body components smaller than this (mL), or than BODY_KEEP_FRACTION of the largest, are dropped.
MIN_BODY_ML = 20.0
BODY_KEEP_FRACTION = 0.05
#: A level shows body when its body cross-section is at least this (cm^2).
MIN_BODY_CM2 = 5.0
#: Lungs: an enclosed air component must average at least this (parenchyma is -700..-900 HU,
#: emphysema rarely below -920; gas in airways, sinuses, bowel and outside is about -1000 HU) ...
LUNG_MEAN_HU = -950.0
#: ... be at least this large (mL) ...
LUNG_COMPONENT_ML = 50.0
#: ... and the lungs together at least this (mL; the nasal cavity and all sinuses hold < 100 mL).
CHEST_MIN_ML = 100.0
#: Lungs are closed in-plane with a square of this half-side (mm): nodules against the chest wall,
#: up to about twice this across, become lung.
LUNG_CLOSING_MM = 12.0
#: An in-plane piece of the lungs no larger than AIRWAY_CM2[1] and darker than this is the trachea or
#: a main bronchus, not lung.
AIRWAY_MEAN_HU = -940.0
#: A level belongs to the chest when its lung cross-section is at least this (cm^2).
LUNG_LEVEL_CM2 = 5.0
#: Lungs count as touching an end level when their area there is at least this (cm^2).
LUNG_END_CM2 = 1.0
#: Skull: bone threshold, and the cranial cavity it must enclose.
SKULL_HU = 300.0
CRANIAL_MIN_CM2 = 10.0
CRANIAL_HU = (0.0, 80.0)
#: Levels without a skull ring inside the skull's run of levels (the frontal sinus, a thin temporal
#: squama); a cavity further away from the main run is not the skull.
CRANIAL_GAP_LEVELS = 2
#: Brain is uniform (sd ~10 HU with noise); the tongue and jaw enclosed by the mandible mix fat,
#: muscle and teeth (sd > 100 HU).
CRANIAL_SD_HU = 40.0
#: A head's cross-section is at most this (cm^2; adults 150-250); a trunk's at least TRUNK_MIN_CM2.
HEAD_MAX_CM2 = 400.0
TRUNK_MIN_CM2 = 300.0
#: The face and jaw below the lowest skull ring still count as head down to this distance (mm).
FACE_MM = 60.0
#: The skull counts as closed at an end level when the cavity there is below this fraction of its maximum.
CRANIAL_END_FRACTION = 0.1
#: Pelvis: bone denser than this ...
PELVIS_BONE_HU = 200.0
#: ... in one piece of at least this (cm^2) on each side, outside the middle third of the body (iliac
#: wings, acetabula and femoral heads: 10-30 cm2; a rib cut obliquely in the upper abdomen: < 7 cm2;
#: the spine lies in the middle third) ...
PELVIS_SIDE_CM2 = 10.0
#: ... at least this far (mm) below the lungs' base, when the volume shows lungs.
PELVIS_BELOW_LUNG_MM = 80.0
#: Minimum extents (mm) for the best-effort regions to be reported.
ABDOMEN_MIN_MM = 40.0
NECK_MIN_MM = 20.0
#: The neck may start this far (mm) below the head or above the lungs (the shoulders lie between).
NECK_GAP_MM = 60.0
EXTREMITY_MIN_MM = 20.0
#: A limb cross-section is at least this (cm^2).
LIMB_MIN_CM2 = 20.0
#: A level whose body covers this fraction of the field of view has no outline to measure: its
#: cross-section says nothing (a constant volume, a small reconstruction field of view).
FILLED_FOV_FRACTION = 0.9
#: A limb holds a long bone: bone (> PELVIS_BONE_HU) of at least this (cm^2) on most of its levels.
LIMB_BONE_CM2 = 1.0
#: Airway at a neck level: enclosed air of this area (cm^2).
AIRWAY_CM2 = (0.5, 15.0)

# In-plane neighbourhoods on the (level, row, column) working grid: no connection between levels.
_CROSS_2D = ndimage.generate_binary_structure(2, 1)
_SQUARE_2D = ndimage.generate_binary_structure(2, 2)
_CROSS = np.zeros((3, 3, 3), dtype=bool)
_CROSS[1] = _CROSS_2D
_SQUARE = np.zeros((3, 3, 3), dtype=bool)
_SQUARE[1] = _SQUARE_2D


@dataclass(frozen=True)
class RegionExtent:
    """One region the volume covers: its slices (indices into the volume), extent and completeness.

    ``first_slice`` <= ``last_slice`` are indices along ``axis``, the volume's index axis
    closest to the superior-inferior axis (0 for an axial series), on the survey grid's
    levels (multiples of the stride). ``z_mm``: (inferior, superior) patient z of the
    region. ``complete``: the region's landmark organ (lungs for chest, skull for head)
    lies wholly inside the field of view; None where the survey does not judge it.
    """

    region: BodyRegion
    first_slice: int
    last_slice: int
    extent_mm: float
    complete: bool | None
    evidence: str
    axis: int = 0
    z_mm: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True, eq=False)
class BodyRegionSurvey:
    """What the image shows. ``body_mask`` and ``lung_mask`` are on the survey grid:
    ``volume.array[::step[0], ::step[1], ::step[2]]`` (bool arrays of that shape).
    ``lung_mask`` is the lungs with their holes (vessels, nodules) filled.
    ``available`` False (``notes`` say why) when the image could not be judged.
    ``regions`` run head to feet (whole_body, when found, last).
    """

    available: bool
    regions: tuple[RegionExtent, ...]
    step: tuple[int, int, int]
    body_mask: npt.NDArray[np.bool_]
    lung_mask: npt.NDArray[np.bool_]
    seconds: float
    notes: tuple[str, ...] = ()
    measurements: dict[str, Any] = field(default_factory=dict)

    def region(self, name: str) -> RegionExtent | None:
        return next((r for r in self.regions if r.region == name), None)

    def image_regions(self) -> ImageRegions:
        """The survey as the shared decision type :class:`dicom_node.model_domain.ImageRegions`."""
        return ImageRegions(
            available=self.available,
            regions=tuple(r.region for r in self.regions),
            complete=tuple(r.region for r in self.regions if r.complete),
            evidence=tuple(r.evidence for r in self.regions) + self.notes,
            seconds=self.seconds,
        )


def survey_body_regions(volume: Volume) -> BodyRegionSurvey:
    """Which body regions ``volume`` covers (see the module docstring); never raises.

    A volume that is not a CT, is too small to judge, or breaks the survey in an
    unforeseen way gives ``available=False`` with a note saying why, and empty masks.
    """
    start = time.perf_counter()
    step = survey_step(volume)
    grid_shape = tuple(len(range(0, int(n), s)) for n, s in zip(volume.array.shape, step))

    def unavailable(note: str, **measurements: Any) -> BodyRegionSurvey:
        empty = np.zeros(grid_shape, dtype=bool)
        return BodyRegionSurvey(available=False, regions=(), step=step, body_mask=empty, lung_mask=empty.copy(),
                                seconds=round(time.perf_counter() - start, 4), notes=(note,),
                                measurements={"step": list(step), "grid_shape": list(grid_shape), **measurements})

    modality = (volume.modality or "").strip().upper()
    if modality != "CT":
        return unavailable(f"not a CT (modality {modality or 'none'}): the image check reads Hounsfield units")
    try:
        frame = _Frame.of(volume, step)
        levels, rows, columns = frame.hu.shape
        if levels < MIN_LEVELS or min(rows, columns) < MIN_CELLS:
            return unavailable(
                f"too small to judge: {levels} survey level{'s' if levels != 1 else ''} of {frame.level_mm:.1f} mm "
                f"along the patient's superior-inferior axis and {rows}x{columns} cells across (needs "
                f"{MIN_LEVELS} levels and {MIN_CELLS}x{MIN_CELLS} cells)", levels=levels)
        return _survey(frame, step, start)
    # The check must never fail a job: a volume that breaks it is reported as not judged
    # (the decision then falls back to the header), with the cause in the log and the note.
    except Exception as exc:
        logger.exception("body-region survey failed on volume of shape %s, spacing %s",
                         volume.array.shape, volume.spacing_mm)
        return unavailable(f"the image check failed ({type(exc).__name__}: {exc}); not judged")


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


# --------------------------------------------------------------------------------------
# The working frame: survey levels along the patient's superior-inferior axis
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Frame:
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
    def of(cls, volume: Volume, step: tuple[int, int, int]) -> _Frame:
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

    def bone_blocks(self, levels: npt.NDArray[np.bool_], cells: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """Skull-dense cells: some voxel of the cell's in-plane block (the step x step voxels from
        its sample on) is above :data:`SKULL_HU`, at the chosen ``levels`` and within the bounding
        box of ``cells`` (u, v); elsewhere the strided sample decides.

        Why: a strided sample misses the thin temporal and frontal bone, so the skull ring
        would open; a block does not. Reading full resolution only at the survey levels of
        small cross-section (the head), inside the head's box, keeps the cost low.
        """
        bone = self.hu > SKULL_HU
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
            block = plane[u0 * s_u:min(u1 * s_u, n_u), v0 * s_v:min(v1 * s_v, n_v)] > SKULL_HU
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
# Masks
# --------------------------------------------------------------------------------------


def _fill_holes_per_level(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``mask`` with every in-plane hole filled, level by level (one labelling for all levels)."""
    background, count = ndimage.label(~mask, structure=_CROSS)
    return ~_lookup(count, _border_labels(background))[background]


def _lookup(count: int, labels: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
    """A table over label values 0..count, True at ``labels`` (indexing with it beats np.isin)."""
    table = np.zeros(count + 1, dtype=bool)
    table[labels] = True
    return table


def _border_labels(labels: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    """Labels found on the in-plane border of any level."""
    edges = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    found = np.unique(edges)
    return found[found > 0]


def _body_mask(frame: _Frame) -> npt.NDArray[np.bool_]:
    """Tissue of the largest connected component(s), holes filled per level (table and headrest dropped)."""
    tissue = frame.hu > TISSUE_HU
    opened = ndimage.binary_opening(tissue, structure=_CROSS)
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros_like(tissue)
    sizes = np.bincount(labels.ravel())[1:]
    floor = max(MIN_BODY_ML / frame.cell_ml, BODY_KEEP_FRACTION * float(sizes.max()))
    keep = np.concatenate([[False], sizes >= floor])
    return _fill_holes_per_level(keep[labels])


def _outside_air(frame: _Frame) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int32]]:
    """Air, and its in-plane components (labels; those touching the image border are outside air)."""
    air = frame.hu < AIR_HU
    labels, _ = ndimage.label(air, structure=_CROSS)
    return air, labels


@dataclass(frozen=True)
class _Lungs:
    mask: npt.NDArray[np.bool_]
    area_cm2: npt.NDArray[np.float64]
    volume_ml: float
    left_ml: float
    right_ml: float
    components: int
    rejected: list[dict[str, float]]
    cut_in_plane_levels: int
    touches_edge: bool


def _lungs(frame: _Frame, body: npt.NDArray[np.bool_], head: npt.NDArray[np.bool_]) -> _Lungs:
    """Enclosed air that is lung parenchyma (see the module docstring), holes filled."""
    hu = frame.hu
    air, air_labels = _outside_air(frame)
    border = _border_labels(air_labels)
    outside = _lookup(int(air_labels.max()), border)[air_labels]
    enclosed = air & ~outside & body & ~head[:, None, None]
    labels, count = ndimage.label(enclosed)
    rejected: list[dict[str, float]] = []
    lungs = np.zeros_like(enclosed)
    if count:
        counts = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        sums = np.bincount(labels.ravel(), weights=hu.ravel(), minlength=count + 1)[1:]
        volume_ml = counts * frame.cell_ml
        mean_hu = sums / np.maximum(counts, 1)
        accepted = (volume_ml >= LUNG_COMPONENT_ML) & (mean_hu >= LUNG_MEAN_HU)
        if volume_ml[accepted].sum() >= CHEST_MIN_ML:
            lungs = np.concatenate([[False], accepted])[labels]
        else:
            accepted[:] = False
        order = np.argsort(-volume_ml)
        rejected = [{"ml": round(float(volume_ml[i]), 1), "mean_hu": round(float(mean_hu[i]), 1)}
                    for i in order[:5] if not accepted[i] and volume_ml[i] >= LUNG_COMPONENT_ML / 2]
    cut_levels = 0
    if lungs.any():
        # Lungs cut by the in-plane field of view: lung-like air open to the image edge, either
        # connected (in 3-D) to the enclosed lungs or as large as a lung itself. Only once enclosed
        # lungs were found (a pillow or a blanket alone never makes a chest); they join the lungs
        # and make them incomplete.
        candidates = _lung_like_outside(hu, air_labels, border, frame.cell_cm2) & ~head[:, None, None]
        if candidates.any():
            joined, count = ndimage.label(lungs | candidates)
            sizes = np.bincount(joined.ravel(), minlength=count + 1) * frame.cell_ml
            keep = sizes >= LUNG_COMPONENT_ML
            keep[np.unique(joined[lungs])] = True
            keep[0] = False
            cut = candidates & keep[joined]
            cut_levels = int(cut.any(axis=(1, 2)).sum())
            lungs |= cut
        lungs = _drop_airways(lungs, hu, frame.cell_cm2)
    components = int(ndimage.label(lungs)[1]) if lungs.any() else 0
    midline = _midline_x(frame, body, lungs)
    filled = _fill_holes_per_level(_close_each_side(frame, lungs, midline)) & (body | lungs)
    edge = np.zeros_like(filled)
    edge[:, 0, :] = edge[:, -1, :] = edge[:, :, 0] = edge[:, :, -1] = True
    fov_edge = ndimage.binary_dilation(hu < OUTSIDE_FOV_HU, structure=_CROSS) | edge
    touches_edge = bool((filled & fov_edge).any())
    per_level = filled.sum(axis=(1, 2)) * frame.cell_cm2
    left = filled & (frame.x_mm > midline)[None]
    return _Lungs(mask=filled, area_cm2=per_level, volume_ml=float(filled.sum() * frame.cell_ml),
                  left_ml=float(left.sum() * frame.cell_ml), right_ml=float((filled & ~left).sum() * frame.cell_ml),
                  components=components, rejected=rejected, cut_in_plane_levels=cut_levels,
                  touches_edge=touches_edge)


def _close_each_side(frame: _Frame, lungs: npt.NDArray[np.bool_], midline_x: float) -> npt.NDArray[np.bool_]:
    """``lungs`` closed in-plane with a square of half-side :data:`LUNG_CLOSING_MM`, each side of the midline apart.

    Why: a nodule against the chest wall is a notch in the air mask, which hole filling
    cannot reach; closing takes it in. Each side apart, so the disc never bridges the
    mediastinum between the two lungs.
    """
    if not lungs.any():
        return lungs
    levels = np.nonzero(lungs.any(axis=(1, 2)))[0]
    box = slice(int(levels[0]), int(levels[-1]) + 1)
    du, dv = (frame.grid_mm[a] for a in frame.rest)
    ru, rv = max(1, round(LUNG_CLOSING_MM / du)), max(1, round(LUNG_CLOSING_MM / dv))
    # A square of lines (separable, so cheap) with the disc's radius.
    lines = (np.ones((1, 2 * ru + 1, 1), dtype=bool), np.ones((1, 1, 2 * rv + 1), dtype=bool))
    left = (frame.x_mm > midline_x)[None]
    closed = lungs.copy()
    part = lungs[box]
    for side in (left, ~left):
        grown = np.pad(part & side, ((0, 0), (ru, ru), (rv, rv)))
        for line in lines:
            grown = ndimage.binary_dilation(grown, structure=line)
        for line in lines:
            grown = ndimage.binary_erosion(grown, structure=line)
        closed[box] |= grown[:, ru:ru + part.shape[1], rv:rv + part.shape[2]]
    return closed


def _drop_airways(lungs: npt.NDArray[np.bool_], hu: npt.NDArray[np.float32],
                  cell_cm2: float) -> npt.NDArray[np.bool_]:
    """``lungs`` without the trachea and main bronchi where a level shows them apart from the lungs.

    They join the lungs in 3-D through the bronchi, but are gas (about -1000 HU), not
    parenchyma, and must not make the lungs reach the top level of a chest CT.
    """
    labels, count = ndimage.label(lungs, structure=_CROSS)
    if not count:
        return lungs
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=count + 1)
    mean = np.bincount(flat, weights=hu.ravel(), minlength=count + 1) / np.maximum(counts, 1)
    airway = (counts * cell_cm2 <= AIRWAY_CM2[1]) & (mean < AIRWAY_MEAN_HU)
    airway[0] = False
    return lungs & ~airway[labels]


def _lung_like_outside(hu: npt.NDArray[np.float32], air_labels: npt.NDArray[np.int32],
                       border: npt.NDArray[np.int32], cell_cm2: float) -> npt.NDArray[np.bool_]:
    """Air components open to the image edge whose mean (inside the field of view) is lung, not air."""
    n = int(air_labels.max())
    flat = air_labels.ravel()
    inside = (hu > OUTSIDE_FOV_HU).ravel()
    counts = np.bincount(flat, weights=inside, minlength=n + 1)
    sums = np.bincount(flat, weights=np.where(inside, hu.ravel(), 0.0), minlength=n + 1)
    mean = sums / np.maximum(counts, 1)
    lung_like = (mean >= LUNG_MEAN_HU) & (counts * cell_cm2 >= LUNG_LEVEL_CM2)
    lung_like[0] = False
    return (lung_like & _lookup(n, border))[air_labels]


def _midline_x(frame: _Frame, body: npt.NDArray[np.bool_], lungs: npt.NDArray[np.bool_]) -> float:
    """Patient x of the body's midline at the lung levels (the mean x of the body there)."""
    levels = lungs.any(axis=(1, 2))
    weights = body[levels].sum(axis=0) if levels.any() else body.sum(axis=0)
    total = float(weights.sum())
    return float((weights * frame.x_mm).sum() / total) if total else 0.0


@dataclass(frozen=True)
class _Skull:
    cavity_cm2: npt.NDArray[np.float64]  # largest brain-like cavity per level (any body size)
    cranial: npt.NDArray[np.bool_]  # levels where it qualifies as a cranial cavity
    cavity_sd: npt.NDArray[np.float64]
    touches_edge: bool


def _skull(frame: _Frame, body: npt.NDArray[np.bool_], body_cm2: npt.NDArray[np.float64]) -> _Skull:
    """Per level: the largest soft-tissue cavity enclosed by a bone ring, and whether it is a skull's."""
    hu = frame.hu
    small = (body_cm2 >= MIN_BODY_CM2) & (body_cm2 <= HEAD_MAX_CM2)
    bone = frame.bone_blocks(small, body[small].any(axis=0))
    # Two cells of dilation bridge gaps of up to four cells (~2 cm: the thin frontal and temporal bone
    # between survey cells, the frontal sinus); the cavity shrinks by as much, which only the area feels.
    wall = ndimage.binary_dilation(bone, structure=_SQUARE, iterations=2)
    cavity = _fill_holes_per_level(wall) & ~wall
    levels = hu.shape[0]
    cavity_cm2 = np.zeros(levels)
    cavity_sd = np.zeros(levels)
    cranial = np.zeros(levels, dtype=bool)
    touches_edge = False
    labels, count = ndimage.label(cavity, structure=_CROSS)
    if count:
        flat = labels.ravel()
        counts = np.bincount(flat, minlength=count + 1).astype(np.float64)
        mean = np.bincount(flat, weights=hu.ravel(), minlength=count + 1) / np.maximum(counts, 1)
        squares = np.bincount(flat, weights=np.square(hu.ravel(), dtype=np.float64), minlength=count + 1)
        sd = np.sqrt(np.maximum(squares / np.maximum(counts, 1) - mean**2, 0.0))
        level_of = np.zeros(count + 1, dtype=np.int64)
        objects = ndimage.find_objects(labels)
        for label, where in enumerate(objects, start=1):
            if where is not None:
                level_of[label] = where[0].start
        area = counts * frame.cell_cm2
        brain = (mean >= CRANIAL_HU[0]) & (mean <= CRANIAL_HU[1]) & (sd <= CRANIAL_SD_HU)
        brain[0] = False
        for label in np.nonzero(brain)[0]:
            level = level_of[label]
            if area[label] > cavity_cm2[level]:
                cavity_cm2[level] = area[label]
                cavity_sd[level] = sd[label]
        cranial = _main_run((cavity_cm2 >= CRANIAL_MIN_CM2) & (body_cm2 <= HEAD_MAX_CM2), CRANIAL_GAP_LEVELS)
        if cranial.any():
            skull_cells = brain[labels] & cranial[:, None, None]
            rim = ndimage.binary_dilation(skull_cells, structure=_CROSS, iterations=2)
            touches_edge = bool(rim[:, 0, :].any() or rim[:, -1, :].any() or rim[:, :, 0].any()
                                or rim[:, :, -1].any() or (rim & (hu < OUTSIDE_FOV_HU)).any())
    return _Skull(cavity_cm2=cavity_cm2, cranial=cranial, cavity_sd=cavity_sd, touches_edge=touches_edge)


@dataclass(frozen=True)
class _Profile:
    """Per-level numbers the regions are decided from."""

    body_cm2: npt.NDArray[np.float64]
    largest_cm2: npt.NDArray[np.float64]  # largest in-plane body component
    limbs: npt.NDArray[np.int64]  # in-plane body components of at least LIMB_MIN_CM2
    airway: npt.NDArray[np.bool_]  # enclosed air of airway size (not lung)
    lateral_bone_cm2: npt.NDArray[np.float64]  # min over the two sides of the largest bone piece outside
    # the body's middle third (the spine lies inside it)
    bone_cm2: npt.NDArray[np.float64]  # bone (> PELVIS_BONE_HU) inside the body
    fills_fov: npt.NDArray[np.bool_]  # the body covers the field of view: no outline to measure


def _largest_piece_cm2(mask: npt.NDArray[np.bool_], cell_cm2: float) -> npt.NDArray[np.float64]:
    """Per level, the area of the largest in-plane connected piece of ``mask``."""
    labels, count = ndimage.label(mask, structure=_SQUARE)
    largest = np.zeros(mask.shape[0])
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * cell_cm2
        level_of = np.zeros(count + 1, dtype=np.int64)
        for label, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is not None:
                level_of[label] = where[0].start
        np.maximum.at(largest, level_of[1:], sizes[1:])
    return largest


def _profile(frame: _Frame, body: npt.NDArray[np.bool_], lungs: npt.NDArray[np.bool_]) -> _Profile:
    hu = frame.hu
    levels = hu.shape[0]
    body_cm2 = body.sum(axis=(1, 2)) * frame.cell_cm2
    labels, count = ndimage.label(body, structure=_SQUARE)
    largest = np.zeros(levels)
    limbs = np.zeros(levels, dtype=np.int64)
    if count:
        area = np.bincount(labels.ravel(), minlength=count + 1)[1:] * frame.cell_cm2
        for label, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is None:
                continue
            level = where[0].start
            largest[level] = max(largest[level], area[label - 1])
            limbs[level] += int(area[label - 1] >= LIMB_MIN_CM2)
    air = (hu < AIR_HU) & body & ~lungs
    air_labels, air_count = ndimage.label(air, structure=_CROSS)
    airway = np.zeros(levels, dtype=bool)
    if air_count:
        air_area = np.bincount(air_labels.ravel(), minlength=air_count + 1)[1:] * frame.cell_cm2
        for label, where in enumerate(ndimage.find_objects(air_labels), start=1):
            if where is not None and AIRWAY_CM2[0] <= air_area[label - 1] <= AIRWAY_CM2[1]:
                airway[where[0].start] = True
    # Bone on each side of the body, outside its middle third (patient x; LPS +x is left).
    bone = (hu > PELVIS_BONE_HU) & body
    weights = body.sum(axis=(1, 2)).astype(np.float64)
    centre = (body * frame.x_mm[None]).sum(axis=(1, 2)) / np.maximum(weights, 1)
    half = np.zeros(levels)
    for level in np.nonzero(weights)[0]:
        xs = frame.x_mm[body[level]]
        half[level] = (float(xs.max()) - float(xs.min())) / 2
    offset = frame.x_mm[None] - centre[:, None, None]
    third = (half / 3)[:, None, None]
    left = _largest_piece_cm2(bone & (offset > third), frame.cell_cm2)
    right = _largest_piece_cm2(bone & (offset < -third), frame.cell_cm2)
    in_fov = (hu > OUTSIDE_FOV_HU).sum(axis=(1, 2))
    fills = body.sum(axis=(1, 2)) >= FILLED_FOV_FRACTION * np.maximum(in_fov, 1)
    return _Profile(body_cm2=body_cm2, largest_cm2=largest, limbs=limbs, airway=airway,
                    lateral_bone_cm2=np.minimum(left, right), bone_cm2=bone.sum(axis=(1, 2)) * frame.cell_cm2,
                    fills_fov=fills)


# --------------------------------------------------------------------------------------
# The survey
# --------------------------------------------------------------------------------------


def _survey(frame: _Frame, step: tuple[int, int, int], start: float) -> BodyRegionSurvey:
    body = _body_mask(frame)
    body_cm2 = body.sum(axis=(1, 2)) * frame.cell_cm2
    skull = _skull(frame, body, body_cm2)
    head_levels = _head_levels(frame, skull, body_cm2)
    lungs = _lungs(frame, body, head_levels)
    profile = _profile(frame, body, lungs.mask)
    notes: list[str] = []
    if not body_cm2.max(initial=0.0) >= MIN_BODY_CM2:
        notes.append("no body found: nothing denser than -500 HU forms a connected region of 20 mL")
    if frame.obliquity < 0.9:
        notes.append(f"oblique volume: its level axis makes {math.degrees(math.acos(frame.obliquity)):.0f} degrees "
                     "with the patient's superior-inferior axis; levels are judged as axial")
    filled = int((profile.fills_fov & (body_cm2 >= MIN_BODY_CM2)).sum())
    if filled:
        notes.append(f"the body fills the field of view on {filled} of {int((body_cm2 >= MIN_BODY_CM2).sum())} "
                     "levels: no outline there to judge neck, abdomen, pelvis or limbs from")
    regions = _regions(frame, skull, head_levels, lungs, profile)
    seconds = round(time.perf_counter() - start, 4)
    measurements = {
        "step": list(step),
        "grid_shape": list(frame.to_grid(body).shape),
        "level_axis": frame.si,
        "feet_first_order": frame.descending,
        "levels": int(frame.hu.shape[0]),
        "level_mm": round(frame.level_mm, 2),
        "z_mm": [round(float(frame.z_mm[0]), 1), round(float(frame.z_mm[-1]), 1)],
        "body_ml": round(float(body.sum() * frame.cell_ml), 1),
        "body_max_cm2": round(float(body_cm2.max(initial=0.0)), 1),
        "lung_ml": round(lungs.volume_ml, 1),
        "lung_left_ml": round(lungs.left_ml, 1),
        "lung_right_ml": round(lungs.right_ml, 1),
        "lung_levels": int((lungs.area_cm2 >= LUNG_LEVEL_CM2).sum()),
        "lung_components": lungs.components,
        "lung_cut_in_plane_levels": lungs.cut_in_plane_levels,
        "air_rejected_as_lung": lungs.rejected,
        "cranial_levels": int(skull.cranial.sum()),
        "cranial_max_cm2": round(float(skull.cavity_cm2.max(initial=0.0)), 1),
        "cranial_sd_hu": round(float(np.median(skull.cavity_sd[skull.cranial])), 1) if skull.cranial.any() else None,
        "regions": [r.region for r in regions],
        "seconds": seconds,
    }
    logger.debug("body-region survey: %s", measurements)
    return BodyRegionSurvey(available=True, regions=tuple(regions), step=step, body_mask=frame.to_grid(body),
                            lung_mask=frame.to_grid(lungs.mask), seconds=seconds, notes=tuple(notes),
                            measurements=measurements)


def _head_levels(frame: _Frame, skull: _Skull, body_cm2: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Levels of the head: from the face below the lowest skull ring to the vertex, small cross-sections only."""
    levels = len(body_cm2)
    head = np.zeros(levels, dtype=bool)
    cranial = np.nonzero(skull.cranial)[0]
    if len(cranial) < 2:
        return head
    lo, hi = int(cranial[0]), int(cranial[-1])
    head[lo:hi + 1] = True
    level = hi + 1
    while level < levels and MIN_BODY_CM2 <= body_cm2[level] <= HEAD_MAX_CM2:
        head[level] = True
        level += 1
    face = int(FACE_MM // max(frame.level_mm, 1e-6))
    level = lo - 1
    while level >= 0 and lo - level <= face and MIN_BODY_CM2 <= body_cm2[level] <= HEAD_MAX_CM2:
        head[level] = True
        level -= 1
    return head


def _main_run(flags: npt.NDArray[np.bool_], gap: int) -> npt.NDArray[np.bool_]:
    """``flags`` kept only in the run (gaps of up to ``gap`` levels bridged) holding the most of them.

    Why: the skull is one run of levels; a lone level with a brain-like cavity elsewhere (the
    tongue inside the mandible, seen at another sampling phase) is not the skull.
    """
    if not flags.any():
        return flags
    bridged = ndimage.binary_closing(flags, structure=np.ones(gap + 1, dtype=bool)) | flags if gap else flags
    best = max(_runs(bridged), key=lambda r: int(flags[r[0]:r[1] + 1].sum()))
    kept = np.zeros_like(flags)
    kept[best[0]:best[1] + 1] = flags[best[0]:best[1] + 1]
    return kept


def _runs(flags: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, last) of each run of True."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b) - 1) for a, b in zip(change[::2], change[1::2])]


def _regions(frame: _Frame, skull: _Skull, head: npt.NDArray[np.bool_], lungs: _Lungs,
             profile: _Profile) -> list[RegionExtent]:
    """Decide the regions from the per-level profile; the heuristics are in the module docstring and here.

    * head: levels with a skull ring (see :func:`_head_levels`); complete when the cranial
      cavity has (nearly) vanished at both end levels (vertex and skull base inside) and the
      skull keeps off the image edge;
    * chest: levels with at least :data:`LUNG_LEVEL_CM2` of lung; complete when the lungs do
      not reach the first or last level nor the in-plane edge of the field of view;
    * neck: the levels between head and chest; without both, a run of at least
      :data:`NECK_MIN_MM` with a small cross-section (no trunk) within :data:`NECK_GAP_MM`
      below the head or above the lungs, or, with neither, one holding an airway;
    * abdomen: trunk levels (largest component >= :data:`TRUNK_MIN_CM2`) below the lungs, at
      least :data:`ABDOMEN_MIN_MM` (above the pelvis); pelvis: trunk levels with
      a piece of :data:`PELVIS_SIDE_CM2` of bone on each side, far enough below the lungs, to the bottom
      of the trunk; without lungs or pelvis the remaining trunk is abdomen;
    * extremities: runs of at least :data:`EXTREMITY_MIN_MM` with body but no trunk, head or
      neck, holding bone on most levels (legs below the pelvis, a limb scanned alone);
    * levels where the body fills the field of view (:data:`FILLED_FOV_FRACTION`) have no
      outline, so they never count as trunk, neck or limb;
    * whole_body: head, chest, abdomen and pelvis all present.
    """
    levels = len(profile.body_cm2)
    has_body = profile.body_cm2 >= MIN_BODY_CM2
    level_mm = max(frame.level_mm, 1e-6)
    found: dict[str, RegionExtent] = {}

    def extent(region: BodyRegion, lo: int, hi: int, complete: bool | None, evidence: str) -> None:
        first, last = sorted((frame.slice_index(lo), frame.slice_index(hi)))
        found[region] = RegionExtent(region=region, first_slice=first, last_slice=last,
                                     extent_mm=round((hi - lo + 1) * frame.level_mm, 1), complete=complete,
                                     evidence=evidence, axis=frame.si,
                                     z_mm=(round(float(frame.z_mm[lo]), 1), round(float(frame.z_mm[hi]), 1)))

    def z(lo: int, hi: int) -> str:
        return f"z {frame.z_mm[lo]:.0f}..{frame.z_mm[hi]:.0f} mm"

    taken = np.zeros(levels, dtype=bool)
    # Head.
    if head.any():
        lo, hi = int(np.argmax(head)), int(levels - 1 - np.argmax(head[::-1]))
        cranial = np.nonzero(skull.cranial)[0]
        c_lo, c_hi = int(cranial[0]), int(cranial[-1])
        peak = float(skull.cavity_cm2.max())
        end = CRANIAL_END_FRACTION * peak
        vertex = bool(skull.cavity_cm2[levels - 1] < end) and c_hi < levels - 1
        base = bool(skull.cavity_cm2[0] < end) and c_lo > 0
        complete = vertex and base and not skull.touches_edge
        why = [] if complete else [w for w, cut in (("vertex cut by the last level", not vertex),
                                                      ("skull base cut by the first level", not base),
                                                      ("skull at the image edge", skull.touches_edge)) if cut]
        extent("head", lo, hi, complete,
               f"skull ring on {int(skull.cranial[c_lo:c_hi + 1].sum())} of {c_hi - c_lo + 1} levels "
               f"({z(c_lo, c_hi)}), brain cavity up to {peak:.0f} cm2; "
               + ("vertex and skull base inside" if complete else "; ".join(why)))
        taken |= head
    # Chest.
    lung_levels = lungs.area_cm2 >= LUNG_LEVEL_CM2
    chest_lo = chest_hi = -1
    if lung_levels.any():
        chest_lo, chest_hi = int(np.argmax(lung_levels)), int(levels - 1 - np.argmax(lung_levels[::-1]))
        cuts = []
        if lungs.area_cm2[0] >= LUNG_END_CM2:
            cuts.append("cut by the first level")
        if lungs.area_cm2[-1] >= LUNG_END_CM2:
            cuts.append("cut by the last level")
        if lungs.touches_edge or lungs.cut_in_plane_levels:
            cuts.append("cut by the in-plane field of view")
        sides = (f" (left {lungs.left_ml / 1000:.1f} L, right {lungs.right_ml / 1000:.1f} L)"
                 if min(lungs.left_ml, lungs.right_ml) >= 0.1 * lungs.volume_ml else "")
        extent("chest", chest_lo, chest_hi, not cuts,
               f"lungs {lungs.volume_ml / 1000:.1f} L{sides} at {z(chest_lo, chest_hi)}, "
               + ("; ".join(cuts) if cuts else "wholly in the field of view"))
        taken[chest_lo:chest_hi + 1] = True
    measurable = has_body & ~profile.fills_fov
    trunk = (profile.largest_cm2 >= TRUNK_MIN_CM2) & ~head & measurable
    small = measurable & ~trunk & ~head & ~lung_levels
    # Neck.
    if head.any() and chest_hi >= 0:
        gap = np.zeros(levels, dtype=bool)
        bounds = sorted((int(np.argmax(head)), chest_hi))
        gap[bounds[0] + 1:bounds[1]] = True
        gap &= ~taken & has_body
        if gap.any() and gap.sum() * level_mm >= NECK_MIN_MM / 2:
            lo, hi = int(np.argmax(gap)), int(levels - 1 - np.argmax(gap[::-1]))
            extent("neck", lo, hi, None, f"{hi - lo + 1} levels between the skull and the lungs ({z(lo, hi)})")
            taken[lo:hi + 1] = True
    else:
        # A small cross-section just below the skull or just above the lungs (the shoulders may
        # lie between the lungs' apices and the neck); without either, one with an airway.
        gap_levels = int(NECK_GAP_MM // level_mm)
        for lo, hi in _runs(small & ~taken):
            if head.any():
                beside = 0 <= int(np.argmax(head)) - hi - 1 <= gap_levels
            elif chest_hi >= 0:
                beside = 0 <= lo - chest_hi - 1 <= gap_levels
            else:
                beside = False
            alone = (not head.any() and chest_hi < 0 and profile.airway[lo:hi + 1].mean() >= 0.5
                     and profile.limbs[lo:hi + 1].max() <= 1)
            if (hi - lo + 1) * level_mm >= NECK_MIN_MM and (beside or alone):
                area = float(np.median(profile.largest_cm2[lo:hi + 1]))
                where = ("below the skull" if head.any() else "above the lungs") if beside else "with an airway"
                extent("neck", lo, hi, None,
                       f"small cross-section (median {area:.0f} cm2) {where} on {hi - lo + 1} levels ({z(lo, hi)})")
                taken[lo:hi + 1] = True
                break
    # Abdomen and pelvis: the trunk below the lungs (or all of it without lungs).
    below = np.zeros(levels, dtype=bool)
    if chest_lo >= 0:
        level = chest_lo - 1
        while level >= 0 and trunk[level]:
            below[level] = True
            level -= 1
    else:
        below = trunk & ~taken
    pelvic = below & (profile.lateral_bone_cm2 >= PELVIS_SIDE_CM2)
    if chest_lo >= 0:
        far = (chest_lo - np.arange(levels)) * level_mm >= PELVIS_BELOW_LUNG_MM
        pelvic &= far
    pelvis_hi = -1
    runs = [r for r in _runs(pelvic) if (r[1] - r[0] + 1) * level_mm >= 15.0]
    if runs:
        pelvis_hi = max(hi for _, hi in runs)
        pelvis_lo = pelvis_hi
        while pelvis_lo - 1 >= 0 and below[pelvis_lo - 1]:
            pelvis_lo -= 1
        bone = float(profile.lateral_bone_cm2[pelvic].max())
        extent("pelvis", pelvis_lo, pelvis_hi, None,
               f"pelvic bone on both sides (up to {bone:.0f} cm2 a side) on {int(pelvic.sum())} levels "
               f"({z(pelvis_lo, pelvis_hi)})")
        taken[pelvis_lo:pelvis_hi + 1] = True
    abdomen = below & ~taken
    need = ABDOMEN_MIN_MM if chest_lo >= 0 else NECK_MIN_MM
    if abdomen.any() and abdomen.sum() * level_mm >= need:
        lo, hi = int(np.argmax(abdomen)), int(levels - 1 - np.argmax(abdomen[::-1]))
        where = "below the lungs" if chest_lo >= 0 else "without lungs or skull"
        extent("abdomen", lo, hi, None, f"trunk {where} on {int(abdomen.sum())} levels ({z(lo, hi)}), "
               f"median cross-section {float(np.median(profile.largest_cm2[abdomen])):.0f} cm2")
        taken[lo:hi + 1] = True
    # Extremities: body without trunk, head or neck.
    limb = measurable & ~trunk & ~taken & ~lung_levels
    limb_runs = [r for r in _runs(limb) if (r[1] - r[0] + 1) * level_mm >= EXTREMITY_MIN_MM
                 and np.mean(profile.bone_cm2[r[0]:r[1] + 1] >= LIMB_BONE_CM2) >= 0.5]
    if limb_runs:
        lo, hi = max(limb_runs, key=lambda r: r[1] - r[0])
        parts = int(np.median(profile.limbs[lo:hi + 1]))
        extent("extremities", lo, hi, None,
               f"{parts} separate limb cross-section{'s' if parts != 1 else ''} without a trunk on "
               f"{hi - lo + 1} levels ({z(lo, hi)}), largest {float(profile.largest_cm2[lo:hi + 1].max()):.0f} cm2")
    ordered = sorted(found.values(), key=lambda r: (-r.z_mm[1], BODY_REGIONS.index(r.region)))
    if {"head", "chest", "abdomen", "pelvis"} <= found.keys():
        body_levels = np.nonzero(has_body)[0]
        lo, hi = int(body_levels[0]), int(body_levels[-1])
        first, last = sorted((frame.slice_index(lo), frame.slice_index(hi)))
        ordered.append(RegionExtent(region="whole_body", first_slice=first, last_slice=last,
                                    extent_mm=round((hi - lo + 1) * frame.level_mm, 1), complete=None,
                                    evidence=f"head, chest, abdomen and pelvis over {z(lo, hi)}", axis=frame.si,
                                    z_mm=(round(float(frame.z_mm[lo]), 1), round(float(frame.z_mm[hi]), 1))))
    return ordered
