"""Per-segment volume (mL) and HU statistics from a label map on the volume's grid."""

from __future__ import annotations

import numpy as np
import pytest

from workers.outputs.measurements import label_counts, measure_segments, slice_label_counts, voxel_volume_ml
from workers.volume import FrameRef, Volume


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], axes: np.ndarray | None = None) -> Volume:
    """A random-HU volume (no DICOM needed: measurements only use array and geometry)."""
    rng = np.random.default_rng(5)
    return Volume(
        array=rng.normal(-300.0, 400.0, size=shape).astype(np.float32),
        spacing_mm=spacing,
        origin_mm=(-10.0, 20.0, 5.0),
        axes=np.eye(3) if axes is None else axes,
        series_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3",
        frame_of_reference_uid="1.2.3.5",
        modality="CT",
        frames=tuple(FrameRef(f"1.2.3.4.{k}") for k in range(shape[0])),
        datasets=(),
    )


def test_volume_and_hu_statistics_match_numpy_on_each_mask() -> None:
    volume = _volume((9, 20, 16), (2.5, 0.75, 0.6))
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2:7, 3:15, 4:12] = 2
    labels[4, 5:8, 5:7] = 5  # carves 6 voxels out of label 2
    labels[8, 19, 15] = 7  # a single voxel in the corner

    results = {m.label_value: m for m in measure_segments(volume, labels)}

    assert sorted(results) == [2, 5, 7]
    unit_ml = 2.5 * 0.75 * 0.6 / 1000.0
    for value, measurement in results.items():
        mask = labels == value
        inside = volume.array[mask].astype(np.float64)
        assert measurement.voxel_count == int(mask.sum())
        assert measurement.volume_ml == pytest.approx(mask.sum() * unit_ml, rel=1e-12)
        assert measurement.mean == pytest.approx(inside.mean(), rel=1e-9, abs=1e-9)
        assert measurement.minimum == inside.min()
        assert measurement.maximum == inside.max()
    assert results[2].voxel_count == 5 * 12 * 8 - 6
    assert results[7].minimum == results[7].maximum == float(volume.array[8, 19, 15])


def test_requested_labels_keep_their_order_and_absent_ones_have_zero_volume_and_no_hu() -> None:
    volume = _volume((4, 6, 6), (1.0, 1.0, 1.0))
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[1, 1:3, 1:3] = 3

    results = measure_segments(volume, labels, label_values=[5, 3])

    assert [m.label_value for m in results] == [5, 3]
    absent, present = results
    assert (absent.voxel_count, absent.volume_ml, absent.present) == (0, 0.0, False)
    assert absent.mean is None and absent.minimum is None and absent.maximum is None
    assert present.present and present.voxel_count == 4


def test_empty_label_map_gives_no_segments() -> None:
    volume = _volume((3, 4, 5), (1.0, 1.0, 1.0))
    assert measure_segments(volume, np.zeros(volume.shape, dtype=np.uint8)) == ()


