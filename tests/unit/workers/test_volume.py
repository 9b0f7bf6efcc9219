"""Tests of the DICOM series -> Volume loader (workers.volume).

Every series comes from the phantom generator (training.phantoms.ct_series), so the
expected HU volume and the expected position of each slice are known exactly; the
tests shuffle file order and InstanceNumber so only positions can give the order.
"""

from __future__ import annotations

import copy
import random
import re
import subprocess
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from training.phantoms.ct_series import (
    SeriesGeometry,
    ct_series_datasets,
    encode_series,
    simple_body_phantom,
    write_series,
)
from workers.volume import Volume, VolumeError, load_series, volume_from_datasets

Orientation = tuple[float, float, float, float, float, float]

ORIENTATIONS: dict[str, Orientation] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    # Double oblique: neither cosine lies in a patient plane.
    "oblique": (0.8, 0.6, 0.0, -0.36, 0.48, -0.8),
}


def _geometry(orientation: Orientation = ORIENTATIONS["axial"], slices: int = 20) -> SeriesGeometry:
    """A small non-square grid with anisotropic pixels, so swapped axes cannot pass."""
    return SeriesGeometry(
        rows=48, columns=64, slices=slices, pixel_spacing=(0.8, 0.6), slice_spacing=1.5,
        slice_thickness=2.0, orientation=orientation,
    )


AXIAL = _geometry()
AXIAL_HU = simple_body_phantom(AXIAL, seed=7)


def _axial_datasets(**kwargs: object) -> list[Dataset]:
    """Fresh in-memory instances of the axial phantom series (each test may edit them)."""
    return ct_series_datasets(AXIAL_HU, AXIAL, seed=7, **kwargs)  # type: ignore[arg-type]


def _shuffled(datasets: Sequence[Dataset], seed: int = 0) -> list[Dataset]:
    """The instances in random order with random InstanceNumbers (order must come from positions)."""
    rng = random.Random(seed)
    out = list(datasets)
    rng.shuffle(out)
    numbers = list(range(1, len(out) + 1))
    rng.shuffle(numbers)
    for ds, number in zip(out, numbers, strict=True):
        ds.InstanceNumber = number
    return out


def _positions(datasets: Sequence[Dataset]) -> npt.NDArray[np.float64]:
    return np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])


def _assert_geometry(volume: Volume, geometry: SeriesGeometry, datasets: Sequence[Dataset]) -> None:
    """index_to_world(k, j, i) == IPP of generated slice k + j * row spacing * column cosines + i * ..."""
    ipp = _positions(datasets)  # generator order: slice k at ipp[k]
    rng = np.random.default_rng(0)
    k = rng.integers(0, geometry.slices, 50)
    j = rng.integers(0, geometry.rows, 50)
    i = rng.integers(0, geometry.columns, 50)
    expected = (
        ipp[k]
        + (j * geometry.pixel_spacing[0])[:, None] * geometry.column_cosines
        + (i * geometry.pixel_spacing[1])[:, None] * geometry.row_cosines
    )
    index = np.stack([k, j, i], axis=1)
    np.testing.assert_allclose(volume.index_to_world(index), expected, atol=1e-4)
    np.testing.assert_allclose(volume.world_to_index(expected), index, atol=1e-4)
    np.testing.assert_allclose(volume.origin_mm, ipp[0], atol=1e-6)
    np.testing.assert_allclose(volume.spacing_mm, (geometry.slice_spacing, *geometry.pixel_spacing), atol=1e-6)
    np.testing.assert_allclose(
        volume.axes, [geometry.normal, geometry.column_cosines, geometry.row_cosines], atol=1e-9
    )


def _error(build: Callable[[], object]) -> str:
    with pytest.raises(VolumeError) as info:
        build()
    return str(info.value)


