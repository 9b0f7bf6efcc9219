"""Tests of the synthetic CT series generator (training.phantoms.ct_series)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from training.phantoms.ct_series import (
    GeneratedSeries,
    SeriesGeometry,
    ct_series_datasets,
    encode_series,
    generate_ct_series,
    simple_body_phantom,
    write_series,
)

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"

SMALL = SeriesGeometry(rows=64, columns=64, slices=4)
SAGITTAL = SeriesGeometry(
    rows=48, columns=40, slices=3, pixel_spacing=(0.8, 0.6), slice_spacing=2.0,
    orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
)


def _positions(datasets: list[pydicom.Dataset]) -> np.ndarray:
    return np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _dciodvfy_errors(path: Path) -> list[str]:
    """Lines dciodvfy reports as errors (it writes its findings to stderr)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def small_volume() -> np.ndarray:
    return simple_body_phantom(SMALL, seed=3)


@pytest.fixture(scope="module")
def small_datasets(small_volume: np.ndarray) -> list[pydicom.Dataset]:
    return ct_series_datasets(small_volume, SMALL, seed=3)


# --- geometry -----------------------------------------------------------------


def test_axial_positions_step_along_normal(small_datasets: list[pydicom.Dataset]) -> None:
    np.testing.assert_allclose(SMALL.normal, [0.0, 0.0, 1.0])
    pos = _positions(small_datasets)
    np.testing.assert_allclose(np.diff(pos, axis=0), [[0.0, 0.0, SMALL.slice_spacing]] * 3, atol=1e-5)
    np.testing.assert_allclose(pos[0], SMALL.origin, atol=1e-5)
    # Default origin centres the in-plane field of view on the patient axis.
    centre = pos[0] + ((SMALL.columns - 1) / 2 * SMALL.pixel_spacing[1]) * SMALL.row_cosines \
        + ((SMALL.rows - 1) / 2 * SMALL.pixel_spacing[0]) * SMALL.column_cosines
    np.testing.assert_allclose(centre, [0.0, 0.0, 0.0], atol=1e-5)
    locations = [float(ds.SliceLocation) for ds in small_datasets]
    np.testing.assert_allclose(locations, pos[:, 2], atol=1e-5)
    ds = small_datasets[0]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == list(SMALL.pixel_spacing)
    assert float(ds.SliceThickness) == SMALL.slice_thickness
    assert float(ds.SpacingBetweenSlices) == SMALL.slice_spacing
    assert [int(d.InstanceNumber) for d in small_datasets] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "orientation",
    [(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)],
    ids=["sagittal", "oblique"],
)
def test_non_axial_positions_step_along_normal(
    orientation: tuple[float, float, float, float, float, float],
) -> None:
    geom = SeriesGeometry(rows=16, columns=16, slices=3, slice_spacing=2.0, orientation=orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets = ct_series_datasets(simple_body_phantom(geom, 0), geom)
    steps = np.diff(_positions(datasets), axis=0)
    np.testing.assert_allclose(steps, [2.0 * normal] * 2, atol=1e-5)
    assert [float(v) for v in datasets[0].ImageOrientationPatient] == list(orientation)
    locations = np.array([float(ds.SliceLocation) for ds in datasets])
    np.testing.assert_allclose(np.diff(locations), [2.0, 2.0], atol=1e-5)


def test_sagittal_normal_and_positions() -> None:
    np.testing.assert_allclose(SAGITTAL.normal, [-1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        np.subtract(SAGITTAL.slice_position(2), SAGITTAL.slice_position(0)), [-4.0, 0.0, 0.0]
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(orientation=(1, 0, 0, 1, 0, 0)), dict(orientation=(2, 0, 0, 0, 1, 0)),
     dict(slice_spacing=0.0), dict(slices=0)],
)
def test_invalid_geometry_is_rejected(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = dict(rows=8, columns=8, slices=2) | kwargs
    with pytest.raises(ValueError):
        SeriesGeometry(**args)  # type: ignore[arg-type]


# --- phantom ------------------------------------------------------------------


def test_phantom_tissues_and_noise() -> None:
    geom = SeriesGeometry(rows=128, columns=128, slices=9)
    vol = simple_body_phantom(geom, seed=1)
    assert vol.shape == (9, 128, 128) and vol.dtype == np.int16
    mid = vol[4]
    assert abs(float(np.median(vol[:, :4, :4])) + 1000) <= 2  # air in the corner
    assert abs(float(np.median(mid[60:68, 30:38])) + 850) <= 5  # left lung
    assert abs(float(np.median(mid[88:96, 60:68])) - 700) <= 5  # spine
    assert abs(float(np.median(mid[60:68, 60:68])) - 40) <= 5  # mediastinum
    assert 8.0 < float(mid[60:68, 60:68].std()) < 12.0
    assert vol.min() >= -1024 and vol.max() <= 3071
    # Lungs taper towards the ends of the stack.
    assert (vol[0] < -500).sum() < (vol[4] < -500).sum()


def test_phantom_at_full_size() -> None:
    geom = SeriesGeometry(rows=512, columns=512, slices=300)
    vol = simple_body_phantom(geom, seed=0)
    assert vol.shape == (300, 512, 512) and vol.dtype == np.int16


# --- pixel values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("intercept", "slope", "pixel_representation", "tolerance"),
    [(-1024.0, 1.0, 0, 0.0), (0.0, 1.0, 1, 0.0), (-1024.0, 2.0, 0, 1.0)],
)
def test_hu_round_trip_through_rescale(
    tmp_path: Path,
    small_volume: np.ndarray,
    intercept: float,
    slope: float,
    pixel_representation: int,
    tolerance: float,
) -> None:
    datasets = ct_series_datasets(small_volume, SMALL, rescale_intercept=intercept, rescale_slope=slope)
    read = [pydicom.dcmread(p) for p in write_series(datasets, tmp_path)]
    for k, ds in enumerate(read):
        assert ds.PixelRepresentation == pixel_representation
        assert ds.RescaleType == "HU"
        assert float(ds.RescaleIntercept) == intercept and float(ds.RescaleSlope) == slope
        assert np.abs(_hu(ds) - small_volume[k]).max() <= tolerance


def test_unrepresentable_values_are_rejected() -> None:
    vol = np.full(SMALL.shape, 70000.0)  # 71024 stored > 65535
    with pytest.raises(ValueError, match="16 bits"):
        ct_series_datasets(vol, SMALL)


def test_volume_shape_must_match_geometry(small_volume: np.ndarray) -> None:
    with pytest.raises(ValueError, match="shape"):
        ct_series_datasets(small_volume[:2], SMALL)


# --- UIDs and determinism -----------------------------------------------------


def test_same_seed_same_series_different_seed_different() -> None:
    a = ct_series_datasets(simple_body_phantom(SMALL, 7), SMALL, seed=7)
    b = ct_series_datasets(simple_body_phantom(SMALL, 7), SMALL, seed=7)
    c = ct_series_datasets(simple_body_phantom(SMALL, 8), SMALL, seed=8)
    for x, y in zip(a, b):
        assert x.PixelData == y.PixelData
        assert (x.StudyInstanceUID, x.SeriesInstanceUID, x.SOPInstanceUID, x.FrameOfReferenceUID) == (
            y.StudyInstanceUID, y.SeriesInstanceUID, y.SOPInstanceUID, y.FrameOfReferenceUID)
    assert a[0].PixelData != c[0].PixelData
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert a[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in a} & {d.SOPInstanceUID for d in c}


def test_uids_unique_valid_and_shared_where_they_should_be(
    small_datasets: list[pydicom.Dataset],
) -> None:
    sops = [ds.SOPInstanceUID for ds in small_datasets]
    assert len(set(sops)) == len(sops)
    for ds in small_datasets:
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert UID(uid).is_valid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert len({ds.SeriesInstanceUID for ds in small_datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in small_datasets}) == 1
    study = {ds.StudyInstanceUID for ds in small_datasets} | {ds.SeriesInstanceUID for ds in small_datasets}
    assert len(study) == 2


def test_explicit_uids_are_used_and_propagate(small_volume: np.ndarray) -> None:
    base = ct_series_datasets(small_volume, SMALL)
    other = ct_series_datasets(small_volume, SMALL, study_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5")
    assert other[0].StudyInstanceUID == "1.2.3.4" and other[0].FrameOfReferenceUID == "1.2.3.5"
    assert other[0].SeriesInstanceUID != base[0].SeriesInstanceUID
    fixed = ct_series_datasets(small_volume, SMALL, series_uid="1.2.3.6")
    assert {ds.SeriesInstanceUID for ds in fixed} == {"1.2.3.6"}


# --- validity -------------------------------------------------------------------


@pytest.mark.parametrize("intercept", [-1024.0, 0.0], ids=["unsigned", "signed"])
def test_every_instance_validates_with_dciodvfy(
    tmp_path: Path, small_volume: np.ndarray, intercept: float
) -> None:
    datasets = ct_series_datasets(small_volume, SMALL, rescale_intercept=intercept)
    paths = write_series(datasets, tmp_path)
    assert [p.name for p in paths] == [f"IM{i:05d}.dcm" for i in range(4)]
    for path in paths:
        assert _dciodvfy_errors(path) == [], path


def test_sagittal_instance_validates_with_dciodvfy(tmp_path: Path) -> None:
    datasets = ct_series_datasets(simple_body_phantom(SAGITTAL, 0), SAGITTAL)
    (path,) = write_series(datasets[1:2], tmp_path)
    assert _dciodvfy_errors(path) == []


def test_written_files_are_part10_explicit_le(tmp_path: Path, small_datasets: list[pydicom.Dataset]) -> None:
    paths = write_series(small_datasets, tmp_path)
    for path in paths:
        assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for keyword in ("KVP", "AcquisitionNumber", "PatientSex", "PatientBirthDate", "StudyID",
                    "ReferringPhysicianName", "PositionReferenceIndicator", "Manufacturer"):
        assert keyword in ds, keyword
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ds.BodyPartExamined, ds.PatientPosition, ds.SpecificCharacterSet) == ("CHEST", "HFS", "ISO_IR 100")


# --- transfer syntaxes --------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        RLELossless,
        JPEG2000Lossless,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGLSLossless,  # pyjpegls comes with highdicom
    ],
    ids=lambda uid: UID(uid).keyword,
)
@pytest.mark.parametrize("intercept", [-1024.0, 0.0], ids=["unsigned", "signed"])
def test_encoded_copies_decode_to_identical_pixels(
    tmp_path: Path, small_volume: np.ndarray, transfer_syntax: str, intercept: float
) -> None:
    original = ct_series_datasets(small_volume, SMALL, rescale_intercept=intercept)
    encoded = encode_series(original, transfer_syntax)
    assert all(ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for ds in original)
    paths = write_series(encoded, tmp_path)
    for k, (path, orig) in enumerate(zip(paths, original)):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.SOPInstanceUID == orig.SOPInstanceUID
        np.testing.assert_array_equal(ds.pixel_array, orig.pixel_array)
        np.testing.assert_array_equal(_hu(ds), small_volume[k])
    # dicom3tools cannot read deflated files; check the other encodings too.
    if transfer_syntax != DeflatedExplicitVRLittleEndian and Path(DCIODVFY).exists():
        assert _dciodvfy_errors(paths[0]) == []


