"""Tissue masks and anatomical landmarks of the body-region survey: body, lungs, skull, per-level profile.

Why a module of its own: these are the measurements (Hounsfield thresholds, connected
components, cross-sections) that :mod:`workers.body_regions` decides the regions from;
keeping them apart from the decisions keeps each heuristic next to its thresholds and
lets the decision code read as a list of rules. Everything works on a
:class:`~workers.survey_frame.SurveyFrame` (levels inferior to superior, ~5 mm cells).

* :func:`body_mask`: tissue (> :data:`TISSUE_HU`) of the largest connected component(s), after a
  one-cell opening that detaches the table and headrest, each level's holes filled;
* :func:`find_lungs`: enclosed air whose mean is parenchyma, not gas, with lungs cut by the field
  of view, the trachea dropped, and holes (vessels, nodules) filled;
* :func:`find_skull`: per level, the largest brain-density cavity enclosed by a bone ring;
* :func:`level_profile`: per-level cross-sections, limbs, airway and lateral bone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from workers.survey_frame import (
    CROSS,
    SQUARE,
    SurveyFrame,
    border_labels,
    fill_holes_per_level,
    label_table,
    largest_piece_cm2,
    main_run,
)

__all__ = ["Lungs", "LevelProfile", "Skull", "body_mask", "find_lungs", "find_skull", "level_profile"]

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
#: Airway at a neck level: enclosed air of this area (cm^2).
AIRWAY_CM2 = (0.5, 15.0)
#: A level belongs to the chest when its lung cross-section is at least this (cm^2).
LUNG_LEVEL_CM2 = 5.0
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
#: A head's cross-section is at most this (cm^2; adults 150-250).
HEAD_MAX_CM2 = 400.0
#: Bone of the pelvis and the limbs: denser than this.
PELVIS_BONE_HU = 200.0
#: A limb cross-section is at least this (cm^2).
LIMB_MIN_CM2 = 20.0
#: A level whose body covers this fraction of the field of view has no outline to measure: its
#: cross-section says nothing (a constant volume, a small reconstruction field of view).
FILLED_FOV_FRACTION = 0.9


def body_mask(frame: SurveyFrame) -> npt.NDArray[np.bool_]:
    """Tissue of the largest connected component(s), holes filled per level (table and headrest dropped)."""
    tissue = frame.hu > TISSUE_HU
    opened = ndimage.binary_opening(tissue, structure=CROSS)
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros_like(tissue)
    sizes = np.bincount(labels.ravel())[1:]
    floor = max(MIN_BODY_ML / frame.cell_ml, BODY_KEEP_FRACTION * float(sizes.max()))
    keep = np.concatenate([[False], sizes >= floor])
    return fill_holes_per_level(keep[labels])


def _outside_air(frame: SurveyFrame) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int32]]:
    """Air, and its in-plane components (labels; those touching the image border are outside air)."""
    air = frame.hu < AIR_HU
    labels, _ = ndimage.label(air, structure=CROSS)
    return air, labels


@dataclass(frozen=True)
class Lungs:
    """The lungs found: their filled mask, area per level, volumes, and what tells whether they are cut."""

    mask: npt.NDArray[np.bool_]
    area_cm2: npt.NDArray[np.float64]
    volume_ml: float
    left_ml: float
    right_ml: float
    components: int
    rejected: list[dict[str, float]]
    cut_in_plane_levels: int
    touches_edge: bool


def find_lungs(frame: SurveyFrame, body: npt.NDArray[np.bool_], head: npt.NDArray[np.bool_]) -> Lungs:
    """Enclosed air that is lung parenchyma (see the module docstring), holes filled."""
    hu = frame.hu
    air, air_labels = _outside_air(frame)
    border = border_labels(air_labels)
    outside = label_table(int(air_labels.max()), border)[air_labels]
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
    filled = fill_holes_per_level(_close_each_side(frame, lungs, midline)) & (body | lungs)
    edge = np.zeros_like(filled)
    edge[:, 0, :] = edge[:, -1, :] = edge[:, :, 0] = edge[:, :, -1] = True
    fov_edge = ndimage.binary_dilation(hu < OUTSIDE_FOV_HU, structure=CROSS) | edge
    touches_edge = bool((filled & fov_edge).any())
    per_level = filled.sum(axis=(1, 2)) * frame.cell_cm2
    left = filled & (frame.x_mm > midline)[None]
    return Lungs(mask=filled, area_cm2=per_level, volume_ml=float(filled.sum() * frame.cell_ml),
                  left_ml=float(left.sum() * frame.cell_ml), right_ml=float((filled & ~left).sum() * frame.cell_ml),
                  components=components, rejected=rejected, cut_in_plane_levels=cut_levels,
                  touches_edge=touches_edge)


def _close_each_side(frame: SurveyFrame, lungs: npt.NDArray[np.bool_], midline_x: float) -> npt.NDArray[np.bool_]:
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
    labels, count = ndimage.label(lungs, structure=CROSS)
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
    return (lung_like & label_table(n, border))[air_labels]


def _midline_x(frame: SurveyFrame, body: npt.NDArray[np.bool_], lungs: npt.NDArray[np.bool_]) -> float:
    """Patient x of the body's midline at the lung levels (the mean x of the body there)."""
    levels = lungs.any(axis=(1, 2))
    weights = body[levels].sum(axis=0) if levels.any() else body.sum(axis=0)
    total = float(weights.sum())
    return float((weights * frame.x_mm).sum() / total) if total else 0.0


