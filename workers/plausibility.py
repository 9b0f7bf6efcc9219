"""Judge a model's result against its plausibility rules before anything is sent.

Why: a chest model run on the wrong anatomy (or on an image unlike anything it was
trained on) still returns confident-looking label maps and findings. The rules of
:class:`~dicom_node.plausibility_rules.PlausibilityRules` catch what no radiologist
should ever receive: organ volumes far outside their range, lungs outside the body,
a heart that touches no lung, nodules outside the lungs, a network unsure of most of
what it labelled. :func:`check_plausibility` evaluates every rule and returns a
:class:`~dicom_node.plausibility_rules.Plausibility`; the pipeline holds a result that
is not plausible.

How, fast (a 300x512x512 label map in well under a second on one core):

* volumes from one pass over the full-resolution label map, slab by slab, counting only
  the labels the rules name (which also notes the slabs each label occurs in);
* the geometric rules (inside the body, adjacency, findings in the lungs) on the image
  survey's coarse grid (:class:`~workers.body_regions.BodyRegionSurvey`, ~4-6 mm voxels):
  a label's mask there is the strided label map, plus, for small labels (nodules, which
  a stride can step over), every grid cell one of its full-resolution voxels falls in.
  Distances on that grid are known to about one grid voxel, so adjacency allows
  ``adjacency_mm`` plus one grid voxel, and a finding counts as inside the lungs when it
  lies within ``findings_margin_mm`` plus half a grid voxel's diagonal of a lung cell.

When in doubt, hold: a rule that needs the survey when there is none (or it could not
judge the image), a rule naming a label the model does not have, or a rule that does
not fit the result's kind is a check with ``passed=None`` and makes the result
implausible, with a reason saying what could not be verified.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.model_domain import Check, NumberRange
from dicom_node.plausibility_rules import Neighbour, Plausibility, PlausibilityRules, ResultKind
from workers.body_regions import BodyRegionSurvey
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.volume import Volume

__all__ = ["check_plausibility", "check_grid_step"]

logger = logging.getLogger(__name__)

#: Grid voxel size (mm) the checks aim for when there is no survey to borrow a grid from.
GRID_TARGET_MM = 4.0
#: A label with fewer full-resolution voxels than this is also mapped voxel by voxel onto the grid.
SMALL_LABEL_VOXELS = 1 << 18
#: About this many voxels per slab of the counting pass (bounds its temporaries, stays in cache).
_SLAB_VOXELS = 1 << 20


def check_grid_step(spacing_mm: tuple[float, float, float], target_mm: float = GRID_TARGET_MM) -> tuple[int, int, int]:
    """Strides giving voxels of about ``target_mm`` (at least 1 per axis): the grid used without a survey."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing_mm)  # type: ignore[return-value]


def check_plausibility(
    model_id: str,
    rules: PlausibilityRules,
    result: SegmentationResult | DetectionResult | ClassificationResult,
    volume: Volume,
    survey: BodyRegionSurvey | None,
) -> Plausibility:
    """Evaluate every rule of ``rules`` on ``result`` (of ``model_id`` on ``volume``).

    ``survey``: the image survey of ``volume`` (its body and lung masks are the
    independent reference of ``inside_body`` and ``findings_inside``); None when it did
    not run. Raises ValueError when the label map's shape differs from the volume's or
    the survey's masks do not lie on the volume's strided grid (a bug upstream).
    """
    started = time.perf_counter()
    verdict = _Verdict()
    grid = _Grid.build(volume, survey)
    kind: ResultKind
    if isinstance(result, SegmentationResult):
        kind = "segmentation"
        _check_segmentation(rules, result, volume, grid, verdict)
    elif isinstance(result, DetectionResult):
        kind = "detection"
        _check_detections(rules, result, volume, grid, verdict)
    else:
        kind = "classification"  # no rule judges a class yet: any rule given is a misfit below
    for name in rules.misfits(kind):
        verdict.unverified(name, f"the rule {name} does not apply to a {kind} result",
                           f"cannot verify {name}: the model returned a {kind} result, which that rule cannot judge")
    decision = Plausibility(
        model_id=model_id,
        plausible=not verdict.reasons,
        reasons=tuple(verdict.reasons),
        checks=tuple(verdict.checks),
        seconds=round(time.perf_counter() - started, 4),
    )
    if decision.plausible:
        logger.info("%s (%.3f s)", decision.summary(), decision.seconds)
    else:
        logger.warning("%s (%.3f s)", decision.summary(), decision.seconds)
    return decision


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class _Verdict:
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name=name, passed=True, detail=detail))

    def failed(self, name: str, detail: str, reason: str) -> None:
        self.checks.append(Check(name=name, passed=False, detail=detail))
        self.reasons.append(reason)

    def unverified(self, name: str, detail: str, reason: str) -> None:
        self.checks.append(Check(name=name, passed=None, detail=detail))
        self.reasons.append(reason if reason.endswith(": held") else f"{reason}: held")