# --- order, values and geometry ---------------------------------------------------


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_shuffled_files_load_in_position_order_with_exact_geometry(name: str, tmp_path: Path) -> None:
    geometry = _geometry(ORIENTATIONS[name])
    hu = simple_body_phantom(geometry, seed=3)
    datasets = ct_series_datasets(hu, geometry, seed=3)
    expected_sops = [str(ds.SOPInstanceUID) for ds in datasets]
    paths = write_series(_shuffled(copy.deepcopy(datasets), seed=len(name)), tmp_path)
    random.Random(1).shuffle(paths)

    volume = load_series(paths)

    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    np.testing.assert_array_equal(volume.array, hu)
    assert [f.sop_instance_uid for f in volume.frames] == expected_sops
    assert all(f.frame_number is None for f in volume.frames)
    _assert_geometry(volume, geometry, datasets)
    assert volume.series_instance_uid == datasets[0].SeriesInstanceUID
    assert volume.study_instance_uid == datasets[0].StudyInstanceUID
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert volume.modality == "CT"
    assert [ds.SOPInstanceUID for ds in volume.datasets] == expected_sops
    assert not any("PixelData" in ds for ds in volume.datasets)
    assert all("ImagePositionPatient" in ds for ds in volume.datasets)


def test_in_memory_datasets_load_without_being_modified() -> None:
    datasets = _shuffled(_axial_datasets())
    volume = volume_from_datasets(datasets)
    np.testing.assert_array_equal(volume.array, AXIAL_HU)
    assert all("PixelData" in ds for ds in datasets)
    assert not any("PixelData" in ds for ds in volume.datasets)
    assert volume.datasets[0].PatientID == datasets[0].PatientID


def test_rescale_is_applied_per_slice() -> None:
    """Odd slices stored with slope 0.5 / intercept -2000, even ones with 1 / -1024."""
    uids = {"study_uid": "1.2.3.1", "series_uid": "1.2.3.2", "frame_of_reference_uid": "1.2.3.3"}
    plain = _axial_datasets(**uids)
    scaled = _axial_datasets(rescale_intercept=-2000.0, rescale_slope=0.5, **uids)
    mixed = [plain[k] if k % 2 == 0 else scaled[k] for k in range(AXIAL.slices)]
    assert float(mixed[1].RescaleSlope) == 0.5 and mixed[1].PixelRepresentation == 0
    volume = volume_from_datasets(_shuffled(mixed))
    np.testing.assert_array_equal(volume.array, AXIAL_HU)


def test_missing_rescale_means_identity() -> None:
    """MR images have no rescale: voxel values are the stored values."""
    datasets = _axial_datasets()
    for ds in datasets:
        del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    volume = volume_from_datasets(datasets)
    np.testing.assert_array_equal(volume.array, AXIAL_HU.astype(np.int32) + 1024)


def test_load_series_holds_pixels_once(tmp_path: Path) -> None:
    """Peak memory stays near the float32 volume: raw pixel data is read and dropped per instance.

    Reading every file whole first would add the raw series (half the volume here) to the peak.
    """
    geometry = SeriesGeometry(rows=256, columns=256, slices=24)
    paths = write_series(ct_series_datasets(simple_body_phantom(geometry, 1), geometry), tmp_path)
    tracemalloc.start()
    try:
        volume = load_series(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * volume.array.nbytes, f"peak {peak} bytes for a {volume.array.nbytes}-byte volume"


def test_single_slice_takes_its_spacing_from_slice_thickness() -> None:
    volume = volume_from_datasets(_axial_datasets()[5:6])
    assert volume.shape == (1, AXIAL.rows, AXIAL.columns)
    assert volume.spacing_mm == (AXIAL.slice_thickness, *AXIAL.pixel_spacing)
    np.testing.assert_array_equal(volume.array[0], AXIAL_HU[5])


# --- compressed transfer syntaxes -------------------------------------------------


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, DeflatedExplicitVRLittleEndian],
    ids=lambda uid: UID(uid).keyword,
)
def test_compressed_series_decode_to_the_same_hu(syntax: str, tmp_path: Path) -> None:
    datasets = encode_series(_axial_datasets()[:6], syntax)
    paths = write_series(datasets, tmp_path)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    volume = load_series(paths[::-1])
    np.testing.assert_array_equal(volume.array, AXIAL_HU[:6])


