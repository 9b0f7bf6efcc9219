"""A preview picture of a study: one key slice of its source series with our results drawn on it, as PNG.

Why: an operator checking that the node works wants to *see* that the
segmentation lies on the anatomy and the detections on the findings, without
opening a PACS viewer. The picture is drawn here, on the server, with numpy and
Pillow (no plotting library), from the same files the workers used: the source
series' geometry read from its headers by :mod:`dicom_node.web.slice_stack` (which
also says which instance and frame each slice is, and decodes only the key slice's
pixels) and the SEG objects in the outbox, mapped onto the slices frame by frame
through their source-image references (falling back to their plane positions).
Only pydicom, highdicom, numpy and Pillow are used: the web process never imports
the workers, nor reads a whole series into memory.

Which slice: the one through the centre of the largest detection; else the one
with the most voxels of lesion-like segments (nodule, lesion, tumour, mass);
else the one with the most segmented voxels; else the middle slice. The image
keeps the native matrix (rows x columns, never upscaled). CT of the chest gets a
lung window (level -600, width 1500), other CT the series' own window (else soft
tissue 40/400), other modalities their own window or the 1st..99th percentile.

Segments are coloured with the SEG's recommended display colour (CIELab), drawn
translucent with a solid outline; a segment covering more than half of the
slice (the body, say) only as its outline. Detections are yellow circles, the
section through the sphere of their diameter.

PNGs are cached under ``data_dir/previews/`` keyed by the study, the series and
its instance count, the result objects and the detections, so a new result gives
a new picture; older pictures of the study are removed when a new one is written.
One preview is rendered at a time per process, so that requests arriving together
for a study render it once (the later ones find the cached picture): a render
reads every header of the series and every frame of its SEGs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels, pixel_array
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import study_views
from dicom_node.db.models import JobState
from dicom_node.settings import Settings
from dicom_node.study_store import FileStudyStore, SeriesNotFound
from dicom_node.web.slice_stack import SliceStack, SliceStackError, read_slice_stack

__all__ = ["LUNG_WINDOW", "Preview", "PreviewError", "study_preview"]

logger = logging.getLogger(__name__)

#: (level, width) in HU for CT of the chest.
LUNG_WINDOW = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)
_CHEST_BODY_PARTS = frozenset({"CHEST", "LUNG", "THORAX", "CHEST_ABDOMEN", "CHESTABDOMEN"})
_CHEST_WORDS = re.compile(r"chest|lung|thora|thx|pulmo", re.IGNORECASE)
_LESION_WORDS = re.compile(r"nodul|lesion|tumou?r|mass|neoplas|metasta|cancer|carcinom", re.IGNORECASE)
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_FILL_ALPHA = 0.4
_OUTLINE_ONLY_FRACTION = 0.5
_DETECTION_RGB = (255, 214, 0)
#: Colours for segments whose SEG gives none (distinct, none of them grey).
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60))
#: One render at a time in this process (a study asked for twice at once is rendered once).
_RENDER_LOCK = threading.Lock()


class PreviewError(Exception):
    """No preview can be made: ``status`` is the HTTP status to answer (404, 422), ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Preview:
    """A rendered (or cached) preview and what it shows."""

    png: bytes
    series_instance_uid: str
    slice_index: int  # along the series' normal, 0 = lowest position
    slice_count: int
    overlay: bool  # whether any result (segment or detection) is drawn
    cached: bool


@dataclass
class _Segment:
    """One segment of a SEG: how to draw it and which SEG frames (by slice) hold it."""

    number: int
    label: str
    rgb: tuple[int, int, int]
    lesion: bool
    voxels_by_slice: npt.NDArray[np.int64]  # segmented pixels on each slice of the series
    frames_by_slice: dict[int, list[int]] = field(default_factory=dict)  # SEG frame indices (0-based)


@dataclass
class _SegFile:
    path: Path
    labelmap: bool
    threshold: int
    segments: dict[int, _Segment]


