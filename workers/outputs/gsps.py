"""Detections as a Grayscale Softcopy Presentation State: outlines and labels any PACS viewer can show.

Why: many viewers show neither SEG nor SR, but nearly all apply a GSPS (the
same mechanism as a radiologist's saved annotations). So each detection gets,
on the referenced source images:

* on the image through its centre: a circle of the detection's diameter and a
  text label such as ``"nodule 12 mm, 87%"``;
* on the neighbouring images its box spans: the circle where the sphere of
  that diameter cuts the image plane (skipped once the cut is under half a
  pixel), so the outline grows and shrinks as the radiologist scrolls.

Circles are closed POLYLINEs (32 segments) in PIXEL units: viewers support
POLYLINE more widely than ELLIPSE, and with non-square pixels a circle is not
a circle in pixel units anyway. Coordinates follow PS3.3 C.10.5.1.2 (see
:mod:`workers.outputs.common`); points falling outside the image are clamped
to its border. Each label's graphics go in a graphic layer named after it, in the
label's colour (the one palette, :mod:`dicom_node.palette`: the SEG's, the overlay
series' and the preview's); one graphic group per detection. Detections under the
model's display threshold (:mod:`workers.outputs.confidence`) are left out unless
``outline_low_confidence``; then they go in a layer of their own, "LOW CONFIDENCE",
in :data:`~dicom_node.palette.LOW_CONFIDENCE_RGB`, their text saying so. The presentation state references every image
of the series (so a viewer applies it, and its window, to the whole series)
and sets a lung window unless told otherwise.

No detections: :func:`build_gsps` returns ``None`` - a presentation state
without graphics is legal but shows nothing; the SR says that nothing was found.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_node.contracts import AlgorithmInfo, Detection
from dicom_node.palette import LOW_CONFIDENCE_RGB
from workers.outputs.common import (
    ImagePoint,
    SeriesIdentity,
    code_string,
    content_identity,
    copy_body_part,
    image_point,
    nearest_slice,
    slice_sources,
)
from workers.outputs.confidence import LOW_CONFIDENCE_TEXT, is_low_confidence, outlined
from workers.volume import Volume

__all__ = ["LOW_CONFIDENCE_LAYER", "LUNG_WINDOW", "VoiWindow", "build_gsps", "detection_text", "outline_slices"]

logger = logging.getLogger(__name__)

#: Segments of the closed polyline that approximates a circle.
_CIRCLE_SEGMENTS = 32
#: Name of the graphic layer of low-confidence detections (when they are outlined at all).
LOW_CONFIDENCE_LAYER = "LOW CONFIDENCE"


class VoiWindow(NamedTuple):
    """A VOI LUT window in modality units (HU for CT)."""

    centre: float
    width: float
    explanation: str


#: The usual lung window, in which nodules are read.
LUNG_WINDOW = VoiWindow(centre=-600.0, width=1500.0, explanation="LUNG")


class Outline(NamedTuple):
    """The circle to draw for one detection on one slice: centre in image coordinates, radius in mm."""

    point: ImagePoint
    radius_mm: float


def detection_text(detection: Detection) -> str:
    """The label shown next to a detection, e.g. ``"nodule 12 mm, 87%"``."""
    return f"{detection.label.name} {detection.diameter_mm:.0f} mm, {detection.score:.0%}"


def outline_slices(volume: Volume, detection: Detection) -> list[Outline]:
    """The outlines of ``detection`` on the slices it spans, centre slice first (full diameter).

    A neighbouring slice is included when its plane lies within the
    detection's box (the box's extent projected on the slice normal) and cuts
    the sphere of ``diameter_mm`` in a circle of at least half a pixel radius.
    Raises ValueError when the centre lies outside the volume.
    """
    centre_slice = nearest_slice(volume, detection.centre_mm)
    radius = detection.diameter_mm / 2.0
    centre_point = image_point(volume, centre_slice, detection.centre_mm)
    outlines = [Outline(centre_point, radius)]
    normal = np.cross(volume.axes[2], volume.axes[1])
    normal /= np.linalg.norm(normal)
    half_extent = 0.5 * float(np.abs(np.asarray(detection.size_mm) * normal).sum())
    reach = min(half_extent, radius)
    min_radius = 0.5 * min(volume.spacing_mm[1], volume.spacing_mm[2])
    span = int(math.ceil(reach / volume.spacing_mm[0])) + 1
    for k in range(max(0, centre_slice - span), min(volume.shape[0], centre_slice + span + 1)):
        if k == centre_slice:
            continue
        point = image_point(volume, k, detection.centre_mm)
        distance = abs(point.distance_mm)
        if distance > reach:
            continue
        cut = math.sqrt(max(radius**2 - distance**2, 0.0))
        if cut >= min_radius:
            outlines.append(Outline(point, cut))
    return outlines


def _circle(volume: Volume, outline: Outline, rows: int, columns: int) -> npt.NDArray[np.float64]:
    """Closed polyline (column, row) of a circle of ``radius_mm``, clamped to the image."""
    angles = np.linspace(0.0, 2.0 * np.pi, _CIRCLE_SEGMENTS + 1)
    angles[-1] = 0.0  # close exactly: first point == last point
    columns_px = outline.point.column + outline.radius_mm * np.cos(angles) / volume.spacing_mm[2]
    rows_px = outline.point.row + outline.radius_mm * np.sin(angles) / volume.spacing_mm[1]
    return np.stack([np.clip(columns_px, 0.0, columns), np.clip(rows_px, 0.0, rows)], axis=1)


def _text_box(
    text: str, column: float, top: float, bottom: float, rows: int, columns: int
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a box for ``text`` just above the rows ``top..bottom`` (else below), in the image.

    Size is a heuristic: a line height of 1/32 of the image, 0.6 line heights per character.
    """
    height = max(rows, columns) / 32.0
    width = min(0.6 * height * len(text), float(columns))
    gap = height / 4.0
    box_top = top - gap - height
    if box_top < 0.0:
        box_top = min(bottom + gap, rows - height)
    box_top = max(box_top, 0.0)
    left = min(max(column - width / 2.0, 0.0), columns - width)
    return (left, box_top, left + width, min(box_top + height, float(rows)))