def _dcmcjpeg(paths: Sequence[Path], options: Sequence[str], out_dir: Path) -> list[Path]:
    """JPEG-compressed copies made by DCMTK (pydicom cannot encode JPEG baseline or lossless)."""
    out_dir.mkdir()
    compressed: list[Path] = []
    for path in paths:
        out = out_dir / path.name
        subprocess.run(["dcmcjpeg", *options, str(path), str(out)], check=True, capture_output=True, timeout=60)
        compressed.append(out)
    return compressed


def test_jpeg_lossless_from_dcmtk_decodes_to_the_same_hu(tmp_path: Path) -> None:
    plain = write_series(_axial_datasets()[:4], tmp_path / "plain")
    compressed = _dcmcjpeg(plain, ["+e1"], tmp_path / "jpeg")
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    volume = load_series(compressed[::-1])
    np.testing.assert_array_equal(volume.array, AXIAL_HU[:4])


def test_jpeg_baseline_from_dcmtk_decodes_within_one_stored_level(tmp_path: Path) -> None:
    """JPEG baseline is 8-bit and lossy: an 8-bit copy (slope 16) must come back within 16 HU.

    Each slice gets its own offset so that a slice in the wrong place is off by hundreds of HU.
    """
    datasets = _axial_datasets()[:4]
    stored = ((AXIAL_HU[:4].astype(np.int32) + 1024) // 16 + 30 * np.arange(4)[:, None, None]).astype(np.uint8)
    for ds, pixels in zip(datasets, stored, strict=True):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
        ds.PixelData = pixels.tobytes()
    plain = write_series(datasets, tmp_path / "plain")
    compressed = _dcmcjpeg(plain, ["+eb", "+q", "100"], tmp_path / "jpeg")
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    volume = load_series(compressed[::-1])
    assert np.abs(volume.array - (stored * 16.0 - 1024)).max() <= 16


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_vendor_encoded_files_decode_like_the_uncompressed_original(name: str) -> None:
    """pydicom's own test files (encoded by other toolkits) against their uncompressed original."""
    reference = load_series([Path(get_testdata_file("MR_small.dcm"))])  # type: ignore[arg-type]
    volume = load_series([Path(get_testdata_file(name))])  # type: ignore[arg-type]
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing_mm == reference.spacing_mm == (0.8, 0.3125, 0.3125)  # 1 slice: SliceThickness


# --- multi-frame (legacy converted enhanced CT) ------------------------------------


OBLIQUE = _geometry(ORIENTATIONS["oblique"], slices=12)
OBLIQUE_HU = simple_body_phantom(OBLIQUE, seed=5)


def _enhanced(datasets: Sequence[Dataset]) -> Dataset:
    """One legacy converted enhanced CT instance from single-frame ``datasets``."""
    first = datasets[0]
    return LegacyConvertedEnhancedCTImage(
        list(datasets),
        series_instance_uid=generate_uid(entropy_srcs=[str(first.SeriesInstanceUID), "enhanced series"]),
        series_number=99,
        sop_instance_uid=generate_uid(entropy_srcs=[str(first.SeriesInstanceUID), "enhanced instance"]),
        instance_number=1,
    )


@pytest.fixture(scope="module")
def oblique_single_frame() -> Volume:
    return volume_from_datasets(ct_series_datasets(OBLIQUE_HU, OBLIQUE, seed=5))


@pytest.fixture(scope="module")
def oblique_enhanced() -> Dataset:
    return _enhanced(_shuffled(ct_series_datasets(OBLIQUE_HU, OBLIQUE, seed=5), seed=3))


def _assert_same_volume(volume: Volume, reference: Volume, enhanced: Dataset) -> None:
    """Same voxels and geometry; frames name the enhanced instance and the frame holding each slice."""
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.spacing_mm, reference.spacing_mm, atol=1e-6)
    np.testing.assert_allclose(volume.origin_mm, reference.origin_mm, atol=1e-6)
    np.testing.assert_allclose(volume.axes, reference.axes, atol=1e-9)
    assert {f.sop_instance_uid for f in volume.frames} == {enhanced.SOPInstanceUID}
    numbers = [f.frame_number for f in volume.frames]
    assert sorted(numbers) == list(range(1, enhanced.NumberOfFrames + 1))  # type: ignore[type-var]
    per_frame = enhanced.PerFrameFunctionalGroupsSequence
    sources = [
        per_frame[n - 1].ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID  # type: ignore[operator]
        for n in numbers
    ]
    assert sources == [f.sop_instance_uid for f in reference.frames]
    assert len(volume.datasets) == 1 and volume.datasets[0].SOPInstanceUID == enhanced.SOPInstanceUID
    assert "PixelData" not in volume.datasets[0]
    assert "PerFrameFunctionalGroupsSequence" in volume.datasets[0]


