"""The device-agnostic half of the GPU tests (tests/gpu/cases.py), checked on the CPU: the comparisons flag
what is out of tolerance and pass what is within it, a model runs through the same timing and dtype recording
on the CPU (float32, no device memory), and the shipped registry holds every bundle of workers/bundles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gpu.cases import (
    CENTRE_TOLERANCE_MM,
    MODEL_IDS,
    SCORE_TOLERANCE,
    chest_ct,
    detection_threshold,
    label_differences,
    load,
    result_differences,
    shipped_registry,
    timed_predict,
)
from workers.models.base import ClassificationResult, DetectionResult


def test_the_shipped_registry_holds_every_bundle_of_workers_bundles() -> None:
    registry = shipped_registry()
    bundles = {path.name for path in (registry.path(MODEL_IDS[0]).parent).iterdir() if path.is_dir()}
    assert {registry.path(model_id).name for model_id in registry.ids} == bundles
    assert list(registry.ids) == MODEL_IDS
    assert detection_threshold(registry, "lung-nodule-detection") == pytest.approx(0.3)


def test_label_maps_agree_within_tolerance_and_not_beyond() -> None:
    reference = np.zeros((40, 64, 64), dtype=np.uint8)
    reference[5:35, 10:54, 10:30] = 1  # an organ of 26,400 voxels
    reference[5:35, 10:54, 34:54] = 2
    reference[18:22, 30:34, 31:33] = 3  # a small label of 32 voxels: too small to be judged by Dice
    assert label_differences(reference, reference.copy()) == []
    boundary = reference.copy()
    boundary[5, 10:20, 10:30] = 0  # 200 boundary voxels of label 1 lost: Dice 0.996, 99.95 % of voxels agree
    assert label_differences(reference, boundary) == []
    shrunk = reference.copy()
    shrunk[5:15, :, :][shrunk[5:15, :, :] == 2] = 0  # a third of label 2 lost
    problems = label_differences(reference, shrunk)
    assert any(p.startswith("label 2: Dice") for p in problems) and any("of the voxels agree" in p for p in problems)
    assert label_differences(reference, reference[:-1]) == ["label maps of shapes (40, 64, 64) and (39, 64, 64)"]


@pytest.fixture(scope="module")
def cpu_detections() -> tuple[DetectionResult, DetectionResult, set[str], float | None]:
    """The shipped detector run twice on the CPU on a 60-slice chest CT through :func:`timed_predict`."""
    registry = shipped_registry()
    before = torch.backends.cudnn.benchmark
    try:
        model = load(registry, "lung-nodule-detection", "cpu", cudnn_benchmark=False)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
    volume = chest_ct(seed=7, shape=(60, 512, 512))
    first, second = timed_predict(model, volume), timed_predict(model, volume)
    assert first.seconds > 0
    return first.result, second.result, first.dtypes, first.peak_mib


def test_a_model_runs_on_the_cpu_through_the_gpu_tests_path(cpu_detections) -> None:  # type: ignore[no-untyped-def]
    first, second, dtypes, peak = cpu_detections
    assert dtypes == {"float32"} and peak is None  # no AMP on the CPU, no device memory to report
    assert first.detections, "the phantom's nodules (8-20 mm) were not found: nothing to compare"
    assert result_differences(first, second, threshold=0.3) == []


def test_detections_match_within_tolerance_and_not_beyond(cpu_detections) -> None:  # type: ignore[no-untyped-def]
    reference = cpu_detections[0]
    found = reference.detections[0]

    def moved(dx: float, score: float) -> DetectionResult:
        x, y, z = found.centre_mm
        changed = found.model_copy(update={"centre_mm": (x + dx, y, z), "score": score})
        return DetectionResult(detections=(changed, *reference.detections[1:]))

    assert result_differences(reference, moved(CENTRE_TOLERANCE_MM / 2, found.score + SCORE_TOLERANCE / 2), 0.3) == []
    assert result_differences(reference, moved(CENTRE_TOLERANCE_MM * 2, found.score), 0.3)
    assert result_differences(reference, moved(0.0, found.score - 2 * SCORE_TOLERANCE), 0.3)
    missing = DetectionResult(detections=reference.detections[1:])
    assert result_differences(reference, missing, threshold=0.3) != []
    # one just above the reporting threshold may be missing on the other device
    assert result_differences(reference, missing, threshold=found.score - SCORE_TOLERANCE / 2) == []


def test_class_probabilities_compare_by_winner_and_tolerance(cpu_detections) -> None:  # type: ignore[no-untyped-def]
    label = cpu_detections[0].detections[0].label  # any two labels will do: only the probabilities are compared

    def result(p: float) -> ClassificationResult:
        return ClassificationResult(labels=(label, label), probabilities=(1.0 - p, p))

    assert result_differences(result(0.70), result(0.71)) == []
    assert result_differences(result(0.70), result(0.75))  # moved more than the tolerance
    assert any("winning class" in p for p in result_differences(result(0.505), result(0.495)))
