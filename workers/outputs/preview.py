"""A preview picture of one job's result: one key slice of the source series with the result drawn on it, as PNG.

Why: an operator checking that the node works wants to *see* that the segmentation
lies on the anatomy and the detections on the findings, without opening a PACS
viewer. The worker draws it when it encodes the job's results, from the volume and
the result it holds in memory (no series is read twice, and the web process, which
only serves the file, never decodes images). numpy and Pillow only, no plotting library.

The picture is **not** a DICOM object and is never delivered: it lies beside the
job's result objects in the outbox (``job-<id>/preview.png`` and a small
``preview.json`` with what it shows, :meth:`PreviewPicture.facts`), and only the
result objects recorded in the database are sent.

Which slice: the one through the centre of the largest detection; else the one with
the most voxels of lesion-like segments (nodule, lesion, tumour, mass, ...); else the
one with the most segmented voxels; else, for a classification, the slice where the
explanation map peaks; else the middle slice. The slice keeps its native matrix
(rows x columns, never upscaled) at the top left of the picture; below it (wider
when the slice is narrow) a legend names each label and finding drawn, in its colour,
and says "AI result preview - not for diagnosis".

Windows: CT of the chest in the lung window (level -600, width 1500, the GSPS's),
other CT in the series' own window (else soft tissue 40/400), other modalities in
their own window or the 1st..99th percentile of the slice; MONOCHROME1 is inverted.

Colours: segments in their label's colour, the one the SEG gives as recommended
display colour (a grey one, which would not stand out, gets a distinct colour),
translucent with a solid outline; a segment covering more than half of the slice
(the body, say) only as its outline. Detections are circles as in the GSPS (the
section through the sphere of their diameter), in their label's colour (the one palette,
:mod:`dicom_node.palette`). The picture shows what a destination sees by default: a
detection under the model's display threshold (:mod:`workers.outputs.confidence`) is not
drawn, and the legend lists it, grey, as "low confidence, not outlined". A classification's class and
probability are written on the slice, with the outline of where its explanation
map reaches half its peak.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from dicom_node.contracts import AlgorithmInfo, Detection, SegmentLabel
from dicom_node.palette import LOW_CONFIDENCE_RGB, label_colour
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.outputs.confidence import LOW_CONFIDENCE_TEXT, split_by_confidence
from workers.outputs.gsps import LUNG_WINDOW, detection_text, outline_slices
from workers.outputs.measurements import slice_label_counts
from workers.volume import Volume

__all__ = ["DISCLAIMER", "PREVIEW_FACTS_NAME", "PREVIEW_NAME", "LegendEntry", "PreviewPicture", "display_window",
           "grey_rgb", "legend_font", "outline_mask",
           "is_lesion", "key_slice", "lesion_voxels_per_slice", "render_preview"]

logger = logging.getLogger(__name__)

#: File names of the picture and its facts, in the job's folder of the outbox.
PREVIEW_NAME = "preview.png"
PREVIEW_FACTS_NAME = "preview.json"
#: The line under every preview.
DISCLAIMER = "AI result preview - not for diagnosis"
SOFT_TISSUE_WINDOW = (40.0, 400.0)
_CHEST_BODY_PARTS = frozenset({"CHEST", "LUNG", "THORAX", "CHEST_ABDOMEN", "CHESTABDOMEN"})
_CHEST_WORDS = re.compile(r"chest|lung|thora|thx|pulmo", re.IGNORECASE)
_LESION_WORDS = re.compile(r"nodul|lesion|tumou?r|mass|neoplas|metasta|cancer|carcinom", re.IGNORECASE)
_FILL_ALPHA = 0.4
_OUTLINE_ONLY_FRACTION = 0.5
#: Outline of where a classifier's explanation reaches this fraction of its peak.
_EXPLANATION_LEVEL = 0.5
_EXPLANATION_RGB = (255, 128, 0)
_BAND_RGB = (20, 20, 20)
_TEXT_RGB = (235, 235, 235)
_DISCLAIMER_RGB = (255, 190, 0)
#: At most this many detections are named in the legend (the rest counted).
_MAX_LEGEND_DETECTIONS = 8

Mark = Literal["fill", "outline", "circle", "text"]


@dataclass(frozen=True)
class LegendEntry:
    """One line of the legend: what was drawn, in which colour, and how (filled area, outline, circle, text)."""

    name: str
    rgb: tuple[int, int, int]
    mark: Mark


@dataclass(frozen=True)
class PreviewPicture:
    """A rendered preview and what it shows; the slice lies at the top left of the PNG, ``rows`` x ``columns``."""

    png: bytes
    model_id: str
    kind: str  # segmentation | detection | classification
    series_instance_uid: str
    slice_index: int  # 0 = first slice of the volume (lowest position along its normal)
    slice_count: int
    rows: int
    columns: int
    overlay: bool  # whether any result is drawn on the slice
    legend: tuple[LegendEntry, ...]
    window: tuple[float, float]  # (level, width)

    def facts(self) -> dict[str, Any]:
        """What ``preview.json`` holds: enough for the web to describe the picture without opening it."""
        return {
            "format": 1, "model_id": self.model_id, "kind": self.kind,
            "series_instance_uid": self.series_instance_uid, "slice_index": self.slice_index,
            "slice_count": self.slice_count, "rows": self.rows, "columns": self.columns, "overlay": self.overlay,
            "legend": [{"name": e.name, "rgb": list(e.rgb), "mark": e.mark} for e in self.legend],
            "window": list(self.window),
        }

    def files(self) -> dict[str, tuple[str, bytes]]:
        """``{"png": (file name, bytes), "facts": (...)}``: what to write in the job's outbox folder."""
        return {"png": (PREVIEW_NAME, self.png),
                "facts": (PREVIEW_FACTS_NAME, json.dumps(self.facts(), indent=1).encode())}