def test_enhanced_ct_loads_like_its_single_frame_series(
    oblique_single_frame: Volume, oblique_enhanced: Dataset
) -> None:
    shared = oblique_enhanced.SharedFunctionalGroupsSequence[0]
    assert "PixelValueTransformationSequence" in shared and "PlanePositionSequence" not in shared
    volume = volume_from_datasets([oblique_enhanced])
    _assert_same_volume(volume, oblique_single_frame, oblique_enhanced)
    # The converter kept the shuffled input order, so frame order is not slice order.
    assert [f.frame_number for f in volume.frames] != list(range(1, OBLIQUE.slices + 1))


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])
def test_enhanced_ct_file_loads_like_its_single_frame_series(
    syntax: str | None, oblique_single_frame: Volume, oblique_enhanced: Dataset, tmp_path: Path
) -> None:
    enhanced = copy.deepcopy(oblique_enhanced)
    if syntax is not None:
        enhanced.compress(syntax, generate_instance_uid=False)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    _assert_same_volume(load_series([path]), oblique_single_frame, oblique_enhanced)


def test_enhanced_ct_applies_per_frame_rescale() -> None:
    uids = {"study_uid": "1.2.3.1", "series_uid": "1.2.3.2", "frame_of_reference_uid": "1.2.3.3"}
    plain = ct_series_datasets(OBLIQUE_HU, OBLIQUE, **uids)  # type: ignore[arg-type]
    scaled = ct_series_datasets(
        OBLIQUE_HU, OBLIQUE, rescale_intercept=-2000.0, rescale_slope=0.5, **uids  # type: ignore[arg-type]
    )
    enhanced = _enhanced([plain[k] if k % 2 else scaled[k] for k in range(OBLIQUE.slices)])
    assert "PixelValueTransformationSequence" in enhanced.PerFrameFunctionalGroupsSequence[0]
    assert "PixelValueTransformationSequence" not in enhanced.SharedFunctionalGroupsSequence[0]
    volume = volume_from_datasets([enhanced])
    np.testing.assert_array_equal(volume.array, OBLIQUE_HU)


def test_enhanced_ct_per_frame_group_wins_over_shared(
    oblique_single_frame: Volume, oblique_enhanced: Dataset
) -> None:
    """A (non-conformant) object with the rescale in both places: the frame's own value is used."""
    enhanced = copy.deepcopy(oblique_enhanced)
    for item in enhanced.PerFrameFunctionalGroupsSequence:
        transformation = Dataset()
        transformation.RescaleIntercept, transformation.RescaleSlope, transformation.RescaleType = -924, 1, "HU"
        item.PixelValueTransformationSequence = [transformation]
    volume = volume_from_datasets([enhanced])
    np.testing.assert_array_equal(volume.array, oblique_single_frame.array + 100)


def test_enhanced_ct_errors_name_the_frame(oblique_enhanced: Dataset) -> None:
    enhanced = copy.deepcopy(oblique_enhanced)
    per_frame = enhanced.PerFrameFunctionalGroupsSequence
    plane_positions = [item.PlanePositionSequence[0] for item in per_frame]
    plane_positions[4].ImagePositionPatient = plane_positions[7].ImagePositionPatient
    message = _error(lambda: volume_from_datasets([enhanced]))
    sop = enhanced.SOPInstanceUID
    assert f"series {enhanced.SeriesInstanceUID}: duplicate slice position" in message
    frame = rf"instance {re.escape(sop)} frame (5|8)"
    assert re.search(rf"{frame} and {frame}", message)

    del per_frame[2].PlanePositionSequence
    message = _error(lambda: volume_from_datasets([enhanced]))
    assert message == f"series {enhanced.SeriesInstanceUID}: instance {sop} frame 3: missing ImagePositionPatient"


