"""Evaluation metrics: Dice per label, lesion-wise Dice by size and LUNA16-style FROC for nodule detection.

Why: the segmentation and detection trainings, their held-out evaluation and the
bundle's ``dicom_node.evaluation`` section all report the same figures, computed
one way, here.

What:

* :func:`dice_per_label` - Dice coefficient of every requested label.
* :func:`lesion_matches`, :func:`lesion_summary` - lesion-wise segmentation figures: each
  reference lesion (a 26-connected region of the label) found or not, its own Dice and
  its size; predicted regions that touch no reference lesion (false-positive lesions);
  sensitivity and mean lesion Dice per size band. A voxel Dice averaged over cases
  hides which lesions a model misses; this says it by size.
* :class:`~workers.models.detection_network.Detection`, :class:`Reference` - a detected /
  a reference nodule: a centre in world millimetres, a diameter, and (for a detection) a
  confidence score.
* :func:`froc` - the FROC curve over a set of scans, the sensitivity at given average
  numbers of false positives per scan and the CPM (competition performance metric,
  the mean of those sensitivities), as in the LUNA16 challenge.

Conventions (the choices that change the numbers):

* Dice: ``2 |P ∩ R| / (|P| + |R|)``; a label absent from both prediction and
  reference scores **1.0** (nothing to find, nothing found), so results never hold NaN.
* Lesion-wise Dice (as BraTS 2023's lesion-wise metrics, without their dilation): a
  reference lesion's Dice is taken against the union of the predicted regions that
  overlap it; a lesion no predicted region overlaps is missed and scores 0. Its size is
  the diameter of the sphere of its volume (voxels x voxel volume).
* FROC hit criterion (LUNA16): a detection hits a reference nodule when the Euclidean
  distance between their centres is at most the nodule's radius (``diameter / 2``).
  Both must be in the same world frame (any frame: distances do not depend on it).
* Each reference counts once: its score is the highest score of the detections that
  hit it. The other detections that hit it are neither true nor false positives
  (ignored). A detection hitting two nodules counts for both.
* ``min_diameter_mm``: references smaller than that are *excluded*: they are not in
  the denominator, and detections hitting them (and no included nodule) are ignored,
  not false positives.
* Every other detection is a false positive.
* Operating points are the distinct detection scores (threshold ``score >= t``). The
  sensitivity at an FP rate ``r`` is the **highest sensitivity reached with at most**
  ``r`` false positives per scan on average (a step function, no interpolation
  between operating points; LUNA16's script interpolates linearly, which can only give
  equal or higher values). When even the highest threshold has more than ``r`` FPs per
  scan, the sensitivity is 0. With no included reference at all the sensitivities and
  the CPM are NaN (``None`` in :meth:`FrocResult.to_dict`): there is nothing to find.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# The detector reports Detections at inference, so the class lives with it in workers.models (serving never imports
# training); FROC scores them here.
from workers.models.detection_network import Detection, Vec3

__all__ = [
    "DEFAULT_FP_RATES",
    "LESION_SIZE_BANDS_MM",
    "Detection",
    "FrocResult",
    "LesionMatch",
    "Reference",
    "dice_per_label",
    "froc",
    "lesion_band",
    "lesion_band_names",
    "lesion_matches",
    "lesion_summary",
]

#: The seven operating points of LUNA16's CPM: 1/8 .. 8 average false positives per scan.
DEFAULT_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

#: Size bands (mm, lesion diameter) of the lesion-wise figures: the Fleischner Society's thresholds for
#: solid lung nodules (under 6 mm no routine follow-up; 6-8 mm; over 8 mm).
LESION_SIZE_BANDS_MM: tuple[tuple[float, float], ...] = ((0.0, 6.0), (6.0, 8.0), (8.0, math.inf))



def dice_per_label(
    prediction: npt.ArrayLike, reference: npt.ArrayLike, labels: Iterable[int]
) -> dict[int, float]:
    """Dice coefficient of each label in ``labels`` between two label maps of one shape.

    A label present in neither map scores 1.0 (see the module docstring), so the
    result never contains NaN. Label maps are compared voxel by voxel; their dtypes
    may differ.
    """
    pred = np.asarray(prediction)
    ref = np.asarray(reference)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    result: dict[int, float] = {}
    for label in labels:
        p = pred == label
        r = ref == label
        denominator = int(p.sum()) + int(r.sum())
        if denominator == 0:
            result[int(label)] = 1.0
        else:
            result[int(label)] = 2.0 * int(np.logical_and(p, r).sum()) / denominator
    return result


@dataclass(frozen=True)
class LesionMatch:
    """One reference lesion: its size (voxels, equivalent-sphere diameter in mm) and how it was segmented.

    ``dice`` is 0 and ``found`` False when no predicted region overlaps it.
    ``centre_voxel`` is its centre of mass (array indices, rounded).
    """

    voxels: int
    diameter_mm: float
    dice: float
    found: bool
    centre_voxel: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"voxels": self.voxels, "diameter_mm": round(self.diameter_mm, 2), "dice": self.dice,
                "found": self.found}


def lesion_matches(
    prediction: npt.ArrayLike, reference: npt.ArrayLike, spacing_mm: Sequence[float]
) -> tuple[list[LesionMatch], int]:
    """(each reference lesion's match, number of false-positive lesions) of two masks of one label.

    Lesions are 26-connected regions of ``reference``; ``spacing_mm`` is the voxel
    size along the masks' axes. A predicted region (26-connected, of ``prediction``)
    that overlaps no reference lesion is a false-positive lesion. Convention: see the
    module docstring.
    """
    from scipy import ndimage

    from workers.models.postprocessing import component_sizes

    pred, ref = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if len(spacing_mm) != pred.ndim or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be {pred.ndim} positive sizes, got {tuple(spacing_mm)}")
    voxel_mm3 = float(np.prod([float(v) for v in spacing_mm]))
    pred_regions, pred_sizes = component_sizes(pred)
    ref_regions, ref_sizes = component_sizes(ref)
    matches = []
    for number, where in enumerate(ndimage.find_objects(ref_regions), start=1):
        inside = ref_regions[where] == number
        under = pred_regions[where][inside]  # predicted region numbers over the lesion's voxels
        overlapping = np.unique(under[under > 0])
        hit = int(np.count_nonzero(under))
        voxels = int(ref_sizes[number])
        centre = np.argwhere(inside).mean(axis=0) + [box.start for box in where]
        matches.append(LesionMatch(
            voxels=voxels,
            diameter_mm=float((6.0 * voxels * voxel_mm3 / math.pi) ** (1.0 / 3.0)),
            dice=2.0 * hit / (int(pred_sizes[overlapping].sum()) + voxels),
            found=hit > 0,
            centre_voxel=tuple(int(v) for v in np.round(centre)),
        ))
    touched = np.unique(pred_regions[ref])
    false_positives = int(np.count_nonzero(pred_sizes)) - int(np.count_nonzero(touched))
    return matches, false_positives


def _band_name(low: float, high: float) -> str:
    if low <= 0:
        return f"< {high:g} mm"
    return f">= {low:g} mm" if math.isinf(high) else f"{low:g}-{high:g} mm"


def lesion_band_names(bands_mm: Sequence[tuple[float, float]] = LESION_SIZE_BANDS_MM) -> list[str]:
    """The names of the size bands, in order: ``"< 6 mm"``, ``"6-8 mm"``, ``">= 8 mm"``."""
    return [_band_name(low, high) for low, high in bands_mm]


def lesion_band(diameter_mm: float, bands_mm: Sequence[tuple[float, float]] = LESION_SIZE_BANDS_MM) -> str | None:
    """The name of the size band holding ``diameter_mm`` (``low <= diameter < high``); None: no band does."""
    return next((_band_name(low, high) for low, high in bands_mm if low <= diameter_mm < high), None)


def lesion_summary(
    matches: Iterable[LesionMatch],
    false_positive_lesions: Sequence[int],
    bands_mm: Sequence[tuple[float, float]] = LESION_SIZE_BANDS_MM,
) -> dict[str, Any]:
    """Lesion-wise figures of a set of cases: overall and per size band.

    ``matches`` are every case's reference lesions; ``false_positive_lesions`` one
    count per case. A band holds the lesions with ``low <= diameter < high``; its
    ``sensitivity`` (found / lesions) and ``mean_dice`` are None when it has no lesion.
    """
    every = list(matches)

    def figures(group: list[LesionMatch]) -> dict[str, Any]:
        found = sum(m.found for m in group)
        return {
            "lesions": len(group),
            "found": found,
            "sensitivity": found / len(group) if group else None,
            "mean_dice": float(np.mean([m.dice for m in group])) if group else None,
        }

    cases = len(false_positive_lesions)
    return {
        **figures(every),
        "size_bands": [
            {"band": name, "min_mm": low, "max_mm": None if math.isinf(high) else high,
             **figures([m for m in every if lesion_band(m.diameter_mm, bands_mm) == name])}
            for name, (low, high) in zip(lesion_band_names(bands_mm), bands_mm, strict=True)
        ],
        "false_positive_lesions": int(sum(false_positive_lesions)),
        "false_positive_lesions_per_case": sum(false_positive_lesions) / cases if cases else None,
    }


@dataclass(frozen=True)
class Reference:
    """One reference (ground-truth) nodule: centre in world mm and diameter in mm."""

    centre_xyz_mm: Vec3
    diameter_mm: float


@dataclass(frozen=True)
class FrocResult:
    """FROC of a set of scans.

    ``sensitivities[i]`` is the sensitivity at ``fp_rates[i]`` average false positives
    per scan, ``cpm`` their mean. The full curve is ``curve_fps_per_scan`` /
    ``curve_sensitivity`` / ``curve_thresholds`` (one point per distinct score,
    decreasing threshold, increasing FPs and sensitivity).
    """

    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    cpm: float
    curve_fps_per_scan: tuple[float, ...]
    curve_sensitivity: tuple[float, ...]
    curve_thresholds: tuple[float, ...]
    n_scans: int
    n_references: int
    n_excluded_references: int
    n_detections: int
    n_true_positive_references: int = 0
    n_false_positives: int = 0
    min_diameter_mm: float | None = None

    def sensitivity_at(self, fp_rate: float) -> float:
        """Sensitivity at an arbitrary FP rate (same step convention as :func:`froc`)."""
        return _sensitivity_at(
            np.asarray(self.curve_fps_per_scan), np.asarray(self.curve_sensitivity), fp_rate
        )

    def threshold_at(self, fp_rate: float) -> float | None:
        """The score threshold of the operating point reported at ``fp_rate``: the lowest
        threshold with at most ``fp_rate`` false positives per scan (None: there is none)."""
        fps = np.asarray(self.curve_fps_per_scan)
        ok = fps <= fp_rate + 1e-12
        return float(np.asarray(self.curve_thresholds)[ok].min()) if ok.any() else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN (no reference nodule at all) becomes ``None``."""
        return {
            "fp_rates": list(self.fp_rates),
            "sensitivities": [_finite_or_none(s) for s in self.sensitivities],
            "sensitivity_at": {_rate_key(r): _finite_or_none(s) for r, s in zip(self.fp_rates, self.sensitivities)},
            "threshold_at": {_rate_key(r): self.threshold_at(r) for r in self.fp_rates},
            "cpm": _finite_or_none(self.cpm),
            "n_scans": self.n_scans,
            "n_references": self.n_references,
            "n_excluded_references": self.n_excluded_references,
            "n_detections": self.n_detections,
            "n_true_positive_references": self.n_true_positive_references,
            "n_false_positives": self.n_false_positives,
            "min_diameter_mm": self.min_diameter_mm,
            "curve": {
                "fps_per_scan": list(self.curve_fps_per_scan),
                "sensitivity": list(self.curve_sensitivity),
                "thresholds": list(self.curve_thresholds),
            },
        }


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _rate_key(rate: float) -> str:
    """'0.125', '1', '8' - JSON keys for FP rates."""
    return f"{rate:g}"


def _sensitivity_at(fps: npt.NDArray[np.float64], sens: npt.NDArray[np.float64], rate: float) -> float:
    ok = fps <= rate + 1e-12
    return float(sens[ok].max()) if ok.any() else 0.0


def froc(
    detections_per_scan: Sequence[Sequence[Detection]],
    references_per_scan: Sequence[Sequence[Reference]],
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    *,
    min_diameter_mm: float | None = None,
) -> FrocResult:
    """LUNA16-style FROC of detections against references, scan by scan.

    ``detections_per_scan[i]`` and ``references_per_scan[i]`` belong to scan ``i``
    (both lists have one entry per scan, possibly empty). References with a diameter
    below ``min_diameter_mm`` are excluded (see the module docstring for every rule).
    """
    if len(detections_per_scan) != len(references_per_scan):
        raise ValueError(
            f"{len(detections_per_scan)} detection lists for {len(references_per_scan)} reference lists"
        )
    n_scans = len(references_per_scan)
    if n_scans == 0:
        raise ValueError("FROC needs at least one scan")

    ref_scores: list[float] = []  # best hitting score per included reference (-inf: missed)
    fp_scores: list[float] = []
    n_excluded = 0
    n_detections = 0
    for detections, references in zip(detections_per_scan, references_per_scan):
        n_detections += len(detections)
        included = [
            r for r in references if min_diameter_mm is None or r.diameter_mm >= min_diameter_mm
        ]
        excluded = [r for r in references if not (min_diameter_mm is None or r.diameter_mm >= min_diameter_mm)]
        n_excluded += len(excluded)
        best = [-math.inf] * len(included)
        for det in detections:
            centre = np.asarray(det.centre_xyz_mm, dtype=np.float64)
            hit_included = False
            for k, ref in enumerate(included):
                if _hits(centre, ref):
                    hit_included = True
                    best[k] = max(best[k], float(det.score))
            if hit_included:
                continue
            if any(_hits(centre, ref) for ref in excluded):
                continue  # hits only an excluded nodule: ignored
            fp_scores.append(float(det.score))
        ref_scores.extend(best)

    n_refs = len(ref_scores)
    ref_arr = np.asarray(ref_scores, dtype=np.float64)
    fp_arr = np.asarray(fp_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([ref_arr[np.isfinite(ref_arr)], fp_arr]))[::-1]
    if thresholds.size:
        # counts of scores >= each threshold, via sorted arrays
        tp_sorted = np.sort(ref_arr[np.isfinite(ref_arr)])
        fp_sorted = np.sort(fp_arr)
        tp_counts = tp_sorted.size - np.searchsorted(tp_sorted, thresholds, side="left")
        fp_counts = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
        curve_fps = fp_counts / n_scans
        curve_sens = tp_counts / n_refs if n_refs else np.zeros_like(curve_fps)
    else:
        curve_fps = np.zeros(0)
        curve_sens = np.zeros(0)

    rates = tuple(float(r) for r in fp_rates)
    if n_refs == 0:
        sens = tuple(math.nan for _ in rates)
        cpm = math.nan
    else:
        sens = tuple(_sensitivity_at(curve_fps, curve_sens, r) for r in rates)
        cpm = float(np.mean(sens)) if sens else math.nan
    return FrocResult(
        fp_rates=rates,
        sensitivities=sens,
        cpm=cpm,
        curve_fps_per_scan=tuple(float(v) for v in curve_fps),
        curve_sensitivity=tuple(float(v) for v in curve_sens),
        curve_thresholds=tuple(float(v) for v in thresholds),
        n_scans=n_scans,
        n_references=n_refs,
        n_excluded_references=n_excluded,
        n_detections=n_detections,
        n_true_positive_references=int(np.isfinite(ref_arr).sum()),
        n_false_positives=len(fp_scores),
        min_diameter_mm=min_diameter_mm,
    )


def _hits(centre: npt.NDArray[np.float64], ref: Reference) -> bool:
    distance = float(np.linalg.norm(centre - np.asarray(ref.centre_xyz_mm, dtype=np.float64)))
    return distance <= ref.diameter_mm / 2.0