def render_preview(volume: Volume, result: Any, algorithm: AlgorithmInfo, *,
                   threshold: float | None = None) -> PreviewPicture:
    """The preview of ``result`` (a segmentation, detection or classification of ``volume``); see the module doc.
    ``threshold``: a detection model's display threshold (detections under it are listed, not drawn)."""
    if isinstance(result, SegmentationResult):
        kind = "segmentation"
        if np.shape(result.label_map) != volume.shape:
            raise ValueError(f"series {volume.series_instance_uid}: label map shape {np.shape(result.label_map)} "
                             f"differs from volume shape {volume.shape}")
    elif isinstance(result, DetectionResult):
        kind = "detection"
        shown, low = split_by_confidence(result.detections, threshold)
        if shown:  # the key slice is the largest outlined finding's
            result = DetectionResult(shown)
    elif isinstance(result, ClassificationResult):
        kind = "classification"
    else:
        raise TypeError(f"model {algorithm.model_id} returned {type(result).__name__}, not a known result type")
    k = key_slice(volume, result)
    window = display_window(volume, k)
    image = Image.fromarray(grey_rgb(volume, k, window), "RGB")
    legend: list[LegendEntry] = []
    if isinstance(result, SegmentationResult):
        legend += _draw_segments(image, np.asarray(result.label_map[k]), result.labels)
        if not legend:
            legend.append(LegendEntry("no segment on this slice" if result.label_map.any() else "nothing segmented",
                                      _TEXT_RGB, "text"))
    elif isinstance(result, DetectionResult):
        legend += _draw_detections(image, volume, k, shown)
        legend += [LegendEntry(f"{detection_text(d)} ({LOW_CONFIDENCE_TEXT}, not outlined)", LOW_CONFIDENCE_RGB,
                               "text") for d in low[:_MAX_LEGEND_DETECTIONS]]
        if not shown and not low:
            legend.append(LegendEntry("no findings", _TEXT_RGB, "text"))
    else:
        legend += _draw_classification(image, result, k)
    overlay = any(entry.mark != "text" for entry in legend) or isinstance(result, ClassificationResult)
    header = f"{algorithm.name} {algorithm.version} - slice {k + 1} of {volume.shape[0]}"
    picture = _with_legend(image, header, legend)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    logger.debug("preview of series %s by %s: slice %d of %d, %d legend entries", volume.series_instance_uid,
                 algorithm.model_id, k + 1, volume.shape[0], len(legend))
    return PreviewPicture(png=buffer.getvalue(), model_id=algorithm.model_id, kind=kind,
                          series_instance_uid=volume.series_instance_uid, slice_index=k, slice_count=volume.shape[0],
                          rows=volume.shape[1], columns=volume.shape[2], overlay=overlay, legend=tuple(legend),
                          window=window)


# --------------------------------------------------------------------------- which slice, which window


def key_slice(volume: Volume, result: Any) -> int:
    """The slice to show: largest detection's centre, most lesion, most segmented, explanation peak, else middle."""
    middle = volume.shape[0] // 2
    if isinstance(result, DetectionResult):
        for detection in sorted(result.detections, key=lambda d: -d.diameter_mm):
            k = int(math.floor(float(volume.world_to_index(detection.centre_mm)[0]) + 0.5))
            if 0 <= k < volume.shape[0]:
                return k
        return middle
    if isinstance(result, SegmentationResult):
        counts = slice_label_counts(result.label_map)  # voxels per slice and label, one walk of the map
        lesions = [label.value for label in result.labels if is_lesion(label)]
        for per_slice in (_columns_sum(counts, lesions), counts[:, 1:].sum(axis=1)):
            if per_slice.max(initial=0) > 0:
                return int(np.argmax(per_slice))
        return middle
    if isinstance(result, ClassificationResult) and result.explanation is not None:
        explanation = result.explanation
        if explanation.shape == volume.shape and explanation.size and explanation.max() > 0:
            return int(np.argmax(explanation.reshape(explanation.shape[0], -1).max(axis=1)))
    return middle