# --- inconsistent series -----------------------------------------------------------


SERIES = str(_axial_datasets()[0].SeriesInstanceUID)


def _move(ds: Dataset, offset_mm: npt.ArrayLike) -> None:
    ds.ImagePositionPatient = [round(float(v), 6) for v in np.asarray(ds.ImagePositionPatient, float) + offset_mm]


def test_varying_slice_spacing_reports_range_and_index() -> None:
    datasets = _axial_datasets()
    for ds in datasets[10:]:
        _move(ds, [0.0, 0.0, 1.0])  # the gap before slice 10 becomes 2.5 mm instead of 1.5
    message = _error(lambda: volume_from_datasets(_shuffled(datasets)))
    assert message.startswith(f"series {SERIES}: slice spacing varies 1.5-2.5 mm at index 10 ")


def test_gradually_varying_spacing_is_caught_by_the_grid_check() -> None:
    datasets = _axial_datasets()
    for k, ds in enumerate(datasets):
        _move(ds, [0.0, 0.0, 0.004 * k * k])  # each gap within tolerance, the sum is not
    message = _error(lambda: volume_from_datasets(datasets))
    assert re.match(rf"series {SERIES}: slice spacing varies 1.5\d*-1.6\d* mm at index \d+ \(it lies", message)


def test_missing_slice_is_reported_as_a_gap() -> None:
    datasets = _axial_datasets()
    del datasets[7]
    message = _error(lambda: volume_from_datasets(_shuffled(datasets)))
    assert message.startswith(f"series {SERIES}: 1 slice(s) missing: gap of 3.0 mm before index 7 ")
    assert "where the spacing is 1.5 mm" in message


def test_duplicate_positions_name_both_instances() -> None:
    datasets = _axial_datasets()
    datasets[6].ImagePositionPatient = datasets[5].ImagePositionPatient
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.startswith(f"series {SERIES}: duplicate slice position ")
    assert datasets[5].SOPInstanceUID in message and datasets[6].SOPInstanceUID in message


def test_same_instance_twice_is_rejected() -> None:
    datasets = _axial_datasets()
    message = _error(lambda: volume_from_datasets([*datasets, datasets[3]]))
    assert message == f"series {SERIES}: instance {datasets[3].SOPInstanceUID} given 2 times"


def test_mixed_rows_and_columns() -> None:
    datasets = _axial_datasets()
    small = SeriesGeometry(rows=32, columns=64, slices=AXIAL.slices, pixel_spacing=(0.8, 0.6), slice_spacing=1.5)
    other = ct_series_datasets(
        simple_body_phantom(small, 1), small, study_uid=datasets[0].StudyInstanceUID,
        series_uid=SERIES, frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    )
    datasets[4] = other[4]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == (
        f"series {SERIES}: mixed rows x columns: 48x64 (19 instances, e.g. {datasets[0].SOPInstanceUID}), "
        f"32x64 (1 instances, e.g. {other[4].SOPInstanceUID})"
    )


def test_mixed_orientations() -> None:
    datasets = _axial_datasets()
    datasets[9].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.startswith(
        f"series {SERIES}: mixed orientations: instance {datasets[9].SOPInstanceUID} has "
        "ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 0.0, -1.0] but instance"
    )


def test_non_orthonormal_orientation() -> None:
    datasets = _axial_datasets()
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0.1, 1, 0]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.endswith("is not two orthonormal direction cosines")


def test_mixed_pixel_spacing() -> None:
    datasets = _axial_datasets()
    datasets[2].PixelSpacing = [0.8, 0.7]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.startswith(
        f"series {SERIES}: mixed pixel spacings: instance {datasets[2].SOPInstanceUID} has [0.8, 0.7] mm"
    )


