"""A segmentation's or detector's result burned into colour Secondary Captures of its key slices ("SC").

Why: many PACS viewers show neither SEG nor SR (nor GSPS); every viewer shows a
Secondary Capture. So, for destinations that name ``SC`` in their outputs, the key
slices of the source series are sent again as RGB images with the result drawn on them:

* key slices (:func:`segmentation_key_slices`, :func:`detection_key_slices`): for a
  segmentation, the slice of the largest cross-section of each lesion-like region (nodule,
  tumour, ...; the largest regions first), else of each label; for a detection, the slice
  through the centre of each outlined finding (highest score first); at most
  :data:`MAX_KEY_SLICES`, sent in slice order;
* drawn: segments as outlines in their label's colour, detections as the circle where
  their sphere cuts the slice (as the GSPS draws it) with "nodule 12 mm, 87%", in the
  label's colour (the palette, :mod:`dicom_node.palette`: the same colour as in the SEG and
  the preview); a legend naming each label shown in a band below the slice; "AI overlay -
  not for primary diagnosis" in a band above it, and in the series description (the bands
  add rows, so nothing but the outlines covers the anatomy);
* the slice in the preview's window (lung window for chest CT), at its own matrix and
  pixel spacing, referencing its source image (:mod:`workers.outputs.secondary_capture`).

Low-confidence detections (under the model's display threshold) are not outlined
unless ``outline_low_confidence``; then they are drawn grey and named "low confidence".
Nothing to show: an empty list (no series is sent).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from dicom_node.contracts import AlgorithmInfo, Detection, SegmentLabel
from dicom_node.palette import LOW_CONFIDENCE_RGB
from workers.models.base import SegmentationResult
from workers.outputs.common import SeriesIdentity, contributing_equipment
from workers.outputs.confidence import LOW_CONFIDENCE_TEXT, is_low_confidence, outlined
from workers.outputs.gsps import detection_text, outline_slices
from workers.outputs.preview import display_window, grey_rgb, is_lesion, legend_font, outline_mask
from workers.outputs.secondary_capture import instance_uid, slice_capture
from workers.volume import Volume

__all__ = ["MAX_KEY_SLICES", "OVERLAY_DISCLAIMER", "band_rows", "build_detection_overlay", "build_segmentation_overlay",
           "detection_key_slices", "overlay_description", "segmentation_key_slices"]

logger = logging.getLogger(__name__)

#: Burned into every image and put in front of the series description.
OVERLAY_DISCLAIMER = "AI overlay - not for primary diagnosis"
#: At most this many key slices per series.
MAX_KEY_SLICES = 16
_BAND_RGB = (0, 0, 0)
_TEXT_RGB = (235, 235, 235)
#: Smallest text (px): small matrices (phantoms) keep most of the slice visible; a 512 CT gets 12 px.
_SMALLEST_FONT = 7


@dataclass(frozen=True)
class _Mark:
    """One legend line: a name in a colour."""

    name: str
    rgb: tuple[int, int, int]


def overlay_description(description: str) -> str:
    """The series description with the disclaimer in front (64 characters at most)."""
    return f"{OVERLAY_DISCLAIMER}: {description}"[:64]


def segmentation_key_slices(label_map: npt.NDArray[np.integer], labels: Sequence[SegmentLabel],
                            limit: int = MAX_KEY_SLICES) -> list[int]:
    """Slices of the largest cross-sections: of each lesion-like region if any, else of each label (see module doc)."""
    lesions = [label.value for label in labels if is_lesion(label)]
    lesion_mask = np.isin(label_map, lesions) if lesions else np.zeros(label_map.shape, bool)
    chosen: list[int] = []
    if lesion_mask.any():
        regions, count = ndimage.label(lesion_mask)
        sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        for region in np.argsort(-sizes, kind="stable") + 1:
            area = (regions == region).reshape(label_map.shape[0], -1).sum(axis=1)
            chosen.append(_widest(area))
    else:
        for label in sorted(labels, key=lambda item: item.value):
            area = (label_map == label.value).reshape(label_map.shape[0], -1).sum(axis=1)
            if area.any():
                chosen.append(_widest(area))
    return sorted(_first_unique(chosen, limit))


def _widest(area: npt.NDArray[np.integer]) -> int:
    """The slice of the largest area; of several as large, the middle one (the centre of a sphere, say)."""
    ties = np.flatnonzero(area == area.max())
    return int(ties[len(ties) // 2])


def _first_unique(items: list[int], limit: int) -> list[int]:
    return list(dict.fromkeys(items))[:limit]


def detection_key_slices(volume: Volume, detections: Sequence[Detection], limit: int = MAX_KEY_SLICES) -> list[int]:
    """The slices through the centres of ``detections``, highest score first, at most ``limit``, in slice order."""
    centres = [outline_slices(volume, d)[0].point.slice_index for d in sorted(detections, key=lambda d: -d.score)]
    return sorted(_first_unique(centres, limit))


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)[3]) + 3


def band_rows(width: int, lines: int) -> int:
    """Rows of a text band of ``lines`` lines over a slice ``width`` pixels wide (the disclaimer's: one line)."""
    return max(1, lines) * _line_height(legend_font(width, _SMALLEST_FONT)) + 2


def _text_band(width: int, marks: list[_Mark], font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
               swatches: bool) -> Image.Image:
    """A dark band ``width`` wide with one line per mark (a colour swatch before it when ``swatches``)."""
    height = _line_height(font)
    band = Image.new("RGB", (width, band_rows(width, len(marks))), _BAND_RGB)
    draw = ImageDraw.Draw(band)
    for row, mark in enumerate(marks):
        y = 1 + row * height
        x = 2
        if swatches:
            draw.rectangle((2, y + 2, height - 2, y + height - 3), outline=mark.rgb, width=2)
            x = height + 2
        draw.text((x, y), mark.name, fill=mark.rgb, font=font)
    return band


def _finish(image: Image.Image, legend: list[_Mark]) -> npt.NDArray[np.uint8]:
    """The slice with the disclaimer in a band above it and the legend in a band below: nothing drawn over the
    anatomy but the outlines (a legend on a 512-pixel slice took a sixth of its height)."""
    font = legend_font(image.size[0], _SMALLEST_FONT)
    top = _text_band(image.size[0], [_Mark(OVERLAY_DISCLAIMER, _TEXT_RGB)], font, swatches=False)
    bottom = _text_band(image.size[0], legend, font, swatches=True) if legend else None
    height = top.size[1] + image.size[1] + (bottom.size[1] if bottom is not None else 0)
    canvas = Image.new("RGB", (image.size[0], height), _BAND_RGB)
    canvas.paste(top, (0, 0))
    canvas.paste(image, (0, top.size[1]))
    if bottom is not None:
        canvas.paste(bottom, (0, top.size[1] + image.size[1]))
    return np.asarray(canvas, dtype=np.uint8).copy()


def segmentation_rgb(volume: Volume, k: int, labels_on_slice: npt.NDArray[np.integer],
                     labels: Sequence[SegmentLabel]) -> npt.NDArray[np.uint8]:
    """Slice ``k`` windowed, each label's outline in its colour, legend and disclaimer burned in."""
    rgb = grey_rgb(volume, k, display_window(volume, k))
    legend = []
    for label in sorted(labels, key=lambda item: (is_lesion(item), item.value)):  # lesions last, on top
        mask = labels_on_slice == label.value
        if mask.any():
            edge = outline_mask(mask)
            if max(mask.shape) >= 256:
                edge = ndimage.binary_dilation(edge) & mask
            rgb[edge] = label.color_rgb
            legend.append(_Mark(label.name, label.color_rgb))
    return _finish(Image.fromarray(rgb, "RGB"), sorted(legend, key=lambda mark: mark.name))


def detection_rgb(volume: Volume, k: int, detections: Sequence[Detection],
                  threshold: float | None) -> npt.NDArray[np.uint8]:
    """Slice ``k`` windowed, each detection's circle on it (low-confidence ones grey), legend and disclaimer."""
    image = Image.fromarray(grey_rgb(volume, k, display_window(volume, k)), "RGB")
    draw = ImageDraw.Draw(image)
    font = legend_font(image.size[0], _SMALLEST_FONT)
    width = 2 if max(image.size) >= 256 else 1
    _, spacing_row, spacing_column = volume.spacing_mm
    legend: dict[str, _Mark] = {}
    for detection in detections:
        low = is_low_confidence(detection, threshold)
        colour = LOW_CONFIDENCE_RGB if low else detection.label.color_rgb
        name = f"{detection.label.name} ({LOW_CONFIDENCE_TEXT})" if low else detection.label.name
        for outline in outline_slices(volume, detection):
            if outline.point.slice_index != k:
                continue
            column, row = outline.point.column - 0.5, outline.point.row - 0.5
            rc, rr = max(outline.radius_mm / spacing_column, 1.5), max(outline.radius_mm / spacing_row, 1.5)
            draw.ellipse((column - rc, row - rr, column + rc, row + rr), outline=colour, width=width)
            text = detection_text(detection) + (f", {LOW_CONFIDENCE_TEXT}" if low else "")
            draw.text((column + rc + 2, row - rr), text, fill=colour, font=font)
            legend[name] = _Mark(name, colour)
    return _finish(image, sorted(legend.values(), key=lambda mark: mark.name))


def _series_of_images(volume: Volume, slices: list[int], rgb_of: dict[int, npt.NDArray[np.uint8]],
                      algorithm: AlgorithmInfo, series: SeriesIdentity, what: str) -> list[hd.sc.SCImage]:
    series_uid, base = str(series.series_uid()), str(hd.UID())
    equipment = contributing_equipment(algorithm, series)  # the model that made it, as on every result
    images = [slice_capture(volume, k, rgb_of[k], series, series_uid=series_uid,
                            sop_instance_uid=instance_uid(series, base, number), number=number,
                            description=overlay_description(series.series_description),
                            comments=f"{algorithm.name} {algorithm.version}: {what}; {OVERLAY_DISCLAIMER}",
                            derivation=f"{what} burned into the source slice", equipment=equipment)
              for number, k in enumerate(slices, start=1)]
    logger.debug("%d overlay images of series %s by %s", len(images), volume.series_instance_uid, algorithm.model_id)
    return images


def build_segmentation_overlay(volume: Volume, result: SegmentationResult, algorithm: AlgorithmInfo,
                               series: SeriesIdentity) -> list[hd.sc.SCImage]:
    """The overlay series of a segmentation (module docstring); empty when nothing was segmented."""
    if result.label_map.shape != volume.shape:
        raise ValueError(f"label map shape {result.label_map.shape} differs from series "
                         f"{volume.series_instance_uid}'s {volume.shape}")
    slices = segmentation_key_slices(result.label_map, result.labels)
    rgb_of = {k: segmentation_rgb(volume, k, np.asarray(result.label_map[k]), result.labels) for k in slices}
    return _series_of_images(volume, slices, rgb_of, algorithm, series, "segment outlines")


def build_detection_overlay(volume: Volume, detections: Sequence[Detection], algorithm: AlgorithmInfo,
                            series: SeriesIdentity, *, threshold: float | None = None,
                            outline_low_confidence: bool = False) -> list[hd.sc.SCImage]:
    """The overlay series of a detection result (module docstring); empty when no detection is outlined."""
    shown = outlined(detections, threshold, outline_low_confidence)
    slices = detection_key_slices(volume, shown)
    rgb_of = {k: detection_rgb(volume, k, shown, threshold) for k in slices}
    return _series_of_images(volume, slices, rgb_of, algorithm, series, "detection outlines")
