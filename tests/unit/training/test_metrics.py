"""Dice and LUNA16-style FROC on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import Detection, LesionMatch, Reference, dice_per_label, froc, lesion_matches, lesion_summary


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


# --------------------------------------------------------------------------- lesion-wise Dice


def _lesion_masks() -> tuple[np.ndarray, np.ndarray]:
    """Reference: a 27-voxel cube, a 1-voxel speck, a 2-voxel pair touching diagonally. Prediction: the cube
    shifted by one voxel along x (18 of 27 overlap) and grown by a 9-voxel slab, the pair's one voxel, and two
    stray regions (a voxel and a diagonal pair)."""
    ref = np.zeros((20, 20, 20), dtype=bool)
    ref[2:5, 2:5, 2:5] = True                       # cube, 27
    ref[10, 10, 10] = True                          # speck, 1 (missed)
    ref[15, 15, 15] = ref[16, 16, 16] = True        # diagonal neighbours: one lesion of 2 (26-connectivity)
    pred = np.zeros_like(ref)
    pred[3:6, 2:5, 2:5] = True                      # 27 voxels, 18 on the cube
    pred[6, 2:5, 2:5] = True                        # 9 more, same region
    pred[16, 16, 16] = True                         # half of the pair
    pred[0, 19, 19] = True                          # stray
    pred[18, 0, 0] = pred[19, 1, 1] = True          # stray pair: one region
    return pred, ref


def test_lesion_matches_scores_each_reference_lesion_on_its_own() -> None:
    pred, ref = _lesion_masks()
    matches, false_positives = lesion_matches(pred, ref, (1.0, 1.0, 1.0))
    by_size = {m.voxels: m for m in matches}
    assert sorted(by_size) == [1, 2, 27] and false_positives == 2
    assert by_size[27].dice == pytest.approx(2 * 18 / (36 + 27)) and by_size[27].found
    assert by_size[1].dice == 0.0 and not by_size[1].found
    assert by_size[2].dice == pytest.approx(2 * 1 / (1 + 2)) and by_size[2].found
    assert by_size[27].centre_voxel == (3, 3, 3) and by_size[1].centre_voxel == (10, 10, 10)
    # Diameter of the sphere of the lesion's volume: 27 voxels of 2 x 1 x 1 mm -> 54 mm^3.
    big = lesion_matches(pred, ref, (2.0, 1.0, 1.0))[0]
    assert max(m.diameter_mm for m in big) == pytest.approx((6 * 54 / math.pi) ** (1 / 3))


def test_lesion_matches_edge_cases_and_errors() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert lesion_matches(empty, empty, (1, 1, 1)) == ([], 0)
    one = empty.copy()
    one[1, 1, 1] = True
    assert lesion_matches(one, empty, (1, 1, 1)) == ([], 1)
    # A predicted region bridging two lesions counts, whole, for each.
    ref = np.zeros((1, 1, 5), dtype=bool)
    ref[0, 0, [0, 4]] = True
    bridge = np.ones_like(ref)
    assert [m.dice for m in lesion_matches(bridge, ref, (1, 1, 1))[0]] == [pytest.approx(2 / 6)] * 2
    with pytest.raises(ValueError, match=r"prediction shape \(4, 4, 4\) != reference shape \(1, 1, 5\)"):
        lesion_matches(one, ref, (1, 1, 1))
    with pytest.raises(ValueError, match=r"spacing_mm must be 3 positive sizes, got \(1, 0, 1\)"):
        lesion_matches(one, one, (1, 0, 1))


def test_lesion_summary_by_size_band() -> None:
    matches = [LesionMatch(1, 3.0, 0.0, False), LesionMatch(2, 5.9, 0.5, True),
               LesionMatch(9, 6.0, 0.8, True), LesionMatch(500, 12.0, 0.9, True)]
    summary = lesion_summary(matches, [1, 0, 2, 0])
    assert (summary["lesions"], summary["found"]) == (4, 3)
    assert summary["sensitivity"] == 0.75 and summary["mean_dice"] == pytest.approx(2.2 / 4)
    assert summary["false_positive_lesions"] == 3 and summary["false_positive_lesions_per_case"] == 0.75
    bands = {b["band"]: b for b in summary["size_bands"]}
    assert list(bands) == ["< 6 mm", "6-8 mm", ">= 8 mm"]
    assert (bands["< 6 mm"]["lesions"], bands["< 6 mm"]["found"], bands["< 6 mm"]["mean_dice"]) == (2, 1, 0.25)
    assert bands["6-8 mm"]["sensitivity"] == 1.0 and bands[">= 8 mm"]["max_mm"] is None
    nothing = lesion_summary([], [], bands_mm=((0.0, 10.0),))
    assert nothing["sensitivity"] is None and nothing["size_bands"][0]["mean_dice"] is None
    assert nothing["false_positive_lesions_per_case"] is None