# --------------------------------------------------------------------------- the check grid


@dataclass
class _Grid:
    """The coarse grid of the geometric checks: ``volume.array[::step[0], ::step[1], ::step[2]]``.

    ``body``/``lungs``: the survey's masks on it (None with ``missing`` saying why).
    """

    volume: Volume
    step: tuple[int, int, int]
    shape: tuple[int, int, int]
    body: npt.NDArray[np.bool_] | None
    lungs: npt.NDArray[np.bool_] | None
    missing: str

    @classmethod
    def build(cls, volume: Volume, survey: BodyRegionSurvey | None) -> _Grid:
        if survey is None:
            step = check_grid_step(volume.spacing_mm)
            return cls(volume, step, _strided_shape(volume.shape, step), None, None,
                       "there is no body-region survey of the image")
        step = tuple(int(s) for s in survey.step)
        if len(step) != 3 or min(step) < 1:
            raise ValueError(f"body-region survey step {survey.step} is not three strides >= 1")
        shape = _strided_shape(volume.shape, step)  # type: ignore[arg-type]
        for name, mask in (("body_mask", survey.body_mask), ("lung_mask", survey.lung_mask)):
            if tuple(mask.shape) != shape:
                raise ValueError(
                    f"body-region survey {name} has shape {tuple(mask.shape)}, but volume {volume.shape} "
                    f"strided by {step} gives {shape}"
                )
        if not survey.available:
            why = "; ".join(survey.notes) or "no reason given"
            return cls(volume, step, shape, None, None,  # type: ignore[arg-type]
                       f"the body-region survey could not judge the image ({why})")
        return cls(volume, step, shape, survey.body_mask.astype(bool, copy=False),  # type: ignore[arg-type]
                   survey.lung_mask.astype(bool, copy=False), "")

    @property
    def cell_mm(self) -> npt.NDArray[np.float64]:
        """Size of one grid voxel along (slice, row, column), mm."""
        return np.asarray(self.volume.spacing_mm, dtype=np.float64) * np.asarray(self.step)

    def label_mask(self, label_map: npt.NDArray[np.integer], value: int, census: _Census) -> npt.NDArray[np.bool_]:
        """Grid cells holding ``value``: the strided sample, plus each cell a voxel of a small label (or of
        one the stride missed entirely, such as a thin sheet between sampled slices) falls in."""
        s0, s1, s2 = self.step
        mask = label_map[::s0, ::s1, ::s2] == value
        count = census.counts[value]
        if count and (count < SMALL_LABEL_VOXELS or not mask.any()):
            for start, stop in census.slabs[value]:
                where = np.argwhere(label_map[start:stop] == value)
                where[:, 0] += start
                cells = np.rint(where / np.asarray(self.step)).astype(np.intp)
                np.clip(cells, 0, np.asarray(self.shape) - 1, out=cells)
                mask[cells[:, 0], cells[:, 1], cells[:, 2]] = True
        return mask

    def patient_x(self, cells: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
        """LPS x (mm; larger is the patient's left) of grid cells ``(N, 3)``."""
        return self.volume.index_to_world(cells * np.asarray(self.step))[:, 0]


def _strided_shape(shape: tuple[int, int, int], step: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(-(-n // s) for n, s in zip(shape, step))  # type: ignore[return-value]


# --------------------------------------------------------------------------- segmentation


@dataclass
class _Census:
    """Voxels of each counted label value, and the slabs ``(first, stop)`` of slices it occurs in."""

    counts: dict[int, int]
    slabs: dict[int, list[tuple[int, int]]]


def _census(label_map: npt.NDArray[np.integer], values: set[int]) -> _Census:
    """Count ``values`` in one pass over slabs of slices (no full-size temporaries; a bincount of 78 M
    voxels costs ~1.4 s for its integer conversion, these comparisons a fraction of it)."""
    counts = dict.fromkeys(values, 0)
    slabs: dict[int, list[tuple[int, int]]] = {v: [] for v in values}
    per_slice = max(1, int(np.prod(label_map.shape[1:])))
    depth = max(1, _SLAB_VOXELS // per_slice)
    for start in range(0, label_map.shape[0], depth):
        stop = min(start + depth, label_map.shape[0])
        block = label_map[start:stop]
        for value in values:
            found = int(np.count_nonzero(block == value))
            if found:
                counts[value] += found
                slabs[value].append((start, stop))
    return _Census(counts, slabs)


def _check_segmentation(rules: PlausibilityRules, result: SegmentationResult, volume: Volume, grid: _Grid,
                        verdict: _Verdict) -> None:
    label_map = result.label_map
    if tuple(label_map.shape) != volume.shape:
        raise ValueError(f"label map shape {tuple(label_map.shape)} differs from volume shape {volume.shape}")
    values = {label.name: label.value for label in result.labels}
    census = _census(label_map, {values[name] for name in rules.label_names() if name in values})
    counts = census.counts
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    masks: dict[str, npt.NDArray[np.bool_]] = {}

    def mask(name: str) -> npt.NDArray[np.bool_]:
        if name not in masks:
            masks[name] = grid.label_mask(label_map, values[name], census)
        return masks[name]

    def unknown(check: str, name: str) -> None:
        verdict.unverified(check, f"the model has no label {name!r} (its labels: {', '.join(values) or 'none'})",
                           f"cannot verify {check}: the model has no label {name!r}")

    for name, limits in rules.volumes_ml.items():
        check = f"volume of {name}"
        if name not in values:
            unknown(check, name)
            continue
        _volume_check(verdict, check, name, counts[values[name]] * voxel_ml, limits)

    for name in rules.inside_body:
        check = f"{name} inside the body"
        if name not in values:
            unknown(check, name)
        elif counts[values[name]] == 0:
            verdict.passed(check, f"no {name} in the result")
        elif grid.body is None:
            verdict.unverified(check, grid.missing, f"cannot verify that {name} lies inside the body: {grid.missing}")
        else:
            _inside_body_check(verdict, check, name, mask(name), grid.body, rules.outside_fraction(name))

    for name, neighbours in rules.adjacent.items():
        for neighbour in neighbours:
            check = f"{name} touches {neighbour.describe()}"
            missing = next((n for n in (name, neighbour.label) if n not in values), None)
            if missing is not None:
                unknown(check, missing)
                continue
            if counts[values[name]] == 0:
                verdict.passed(check, f"no {name} in the result")
                continue
            if counts[values[neighbour.label]] == 0:
                verdict.failed(check, f"no {neighbour.label} in the result",
                               f"{name} is present but there is no {neighbour.label} for it to touch")
                continue
            _adjacency_check(verdict, check, name, neighbour, mask(name), mask(neighbour.label), grid,
                             rules.adjacency_mm)

    if rules.max_low_confidence_fraction is not None:
        _confidence_check(verdict, result.low_confidence_fraction, rules.max_low_confidence_fraction)


def _volume_check(verdict: _Verdict, check: str, name: str, ml: float, limits: NumberRange) -> None:
    allowed = f"{limits.describe()} mL"
    if limits.holds(ml):
        verdict.passed(check, f"{ml:.0f} mL within {allowed}")
    elif ml == 0:
        verdict.failed(check, f"absent (0 mL), allowed {allowed}", f"{name} is absent (0 mL); allowed {allowed}")
    else:
        verdict.failed(check, f"{ml:.0f} mL outside {allowed}",
                       f"{name} volume {ml:.0f} mL is outside the allowed {allowed}")


def _inside_body_check(verdict: _Verdict, check: str, name: str, label: npt.NDArray[np.bool_],
                       body: npt.NDArray[np.bool_], allowed: float) -> None:
    total = int(label.sum())
    outside = int(np.count_nonzero(label & ~body))
    fraction = outside / total if total else 0.0
    detail = f"{fraction:.1%} outside the body (at most {allowed:.1%}; {outside} of {total} grid voxels)"
    if fraction <= allowed:
        verdict.passed(check, detail)
    else:
        verdict.failed(check, detail,
                       f"{fraction:.1%} of {name} lies outside the body (allowed at most {allowed:.1%})")


def _adjacency_check(verdict: _Verdict, check: str, name: str, neighbour: Neighbour, subject: npt.NDArray[np.bool_],
                     other: npt.NDArray[np.bool_], grid: _Grid, adjacency_mm: float) -> None:
    cell = grid.cell_mm
    reach = adjacency_mm + float(cell.max())
    near = _near(subject, other, cell, reach)
    within = f"within {adjacency_mm:g} mm"
    if not len(near):
        verdict.failed(check, f"no {neighbour.label} {within}",
                       f"{name} does not touch {neighbour.label} ({within})")
        return
    if neighbour.sides == "any":
        verdict.passed(check, f"{len(near)} grid voxels of {neighbour.label} {within}")
        return
    centre_x = float(grid.patient_x(np.argwhere(subject)).mean())
    xs = grid.patient_x(near)
    left, right = int(np.count_nonzero(xs > centre_x)), int(np.count_nonzero(xs < centre_x))
    detail = f"{neighbour.label} {within}: {left} grid voxels on the patient's left, {right} on the right"
    if left and right:
        verdict.passed(check, detail)
    else:
        side = "left" if not left else "right"
        verdict.failed(check, detail, f"{name} does not touch {neighbour.label} on the patient's {side} ({within})")


def _near(subject: npt.NDArray[np.bool_], other: npt.NDArray[np.bool_], cell_mm: npt.NDArray[np.float64],
          reach_mm: float) -> npt.NDArray[np.intp]:
    """Cells ``(N, 3)`` of ``other`` within ``reach_mm`` of ``subject`` (distance transform on a crop around it)."""
    pad = np.ceil(reach_mm / cell_mm).astype(int) + 1
    where = np.argwhere(subject)
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, subject.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    distance = ndimage.distance_transform_edt(~subject[crop], sampling=cell_mm)
    near = np.argwhere(other[crop] & (distance <= reach_mm))
    return near + lo


def _confidence_check(verdict: _Verdict, fraction: float | None, allowed: float) -> None:
    check = "network confidence"
    if fraction is None:
        verdict.unverified(check, "the model reports no low-confidence fraction",
                           "cannot verify the network's confidence: the model reports no low-confidence fraction")
        return
    detail = (f"{fraction:.1%} of the labelled voxels won with a probability below 0.5 "
              f"(at most {allowed:.1%})")
    if fraction <= allowed:
        verdict.passed(check, detail)
    else:
        verdict.failed(check, detail,
                       f"{fraction:.1%} of the labelled voxels were labelled with less than 50% probability "
                       f"(allowed at most {allowed:.1%}): the image may be unlike what the model was trained on")


# --------------------------------------------------------------------------- detection


def _check_detections(rules: PlausibilityRules, result: DetectionResult, volume: Volume, grid: _Grid,
                      verdict: _Verdict) -> None:
    if rules.findings_inside is None:
        return
    check = "findings inside the lungs"
    detections = result.detections
    if not detections:
        verdict.passed(check, "no findings")
        return
    if grid.lungs is None:
        verdict.unverified(check, grid.missing,
                           f"cannot verify that the {len(detections)} findings lie inside the lungs: {grid.missing}")
        return
    margin = rules.findings_margin_mm
    cell = grid.cell_mm
    tolerance = margin + 0.5 * float(np.linalg.norm(cell))
    lung_mm = np.argwhere(grid.lungs) * cell
    spacing = np.asarray(volume.spacing_mm, dtype=np.float64)
    limit = (np.asarray(volume.shape) - 1) * spacing
    outside: list[str] = []
    for number, detection in enumerate(detections, start=1):
        at_mm = volume.world_to_index(detection.centre_mm) * spacing  # volume index frame, mm (orthonormal axes)
        where = _format_point(detection.centre_mm)
        if np.any(at_mm < -tolerance) or np.any(at_mm > limit + tolerance):
            outside.append(f"finding {number} at {where} lies outside the image")
            continue
        if not len(lung_mm):
            outside.append(f"finding {number} at {where}: the image shows no lungs")
            continue
        distance = float(np.sqrt(np.min(np.sum((lung_mm - at_mm) ** 2, axis=1))))
        if distance > tolerance:
            outside.append(f"finding {number} at {where} lies {distance:.0f} mm from the lungs "
                           f"(allowed margin {margin:g} mm)")
    inside = len(detections) - len(outside)
    detail = f"{inside} of {len(detections)} findings in the lungs (margin {margin:g} mm)"
    if not outside:
        verdict.passed(check, detail)
    else:
        verdict.failed(check, detail + "; " + "; ".join(outside[:5]) + ("; ..." if len(outside) > 5 else ""),
                       f"{len(outside)} of {len(detections)} findings lie outside the lungs: {outside[0]}")


def _format_point(point: tuple[float, float, float]) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in point) + ") mm"

