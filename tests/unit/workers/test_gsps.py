"""GSPS builder (workers.outputs.gsps): outlines on the right images at the right pixels, valid and consistent."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.contracts import Detection
from dicom_node.palette import LOW_CONFIDENCE_RGB
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
from workers.outputs.common import SeriesIdentity
from workers.outputs.gsps import build_gsps
from workers.outputs.seg import build_seg
from workers.volume import Volume

IDENTITY = SeriesIdentity(series_number=903, series_description="AI nodule marks", software_versions="9.9.9")
NODULE = LABELS[4]


def detections(volume: Volume) -> list[Detection]:
    """A nodule inside, one at the image border (outline clamped), one whose box is thinner than the sphere."""
    thin = detection(volume, (17.0, 40.2, 20.7), 10.0, 0.61, NODULE)
    thin = thin.model_copy(update={"size_mm": (10.0, 10.0, 3.0)}) if volume.axes[0][2] > 0.99 else thin
    return [
        detection(volume, (11.3, 20.6, 30.2), 12.0, 0.87, NODULE),
        detection(volume, (3.0, 1.0, volume.shape[2] - 1.5), 20.0, 0.5, NODULE),
        thin,
    ]


class Written:
    """A GSPS built from a phantom series, written to bytes and read back, with what it came from."""

    def __init__(self, tmp: Path, geometry: SeriesGeometry, seed: int, multiframe: bool = False) -> None:
        paths = write_phantom_series(tmp / "series", geometry, seed=seed, reverse_instance_numbers=True)
        if multiframe:
            self.volume = multiframe_volume(paths, tmp / "enhanced.dcm")
            self.source_paths = [tmp / "enhanced.dcm"]
        else:
            self.volume = volume_from_files(paths)
            self.source_paths = paths
        self.detections = detections(self.volume)
        gsps = build_gsps(self.volume, self.detections, ALGORITHM, IDENTITY)
        assert gsps is not None
        buffer = io.BytesIO()
        gsps.save_as(buffer, enforce_file_format=True)
        self.path = tmp / "gsps.dcm"
        self.path.write_bytes(buffer.getvalue())
        self.dataset = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        self.source = pydicom.dcmread(self.source_paths[0], stop_before_pixels=True)

    def slice_of(self, annotation: Dataset) -> int:
        """The volume slice an annotation is drawn on, from its referenced image (and frame)."""
        ref = annotation.ReferencedImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        matches = [k for k, f in enumerate(self.volume.frames)
                   if f.sop_instance_uid == ref.ReferencedSOPInstanceUID and f.frame_number == frame]
        assert len(matches) == 1
        return matches[0]

    def objects_by_detection(self) -> dict[int, dict[int, list[Dataset]]]:
        """{detection number: {slice index: [graphic and text objects]}} as read back."""
        found: dict[int, dict[int, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
        for annotation in self.dataset.GraphicAnnotationSequence:
            assert annotation.GraphicLayer == "NODULE"
            k = self.slice_of(annotation)
            for item in [*annotation.get("GraphicObjectSequence", []), *annotation.get("TextObjectSequence", [])]:
                found[int(item.GraphicGroupID)][k].append(item)
        return found


@pytest.fixture(scope="module", params=["axial", "oblique"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Written:
    geometry = {"axial": AXIAL, "oblique": OBLIQUE}[request.param]
    return Written(tmp_path_factory.mktemp(f"gsps_{request.param}"), geometry, seed=31)


def _rgb(layer: Dataset) -> tuple[int, int, int]:
    """A graphic layer's recommended display colour (CIELab in the GSPS) back in sRGB, rounded."""
    lab = hd.color.CIELabColor.from_dicom_value(layer.GraphicLayerRecommendedDisplayCIELabValue)
    return tuple(int(v) for v in lab.to_rgb())  # type: ignore[return-value]


def expected_outlines(volume: Volume, det: Detection) -> dict[int, float]:
    """{slice: outline radius mm}: centre slice at full diameter, neighbours within the box cut >= half a pixel."""
    s = float(volume.world_to_index(det.centre_mm)[0])
    radius = det.diameter_mm / 2
    half_box = 0.5 * float(np.abs(np.asarray(det.size_mm) * volume.axes[0]).sum())
    out = {int(round(s)): radius}
    for k in range(volume.shape[0]):
        d = abs(k - s) * volume.spacing_mm[0]
        if k != round(s) and d <= min(radius, half_box) and math.sqrt(radius**2 - d**2) >= 0.5 * min(volume.spacing_mm[1:]):
            out[k] = math.sqrt(radius**2 - d**2)
    return out


