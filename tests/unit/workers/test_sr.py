"""TID 1500 SR: written, read back (pydicom + highdicom), checked against numpy, geometry and dicom3tools.

Every SR is built from a phantom series written to disk, with a synthetic label
map and the SEG built from it by ``build_seg``, plus synthetic detections; it
is written to bytes and read back before anything is asserted, then validated
with ``dciodvfy`` (IOD) and ``dcentvfy`` (consistency with the source series and
the SEG). Geometry is checked independently of the Volume: expected image
coordinates are computed from the source files' own plane attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.contracts import AlgorithmInfo, Detection
from tests.unit.workers.outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    OBLIQUE,
    dcentvfy_findings,
    dciodvfy_findings,
    detection,
    multiframe_volume,
    sphere_mask,
    volume_from_files,
    write_phantom_series,
)
from training.phantoms.ct_series import SeriesGeometry
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity, source_image
from workers.outputs.seg import build_seg
from workers.outputs.sr import DetectionFindings, SegmentationFindings, build_sr
from workers.outputs.sr_summary import QUALITATIVE_EVALUATIONS
from workers.volume import Volume

DETECTOR = AlgorithmInfo(name="Nodule detector test net", version="0.9.1", model_id="nodule-detector-test")
SEG_SERIES = SeriesIdentity(series_number=901, series_description="AI segmentation")
SR_SERIES = SeriesIdentity(series_number=902, series_description="AI measurements")
LUNG, NODULE = LABELS[1], LABELS[4]

# Concept name codes looked up in the content tree.
ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"
REFERENCED_SEGMENT = "121191"
IMAGE_LIBRARY, IMAGING_MEASUREMENTS = "111028", "126010"
ABSENT = ("272519000", "SCT")


@dataclass(frozen=True)
class Source:
    """A written phantom series: its files, their headers (with pixel data), and the Volume read from them."""

    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    volume: Volume


def _source(tmp: Path, geometry: SeriesGeometry, seed: int, multiframe: bool) -> Source:
    paths = write_phantom_series(tmp / "src", geometry, seed=seed, reverse_instance_numbers=True)
    if multiframe:
        volume = multiframe_volume(paths, tmp / "enhanced.dcm")
        files: tuple[Path, ...] = (tmp / "enhanced.dcm",)
    else:
        volume = volume_from_files(paths)
        files = tuple(paths)
    return Source(files, tuple(pydicom.dcmread(p) for p in files), volume)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    """Axial single-frame, oblique single-frame and oblique multi-frame phantom series (written once)."""
    return {
        "axial": _source(tmp_path_factory.mktemp("axial"), AXIAL, 31, multiframe=False),
        "oblique": _source(tmp_path_factory.mktemp("oblique"), OBLIQUE, 32, multiframe=False),
        "oblique-multiframe": _source(tmp_path_factory.mktemp("oblique_mf"), OBLIQUE, 33, multiframe=True),
    }


def _write_and_read(sr: hd.sr.Comprehensive3DSR, path: Path) -> tuple[Dataset, hd.sr.Comprehensive3DSR]:
    """Write ``sr`` to bytes (and to ``path`` for dicom3tools); read it back with pydicom and highdicom."""
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    path.write_bytes(data)
    return pydicom.dcmread(BytesIO(data)), hd.sr.srread(BytesIO(data))


def _assert_valid(sr_path: Path, study_files: Sequence[Path]) -> None:
    """dciodvfy: no error or warning; dcentvfy with the study's other files: no error.

    dcentvfy's only accepted warning is its classification quirk for SR: it
    files AccessionNumber under the Series IE for the SR and the Study IE for
    images ("Different information entities"), even though the values agree.
    """
    errors, warnings = dciodvfy_findings(sr_path)
    assert errors == [] and warnings == [], (errors, warnings)
    errors, warnings = dcentvfy_findings([*study_files, sr_path])
    assert errors == []
    assert [w for w in warnings if "Element=<AccessionNumber>" not in w] == []


def _items(group: Sequence[Dataset], code_value: str) -> list[Dataset]:
    """Direct children of a measurement group's container with the given concept name code value."""
    return [item for item in group[0].ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == code_value]


def _text(group: Sequence[Dataset], code_value: str) -> str:
    (item,) = _items(group, code_value)
    return str(item.TextValue)


