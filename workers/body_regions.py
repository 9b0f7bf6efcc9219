"""Which body regions a CT volume actually covers, judged from the image in well under a second.

Why: the header's BodyPartExamined and descriptions are often missing or wrong (issue 21: a
chest model ran on a real head CT); the applicability check
(:func:`dicom_node.model_domain.decide`) therefore also asks the image, and the image wins.
This module looks at Hounsfield units only (numpy + scipy.ndimage, no network) and answers
from anatomy that no scanner setting hides:

* **body**: tissue (> :data:`~workers.body_landmarks.TISSUE_HU`) in the largest connected component(s), after a
  one-cell opening that detaches the table and headrest, with each level's holes filled;
* **lungs** (chest): air (< :data:`~workers.body_landmarks.AIR_HU`) enclosed by the body at its level (not outside
  air), in 3-D components of at least :data:`~workers.body_landmarks.LUNG_COMPONENT_ML` whose mean is parenchyma, not
  gas (>= :data:`~workers.body_landmarks.LUNG_MEAN_HU`; outside air, airways, sinuses and bowel gas are about
  -1000 HU), :data:`~workers.body_landmarks.CHEST_MIN_ML` together, outside the head's levels; lung-like air open to
  the image edge joins them as lung cut by the field of view; the trachea is dropped where a
  level shows it apart; the mask is closed in-plane (nodules against the chest wall) and its
  holes (vessels, nodules) filled;
* **skull** (head): a bone ring (> :data:`~workers.body_landmarks.SKULL_HU`, read at full in-plane resolution at the
  levels of small cross-section, gaps of up to ~2 cm bridged) enclosing at least
  :data:`~workers.body_landmarks.CRANIAL_MIN_CM2` of uniform brain-density tissue (mean 0..80 HU, sd <= 40 HU) at
  levels whose body cross-section is at most :data:`~workers.body_landmarks.HEAD_MAX_CM2`;
* neck, abdomen, pelvis, extremities and whole body, best effort, from the cross-section,
  the order of the regions along the patient and lateral bone (see :func:`_regions`).

The survey is three modules: the working frame (:mod:`workers.survey_frame`), the tissue
masks and landmarks (:mod:`workers.body_landmarks`) and, here, the regions decided from them.

The volume may lie in any orientation: the index axis closest to the patient's
superior-inferior axis (LPS +z, from ``Volume.axes``) is the level axis, and the strided
array is transposed (no resampling) so every judgement is per axial level, inferior to
superior. Everything runs on a grid of about :data:`~workers.survey_frame.SURVEY_VOXEL_MM` voxels taken with
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

from dicom_node.model_domain import BODY_REGIONS, BodyRegion, ImageRegions
from workers.body_landmarks import (
    HEAD_MAX_CM2,
    LUNG_LEVEL_CM2,
    MIN_BODY_CM2,
    LevelProfile,
    Lungs,
    Skull,
    body_mask,
    find_lungs,
    find_skull,
    level_profile,
)
from workers.survey_frame import SurveyFrame, level_runs, survey_step
from workers.volume import Volume

__all__ = ["BodyRegionSurvey", "RegionExtent", "survey_body_regions"]

logger = logging.getLogger(__name__)

#: Fewer survey levels than this along the superior-inferior axis: the image is not judged.
MIN_LEVELS = 5
#: Fewer survey cells than this across a level (either in-plane axis): not judged.
MIN_CELLS = 8
#: Lungs count as touching an end level when their area there is at least this (cm^2).
LUNG_END_CM2 = 1.0
#: A trunk's cross-section is at least this (cm^2; a head's is at most HEAD_MAX_CM2).
TRUNK_MIN_CM2 = 300.0
#: The face and jaw below the lowest skull ring still count as head down to this distance (mm).
FACE_MM = 60.0
#: The skull counts as closed at an end level when the cavity there is below this fraction of its maximum.
CRANIAL_END_FRACTION = 0.1
#: Pelvis: bone denser than PELVIS_BONE_HU in one piece of at least this (cm^2) on each side, outside
#: the middle third of the body (iliac wings, acetabula and femoral heads: 10-30 cm2; a rib cut
#: obliquely in the upper abdomen: < 7 cm2; the spine lies in the middle third) ...
PELVIS_SIDE_CM2 = 10.0
#: ... at least this far (mm) below the lungs' base, when the volume shows lungs.
PELVIS_BELOW_LUNG_MM = 80.0
#: Minimum extents (mm) for the best-effort regions to be reported.
ABDOMEN_MIN_MM = 40.0
NECK_MIN_MM = 20.0
#: The neck may start this far (mm) below the head or above the lungs (the shoulders lie between).
NECK_GAP_MM = 60.0
EXTREMITY_MIN_MM = 20.0
#: A limb holds a long bone: bone (> PELVIS_BONE_HU) of at least this (cm^2) on most of its levels.
LIMB_BONE_CM2 = 1.0


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
        frame = SurveyFrame.of(volume, step)
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


def _survey(frame: SurveyFrame, step: tuple[int, int, int], start: float) -> BodyRegionSurvey:
    body = body_mask(frame)
    body_cm2 = body.sum(axis=(1, 2)) * frame.cell_cm2
    skull = find_skull(frame, body, body_cm2)
    head_levels = _head_levels(frame, skull, body_cm2)
    lungs = find_lungs(frame, body, head_levels)
    profile = level_profile(frame, body, lungs.mask)
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


def _head_levels(frame: SurveyFrame, skull: Skull, body_cm2: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
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


def _regions(frame: SurveyFrame, skull: Skull, head: npt.NDArray[np.bool_], lungs: Lungs,
             profile: LevelProfile) -> list[RegionExtent]:
    """Decide the regions from the per-level profile; the heuristics are in the module docstring and here.

    * head: levels with a skull ring (see :func:`_head_levels`); complete when the cranial
      cavity has (nearly) vanished at both end levels (vertex and skull base inside) and the
      skull keeps off the image edge;
    * chest: levels with at least :data:`~workers.body_landmarks.LUNG_LEVEL_CM2` of lung; complete when the lungs do
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
    * levels where the body fills the field of view (:data:`~workers.body_landmarks.FILLED_FOV_FRACTION`) have no
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
        for lo, hi in level_runs(small & ~taken):
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
    runs = [r for r in level_runs(pelvic) if (r[1] - r[0] + 1) * level_mm >= 15.0]
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
    limb_runs = [r for r in level_runs(limb) if (r[1] - r[0] + 1) * level_mm >= EXTREMITY_MIN_MM
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