@dataclass(frozen=True)
class _Plan:
    """What a preview of a study shows; its ``key`` names the cached picture."""

    study_instance_uid: str
    series: study_views.SeriesRow
    seg_results: list[study_views.ResultRow]
    detections: list[dict[str, Any]]

    @property
    def key(self) -> str:
        material = json.dumps([
            self.study_instance_uid, self.series.series_instance_uid, self.series.instance_count,
            self.series.last_received_at.isoformat(), [r.id for r in self.seg_results], self.detections,
        ], sort_keys=True, default=str)
        return hashlib.sha256(material.encode()).hexdigest()[:24]


def study_preview(settings: Settings, sessions: sessionmaker[Session], study_instance_uid: str) -> Preview:
    """The preview PNG of a study (from the cache when nothing changed); raises :class:`PreviewError`."""
    detail = study_views.study_detail(sessions, study_instance_uid)
    if detail is None:
        raise PreviewError(404, f"study {study_instance_uid} is not known")
    plan = _plan(detail)
    directory = settings.data_dir / "previews"
    prefix = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]
    target = directory / f"{prefix}-{plan.key}.png"
    meta_path = target.with_suffix(".json")
    cached = _read_cached(target, meta_path, plan)
    if cached is not None:
        return cached
    with _RENDER_LOCK:
        cached = _read_cached(target, meta_path, plan)
        if cached is not None:
            return cached
        preview = _render(settings, sessions, plan)
        _store(directory, prefix, target, meta_path, preview)
    return preview


# --------------------------------------------------------------------------- what to show


#: Jobs whose results are drawn: those sent (held results are not shown until an operator releases them).
_SENT = (JobState.SUCCEEDED.value, JobState.RELEASED.value)


def _plan(detail: study_views.StudyDetail) -> _Plan:
    """Pick the series (the one our newest successful job ran on, else any job's, else the largest image
    series) and the results on it to draw."""
    images = {s.series_instance_uid: s for s in detail.series if s.is_image and s.instance_count > 0}
    if not images:
        kinds = ", ".join(sorted({s.modality or "?" for s in detail.series})) or "none"
        raise PreviewError(404, f"study {detail.study_instance_uid} has no image series to preview "
                                f"(series modalities: {kinds})")
    succeeded = [j for j in reversed(detail.jobs) if j.state in _SENT and j.series_instance_uid in images]
    others = [j for j in reversed(detail.jobs) if j.series_instance_uid in images]
    if succeeded:
        series = images[succeeded[0].series_instance_uid]
    elif others:
        series = images[others[0].series_instance_uid]
    else:
        series = max(images.values(), key=lambda s: (s.instance_count, s.last_received_at))
    on_series = [j for j in detail.jobs if j.state in _SENT and j.series_instance_uid == series.series_instance_uid]
    segs = [r for j in on_series for r in j.results if r.kind == "SEG"]
    detections = [d for j in on_series for d in (j.summary.get("detections") or []) if _valid_detection(d)]
    return _Plan(detail.study_instance_uid, series, segs, detections)


def _valid_detection(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    centre, diameter = item.get("centre_mm"), item.get("diameter_mm")
    return (isinstance(centre, list) and len(centre) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in centre)
            and isinstance(diameter, (int, float)) and math.isfinite(diameter) and diameter > 0)


# --------------------------------------------------------------------------- cache


