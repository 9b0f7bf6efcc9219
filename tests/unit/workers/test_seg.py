"""DICOM SEG builder (workers.outputs.seg): written, read back and validated against its source series."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydantic
import pydicom
import pytest

from tests.unit.workers.outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    OBLIQUE,
    dcentvfy_findings,
    dciodvfy_findings,
    multiframe_volume,
    sphere_mask,
    volume_from_files,
    write_phantom_series,
)
from training.phantoms.ct_series import SeriesGeometry
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.seg import build_seg, present_labels
from workers.volume import Volume

IDENTITY = SeriesIdentity(
    series_number=901,
    series_description="AI chest organs",
    manufacturer="Test Hospital AI",
    manufacturer_model_name="dicom-ai-node",
    software_versions="9.9.9",
    device_serial_number="NODE-7",
)
LUNG, BONE, NODULE = LABELS[1], LABELS[3], LABELS[4]  # values 2, 4, 5: not consecutive
COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
          "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription", "ReferringPhysicianName")


def label_map(volume: Volume) -> npt.NDArray[np.uint8]:
    """Three labels: a lung box, a bone box and a nodule sphere (spanning several slices)."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:9, 10:22, 8:30] = LUNG.value
    labels[14:17, 30:38, 4:12] = BONE.value
    labels[sphere_mask(volume, volume.index_to_world((11.0, 30.0, 30.0)), 9.0)] = NODULE.value
    return labels


class Written:
    """A SEG built from a phantom series, written to bytes and read back, with what it came from."""

    def __init__(self, volume: Volume, labels: npt.NDArray[np.uint8], source_paths: list[Path], seg_path: Path) -> None:
        self.volume = volume
        self.labels = labels
        self.source_paths = source_paths
        self.seg_path = seg_path
        seg = build_seg(volume, SegmentationResult(labels, LABELS), ALGORITHM, IDENTITY)
        assert seg is not None
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        seg_path.write_bytes(buffer.getvalue())
        self.dataset = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        self.seg = hd.seg.segread(io.BytesIO(buffer.getvalue()))
        self.sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in source_paths)}


def _write(tmp: Path, geometry: SeriesGeometry, seed: int, multiframe: bool = False) -> Written:
    paths = write_phantom_series(tmp / "series", geometry, seed=seed, reverse_instance_numbers=True)
    if multiframe:
        volume = multiframe_volume(paths, tmp / "enhanced.dcm")
        return Written(volume, label_map(volume), [tmp / "enhanced.dcm"], tmp / "seg.dcm")
    volume = volume_from_files(paths)
    return Written(volume, label_map(volume), paths, tmp / "seg.dcm")


@pytest.fixture(scope="module", params=["axial", "oblique"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Written:
    geometry = {"axial": AXIAL, "oblique": OBLIQUE}[request.param]
    return _write(tmp_path_factory.mktemp(f"seg_{request.param}"), geometry, seed=21)


@pytest.fixture(scope="module")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> Written:
    return _write(tmp_path_factory.mktemp("seg_multiframe"), AXIAL, seed=22, multiframe=True)


def _slice_of(volume: Volume, sop_uid: str, frame_number: int | None) -> int:
    matches = [k for k, f in enumerate(volume.frames) if f.sop_instance_uid == sop_uid and f.frame_number == frame_number]
    assert len(matches) == 1, f"{sop_uid} frame {frame_number} is not one slice of the volume"
    return matches[0]


def _assert_frames_match_sources(w: Written, multiframe: bool) -> None:
    """Every SEG frame: the right source image (and frame), its position, and the label map's pixels."""
    pixels = w.dataset.pixel_array.reshape(-1, *w.volume.shape[1:])
    frames = w.dataset.PerFrameFunctionalGroupsSequence
    present = (LUNG, BONE, NODULE)
    assert len(frames) == len(present) * w.volume.shape[0], "empty frames must be kept: one per slice and segment"
    seen: set[tuple[int, int]] = set()
    for index, item in enumerate(frames):
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame_number = int(source.ReferencedFrameNumber) if multiframe else None
        k = _slice_of(w.volume, str(source.ReferencedSOPInstanceUID), frame_number)
        seen.add((segment, k))
        src = w.sources[str(source.ReferencedSOPInstanceUID)]
        if multiframe:
            expected = src.PerFrameFunctionalGroupsSequence[frame_number - 1].PlanePositionSequence[0].ImagePositionPatient
        else:
            expected = src.ImagePositionPatient
        position = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in expected], atol=1e-4)
        np.testing.assert_allclose([float(v) for v in position], w.volume.index_to_world((k, 0, 0)), atol=1e-3)
        expected_mask = w.labels[k] == present[segment - 1].value
        assert np.array_equal(pixels[index].astype(bool), expected_mask), f"frame {index + 1} (segment {segment}, slice {k})"
    assert seen == {(s, k) for s in (1, 2, 3) for k in range(w.volume.shape[0])}


def test_segments_are_the_present_labels_coded_with_algorithm(written: Written) -> None:
    segments = written.dataset.SegmentSequence
    assert [int(s.SegmentNumber) for s in segments] == [1, 2, 3]
    assert [str(s.SegmentLabel) for s in segments] == ["lung", "bone", "nodule"]  # heart/body absent: no segment
    for item, label in zip(segments, (LUNG, BONE, NODULE), strict=True):
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
            label.property_category.value, label.property_category.scheme, label.property_category.meaning)
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            label.property_type.value, label.property_type.scheme, label.property_type.meaning)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == ALGORITHM.name
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
            "123110", "DCM", "Artificial Intelligence")
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert list(item.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*label.color_rgb).value)
    assert written.dataset.SegmentationType == "BINARY"
    assert written.dataset.ContentLabel == "CHEST ORGANS TES"