def _columns_sum(counts: npt.NDArray[np.int64], values: Sequence[int]) -> npt.NDArray[np.int64]:
    """Per slice, the voxels of ``counts`` (:func:`slice_label_counts`) holding one of ``values``."""
    inside = [v for v in values if v < counts.shape[1]]
    return counts[:, inside].sum(axis=1) if inside else np.zeros(counts.shape[0], dtype=np.int64)


def lesion_voxels_per_slice(label_map: npt.NDArray[np.integer], lesions: Sequence[int]) -> npt.NDArray[np.int64]:
    """Per slice (axis 0) of ``label_map``, its voxels holding one of the label values ``lesions`` (zeros if none)."""
    if not lesions:
        return np.zeros(np.shape(label_map)[0], dtype=np.int64)
    return _columns_sum(slice_label_counts(label_map), lesions)


def is_lesion(label: SegmentLabel) -> bool:
    """Whether a label names a lesion-like structure (its name or coded type: nodule, tumour, mass, ...)."""
    return bool(_LESION_WORDS.search(f"{label.name} {label.property_type.meaning}"))


def display_window(volume: Volume, k: int) -> tuple[float, float]:
    """(level, width): lung window for chest CT, else the series' own window, else a default (module doc)."""
    header = volume.datasets[0] if volume.datasets else None
    modality = volume.modality.upper()

    def text(keyword: str) -> str:
        return str(header.get(keyword, "") or "") if header is not None else ""

    if modality == "CT":
        words = " ".join(text(k) for k in ("SeriesDescription", "StudyDescription", "ProtocolName"))
        if text("BodyPartExamined").upper() in _CHEST_BODY_PARTS or _CHEST_WORDS.search(words):
            return LUNG_WINDOW.centre, LUNG_WINDOW.width
    if header is not None:
        try:
            centre, width = header.get("WindowCenter"), header.get("WindowWidth")
            if centre is not None and width is not None:
                c = float(centre[0] if _is_multi(centre) else centre)
                w = float(width[0] if _is_multi(width) else width)
                if w > 0 and math.isfinite(c) and math.isfinite(w):
                    return c, w
        except (TypeError, ValueError, IndexError):
            pass
    if modality == "CT":
        return SOFT_TISSUE_WINDOW
    low, high = np.percentile(volume.array[k], [1.0, 99.0])
    return float(low + high) / 2, max(float(high - low), 1.0)