def test_outlines_are_on_the_right_images_at_the_right_pixels(written: Written) -> None:
    found = written.objects_by_detection()
    rows, columns = written.volume.shape[1:]
    _, row_mm, col_mm = written.volume.spacing_mm
    assert sorted(found) == [1, 2, 3]
    for number, det in enumerate(written.detections, start=1):
        centre = written.volume.world_to_index(det.centre_mm)
        centre_col, centre_row = centre[2] + 0.5, centre[1] + 0.5  # DICOM: (0, 0) is the top left pixel's corner
        expected = expected_outlines(written.volume, det)
        assert sorted(found[number]) == sorted(expected), f"detection {number}"
        assert len(expected) > 1 or number == 3, "a sphere spanning several slices is outlined on each"
        for k, radius in expected.items():
            polylines = [o for o in found[number][k] if "GraphicType" in o]
            assert len(polylines) == 1
            line = polylines[0]
            assert (line.GraphicType, line.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
            points = np.asarray(line.GraphicData, dtype=np.float64).reshape(-1, 2)
            np.testing.assert_array_equal(points[0], points[-1])  # closed
            assert points[:, 0].min() >= 0 and points[:, 0].max() <= columns
            assert points[:, 1].min() >= 0 and points[:, 1].max() <= rows
            inside = (points[:, 0] > 0) & (points[:, 0] < columns) & (points[:, 1] > 0) & (points[:, 1] < rows)
            assert inside.sum() >= 8
            distance_mm = np.hypot((points[inside, 0] - centre_col) * col_mm, (points[inside, 1] - centre_row) * row_mm)
            np.testing.assert_allclose(distance_mm, radius, rtol=1e-4)
        texts = [(k, o) for k, objects in found[number].items() for o in objects if "UnformattedTextValue" in o]
        assert len(texts) == 1
        k, text = texts[0]
        assert k == round(centre[0])
        box = [*text.BoundingBoxTopLeftHandCorner, *text.BoundingBoxBottomRightHandCorner]
        assert 0 <= box[0] < box[2] <= columns and 0 <= box[1] < box[3] <= rows
    texts = [o.UnformattedTextValue for n in sorted(found) for os in found[n].values() for o in os
             if "UnformattedTextValue" in o]
    assert texts == ["nodule 12 mm, 87%", "nodule 20 mm, 50%", "nodule 10 mm, 61%"]


def test_presentation_state_identification_window_and_references(written: Written) -> None:
    ds, source = written.dataset, written.source
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.AccessionNumber == "ACC00031"
    assert (ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.SoftwareVersions) == (
        "PR", 903, "AI nodule marks", "9.9.9")
    assert ds.ContentLabel == "CHEST ORGANS TES"
    assert ds.BodyPartExamined == "CHEST"
    voi = ds.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth), voi.WindowCenterWidthExplanation) == (-600.0, 1500.0, "LUNG")
    [layer] = ds.GraphicLayerSequence
    assert layer.GraphicLayer == "NODULE"
    assert layer.GraphicLayerDescription == f"nodule - {ALGORITHM.name} {ALGORITHM.version}"
    # The label's palette colour (not the old CAD yellow), as the SEG, overlay series and preview show it.
    assert NODULE.color_rgb == (230, 159, 0)
    assert _rgb(layer) == NODULE.color_rgb
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == written.volume.series_instance_uid
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedImageSequence} == {
        f.sop_instance_uid for f in written.volume.frames}


def test_dicom3tools_find_no_errors_in_source_seg_and_gsps(written: Written, tmp_path: Path) -> None:
    labels = np.zeros(written.volume.shape, dtype=np.uint8)
    labels[sphere_mask(written.volume, written.detections[0].centre_mm, 6.0)] = NODULE.value
    seg = build_seg(written.volume, SegmentationResult(labels, LABELS), ALGORITHM,
                    SeriesIdentity(series_number=901, series_description="AI nodules"))
    assert seg is not None
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    errors, warnings = dciodvfy_findings(written.path)
    print("\n".join(warnings))
    assert errors == []
    errors, warnings = dcentvfy_findings([*written.source_paths, tmp_path / "seg.dcm", written.path])
    print("\n".join(warnings))
    assert errors == []