@dataclass(frozen=True)
class Skull:
    """Per level: the largest brain-like cavity inside a bone ring, and the levels where it is a cranial cavity."""

    cavity_cm2: npt.NDArray[np.float64]  # largest brain-like cavity per level (any body size)
    cranial: npt.NDArray[np.bool_]  # levels where it qualifies as a cranial cavity
    cavity_sd: npt.NDArray[np.float64]
    touches_edge: bool


def find_skull(frame: SurveyFrame, body: npt.NDArray[np.bool_], body_cm2: npt.NDArray[np.float64]) -> Skull:
    """Per level: the largest soft-tissue cavity enclosed by a bone ring, and whether it is a skull's."""
    hu = frame.hu
    small = (body_cm2 >= MIN_BODY_CM2) & (body_cm2 <= HEAD_MAX_CM2)
    bone = frame.bone_blocks(small, body[small].any(axis=0), SKULL_HU)
    # Two cells of dilation bridge gaps of up to four cells (~2 cm: the thin frontal and temporal bone
    # between survey cells, the frontal sinus); the cavity shrinks by as much, which only the area feels.
    wall = ndimage.binary_dilation(bone, structure=SQUARE, iterations=2)
    cavity = fill_holes_per_level(wall) & ~wall
    levels = hu.shape[0]
    cavity_cm2 = np.zeros(levels)
    cavity_sd = np.zeros(levels)
    cranial = np.zeros(levels, dtype=bool)
    touches_edge = False
    labels, count = ndimage.label(cavity, structure=CROSS)
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
        cranial = main_run((cavity_cm2 >= CRANIAL_MIN_CM2) & (body_cm2 <= HEAD_MAX_CM2), CRANIAL_GAP_LEVELS)
        if cranial.any():
            skull_cells = brain[labels] & cranial[:, None, None]
            rim = ndimage.binary_dilation(skull_cells, structure=CROSS, iterations=2)
            touches_edge = bool(rim[:, 0, :].any() or rim[:, -1, :].any() or rim[:, :, 0].any()
                                or rim[:, :, -1].any() or (rim & (hu < OUTSIDE_FOV_HU)).any())
    return Skull(cavity_cm2=cavity_cm2, cranial=cranial, cavity_sd=cavity_sd, touches_edge=touches_edge)


@dataclass(frozen=True)
class LevelProfile:
    """Per-level numbers the regions are decided from."""

    body_cm2: npt.NDArray[np.float64]
    largest_cm2: npt.NDArray[np.float64]  # largest in-plane body component
    limbs: npt.NDArray[np.int64]  # in-plane body components of at least LIMB_MIN_CM2
    airway: npt.NDArray[np.bool_]  # enclosed air of airway size (not lung)
    lateral_bone_cm2: npt.NDArray[np.float64]  # min over the two sides of the largest bone piece outside
    # the body's middle third (the spine lies inside it)
    bone_cm2: npt.NDArray[np.float64]  # bone (> PELVIS_BONE_HU) inside the body
    fills_fov: npt.NDArray[np.bool_]  # the body covers the field of view: no outline to measure


def level_profile(frame: SurveyFrame, body: npt.NDArray[np.bool_], lungs: npt.NDArray[np.bool_]) -> LevelProfile:
    hu = frame.hu
    levels = hu.shape[0]
    body_cm2 = body.sum(axis=(1, 2)) * frame.cell_cm2
    labels, count = ndimage.label(body, structure=SQUARE)
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
    air_labels, air_count = ndimage.label(air, structure=CROSS)
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
    left = largest_piece_cm2(bone & (offset > third), frame.cell_cm2)
    right = largest_piece_cm2(bone & (offset < -third), frame.cell_cm2)
    in_fov = (hu > OUTSIDE_FOV_HU).sum(axis=(1, 2))
    fills = body.sum(axis=(1, 2)) >= FILLED_FOV_FRACTION * np.maximum(in_fov, 1)
    return LevelProfile(body_cm2=body_cm2, largest_cm2=largest, limbs=limbs, airway=airway,
                    lateral_bone_cm2=np.minimum(left, right), bone_cm2=bone.sum(axis=(1, 2)) * frame.cell_cm2,
                    fills_fov=fills)