def test_gantry_tilt_is_rejected() -> None:
    datasets = _axial_datasets()
    tilt = np.tan(np.radians(10.0)) * AXIAL.slice_spacing
    for k, ds in enumerate(datasets):
        _move(ds, k * tilt * AXIAL.column_cosines)  # positions step along a tilted line
    message = _error(lambda: volume_from_datasets(_shuffled(datasets)))
    assert message.startswith(
        f"series {SERIES}: slice positions are not along the slice normal "
        f"(gantry tilt or non-orthogonal stacking): slice at index 19 (instance {datasets[19].SOPInstanceUID}) "
        "is 5.025 mm off the normal through index 0"
    )
    assert message.endswith("a tilt of 10.00 degrees")


def test_small_position_noise_is_tolerated() -> None:
    """0.01 mm jitter is well inside the documented tolerance (5 % of a voxel, at least 0.01 mm)."""
    datasets = _axial_datasets()
    rng = np.random.default_rng(1)
    for ds in datasets:
        _move(ds, rng.uniform(-0.005, 0.005, 3))
    volume = volume_from_datasets(datasets)
    assert abs(volume.spacing_mm[0] - AXIAL.slice_spacing) < 0.01


def test_no_pixel_data() -> None:
    datasets = _axial_datasets()
    del datasets[11].PixelData
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == f"series {SERIES}: instance {datasets[11].SOPInstanceUID} has no pixel data"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SeriesInstanceUID", "1.2.3.99"), ("StudyInstanceUID", "1.2.3.98"), ("FrameOfReferenceUID", "1.2.3.97")],
)
def test_mixed_uids(keyword: str, value: str) -> None:
    datasets = _axial_datasets()
    original = datasets[0].get(keyword)
    datasets[13].data_element(keyword).value = value  # type: ignore[union-attr]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == f"series {SERIES}: mixed {keyword} values: {original} (19 instances), {value} (1 instances)"


def test_single_slice_without_slice_thickness() -> None:
    datasets = _axial_datasets()[:1]
    del datasets[0].SliceThickness
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.startswith(f"series {SERIES}: a single slice (instance {datasets[0].SOPInstanceUID}) without")


def test_empty_series() -> None:
    assert _error(lambda: volume_from_datasets([])) == "empty series: no instances given"
    assert _error(lambda: load_series([])) == "empty series: no instances given"


def test_rgb_is_unsupported() -> None:
    datasets = _axial_datasets()
    datasets[0].PhotometricInterpretation = "RGB"
    datasets[0].SamplesPerPixel = 3
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == (
        f"series {SERIES}: instance {datasets[0].SOPInstanceUID}: unsupported photometric interpretation RGB "
        "with 3 sample(s) per pixel; expected MONOCHROME1 or MONOCHROME2 with 1 sample"
    )


def test_missing_and_malformed_geometry_attributes() -> None:
    datasets = _axial_datasets()
    del datasets[8].ImagePositionPatient
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == f"series {SERIES}: instance {datasets[8].SOPInstanceUID}: missing ImagePositionPatient"

    datasets = _axial_datasets()
    datasets[8].PixelSpacing = [0.8]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message == (
        f"series {SERIES}: instance {datasets[8].SOPInstanceUID}: PixelSpacing has 1 values, expected 2: 0.8"
    )


def test_truncated_pixel_data_is_a_volume_error() -> None:
    datasets = _axial_datasets()
    datasets[3].PixelData = datasets[3].PixelData[:1000]
    message = _error(lambda: volume_from_datasets(datasets))
    assert message.startswith(
        f"series {SERIES}: cannot decode pixel data of instance {datasets[3].SOPInstanceUID} "
        "(Explicit VR Little Endian): ValueError: "
    )


def test_unreadable_file_names_its_path(tmp_path: Path) -> None:
    paths = write_series(_axial_datasets()[:3], tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM file at all")
    message = _error(lambda: load_series([*paths, broken]))
    assert message.startswith(f"cannot read DICOM file {broken}: ")