def test_every_frame_lies_on_its_source_slice_and_holds_its_labels(written: Written) -> None:
    _assert_frames_match_sources(written, multiframe=False)


def test_highdicom_reads_the_label_map_back_by_source_instance(written: Written) -> None:
    uids = [f.sop_instance_uid for f in written.volume.frames]
    segments = written.seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False, dtype=np.uint8
    )
    lut = np.array([0, LUNG.value, BONE.value, NODULE.value], dtype=np.uint8)
    assert np.array_equal(lut[segments], written.labels)


def test_patient_study_and_series_identification(written: Written) -> None:
    ds, source = written.dataset, next(iter(written.sources.values()))
    for keyword in COPIED:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.AccessionNumber == "ACC00021"
    assert ds.Modality == "SEG"
    assert (ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber) == (901, "AI chest organs", 1)
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions, ds.DeviceSerialNumber) == (
        "Test Hospital AI", "dicom-ai-node", "9.9.9", "NODE-7")
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == written.volume.frame_of_reference_uid
    assert ds.BodyPartExamined == "CHEST"
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == written.volume.series_instance_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(written.sources)


def test_dicom3tools_find_no_errors(written: Written) -> None:
    errors, warnings = dciodvfy_findings(written.seg_path)
    print("\n".join(warnings))
    assert errors == []
    errors, warnings = dcentvfy_findings([*written.source_paths, written.seg_path])
    print("\n".join(warnings))
    assert errors == []


def test_multiframe_source_frames_are_referenced_by_number(multiframe: Written) -> None:
    assert len(multiframe.volume.datasets) == 1
    assert [f.frame_number for f in multiframe.volume.frames][:2] == [24, 23]  # frame order != slice order
    _assert_frames_match_sources(multiframe, multiframe=True)
    errors, warnings = dciodvfy_findings(multiframe.seg_path)
    print("\n".join(warnings))
    assert errors == []


def test_order_of_volume_datasets_does_not_matter(written: Written) -> None:
    shuffled = dataclasses.replace(written.volume, datasets=tuple(reversed(written.volume.datasets)))
    a = build_seg(written.volume, SegmentationResult(written.labels, LABELS), ALGORITHM, IDENTITY)
    b = build_seg(shuffled, SegmentationResult(written.labels, LABELS), ALGORITHM, IDENTITY)
    assert a is not None and b is not None

    def references(seg: hd.seg.Segmentation) -> list[str]:
        return [str(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for i in seg.PerFrameFunctionalGroupsSequence]

    assert references(a) == references(b)
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_configured_uids_are_used_and_single_label_gives_one_segment(written: Written) -> None:
    identity = IDENTITY.model_copy(update={"series_instance_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.4.5"})
    labels = np.where(written.labels == NODULE.value, NODULE.value, 0).astype(np.uint8)
    seg = build_seg(written.volume, SegmentationResult(labels, LABELS), ALGORITHM, identity)
    assert seg is not None
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["nodule"]
    assert seg.NumberOfFrames == written.volume.shape[0]


def test_no_label_present_gives_no_seg(written: Written) -> None:
    empty = np.zeros(written.volume.shape, dtype=np.uint8)
    assert build_seg(written.volume, SegmentationResult(empty, LABELS), ALGORITHM, IDENTITY) is None


def test_undeclared_label_value_is_named(written: Written) -> None:
    labels = written.labels.copy()
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"values \[9\] that no label describes"):
        present_labels(written.volume, SegmentationResult(labels, LABELS))


def test_label_map_of_wrong_shape_is_refused(written: Written) -> None:
    with pytest.raises(ValueError, match=r"label map shape \(2, 64, 64\) differs"):
        build_seg(written.volume, SegmentationResult(np.zeros((2, 64, 64), np.uint8), LABELS), ALGORITHM, IDENTITY)


def test_series_identity_is_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="series_description"):
        SeriesIdentity(series_number=1, series_description="x" * 65)
    with pytest.raises(pydantic.ValidationError, match="series_instance_uid"):
        SeriesIdentity(series_number=1, series_description="AI", series_instance_uid="1.02.x")


@pytest.mark.parametrize("values", [(1, 2, 3), (2, 4, 5)], ids=["consecutive", "gaps"])
def test_segments_read_back_as_the_label_map_which_is_left_untouched(written: Written, values: tuple[int, ...]) -> None:
    """Label values 1..N are already segment numbers (the map is passed on as it is); others are renumbered."""
    labels = np.zeros(written.volume.shape, dtype=np.uint8)
    labels[2:10, 8:30, 6:26] = values[0]
    labels[5:8, 12:20, 10:20] = values[1]  # nested inside the first
    labels[12:15, 30:40, 30:40] = values[2]
    before = labels.copy()

    seg = build_seg(written.volume, SegmentationResult(labels, LABELS), ALGORITHM, IDENTITY)

    assert seg is not None
    assert np.array_equal(labels, before)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [LABELS[v - 1].name for v in values]
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    back = hd.seg.segread(io.BytesIO(buffer.getvalue()))
    numbers = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[f.sop_instance_uid for f in written.volume.frames],
        combine_segments=True,
        relabel=False,
        dtype=np.uint8,
    )
    assert np.array_equal(np.array((0, *values), dtype=np.uint8)[numbers], labels)