def test_multiframe_source_annotations_reference_frame_numbers(tmp_path: Path) -> None:
    written = Written(tmp_path, AXIAL, seed=32, multiframe=True)
    found = written.objects_by_detection()
    for number, det in enumerate(written.detections, start=1):
        assert sorted(found[number]) == sorted(expected_outlines(written.volume, det))
    frames = {int(a.ReferencedImageSequence[0].ReferencedFrameNumber) for a in written.dataset.GraphicAnnotationSequence}
    centre_slice = round(float(written.volume.world_to_index(written.detections[0].centre_mm)[0]))
    assert written.volume.frames[centre_slice].frame_number in frames
    assert written.volume.frames[centre_slice].frame_number != centre_slice + 1  # frame order is not slice order
    errors, warnings = dciodvfy_findings(written.path)
    print("\n".join(warnings))
    assert errors == []


def test_no_detections_gives_no_gsps(written: Written) -> None:
    assert build_gsps(written.volume, [], ALGORITHM, IDENTITY) is None


def test_detection_outside_the_volume_is_named(written: Written) -> None:
    outside = detection(written.volume, (written.volume.shape[0] + 2.0, 10.0, 10.0), 8.0, 0.9, NODULE)
    with pytest.raises(ValueError, match=r"outside 0\.\.\d+"):
        build_gsps(written.volume, [outside], ALGORITHM, IDENTITY)


def test_without_window_the_source_window_is_kept(written: Written) -> None:
    gsps = build_gsps(written.volume, written.detections[:1], ALGORITHM, IDENTITY, window=None)
    assert gsps is not None
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)  # the phantom's soft-tissue window


def test_a_source_without_body_part_gives_a_valid_gsps_and_seg(tmp_path: Path) -> None:
    """Without BodyPartExamined dciodvfy wants Laterality (Type 2C) in the GSPS (written empty), not in the SEG."""
    paths = write_phantom_series(tmp_path / "series", AXIAL, seed=33)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.BodyPartExamined
        ds.save_as(path)
    volume = volume_from_files(paths)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    found = detections(volume)
    labels[sphere_mask(volume, found[0].centre_mm, 6.0)] = NODULE.value
    for name, built in (("gsps", build_gsps(volume, found, ALGORITHM, IDENTITY)),
                        ("seg", build_seg(volume, SegmentationResult(labels, LABELS), ALGORITHM,
                                          SeriesIdentity(series_number=901, series_description="AI nodules")))):
        assert built is not None
        built.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        errors, _ = dciodvfy_findings(tmp_path / f"{name}.dcm")
        assert errors == [], name
        assert "BodyPartExamined" not in built
        assert ("Laterality" in built) == (name == "gsps")


def test_low_confidence_detections_are_left_out_or_drawn_in_their_own_grey_layer(tmp_path: Path) -> None:
    """Under the display threshold: not outlined by default; with ``outline_low_confidence`` in the grey
    "LOW CONFIDENCE" layer, text saying so, the certain ones still in their label's layer; valid either way."""
    written = Written(tmp_path, AXIAL, seed=31)
    volume, found = written.volume, written.detections  # scores 0.87, 0.5, 0.61
    default = build_gsps(volume, found, ALGORITHM, IDENTITY, threshold=0.6)
    assert default is not None
    texts = sorted(str(t.UnformattedTextValue) for a in default.GraphicAnnotationSequence
                   for t in a.get("TextObjectSequence", []))
    assert texts == ["nodule 10 mm, 61%", "nodule 12 mm, 87%"]
    assert [str(layer.GraphicLayer) for layer in default.GraphicLayerSequence] == ["NODULE"]
    assert build_gsps(volume, found, ALGORITHM, IDENTITY, threshold=0.9) is None, "nothing outlined, no GSPS"

    shown = build_gsps(volume, found, ALGORITHM, IDENTITY, threshold=0.6, outline_low_confidence=True)
    assert shown is not None
    layers = {str(layer.GraphicLayer): layer for layer in shown.GraphicLayerSequence}
    assert list(layers) == ["NODULE", "LOW CONFIDENCE"]
    assert _rgb(layers["LOW CONFIDENCE"]) == LOW_CONFIDENCE_RGB and _rgb(layers["NODULE"]) == NODULE.color_rgb
    by_layer: dict[str, list[str]] = defaultdict(list)
    for annotation in shown.GraphicAnnotationSequence:
        by_layer[str(annotation.GraphicLayer)] += [str(t.UnformattedTextValue)
                                                   for t in annotation.get("TextObjectSequence", [])]
    assert by_layer["LOW CONFIDENCE"] == ["nodule 20 mm, 50%, low confidence"]
    assert sorted(by_layer["NODULE"]) == ["nodule 10 mm, 61%", "nodule 12 mm, 87%"]
    for name, gsps in (("default", default), ("shown", shown)):
        path = tmp_path / f"{name}.dcm"
        gsps.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy_findings(path)
        assert errors == [], (name, errors)
