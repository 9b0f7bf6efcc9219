"""Dice and LUNA16-style FROC on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import Detection, Reference, dice_per_label, froc


def test_dice_known_values() -> None:
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros((4, 4, 4), dtype=np.int64)
    ref[0, :2, :2] = 1  # 4 voxels of label 1
    pred[0, :2, :1] = 1  # 2 voxels, all inside
    ref[2] = 2  # 16 voxels of label 2, never predicted
    pred[3, 0, 0] = 3  # label 3 only predicted
    dice = dice_per_label(pred, ref, labels=[1, 2, 3, 4])
    assert dice[1] == pytest.approx(2 * 2 / (4 + 2))
    assert dice[2] == 0.0
    assert dice[3] == 0.0
    assert dice[4] == 1.0  # absent from both: 1.0 by convention, never NaN
    assert dice_per_label(ref, ref, [0, 1, 2]) == {0: 1.0, 1: 1.0, 2: 1.0}


def test_dice_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        dice_per_label(np.zeros((2, 2)), np.zeros((2, 3)), [1])


def _det(x: float, y: float, z: float, score: float) -> Detection:
    return Detection(centre_xyz_mm=(x, y, z), diameter_mm=5.0, score=score)


# Two scans, three nodules.
REFERENCES = [
    [Reference((0.0, 0.0, 0.0), 10.0), Reference((50.0, 0.0, 0.0), 4.0)],  # R1 (r=5), R2 (r=2)
    [Reference((0.0, 0.0, 0.0), 8.0)],  # R3 (r=4)
]
DETECTIONS = [
    [
        _det(1, 1, 1, 0.9),  # hits R1
        _det(0, 0, 4, 0.8),  # hits R1 again: ignored (neither TP nor FP)
        _det(100, 0, 0, 0.7),  # FP
        _det(51, 0, 0, 0.3),  # hits R2 (distance 1 <= 2)
        _det(0, 5.5, 0, 0.95),  # 5.5 mm from R1 > radius 5: FP
    ],
    [
        _det(0, 0, 3.9, 0.6),  # hits R3 (3.9 <= 4)
        _det(30, 30, 30, 0.5),  # FP
        _det(0, 0, 4.1, 0.4),  # just outside R3's radius: FP
    ],
]


def test_froc_all_nodules() -> None:
    # Operating points (threshold: FPs/scan, sensitivity):
    # .95: .5, 0 | .9: .5, 1/3 | .7: 1, 1/3 | .6: 1, 2/3 | .5: 1.5, 2/3 | .4: 2, 2/3 | .3: 2, 1
    result = froc(DETECTIONS, REFERENCES)
    expected = [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert result.fp_rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert result.sensitivities == pytest.approx(expected)
    assert result.cpm == pytest.approx(4 / 7)
    assert result.n_references == 3
    assert result.n_scans == 2
    assert result.n_detections == 8
    assert result.n_false_positives == 4  # the duplicate hit is not one
    assert result.n_true_positive_references == 3
    assert result.curve_thresholds == pytest.approx([0.95, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert result.curve_fps_per_scan == pytest.approx([0.5, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0])
    assert result.curve_sensitivity == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    assert result.sensitivity_at(1.5) == pytest.approx(2 / 3)
    as_dict = result.to_dict()
    assert as_dict["sensitivity_at"]["1"] == pytest.approx(2 / 3)
    assert as_dict["sensitivity_at"]["0.125"] == 0.0
    # operating points: lowest threshold with at most r FPs per scan
    assert result.threshold_at(0.125) is None
    assert result.threshold_at(0.5) == pytest.approx(0.9)
    assert result.threshold_at(1.0) == pytest.approx(0.6)
    assert as_dict["threshold_at"]["8"] == pytest.approx(0.3)


def test_froc_min_diameter_excludes_small_nodules_and_their_hits() -> None:
    # R2 (4 mm) is excluded: not counted, and the detection hitting it is not an FP.
    result = froc(DETECTIONS, REFERENCES, min_diameter_mm=6.0)
    assert result.n_references == 2
    assert result.n_excluded_references == 1
    assert result.n_false_positives == 4
    assert result.sensitivities == pytest.approx([0, 0, 0.5, 1, 1, 1, 1])
    assert result.cpm == pytest.approx(4.5 / 7)


def test_froc_custom_rates_missed_nodules_and_empty_scans() -> None:
    refs = [[Reference((0.0, 0.0, 0.0), 6.0)], [], [Reference((10.0, 10.0, 10.0), 6.0)]]
    dets = [[_det(0, 0, 0, 0.2)], [_det(5, 5, 5, 0.9)], []]
    result = froc(dets, refs, fp_rates=(0.2, 1 / 3, 1.0))
    # .9: 1/3 FP/scan, sens 0 | .2: 1/3, 1/2 ; the second nodule is never found.
    assert result.sensitivities == pytest.approx([0.0, 0.5, 0.5])
    assert result.cpm == pytest.approx(1 / 3)


def test_froc_detection_hitting_two_nodules_counts_for_both() -> None:
    refs = [[Reference((0.0, 0.0, 0.0), 10.0), Reference((4.0, 0.0, 0.0), 10.0)]]
    result = froc([[_det(2, 0, 0, 0.5)]], refs, fp_rates=(0.125,))
    assert result.sensitivities == (1.0,)


def test_froc_no_detections_and_no_references() -> None:
    refs = [[Reference((0.0, 0.0, 0.0), 10.0)]]
    assert froc([[]], refs).cpm == 0.0
    empty = froc([[_det(0, 0, 0, 0.5)]], [[]])
    assert math.isnan(empty.cpm)
    assert empty.n_false_positives == 1
    assert empty.to_dict()["cpm"] is None
    with pytest.raises(ValueError):
        froc([[]], [[], []])


def test_detection_box() -> None:
    det = Detection((1.0, 2.0, 3.0), 6.0, 0.7)
    assert det.box_cccwhd == (1.0, 2.0, 3.0, 6.0, 6.0, 6.0)
    assert Detection((0.0, 0.0, 0.0), 6.0, 0.7, size_xyz_mm=(4.0, 5.0, 6.0)).box_cccwhd[3:] == (4.0, 5.0, 6.0)