def _code(concept: object) -> tuple[str, str]:
    return (concept.value, concept.scheme_designator)  # type: ignore[attr-defined]


def _segmentation(volume: Volume) -> SegmentationResult:
    """A lung sphere (label 2) and a nodule sphere (label 5); body, heart and bone stay absent."""
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    middle = np.asarray(volume.shape, dtype=float) / 2.0
    label_map[sphere_mask(volume, volume.index_to_world(middle), 30.0)] = LUNG.value
    label_map[sphere_mask(volume, volume.index_to_world(middle * 0.6), 9.0)] = NODULE.value
    return SegmentationResult(label_map=label_map, labels=LABELS)


def _detections(volume: Volume) -> tuple[Detection, ...]:
    """A sphere between slices and an anisotropic box (so the ellipsoid's axis order matters)."""
    shape = np.asarray(volume.shape, dtype=float)
    box_centre = volume.index_to_world(shape * [0.3, 0.65, 0.55])
    return (
        detection(volume, shape * [0.55, 0.4, 0.35] + [0.3, 0.2, 0.7], 12.0, 0.87, NODULE),
        Detection(
            centre_mm=tuple(float(v) for v in box_centre),  # type: ignore[arg-type]
            size_mm=(9.0, 15.0, 6.0),
            diameter_mm=15.0,
            score=0.42,
            label=NODULE,
        ),
    )