#: (slice index, layer name) -> the objects drawn there.
_Drawn = dict[tuple[int, str], list[hd.pr.GraphicObject]]
_Written = dict[tuple[int, str], list[hd.pr.TextObject]]


def _layers(detections: Sequence[Detection], threshold: float | None,
            algorithm: AlgorithmInfo) -> tuple[dict[int, str], list[hd.pr.GraphicLayer]]:
    """The layer name of each detection (by position) and the layers: one per label in its colour, labels in
    value order, and the low-confidence layer last (drawn on top)."""
    names: dict[int, str] = {}
    layers: dict[str, hd.pr.GraphicLayer] = {}
    by_value = sorted(enumerate(detections), key=lambda item: (is_low_confidence(item[1], threshold),
                                                              item[1].label.value))
    for index, detection in by_value:
        low = is_low_confidence(detection, threshold)
        name = LOW_CONFIDENCE_LAYER if low else code_string(detection.label.name)
        if name not in layers:
            what = f"{LOW_CONFIDENCE_TEXT}: under the display threshold" if low else detection.label.name
            layers[name] = hd.pr.GraphicLayer(
                layer_name=name, order=len(layers) + 1,
                description=f"{what} - {algorithm.name} {algorithm.version}"[:64],
                display_color=hd.color.CIELabColor.from_rgb(*(LOW_CONFIDENCE_RGB if low
                                                                else detection.label.color_rgb)))
        names[index] = name
    return names, list(layers.values())