def _is_multi(value: Any) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def grey_rgb(volume: Volume, k: int, window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    """Slice ``k`` windowed to grey (MONOCHROME1 inverted), as RGB to draw on."""
    level, width = window
    grey = np.clip((volume.array[k] - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    if volume.datasets and str(volume.datasets[0].get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- drawing


def label_rgb(label: SegmentLabel) -> tuple[int, int, int]:
    """The label's colour (the SEG's recommended display colour); a grey one gets its palette colour."""
    return label_colour(label.value, label.color_rgb)


def _draw_segments(image: Image.Image, labels_on_slice: npt.NDArray[Any],
                   labels: tuple[SegmentLabel, ...]) -> list[LegendEntry]:
    """Blend the slice's segments into ``image`` (lesions last, on top); the legend of what was drawn."""
    present = [label for label in sorted(labels, key=lambda item: (is_lesion(item), item.value))
               if np.any(labels_on_slice == label.value)]
    if not present:
        return []
    out = np.asarray(image, dtype=np.float32).copy()
    legend = []
    for label in present:
        mask = labels_on_slice == label.value
        colour = np.asarray(label_rgb(label), dtype=np.float32)
        filled = mask.mean() <= _OUTLINE_ONLY_FRACTION
        if filled:
            out[mask] = out[mask] * (1 - _FILL_ALPHA) + colour * _FILL_ALPHA
        out[outline_mask(mask)] = colour
        legend.append(LegendEntry(label.name, label_rgb(label), "fill" if filled else "outline"))
    image.paste(Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB"))
    return sorted(legend, key=lambda entry: entry.name)


def outline_mask(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The pixels of ``mask`` with a 4-neighbour outside it: its one-pixel outline."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _draw_detections(image: Image.Image, volume: Volume, k: int,
                     detections: tuple[Detection, ...]) -> list[LegendEntry]:
    """Circles where each detection's sphere cuts slice ``k`` (as the GSPS draws them); the legend entries."""
    draw = ImageDraw.Draw(image)
    large = max(image.size) >= 256
    width = 2 if large else 1
    _, spacing_row, spacing_column = volume.spacing_mm
    drawn: list[Detection] = []
    for detection in detections:
        try:
            outlines = outline_slices(volume, detection)
        except ValueError as exc:  # centre outside the volume: nothing to draw on it
            logger.warning("preview: detection not drawn: %s", exc)
            continue
        for outline in outlines:
            if outline.point.slice_index != k:
                continue
            column, row = outline.point.column - 0.5, outline.point.row - 0.5  # pixel-centre coordinates
            rc = max(outline.radius_mm / spacing_column, 1.5)
            rr = max(outline.radius_mm / spacing_row, 1.5)
            colour = label_rgb(detection.label)
            draw.ellipse((column - rc, row - rr, column + rc, row + rr), outline=colour, width=width)
            if large:
                draw.text((column + rc + 3, row - rr), detection_text(detection), fill=colour,
                          font=legend_font(image.size[0]))
            drawn.append(detection)
    legend = [LegendEntry(detection_text(d), label_rgb(d.label), "circle") for d in drawn[:_MAX_LEGEND_DETECTIONS]]
    if len(drawn) > _MAX_LEGEND_DETECTIONS:
        legend.append(LegendEntry(f"and {len(drawn) - _MAX_LEGEND_DETECTIONS} more finding(s) on this slice",
                                  _TEXT_RGB, "text"))
    others = len(detections) - len(drawn)
    if others:
        legend.append(LegendEntry(f"{others} finding(s) on other slices", _TEXT_RGB, "text"))
    return legend


def _draw_classification(image: Image.Image, result: ClassificationResult, k: int) -> list[LegendEntry]:
    """The class and its probability written on the slice; the outline of where the explanation peaks."""
    legend = []
    explanation = result.explanation
    if explanation is not None and explanation.ndim == 3 and explanation.shape[1:] == (image.size[1], image.size[0]):
        peak = float(explanation.max(initial=0.0))
        mask = explanation[k] >= _EXPLANATION_LEVEL * peak if peak > 0 else np.zeros(explanation.shape[1:], bool)
        if mask.any():
            rgb = np.asarray(image).copy()
            rgb[outline_mask(mask)] = _EXPLANATION_RGB
            image.paste(Image.fromarray(rgb, "RGB"))
            method = result.explanation_method or "explanation"
            legend.append(LegendEntry(f"where it looked ({method}, >= {_EXPLANATION_LEVEL:.0%} of its peak)",
                                      _EXPLANATION_RGB, "outline"))
    text = f"{result.winner.name}: {result.winner_probability:.0%}"
    draw = ImageDraw.Draw(image)
    font = legend_font(image.size[0])
    left, top, right, bottom = draw.textbbox((3, 3), text, font=font)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=_BAND_RGB)
    draw.text((3, 3), text, fill=label_rgb(result.winner), font=font)
    legend.insert(0, LegendEntry(text, label_rgb(result.winner), "text"))
    return legend


def legend_font(width: int, smallest: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font (no font file needed), ``smallest`` px or more on large images (width / 42)."""
    size = max(smallest, round(width / 42))
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def _with_legend(image: Image.Image, header: str, legend: list[LegendEntry]) -> Image.Image:
    """``image`` at the top left, a dark band below with the header, one line per legend entry and the disclaimer."""
    font = legend_font(image.size[0])
    probe = ImageDraw.Draw(image)
    line = int(math.ceil(max(probe.textbbox((0, 0), "Ag", font=font)[3], 10) * 1.4))
    swatch = line - 6
    lines = [(header, _TEXT_RGB, None), *((e.name, e.rgb, e) for e in legend), (DISCLAIMER, _DISCLAIMER_RGB, None)]
    text_widths = [probe.textlength(text, font=font) + (swatch + 6 if entry and entry.mark != "text" else 0)
                   for text, _, entry in lines]
    width = max(image.size[0], int(math.ceil(max(text_widths))) + 12)
    height = image.size[1] + 6 + line * len(lines) + 4
    canvas = Image.new("RGB", (width, height), _BAND_RGB)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.size[1] + 6
    for text, colour, entry in lines:
        x = 6
        if entry is not None and entry.mark != "text":
            box = (x, y + 2, x + swatch, y + 2 + swatch)
            if entry.mark == "fill":
                draw.rectangle(box, fill=tuple(int(v * _FILL_ALPHA + 128 * (1 - _FILL_ALPHA)) for v in entry.rgb),
                               outline=entry.rgb)
            elif entry.mark == "outline":
                draw.rectangle(box, outline=entry.rgb, width=2)
            else:
                draw.ellipse(box, outline=entry.rgb, width=2)
            x += swatch + 6
        draw.text((x, y), text, fill=colour, font=font)
        y += line
    return canvas