def _plane(header: Dataset, frame_number: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(position, row cosines, column cosines, (row spacing, column spacing)) of an image or frame, from its header."""
    if frame_number is None:
        position, orientation = header.ImagePositionPatient, header.ImageOrientationPatient
        spacing = header.PixelSpacing
    else:
        per_frame = header.PerFrameFunctionalGroupsSequence[frame_number - 1]
        shared = header.SharedFunctionalGroupsSequence[0]

        def attribute(sequence: str) -> Dataset:
            return (per_frame if sequence in per_frame else shared)[sequence][0]

        position = attribute("PlanePositionSequence").ImagePositionPatient
        orientation = attribute("PlaneOrientationSequence").ImageOrientationPatient
        spacing = attribute("PixelMeasuresSequence").PixelSpacing
    iop = np.asarray([float(v) for v in orientation])
    return (
        np.asarray([float(v) for v in position]),
        iop[:3],
        iop[3:],
        (float(spacing[0]), float(spacing[1])),
    )


def _nearest_image(source: Source, point_mm: Sequence[float]) -> tuple[str, int | None, float, float]:
    """(SOP instance UID, frame, column, row) of the source image plane nearest ``point_mm``, from the files alone."""
    candidates = []
    for header in source.headers:
        frames: list[int | None] = (
            list(range(1, int(header.NumberOfFrames) + 1)) if "PerFrameFunctionalGroupsSequence" in header else [None]
        )
        for frame in frames:
            position, right, down, (row_spacing, column_spacing) = _plane(header, frame)
            offset = np.asarray(point_mm) - position
            distance = abs(float(offset @ np.cross(right, down)))
            column = float(offset @ right) / column_spacing + 0.5
            row = float(offset @ down) / row_spacing + 0.5
            candidates.append((distance, str(header.SOPInstanceUID), frame, column, row))
    _, uid, frame, column, row = min(candidates, key=lambda c: c[0])
    return uid, frame, column, row


def _segment_mask(seg: hd.seg.Segmentation, volume: Volume, number: int) -> np.ndarray:
    """Segment ``number`` of a SEG on the volume's grid, looked up by source instance (and frame)."""
    frames = volume.frames
    if frames[0].frame_number is None:
        pixels = seg.get_pixels_by_source_instance([f.sop_instance_uid for f in frames], segment_numbers=[number])
    else:
        pixels = seg.get_pixels_by_source_frame(
            frames[0].sop_instance_uid, [int(f.frame_number or 0) for f in frames], segment_numbers=[number]
        )
    return pixels[..., 0] > 0


@pytest.mark.parametrize(("source_name", "geometry"), [("axial", AXIAL), ("oblique-multiframe", OBLIQUE)])
def test_segments_become_volumetric_groups_with_volume_hu_and_seg_references(
    sources: dict[str, Source], tmp_path: Path, source_name: str, geometry: SeriesGeometry
) -> None:
    source = sources[source_name]
    volume = source.volume
    result = _segmentation(volume)
    seg = build_seg(volume, result, ALGORITHM, SEG_SERIES)
    assert seg is not None
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    seg_back = hd.seg.segread(seg_path)

    sr = build_sr(volume, [SegmentationFindings(ALGORITHM, result, seg_back)], SR_SERIES)
    dataset, sr_back = _write_and_read(sr, tmp_path / "sr.dcm")

    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (dataset.SeriesNumber, dataset.SeriesDescription) == (902, "AI measurements")
    assert (dataset.PatientID, dataset.StudyInstanceUID) == (volume.datasets[0].PatientID, volume.study_instance_uid)
    report = sr_back.content
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in volumetric] == ["lung (segment 1)", "nodule (segment 2)"]
    # Each segment is also outlined on the slice where it is largest (what a viewer opens the report on), titled
    # with its volume, under the same tracking UID; the outline follows the label's pixel border.
    outlines = report.get_planar_roi_measurement_groups()
    assert [g.tracking_uid for g in outlines] == [g.tracking_uid for g in volumetric]
    for group, label in zip(outlines, (LUNG, NODULE), strict=True):
        mask = result.label_map == label.value
        key = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        region = group.roi
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        slice_dataset, frame = source_image(volume, key)
        assert reference.ReferencedSOPInstanceUID == slice_dataset.SOPInstanceUID
        assert reference.get("ReferencedFrameNumber") == frame  # a multi-frame source's frame, by number
        points = np.asarray(region.value, dtype=float)
        assert region.graphic_type.value == "POLYLINE" and np.array_equal(points[0], points[-1])
        rows, columns = np.nonzero(mask[key])
        assert (points[:, 0].min(), points[:, 0].max()) == (columns.min(), columns.max() + 1)  # pixel corners
        assert (points[:, 1].min(), points[:, 1].max()) == (rows.min(), rows.max() + 1)
        x, y = points[:, 0], points[:, 1]
        area = abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2.0
        assert area == pytest.approx(int(mask[key].sum()), rel=0.1)
        title = _text(group, "121106")
        assert title.startswith(f"{label.name.capitalize()}: ") and " mL, mean " in title and title.endswith(" HU")

    unit_ml = geometry.pixel_spacing[0] * geometry.pixel_spacing[1] * geometry.slice_spacing / 1000.0
    for group, label in zip(volumetric, (LUNG, NODULE), strict=True):
        (reference,) = _items(group, REFERENCED_SEGMENT)
        referenced = reference.ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert referenced.ReferencedSOPClassUID == seg.SOPClassUID
        number = int(referenced.ReferencedSegmentNumber)
        segment = seg_back.get_segment_description(number)
        assert segment.segment_label == label.name
        assert _code(group.finding_type) == (label.property_type.value, label.property_type.scheme)
        assert _code(group.finding_category) == (label.property_category.value, label.property_category.scheme)
        # An anatomical structure is its own finding site; a nodule's site is not known from its label.
        expected_sites = [(LUNG.property_type.value, "SCT")] if label == LUNG else []
        assert [_code(site.value) for site in group.finding_sites] == expected_sites
        assert _text(group, ALGORITHM_NAME) == ALGORITHM.name and _text(group, ALGORITHM_VERSION) == ALGORITHM.version

        mask = result.label_map == label.value
        seg_mask = _segment_mask(seg_back, volume, number)
        assert np.array_equal(seg_mask, mask)  # the referenced segment is this label's voxels
        (size,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert size.unit.value == "mL"
        assert size.value == pytest.approx(int(mask.sum()) * unit_ml, rel=1e-6)  # cosines are rounded to 1e-6
        attenuation = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
        hu = {m.derivation.meaning: m for m in group.get_measurements(name=attenuation)}
        inside = volume.array[mask].astype(np.float64)
        assert {m.unit.value for m in hu.values()} == {"[hnsf'U]"}
        assert hu["Mean"].value == pytest.approx(inside.mean(), rel=1e-9)
        assert (hu["Minimum"].value, hu["Maximum"].value) == (inside.min(), inside.max())

    absent = report.get_image_measurement_groups()
    assert sorted(_code(g.finding_type) for g in absent) == sorted(
        (label.property_type.value, "SCT") for label in LABELS if label not in (LUNG, NODULE)
    )
    _assert_valid(tmp_path / "sr.dcm", [*source.files, seg_path])


@pytest.mark.parametrize("source_name", ["axial", "oblique", "oblique-multiframe"])
def test_detections_are_outlined_on_the_slice_through_their_centre_and_boxed_in_3d(
    sources: dict[str, Source], tmp_path: Path, source_name: str
) -> None:
    source = sources[source_name]
    volume = source.volume
    detections = _detections(volume)

    sr = build_sr(volume, [DetectionFindings(DETECTOR, detections, (NODULE,))], SR_SERIES)
    _, sr_back = _write_and_read(sr, tmp_path / "sr.dcm")

    report = sr_back.content
    planar = report.get_planar_roi_measurement_groups()
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(planar) == len(volumetric) == len(detections)
    assert report.get_image_measurement_groups() == []  # the nodule label was found: nothing reported absent
    for found, flat, solid in zip(detections, planar, volumetric, strict=True):
        # 2-D: a closed square of the diameter around the centre projected onto the nearest source image (and
        # frame), titled in words, without measurements: the shape OHIF lists in its measurement panel.
        uid, frame, column, row = _nearest_image(source, found.centre_mm)
        region = flat.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        image = region.ContentSequence[0].ReferencedSOPSequence[0]  # the SCOORD's "selected from" IMAGE
        assert image.ReferencedSOPInstanceUID == uid
        if frame is None:
            assert "ReferencedFrameNumber" not in image
        else:
            assert [int(f) for f in np.atleast_1d(image.ReferencedFrameNumber)] == [frame]
        points = np.asarray(region.value, dtype=np.float64)
        assert points.shape == (5, 2) and np.array_equal(points[0], points[-1])
        centre = points[:-1].mean(axis=0)
        np.testing.assert_allclose(centre, [column, row], atol=1e-3)
        row_spacing, column_spacing = volume.spacing_mm[1], volume.spacing_mm[2]
        half_sides_mm = np.abs(points[:-1] - centre) * [column_spacing, row_spacing]
        np.testing.assert_allclose(half_sides_mm, found.diameter_mm / 2.0, rtol=1e-4)
        assert len({tuple(p) for p in points[:-1]}) == 4  # four distinct corners
        assert flat.get_measurements() == []
        assert _text(flat, "121106") == f"{NODULE.name.capitalize()}, {found.diameter_mm:.0f} mm, {found.score * 100:.0f} %"
        measured = {m.name.meaning: (m.value, m.unit.value) for m in solid.get_measurements()}
        assert measured == {
            "Long axis": (found.diameter_mm, "mm"),
            "Certainty of Finding": (pytest.approx(found.score * 100), "%"),
        }
        assert _text(flat, ALGORITHM_NAME) == DETECTOR.name and _text(flat, ALGORITHM_VERSION) == DETECTOR.version
        assert _code(flat.finding_type) == (NODULE.property_type.value, "SCT")

        # 3-D: an ellipsoid in the frame of reference whose axes are the box extents through the centre.
        assert (solid.tracking_uid, solid.tracking_identifier) == (flat.tracking_uid, flat.tracking_identifier)
        surface = solid.roi
        (scoord3d,) = [item for item in surface if item.value_type == hd.sr.ValueTypeValues.SCOORD3D]
        assert scoord3d.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
        assert scoord3d.ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
        ends = np.asarray(scoord3d.value, dtype=np.float64).reshape(3, 2, 3)
        np.testing.assert_allclose(ends.mean(axis=1), np.tile(found.centre_mm, (3, 1)), atol=1e-3)
        extents = np.abs(ends[:, 1] - ends[:, 0])
        np.testing.assert_allclose(np.sort(extents.max(axis=1))[::-1], sorted(found.size_mm, reverse=True), atol=1e-3)
        np.testing.assert_allclose(extents.sum(axis=0), found.size_mm, atol=1e-3)  # one axis per patient axis
    assert len({g.tracking_uid for g in planar}) == len(detections)
    _assert_valid(tmp_path / "sr.dcm", source.files)


def test_empty_results_are_reported_as_absent_not_omitted(sources: dict[str, Source], tmp_path: Path) -> None:
    source = sources["axial"]
    volume = source.volume
    nothing = SegmentationResult(label_map=np.zeros(volume.shape, dtype=np.uint8), labels=LABELS)
    assert build_seg(volume, nothing, ALGORITHM, SEG_SERIES) is None

    sr = build_sr(
        volume,
        [SegmentationFindings(ALGORITHM, nothing, None), DetectionFindings(DETECTOR, (), (NODULE,))],
        SR_SERIES,
    )
    _, sr_back = _write_and_read(sr, tmp_path / "sr.dcm")

    report = sr_back.content
    assert report.get_planar_roi_measurement_groups() == []
    assert report.get_volumetric_roi_measurement_groups() == []
    groups = report.get_image_measurement_groups()
    assert [(g.tracking_identifier, _text(g, ALGORITHM_NAME)) for g in groups] == [
        *((f"{label.name} (not found)", ALGORITHM.name) for label in LABELS),
        ("nodule (not found)", DETECTOR.name),
    ]
    for group in groups:
        evaluations = {
            _code(e.name): _code(e.value)
            for e in group.get_qualitative_evaluations()
            if _code(e.name) == _code(group.finding_type)
        }
        assert evaluations == {_code(group.finding_type): ABSENT}
    _assert_valid(tmp_path / "sr.dcm", source.files)


def test_report_context_device_observer_procedure_library_and_reproducible_uids(
    sources: dict[str, Source], tmp_path: Path
) -> None:
    source = sources["oblique-multiframe"]
    volume = source.volume
    fixed = SR_SERIES.model_copy(
        update={"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2"}
    )
    findings = [DetectionFindings(DETECTOR, _detections(volume), (NODULE, LUNG))]

    first, second = (_write_and_read(build_sr(volume, findings, fixed), tmp_path / f"sr{i}.dcm")[1] for i in (1, 2))

    (device,) = first.content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    (device_again,) = second.content.get_observer_contexts()
    assert device.observer_identifying_attributes.uid == device_again.observer_identifying_attributes.uid
    assert device.observer_identifying_attributes.manufacturer_name == fixed.manufacturer
    root = first.ContentSequence
    (procedure,) = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    code = procedure.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("24627-2", "LN", "CT Chest")
    (library,) = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
    library_uids = {
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    }
    assert library_uids == {str(ds.SOPInstanceUID) for ds in source.headers}
    uids = [g.tracking_uid for g in first.content.get_planar_roi_measurement_groups()]
    assert uids == [g.tracking_uid for g in second.content.get_planar_roi_measurement_groups()]
    assert [g.tracking_identifier for g in first.content.get_image_measurement_groups()] == ["lung (not found)"]


def test_inconsistent_inputs_are_rejected_with_the_culprit_named(sources: dict[str, Source]) -> None:
    axial, oblique = sources["axial"].volume, sources["oblique"].volume
    result = _segmentation(axial)
    seg_of_other_series = build_seg(oblique, _segmentation(oblique), ALGORITHM, SEG_SERIES)

    with pytest.raises(ValueError, match=rf"references series \['{oblique.series_instance_uid}'\], not the volume's"):
        build_sr(axial, [SegmentationFindings(ALGORITHM, result, seg_of_other_series)], SR_SERIES)
    with pytest.raises(ValueError, match=r"label values \[2, 5\] are present but no SEG was given"):
        build_sr(axial, [SegmentationFindings(ALGORITHM, result, None)], SR_SERIES)
    outside = detection(axial, (axial.shape[0] + 3.0, 10.0, 10.0), 5.0, 0.5, NODULE)
    with pytest.raises(ValueError, match=r"outside 0\.\.23"):
        build_sr(axial, [DetectionFindings(DETECTOR, (outside,), (NODULE,))], SR_SERIES)
    with pytest.raises(ValueError, match=r"detections with label values \[5\] not among the declared labels \[2\]"):
        DetectionFindings(DETECTOR, _detections(axial), (LUNG,))
    with pytest.raises(ValueError, match="labels must name what it looks for"):
        DetectionFindings(DETECTOR, (), ())
    with pytest.raises(ValueError, match="no findings set to report"):
        build_sr(axial, [], SR_SERIES)


_SOURCE = ("260753009", "SCT")
_Reference = tuple[str, str, tuple[int, ...] | None]  # SOP class UID, SOP instance UID, frame numbers


def _library_references(library: Dataset) -> list[_Reference]:
    """What an Image Library references, after asserting that it holds nothing but bare references.

    One Image Library Group, whose only children are IMAGE "Source" entries,
    each with exactly one referenced SOP (class, instance, and frame numbers
    when given) and no content of its own (no TID 1602 descriptors).
    """
    assert library.ConceptNameCodeSequence[0].CodeValue == IMAGE_LIBRARY
    (group,) = library.ContentSequence
    assert (group.ValueType, group.ConceptNameCodeSequence[0].CodeValue) == ("CONTAINER", "126200")
    references: list[_Reference] = []
    for entry in group.ContentSequence:
        assert set(entry.dir()) == {"RelationshipType", "ValueType", "ConceptNameCodeSequence", "ReferencedSOPSequence"}
        assert (entry.RelationshipType, entry.ValueType) == ("CONTAINS", "IMAGE")
        name = entry.ConceptNameCodeSequence[0]
        assert (name.CodeValue, name.CodingSchemeDesignator) == _SOURCE
        (referenced,) = entry.ReferencedSOPSequence
        uids = {"ReferencedSOPClassUID", "ReferencedSOPInstanceUID"}
        assert set(referenced.dir()) - {"ReferencedFrameNumber"} == uids
        frames = (
            tuple(int(f) for f in np.atleast_1d(referenced.ReferencedFrameNumber))
            if "ReferencedFrameNumber" in referenced
            else None
        )
        references.append((str(referenced.ReferencedSOPClassUID), str(referenced.ReferencedSOPInstanceUID), frames))
    return references


@pytest.mark.parametrize("source_name", ["axial", "oblique", "oblique-multiframe"])
def test_image_library_lists_exactly_the_source_instances_before_the_measurements(
    sources: dict[str, Source], tmp_path: Path, source_name: str
) -> None:
    """One bare TID 1601 entry per source file (all frames of a multi-frame one), no optional descriptors."""
    source = sources[source_name]
    volume = source.volume
    sr = build_sr(volume, [DetectionFindings(DETECTOR, _detections(volume), (NODULE,))], SR_SERIES)
    dataset, _ = _write_and_read(sr, tmp_path / "sr.dcm")

    names = [item.ConceptNameCodeSequence[0].CodeValue for item in dataset.ContentSequence]
    # where MeasurementReport(referenced_images=...) puts it; the summary's Qualitative Evaluations come last
    assert names[-3:] == [IMAGE_LIBRARY, IMAGING_MEASUREMENTS, QUALITATIVE_EVALUATIONS.value]
    assert names.count(IMAGE_LIBRARY) == 1
    assert [item.ConceptNameCodeSequence[0].CodeValue for item in sr.content[0].ContentSequence] == names
    expected = sorted(
        (
            str(header.SOPClassUID),
            str(header.SOPInstanceUID),
            tuple(range(1, int(header.NumberOfFrames) + 1)) if "PerFrameFunctionalGroupsSequence" in header else None,
        )
        for header in source.headers
    )
    written = _library_references(dataset.ContentSequence[-3])
    assert sorted(written) == expected
    assert _library_references(sr.content[0].ContentSequence[-3]) == written  # the parsed view is the document


def test_a_rerun_report_names_the_report_it_replaces(sources: dict[str, Source], tmp_path: Path) -> None:
    """A re-run of a model on a series: the new SR lists the earlier SR in its Predecessor Documents Sequence."""
    source = sources["axial"]
    volume = source.volume
    findings = [DetectionFindings(DETECTOR, _detections(volume), (NODULE,))]
    earlier, _ = _write_and_read(build_sr(volume, findings, SR_SERIES), tmp_path / "earlier.dcm")
    later, _ = _write_and_read(build_sr(volume, findings, SR_SERIES, replaces=[earlier]), tmp_path / "later.dcm")

    [study_ref] = later.PredecessorDocumentsSequence
    [series_ref] = study_ref.ReferencedSeriesSequence
    [instance_ref] = series_ref.ReferencedSOPSequence
    assert (study_ref.StudyInstanceUID, series_ref.SeriesInstanceUID) == (earlier.StudyInstanceUID,
                                                                         earlier.SeriesInstanceUID)
    assert (instance_ref.ReferencedSOPClassUID, instance_ref.ReferencedSOPInstanceUID) == (
        earlier.SOPClassUID, earlier.SOPInstanceUID)
    assert later.SOPInstanceUID != earlier.SOPInstanceUID and "PredecessorDocumentsSequence" not in earlier
    _assert_valid(tmp_path / "later.dcm", source.files)