def _annotation_objects(
    volume: Volume, detections: Sequence[Detection], layer_of: dict[int, str], threshold: float | None,
    rows: int, columns: int
) -> tuple[list[hd.pr.GraphicGroup], _Drawn, _Written]:
    """Graphic groups (one per detection) and the graphic/text objects per slice index and layer."""
    groups: list[hd.pr.GraphicGroup] = []
    graphics: _Drawn = defaultdict(list)
    texts: _Written = defaultdict(list)
    for number, detection in enumerate(detections, start=1):
        layer = layer_of[number - 1]
        text = detection_text(detection)
        if is_low_confidence(detection, threshold):
            text += f", {LOW_CONFIDENCE_TEXT}"
        group = hd.pr.GraphicGroup(graphic_group_id=number, label=f"{detection.label.name} {number}"[:64], description=text)
        groups.append(group)
        outlines = outline_slices(volume, detection)
        for outline in outlines:
            graphics[(outline.point.slice_index, layer)].append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=_circle(volume, outline, rows, columns),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    graphic_group=group,
                )
            )
        centre = outlines[0]
        radius_rows = centre.radius_mm / volume.spacing_mm[1]
        column = min(max(centre.point.column, 0.0), float(columns))
        top = min(max(centre.point.row - radius_rows, 0.0), float(rows))
        texts[(centre.point.slice_index, layer)].append(
            hd.pr.TextObject(
                text_value=text,
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=_text_box(text, column, top, min(centre.point.row + radius_rows, float(rows)), rows, columns),
                anchor_point=(column, top),
                anchor_point_visible=False,
                graphic_group=group,
            )
        )
    return groups, graphics, texts


def build_gsps(
    volume: Volume,
    detections: Sequence[Detection],
    algorithm: AlgorithmInfo,
    series: SeriesIdentity,
    *,
    window: VoiWindow | None = LUNG_WINDOW,
    threshold: float | None = None,
    outline_low_confidence: bool = False,
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    """A GSPS outlining ``detections`` on ``volume``'s source images, or None when none is outlined.

    ``threshold``: the model's display threshold; detections under it are outlined only with
    ``outline_low_confidence``, and then in the low-confidence layer (module docstring).

    ``window`` is the VOI window the presentation state applies (default: lung
    window); None keeps the source images' own window. Patient and study
    attributes are copied from the source images by highdicom. Raises
    ValueError when a detection's centre lies outside the volume.
    """
    detections = outlined(detections, threshold, outline_low_confidence)
    if not detections:
        logger.info("detection by %s %s outlines nothing; no GSPS built", algorithm.name, algorithm.version)
        return None
    sources = slice_sources(volume)
    first: Dataset = sources[0][0]
    rows, columns = int(first.Rows), int(first.Columns)
    layer_of, layers = _layers(detections, threshold, algorithm)
    by_name = {str(layer.GraphicLayer): layer for layer in layers}
    groups, graphics, texts = _annotation_objects(volume, detections, layer_of, threshold, rows, columns)
    annotations = []
    for slice_index, name in sorted(set(graphics) | set(texts), key=lambda key: (key[0], by_name[key[1]].GraphicLayerOrder)):
        dataset, frame_number = sources[slice_index]
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[dataset],
                graphic_layer=by_name[name],
                referenced_frame_number=frame_number,
                graphic_objects=graphics.get((slice_index, name)) or None,
                text_objects=texts.get((slice_index, name)) or None,
            )
        )
    referenced = list({str(ds.SOPInstanceUID): ds for ds, _ in sources}.values())
    voi = (
        # Lists, not scalars: highdicom 0.28.2 stores a scalar explanation as one value per character.
        [hd.pr.SoftcopyVOILUTTransformation(
            window_center=[window.centre], window_width=[window.width], window_explanation=[window.explanation]
        )]
        if window is not None
        else None
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=referenced,
        **content_identity(series, algorithm),
        graphic_annotations=annotations,
        graphic_layers=layers,
        graphic_groups=groups,
        voi_lut_transformations=voi,
    )
    copy_body_part(gsps, first)
    if not first.get("BodyPartExamined") and "Laterality" not in gsps:
        # dciodvfy requires Laterality (Type 2C: for a paired body part) in a presentation state whose
        # source names no body part; present and empty means unknown. (A SEG must not have it then.)
        gsps.Laterality = ""
    logger.debug(
        "GSPS %s of series %s: %d detections on %d images",
        gsps.SOPInstanceUID,
        volume.series_instance_uid,
        len(detections),
        len(annotations),
    )
    return gsps