def _read_cached(target: Path, meta_path: Path, plan: _Plan) -> Preview | None:
    try:
        png = target.read_bytes()
        meta = json.loads(meta_path.read_text())
        return Preview(png=png, series_instance_uid=plan.series.series_instance_uid,
                       slice_index=int(meta["slice_index"]), slice_count=int(meta["slice_count"]),
                       overlay=bool(meta["overlay"]), cached=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("preview cache %s unreadable (%s); rendering again", target, exc)
        return None


def _store(directory: Path, prefix: str, target: Path, meta_path: Path, preview: Preview) -> None:
    """Write the PNG and its facts atomically; drop older previews of the same study."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob(f"{prefix}-*"):
            if old.name not in (target.name, meta_path.name):
                old.unlink(missing_ok=True)
        meta = json.dumps({"slice_index": preview.slice_index, "slice_count": preview.slice_count,
                           "overlay": preview.overlay}).encode()
        for path, data in ((target, preview.png), (meta_path, meta)):
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
            temporary.write_bytes(data)
            os.replace(temporary, path)
    except OSError as exc:  # a full or read-only disk must not break the page: the picture is still answered
        logger.warning("cannot cache the preview %s: %s", target, exc)


# --------------------------------------------------------------------------- rendering


def _render(settings: Settings, sessions: sessionmaker[Session], plan: _Plan) -> Preview:
    series_uid = plan.series.series_instance_uid
    try:
        paths = FileStudyStore(sessions, settings.spool_dir).series_files(
            series_uid, study_instance_uid=plan.study_instance_uid)
    except SeriesNotFound as exc:
        raise PreviewError(404, str(exc)) from exc
    try:
        stack = read_slice_stack(series_uid, paths)
        segs = [_read_seg(_outbox_file(settings.outbox_dir, r), r, stack) for r in plan.seg_results]
        key_slice = _key_slice(stack, segs, plan.detections)
        rgb = _grey_rgb(stack, key_slice)
    except SliceStackError as exc:
        logger.warning("no preview of series %s: %s", series_uid, exc)
        raise PreviewError(422, f"series {series_uid} cannot be shown: {exc}") from exc
    drawn = _draw_segments(rgb, segs, key_slice)
    image = Image.fromarray(rgb, "RGB")
    drawn = _draw_detections(image, stack, key_slice, plan.detections) or drawn
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    logger.info("rendered the preview of series %s: slice %d of %d, %d SEG(s), %d detection(s)",
                series_uid, key_slice + 1, len(stack), len(segs), len(plan.detections))
    return Preview(png=buffer.getvalue(), series_instance_uid=series_uid, slice_index=key_slice,
                   slice_count=len(stack), overlay=drawn, cached=False)


def _outbox_file(outbox: Path, result: study_views.ResultRow) -> Path:
    path = (outbox / result.path).resolve()
    if not path.is_relative_to(outbox.resolve()):
        logger.warning("result object %s has a path outside the outbox: %r", result.sop_instance_uid, result.path)
        raise PreviewError(422, f"result {result.kind} {result.sop_instance_uid} has an invalid outbox path")
    return path


def _read_seg(path: Path, result: study_views.ResultRow, stack: SliceStack) -> _SegFile:
    """The segments of one SEG file, mapped onto the series' slices, with voxel counts per slice.

    Reads the header once and the frames one at a time (a SEG of a 300-slice CT with
    several segments holds thousands of frames); only the counts are kept.
    """
    what = f"SEG {result.sop_instance_uid} (job {result.job_id})"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError as exc:
        logger.warning("%s: file %s is missing from the outbox", what, path)
        raise PreviewError(422, f"{what}: its file is missing from the outbox") from exc
    except Exception as exc:  # pydicom raises many types for damaged files
        logger.warning("%s: cannot read %s: %s: %s", what, path, type(exc).__name__, exc)
        raise PreviewError(422, f"{what} cannot be read: {type(exc).__name__}") from exc
    try:
        seg = _seg_layout(ds, stack, path)
        frame_slices = {f: k for segment in seg.segments.values() for k, fs in segment.frames_by_slice.items()
                        for f in fs}
        frame_segment = {f: segment for segment in seg.segments.values()
                         for fs in segment.frames_by_slice.values() for f in fs}
        for index, frame in enumerate(iter_pixels(path)):
            k = frame_slices.get(index)
            if k is None:
                continue
            if seg.labelmap:
                counts = np.bincount(frame.ravel().astype(np.int64), minlength=256)
                for number, segment in seg.segments.items():
                    if number < counts.size:
                        segment.voxels_by_slice[k] += int(counts[number])
            else:
                frame_segment[index].voxels_by_slice[k] += int(np.count_nonzero(frame >= seg.threshold))
    except PreviewError:
        raise
    except Exception as exc:  # a SEG we cannot interpret must give a clear answer, not a 500
        logger.warning("%s in %s cannot be used: %s: %s", what, path, type(exc).__name__, exc)
        raise PreviewError(422, f"{what} cannot be used: {type(exc).__name__}: {exc}") from exc
    return seg


def _seg_layout(ds: Dataset, stack: SliceStack, path: Path) -> _SegFile:
    """Segments and which frame lies on which slice of ``stack`` (by source reference, else position)."""
    if str(ds.get("SOPClassUID", "")) != _SEG_SOP_CLASS:
        raise ValueError(f"SOP class {ds.get('SOPClassUID')} is not Segmentation Storage")
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    labelmap = seg_type == "LABELMAP"
    threshold = 1
    if seg_type == "FRACTIONAL":
        threshold = max(1, int(ds.get("MaximumFractionalValue", 255)) // 2)
    segments: dict[int, _Segment] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        label = str(item.get("SegmentLabel", "") or f"segment {number}")
        meaning = ""
        if item.get("SegmentedPropertyTypeCodeSequence"):
            meaning = str(item.SegmentedPropertyTypeCodeSequence[0].get("CodeMeaning", ""))
        segments[number] = _Segment(number=number, label=label, rgb=_segment_rgb(item, number),
                                    lesion=bool(_LESION_WORDS.search(f"{label} {meaning}")),
                                    voxels_by_slice=np.zeros(len(stack), dtype=np.int64))
    if not segments:
        raise ValueError("no SegmentSequence")
    by_ref = {(f.sop_instance_uid, f.frame_number): k for k, f in enumerate(stack.slices)}
    by_sop: dict[str, int | None] = {}
    for k, f in enumerate(stack.slices):
        by_sop[f.sop_instance_uid] = k if f.sop_instance_uid not in by_sop else None  # None: several frames
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != int(ds.get("NumberOfFrames", 1)):
        raise ValueError(f"{len(per_frame)} per-frame groups for {ds.get('NumberOfFrames', 1)} frames")
    for index, groups in enumerate(per_frame):
        k = _frame_slice(groups, by_ref, by_sop, stack)
        if k is None:
            continue
        if labelmap:
            numbers = list(segments)
        else:
            ident = groups.get("SegmentIdentificationSequence") or (shared.get("SegmentIdentificationSequence")
                                                                    if shared is not None else None)
            if not ident:
                raise ValueError(f"frame {index + 1} has no SegmentIdentificationSequence")
            numbers = [int(ident[0].ReferencedSegmentNumber)]
        for number in numbers:
            if number in segments:
                segments[number].frames_by_slice.setdefault(k, []).append(index)
    return _SegFile(path=path, labelmap=labelmap, threshold=threshold, segments=segments)


def _frame_slice(groups: Dataset, by_ref: dict[tuple[str, int | None], int], by_sop: dict[str, int | None],
                 stack: SliceStack) -> int | None:
    """The slice a SEG frame lies on: its source image reference, else its plane position."""
    for derivation in groups.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            sop = str(source.get("ReferencedSOPInstanceUID", ""))
            frame = source.get("ReferencedFrameNumber")
            if isinstance(frame, (list, MultiValue)):
                frame = frame[0] if len(frame) else None
            frame_number = int(frame) if frame is not None else None
            if (sop, frame_number) in by_ref:
                return by_ref[(sop, frame_number)]
            if frame_number is None and by_sop.get(sop) is not None:
                return by_sop[sop]
    positions = groups.get("PlanePositionSequence")
    if positions and "ImagePositionPatient" in positions[0]:
        index = stack.world_to_index([float(v) for v in positions[0].ImagePositionPatient])
        k = int(round(float(index[0])))
        if 0 <= k < len(stack) and abs(index[0] - k) < 0.1 and abs(index[1]) < 0.1 and abs(index[2]) < 0.1:
            return k
    return None


def _segment_rgb(item: Dataset, number: int) -> tuple[int, int, int]:
    value = item.get("RecommendedDisplayCIELabValue")
    if value is not None and len(value) == 3:
        try:
            import highdicom as hd

            r, g, b = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in value)).to_rgb()
            if not r == g == b:  # a grey would not stand out on a grey image
                return int(r), int(g), int(b)
        except (ValueError, TypeError):
            logger.debug("segment %d: unusable RecommendedDisplayCIELabValue %r", number, value)
    return _PALETTE[(number - 1) % len(_PALETTE)]


def _key_slice(stack: SliceStack, segs: list[_SegFile], detections: list[dict[str, Any]]) -> int:
    n = len(stack)
    if detections:
        largest = max(detections, key=lambda d: float(d["diameter_mm"]))
        k = int(round(float(stack.world_to_index(largest["centre_mm"])[0])))
        if 0 <= k < n:
            return k
    segments = [s for seg in segs for s in seg.segments.values()]
    for chosen in ([s for s in segments if s.lesion], segments):
        if chosen:
            total = np.sum([s.voxels_by_slice for s in chosen], axis=0)
            if total.max() > 0:
                return int(np.argmax(total))
    return n // 2


def _window(stack: SliceStack, slice_values: npt.NDArray[np.float32]) -> tuple[float, float]:
    """(level, width): lung window for chest CT, else the series' own window, else a default."""
    header = stack.slices[0].header
    modality = stack.modality.upper()
    if modality == "CT":
        text = " ".join(str(header.get(k, "")) for k in ("SeriesDescription", "StudyDescription", "ProtocolName"))
        if str(header.get("BodyPartExamined", "")).upper() in _CHEST_BODY_PARTS or _CHEST_WORDS.search(text):
            return LUNG_WINDOW
    centre, width = header.get("WindowCenter"), header.get("WindowWidth")
    try:
        if centre is not None and width is not None:
            c = float(centre[0] if isinstance(centre, MultiValue) else centre)
            w = float(width[0] if isinstance(width, MultiValue) else width)
            if w > 0 and math.isfinite(c) and math.isfinite(w):
                return c, w
    except (TypeError, ValueError):
        pass
    if modality == "CT":
        return SOFT_TISSUE_WINDOW
    low, high = np.percentile(slice_values, [1.0, 99.0])
    return float(low + high) / 2, max(float(high - low), 1.0)


def _grey_rgb(stack: SliceStack, k: int) -> npt.NDArray[np.uint8]:
    """Slice ``k`` windowed to grey (MONOCHROME1 inverted), as RGB to draw on."""
    values = stack.pixels(k)
    level, width = _window(stack, values)
    grey = np.clip((values - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    if str(stack.slices[k].header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


def _draw_segments(rgb: npt.NDArray[np.uint8], segs: list[_SegFile], k: int) -> bool:
    """Blend the key slice's segments into ``rgb`` (lesions last, on top); True if anything was drawn."""
    rows, columns = rgb.shape[:2]
    masks: list[tuple[_Segment, npt.NDArray[np.bool_]]] = []
    for seg in segs:
        for segment in seg.segments.values():
            frames = segment.frames_by_slice.get(k, [])
            if not frames or segment.voxels_by_slice[k] == 0:
                continue
            mask = np.zeros((rows, columns), dtype=bool)
            for index in frames:
                frame = pixel_array(seg.path, index=index)
                if frame.shape != (rows, columns):
                    raise PreviewError(422, f"SEG frame {index + 1} is {frame.shape}, the image {(rows, columns)}")
                mask |= (frame == segment.number) if seg.labelmap else (frame >= seg.threshold)
            masks.append((segment, mask))
    masks.sort(key=lambda item: item[0].lesion)
    out = rgb.astype(np.float32)
    for segment, mask in masks:
        colour = np.asarray(segment.rgb, dtype=np.float32)
        if mask.mean() <= _OUTLINE_ONLY_FRACTION:
            out[mask] = out[mask] * (1 - _FILL_ALPHA) + colour * _FILL_ALPHA
        out[_outline(mask)] = colour
    rgb[...] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return bool(masks)


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _draw_detections(image: Image.Image, stack: SliceStack, k: int, detections: list[dict[str, Any]]) -> bool:
    """Circles where each detection's sphere cuts the key slice; True if any was drawn."""
    draw = ImageDraw.Draw(image)
    spacing_slice, spacing_row, spacing_col = stack.spacing_mm
    width = 2 if max(image.size) >= 256 else 1
    drawn = False
    for item in detections:
        s, r, c = (float(v) for v in stack.world_to_index(item["centre_mm"]))
        radius = float(item["diameter_mm"]) / 2
        distance = abs(s - k) * spacing_slice
        if distance > radius:
            continue
        section = max(math.sqrt(radius * radius - distance * distance), 1.5 * min(spacing_row, spacing_col))
        rr, rc = section / spacing_row, section / spacing_col
        draw.ellipse((c - rc, r - rr, c + rc, r + rr), outline=_DETECTION_RGB, width=width)
        if max(image.size) >= 256:
            draw.text((c + rc + 3, r - rr), f"{float(item['diameter_mm']):.0f} mm", fill=_DETECTION_RGB)
        drawn = True
    return drawn