def test_voxel_volume_uses_the_determinant_on_a_sheared_grid() -> None:
    """Gantry tilt: slices step along a direction that is not the image normal."""
    tilt = np.radians(15.0)
    axes = np.array([[0.0, np.sin(tilt), np.cos(tilt)], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    volume = _volume((2, 3, 3), (3.0, 0.5, 0.8), axes=axes)
    expected_mm3 = 3.0 * np.cos(tilt) * 0.5 * 0.8  # slab thickness along the normal x pixel area
    assert voxel_volume_ml(volume) == pytest.approx(expected_mm3 / 1000.0, rel=1e-12)
    labels = np.ones(volume.shape, dtype=np.uint8)
    (only,) = measure_segments(volume, labels)
    assert only.volume_ml == pytest.approx(18 * expected_mm3 / 1000.0, rel=1e-12)


def test_label_map_off_the_volume_grid_is_rejected_with_both_shapes() -> None:
    volume = _volume((3, 4, 5), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"series 1\.2\.3\.4: label map shape \(3, 4, 4\) != volume shape \(3, 4, 5\)"):
        measure_segments(volume, np.zeros((3, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize("bad", [0, 256])
def test_requested_label_value_outside_1_to_255_is_rejected(bad: int) -> None:
    volume = _volume((2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=rf"label values must be 1\.\.255, got \[{bad}\]"):
        measure_segments(volume, np.zeros(volume.shape, dtype=np.uint8), label_values=[1, bad])


def test_non_integer_label_map_is_rejected() -> None:
    volume = _volume((2, 2, 2), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="dtype float32"):
        measure_segments(volume, np.zeros(volume.shape, dtype=np.float32))  # type: ignore[arg-type]


def test_statistics_stay_exact_across_chunks_and_for_many_short_runs() -> None:
    """More voxels than one chunk of the run walk (2**20), noisy labels (runs of 1-3 voxels), a block across chunks."""
    volume = _volume((18, 256, 256), (1.25, 0.7, 0.7))
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, size=volume.shape, dtype=np.uint8)
    labels[14:17, 100:200, 50:220] = 9  # 1 << 20 voxels = 16 slices: this block straddles the first chunk boundary
    assert labels.size > 1 << 20

    results = {m.label_value: m for m in measure_segments(volume, labels)}

    assert sorted(results) == [1, 2, 3, 9]
    for value, measurement in results.items():
        inside = volume.array[labels == value].astype(np.float64)
        assert measurement.voxel_count == inside.size
        assert measurement.mean == pytest.approx(inside.mean(), rel=1e-12)
        assert (measurement.minimum, measurement.maximum) == (inside.min(), inside.max())


def test_label_counts_match_numpy_for_any_integer_map() -> None:
    rng = np.random.default_rng(3)
    for dtype in (np.uint8, np.int16, np.uint16, np.int64):
        labels = rng.integers(0, 6, size=(5, 40, 30)).astype(dtype)
        labels[2, 7, 3] = 200
        if dtype in (np.uint16, np.int64):
            labels[4, 39, 29] = 300  # beyond 255: the table grows to hold it
        counts = label_counts(labels)
        expected = np.bincount(labels.ravel().astype(np.int64), minlength=256)
        assert np.array_equal(counts, expected), dtype
    assert np.array_equal(label_counts(np.zeros((0, 4, 4), np.uint8)), np.zeros(256, np.int64))


def test_label_values_above_255_are_measured_by_default() -> None:
    volume = _volume((2, 3, 4), (1.0, 1.0, 1.0))
    labels = np.zeros(volume.shape, dtype=np.uint16)
    labels[1, 2, 3] = 300
    (only,) = measure_segments(volume, labels)
    assert (only.label_value, only.voxel_count, only.mean) == (300, 1, pytest.approx(float(volume.array[1, 2, 3])))


def test_negative_label_values_are_rejected_with_the_value() -> None:
    labels = np.zeros((2, 2, 2), dtype=np.int16)
    labels[1, 1, 1] = -3
    with pytest.raises(ValueError, match="label map holds negative value -3"):
        label_counts(labels)
    with pytest.raises(ValueError, match=r"series 1\.2\.3\.4: label map holds negative value -3"):
        measure_segments(_volume((2, 2, 2), (1.0, 1.0, 1.0)), labels)


def test_slice_label_counts_match_numpy_per_slice_and_sum_to_the_label_counts() -> None:
    """Runs of one value across slice ends and across the walk's chunks are counted in their own slices."""
    rng = np.random.default_rng(17)
    labels = rng.integers(0, 3, size=(20, 256, 256), dtype=np.uint8)  # 20 slices: more than one chunk
    labels[3:18, 100:256, :] = 4  # a run from the middle of each slice into the next one
    labels[19, -1, -1] = 255
    counts = slice_label_counts(labels)
    assert counts.shape == (20, 256)
    for k in range(20):
        assert np.array_equal(counts[k], np.bincount(labels[k].ravel(), minlength=256)), k
    assert np.array_equal(counts.sum(axis=0), label_counts(labels))
    wide = np.zeros((3, 4, 4), np.uint16)
    wide[2, 1, 1] = 300
    assert slice_label_counts(wide)[2, 300] == 1 and slice_label_counts(wide).shape == (3, 301)
    assert slice_label_counts(np.zeros((0, 4, 4), np.uint8)).shape == (0, 256)