@pytest.mark.parametrize("transfer_syntax", [JPEGBaseline8Bit, JPEGLosslessSV1])
def test_unencodable_transfer_syntax_raises_naming_uid(
    small_datasets: list[pydicom.Dataset], transfer_syntax: str
) -> None:
    with pytest.raises(ValueError, match=transfer_syntax.replace(".", r"\.")):
        encode_series(small_datasets, transfer_syntax)


# --- convenience wrapper --------------------------------------------------------


def test_generate_ct_series_writes_what_it_reports(tmp_path: Path) -> None:
    result = generate_ct_series(tmp_path, slices=3, rows=32, columns=40, seed=5,
                                transfer_syntax_uid=RLELossless, keep_volume=True,
                                patient_id="PHANTOM-0042", series_number=7)
    assert isinstance(result, GeneratedSeries)
    assert result.geometry.shape == (3, 32, 40)
    assert [p.name for p in result.paths] == ["IM00000.dcm", "IM00001.dcm", "IM00002.dcm"]
    assert result.volume_hu is not None
    read = [pydicom.dcmread(p) for p in result.paths]
    assert [ds.SOPInstanceUID for ds in read] == result.sop_instance_uids
    for k, ds in enumerate(read):
        assert ds.StudyInstanceUID == result.study_uid
        assert ds.SeriesInstanceUID == result.series_uid
        assert ds.FrameOfReferenceUID == result.frame_of_reference_uid
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert (ds.PatientID, ds.SeriesNumber) == ("PHANTOM-0042", 7)
        np.testing.assert_array_equal(_hu(ds), result.volume_hu[k])
    again = generate_ct_series(tmp_path / "again", slices=3, rows=32, columns=40, seed=5,
                               patient_id="PHANTOM-0042", series_number=7)
    assert again.sop_instance_uids == result.sop_instance_uids
    assert again.volume_hu is None


def test_training_package_does_not_import_node_code() -> None:
    code = (
        "import sys, training.phantoms.ct_series; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dicom_node', 'workers')))"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
