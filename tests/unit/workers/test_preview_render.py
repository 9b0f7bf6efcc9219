"""The worker's preview renderer: which slice, colours from the SEG's palette, circles, class text, legend, window.

The volume is a phantom CT series written as DICOM and loaded the way the workers load
it; the results are built by hand so that the right slice and pixels are known.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from dicom_node.contracts import CodedConcept, SegmentLabel
from dicom_node.palette import LOW_CONFIDENCE_RGB
from tests.unit.workers.outputs_fixtures import ALGORITHM, AXIAL, LABELS, detection, sphere_mask, volume_from_files, \
    voxel_centres_mm, write_phantom_series
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.outputs.preview import (
    DISCLAIMER,
    PREVIEW_FACTS_NAME,
    PREVIEW_NAME,
    PreviewPicture,
    display_window,
    key_slice,
    label_rgb,
    render_preview,
)
from workers.volume import Volume

BODY, LUNG, NODULE = LABELS[0], LABELS[1], LABELS[4]
NODULE_AT = (15, 40, 20)  # slice, row, column of the nodule's centre: right half of the image, lower part
PRESENT = SegmentLabel(value=2, name="nodule present", property_category=CodedConcept(
    value="27925004", scheme="SCT", meaning="Nodule"), property_type=CodedConcept(
    value="52101004", scheme="SCT", meaning="Present"), color_rgb=(220, 40, 40))
ABSENT = PRESENT.model_copy(update={"value": 1, "name": "nodule absent", "color_rgb": (40, 200, 40),
                                    "property_type": CodedConcept(value="2667000", scheme="SCT", meaning="Absent")})


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return volume_from_files(write_phantom_series(tmp_path_factory.mktemp("preview"), AXIAL, seed=5))


def pixels(picture: PreviewPicture) -> npt.NDArray[np.uint8]:
    image = Image.open(io.BytesIO(picture.png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def coloured(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Pixels that are not grey (the windowed CT is grey, so these are what was drawn)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r != g) | (g != b)


def band(rgb: npt.NDArray[np.uint8], volume: Volume) -> npt.NDArray[np.uint8]:
    """The legend band under the slice."""
    return rgb[volume.shape[1]:]


def lung_and_nodule(volume: Volume, *, nodule: bool = True) -> SegmentationResult:
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:7, 10:40, 10:50] = LUNG.value  # more voxels than the nodule, on other slices
    if nodule:
        labels[sphere_mask(volume, volume.index_to_world(NODULE_AT), 9.0)] = NODULE.value
    return SegmentationResult(labels, LABELS)


def test_a_lesion_decides_the_slice_and_is_drawn_in_its_seg_colour_with_a_legend(volume: Volume) -> None:
    picture = render_preview(volume, lung_and_nodule(volume), ALGORITHM)
    rgb = pixels(picture)
    rows, columns = volume.shape[1:]
    assert picture.slice_index == NODULE_AT[0] and picture.slice_count == volume.shape[0]
    assert picture.overlay and picture.kind == "segmentation" and picture.model_id == ALGORITHM.model_id
    slice_rgb = rgb[:rows, :columns]
    _, row, column = NODULE_AT
    r, g, b = slice_rgb[row, column].astype(int)
    assert r > b + 60 and g > b + 60, (r, g, b)  # blended towards the nodule's yellow (255, 230, 0)
    assert tuple(slice_rgb[row - 2, column]) == NODULE.color_rgb or coloured(slice_rgb)[row - 2, column]
    assert not coloured(slice_rgb)[:4, :4].any() and coloured(slice_rgb).sum() < rows * columns / 10
    outline = np.all(slice_rgb == np.asarray(NODULE.color_rgb), axis=-1)
    assert outline.any(), "the nodule has a solid outline in its SEG colour"
    assert [(e.name, e.rgb, e.mark) for e in picture.legend] == [("nodule", NODULE.color_rgb, "fill")]
    legend = band(rgb, volume)
    assert legend.shape[0] >= 4 * 12, "header, one entry and the disclaimer"
    assert (np.abs(legend.astype(int) - legend[-1, -1].astype(int)).sum(axis=-1) > 60).sum() > 200  # text drawn
    assert np.all(legend == NODULE.color_rgb, axis=-1).any(), "the legend's swatch in the nodule's colour"


def test_without_lesion_the_most_segmented_slice_and_a_large_segment_only_outlined(volume: Volume) -> None:
    labels = lung_and_nodule(volume, nodule=False).label_map.copy()
    labels[12, 2:62, 2:62] = BODY.value  # the body: most voxels of all, on slice 12, nearly the whole slice
    picture = render_preview(volume, SegmentationResult(labels, LABELS), ALGORITHM)
    assert picture.slice_index == 12
    slice_rgb = pixels(picture)[:volume.shape[1], :volume.shape[2]]
    assert not coloured(slice_rgb)[30, 30], "a segment over half the slice is drawn as its outline only"
    assert np.all(slice_rgb[2, 10:50] == BODY.color_rgb)
    assert [e.mark for e in picture.legend] == ["outline"]
    nothing = render_preview(volume, SegmentationResult(np.zeros(volume.shape, np.uint8), LABELS), ALGORITHM)
    assert nothing.slice_index == volume.shape[0] // 2 and not nothing.overlay
    assert not coloured(pixels(nothing)[:volume.shape[1], :volume.shape[2]]).any()
    assert [e.name for e in nothing.legend] == ["nothing segmented"]


def test_the_largest_detection_decides_the_slice_and_is_circled_as_in_the_gsps(volume: Volume) -> None:
    big = detection(volume, (18, 30, 32), 24.0, 0.9, NODULE)
    small = detection(volume, (5, 20, 20), 8.0, 0.6, NODULE)
    picture = render_preview(volume, DetectionResult((small, big)), ALGORITHM)
    assert picture.slice_index == 18 and picture.overlay
    slice_rgb = pixels(picture)[:volume.shape[1], :volume.shape[2]]
    assert NODULE.color_rgb == (230, 159, 0)  # the palette's orange, not the old CAD yellow
    circled = np.all(slice_rgb == NODULE.color_rgb, axis=-1)
    rows, columns = np.nonzero(circled)
    assert len(rows) > 12 and abs(rows.mean() - 30) < 1.5 and abs(columns.mean() - 32) < 1.5
    assert not circled[30, 32], "an outline, not a disc"
    radius = np.hypot(rows - 30, columns - 32)
    assert abs(np.median(radius) - 12.0 / 4.0) < 1.0, "the circle has the detection's diameter (4 mm pixels)"
    assert [(e.name, e.mark, e.rgb) for e in picture.legend] == [
        ("nodule 24 mm, 90%", "circle", NODULE.color_rgb), ("1 finding(s) on other slices", "text", (235, 235, 235))]
    none = render_preview(volume, DetectionResult(()), ALGORITHM)
    assert none.slice_index == volume.shape[0] // 2 and not none.overlay
    assert [e.name for e in none.legend] == ["no findings"]


def test_low_confidence_detections_are_listed_not_drawn_as_a_default_destination_sees_them(volume: Volume) -> None:
    big = detection(volume, (18, 30, 32), 24.0, 0.31, NODULE)  # under the threshold: not drawn, though largest
    small = detection(volume, (5, 20, 20), 8.0, 0.6, NODULE)
    picture = render_preview(volume, DetectionResult((small, big)), ALGORITHM, threshold=0.34)
    assert picture.slice_index == 5, "the slice of the largest outlined finding"
    slice_rgb = pixels(picture)[:volume.shape[1], :volume.shape[2]]
    assert np.all(slice_rgb == NODULE.color_rgb, axis=-1).sum() > 4
    assert [(e.name, e.mark, e.rgb) for e in picture.legend] == [
        ("nodule 8 mm, 60%", "circle", NODULE.color_rgb),
        ("nodule 24 mm, 31% (low confidence, not outlined)", "text", LOW_CONFIDENCE_RGB)]
    only_low = render_preview(volume, DetectionResult((big,)), ALGORITHM, threshold=0.34)
    assert only_low.slice_index == 18 and not only_low.overlay, "its slice, nothing drawn on it"
    assert not np.all(pixels(only_low)[:volume.shape[1], :volume.shape[2]] == NODULE.color_rgb, axis=-1).any()
    assert [e.name for e in only_low.legend] == ["nodule 24 mm, 31% (low confidence, not outlined)"]
    legend = pixels(only_low)[volume.shape[1]:]
    assert np.all(legend == LOW_CONFIDENCE_RGB, axis=-1).sum() > 10, "the legend line in the low-confidence grey"


def test_a_classification_writes_its_class_on_the_explanation_peak_slice(volume: Volume) -> None:
    distance = np.linalg.norm(voxel_centres_mm(volume) - volume.index_to_world((7, 20, 44)), axis=-1)
    explanation = np.clip(1.0 - distance / 16.0, 0.0, 1.0).astype(np.float32)  # peaks at slice 7, row 20, column 44
    result = ClassificationResult((ABSENT, PRESENT), (0.13, 0.87), explanation, "hirescam")
    assert key_slice(volume, result) == 7
    picture = render_preview(volume, result, ALGORITHM)
    slice_rgb = pixels(picture)[:volume.shape[1], :volume.shape[2]]
    assert picture.slice_index == 7 and picture.overlay
    assert picture.legend[0].name == "nodule present: 87%" and picture.legend[0].rgb == PRESENT.color_rgb
    red = (slice_rgb[..., 0] > 140) & (slice_rgb[..., 1] < 90) & (slice_rgb[..., 2] < 90)
    assert red[:18, :].sum() > 20 and not red[24:].any(), "the class written top left in its colour"
    orange = np.all(slice_rgb == (255, 128, 0), axis=-1)
    assert orange.any() and abs(np.nonzero(orange)[1].mean() - 44) < 2, "where it looked, outlined"
    plain = render_preview(volume, ClassificationResult((ABSENT, PRESENT), (0.7, 0.3)), ALGORITHM)
    assert plain.slice_index == volume.shape[0] // 2 and [e.name for e in plain.legend] == ["nodule absent: 70%"]


def test_chest_ct_is_shown_in_the_lung_window_and_other_series_in_their_own(volume: Volume) -> None:
    assert volume.datasets[0].BodyPartExamined == "CHEST"
    assert display_window(volume, 0) == (-600.0, 1500.0)
    header = volume.datasets[0].copy()
    header.BodyPartExamined, header.SeriesDescription, header.StudyDescription = "ABDOMEN", "Abdomen", "Abdomen"
    header.WindowCenter, header.WindowWidth = "50", "350"
    abdomen = dataclasses.replace(volume, datasets=(header, *volume.datasets[1:]))
    assert display_window(abdomen, 0) == (50.0, 350.0)
    mr = dataclasses.replace(volume, modality="MR", datasets=())
    level, width = display_window(mr, 12)
    low, high = np.percentile(volume.array[12], [1, 99])
    assert level == pytest.approx((low + high) / 2) and width == pytest.approx(high - low)


def test_a_grey_label_colour_gets_a_distinct_one_and_the_facts_describe_the_picture(volume: Volume) -> None:
    grey = LUNG.model_copy(update={"color_rgb": (128, 128, 128)})
    assert label_rgb(grey) != (128, 128, 128) and label_rgb(LUNG) == LUNG.color_rgb
    picture = render_preview(volume, lung_and_nodule(volume), ALGORITHM)
    files = picture.files()
    assert files["png"] == (PREVIEW_NAME, picture.png) and files["facts"][0] == PREVIEW_FACTS_NAME
    facts = json.loads(files["facts"][1])
    assert facts["series_instance_uid"] == volume.series_instance_uid
    assert (facts["slice_index"], facts["slice_count"], facts["overlay"]) == (NODULE_AT[0], volume.shape[0], True)
    assert (facts["rows"], facts["columns"]) == volume.shape[1:] and facts["legend"][0]["name"] == "nodule"
    image = Image.open(io.BytesIO(picture.png))
    assert image.size[0] >= volume.shape[2] and image.size[1] > volume.shape[1]
    assert DISCLAIMER == "AI result preview - not for diagnosis"


def test_a_label_map_of_another_shape_is_refused_naming_both(volume: Volume) -> None:
    with pytest.raises(ValueError, match=r"label map shape \(2, 2, 2\) differs from volume shape"):
        render_preview(volume, SegmentationResult(np.zeros((2, 2, 2), np.uint8), LABELS), ALGORITHM)
