"""One series' frames read from their headers, and the checks that they form one regular stack.

Why a module of its own: before a single pixel is decoded, :func:`workers.volume.load_series`
must know where every frame lies, how it is rescaled and whether the frames make one
trustworthy volume (one series, monochrome, one orientation and pixel spacing, positions on
a regular grid along the normal). Those checks are most of the loader and all of its error
messages; here they are apart from the decoding and from :class:`workers.volume.Volume`.

Single-frame and enhanced multi-frame instances are read alike (:func:`collect_frames`:
per-frame functional groups, then shared, then top level). Every error is a
:class:`VolumeError` naming the series, the instance (and frame) and the cause.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = [
    "DUPLICATE_TOLERANCE_MM",
    "GRID_TOLERANCE_FRACTION",
    "MIN_TOLERANCE_MM",
    "ORIENTATION_TOLERANCE",
    "PIXEL_SPACING_TOLERANCE",
    "FrameRef",
    "Frames",
    "Stack",
    "VolumeError",
    "check_identity",
    "check_pixel_format",
    "check_plane",
    "collect_frames",
    "describe_frame",
    "sop_of",
    "stack_frames",
]


class VolumeError(ValueError):
    """A series that cannot be turned into a trustworthy volume; the message names series and cause."""


@dataclass(frozen=True)
class FrameRef:
    """The source of one slice: an instance, and its frame number for multi-frame instances (else None)."""

    sop_instance_uid: str
    frame_number: int | None = None


#: A slice may lie this fraction of a voxel off the regular grid the volume assumes
#: (along the normal: of the slice spacing; in-plane: of the smaller pixel spacing) ...
GRID_TOLERANCE_FRACTION = 0.05
#: ... but the tolerance is never below this (DS values are rounded to a few decimals).
MIN_TOLERANCE_MM = 0.01
#: Two frames closer than this along the normal are at the same (duplicate) position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Direction cosines differing by less than this are the same orientation (~0.06 degree);
#: also the allowed deviation of ImageOrientationPatient from two orthonormal vectors.
ORIENTATION_TOLERANCE = 1e-3
#: Pixel spacings differing by less than this fraction are the same.
PIXEL_SPACING_TOLERANCE = 1e-4

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_BITS_ALLOCATED = frozenset({8, 16, 32})


@dataclass
class Frames:
    """Geometry, rescale and source of every frame, in input order (one row per frame)."""

    dataset_index: npt.NDArray[np.intp]  # non-decreasing: an instance's frames are consecutive rows
    refs: list[FrameRef]
    positions: npt.NDArray[np.float64]  # (n, 3)
    orientations: npt.NDArray[np.float64]  # (n, 6)
    pixel_spacings: npt.NDArray[np.float64]  # (n, 2)
    slice_thickness: list[float | None]
    slopes: npt.NDArray[np.float64]
    intercepts: npt.NDArray[np.float64]

    def describe(self, row: int) -> str:
        """Human name of frame ``row``: its instance, and frame number for multi-frame."""
        return describe_frame(self.refs[row])


@dataclass(frozen=True)
class Stack:
    """Slice order and grid found by :func:`stack_frames`."""

    order: npt.NDArray[np.intp]  # frame rows in slice order
    slice_spacing: float


def check_identity(datasets: list[Dataset]) -> dict[str, str]:
    """The series/study/frame-of-reference UIDs and modality shared by all instances.

    The series is named by the first instance's SeriesInstanceUID in every message.
    Also rejects an instance (SOPInstanceUID) given twice.
    """
    first_uid = str(datasets[0].get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")
    identity: dict[str, str] = {}
    sops = Counter(sop_of(ds) for ds in datasets)
    repeated = [sop for sop, n in sops.items() if n > 1]
    if repeated:
        raise VolumeError(
            f"series {first_uid}: instance {repeated[0]} given {sops[repeated[0]]} times"
            + (f" ({len(repeated)} instances repeated)" if len(repeated) > 1 else "")
        )
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality"):
        values = [str(ds.get(keyword, "") or "") for ds in datasets]
        missing = [sop_of(ds) for ds, value in zip(datasets, values, strict=True) if not value]
        if missing:
            raise VolumeError(
                f"series {first_uid}: {len(missing)} instance(s) without {keyword}, e.g. {missing[0]}"
            )
        counts = Counter(values)
        if len(counts) > 1:
            listing = ", ".join(f"{value} ({n} instances)" for value, n in counts.most_common())
            raise VolumeError(f"series {first_uid}: mixed {keyword} values: {listing}")
        identity[keyword] = values[0]
    return identity


def check_pixel_format(uid: str, datasets: list[Dataset]) -> tuple[int, int]:
    """Rows and columns shared by all instances, after checking each has decodable monochrome pixels."""
    sizes: Counter[tuple[int, int]] = Counter()
    first_of_size: dict[tuple[int, int], str] = {}
    for ds in datasets:
        sop = sop_of(ds)
        if "PixelData" not in ds:
            other = " (float pixel data is not supported)" if (
                "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
            ) else ""
            raise VolumeError(f"series {uid}: instance {sop} has no pixel data{other}")
        photometric = str(ds.get("PhotometricInterpretation", "") or "")
        samples = ds.get("SamplesPerPixel", None)
        if photometric not in _MONOCHROME or samples != 1:
            raise VolumeError(
                f"series {uid}: instance {sop}: unsupported photometric interpretation "
                f"{photometric or '<missing>'} with {samples} sample(s) per pixel; "
                "expected MONOCHROME1 or MONOCHROME2 with 1 sample"
            )
        bits = ds.get("BitsAllocated", None)
        if bits not in _BITS_ALLOCATED:
            raise VolumeError(
                f"series {uid}: instance {sop}: unsupported BitsAllocated {bits}; expected 8, 16 or 32"
            )
        if "ModalityLUTSequence" in ds:
            raise VolumeError(
                f"series {uid}: instance {sop}: a Modality LUT Sequence is not supported "
                "(only RescaleSlope/RescaleIntercept)"
            )
        rows, columns = ds.get("Rows", None), ds.get("Columns", None)
        if not rows or not columns:
            raise VolumeError(f"series {uid}: instance {sop}: invalid Rows/Columns {rows}x{columns}")
        size = (int(rows), int(columns))
        sizes[size] += 1
        first_of_size.setdefault(size, sop)
    if len(sizes) > 1:
        listing = ", ".join(
            f"{r}x{c} ({n} instances, e.g. {first_of_size[(r, c)]})" for (r, c), n in sizes.most_common()
        )
        raise VolumeError(f"series {uid}: mixed rows x columns: {listing}")
    return next(iter(sizes))


def collect_frames(uid: str, datasets: list[Dataset]) -> Frames:
    """One row of geometry and rescale per frame of every instance, in input order."""
    dataset_index: list[int] = []
    refs: list[FrameRef] = []
    positions: list[npt.NDArray[np.float64]] = []
    orientations: list[npt.NDArray[np.float64]] = []
    spacings: list[npt.NDArray[np.float64]] = []
    thickness: list[float | None] = []
    slopes: list[float] = []
    intercepts: list[float] = []
    for index, ds in enumerate(datasets):
        sop = sop_of(ds)
        enhanced = _is_enhanced(ds)
        try:
            for frame, (position, orientation, spacing, thick, slope, intercept) in enumerate(
                _instance_frames(ds)
            ):
                dataset_index.append(index)
                refs.append(FrameRef(sop, frame + 1 if enhanced else None))
                positions.append(position)
                orientations.append(orientation)
                spacings.append(spacing)
                thickness.append(thick)
                slopes.append(slope)
                intercepts.append(intercept)
        except _HeaderError as exc:
            raise VolumeError(f"series {uid}: instance {sop}{exc.where}: {exc}") from exc
    return Frames(
        dataset_index=np.asarray(dataset_index, dtype=np.intp),
        refs=refs,
        positions=np.asarray(positions, dtype=np.float64),
        orientations=np.asarray(orientations, dtype=np.float64),
        pixel_spacings=np.asarray(spacings, dtype=np.float64),
        slice_thickness=thickness,
        slopes=np.asarray(slopes, dtype=np.float64),
        intercepts=np.asarray(intercepts, dtype=np.float64),
    )


class _HeaderError(ValueError):
    """A missing or malformed attribute of one instance (``where`` names the frame, if any)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


_FrameGeometry = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], float | None, float, float
]


def _is_enhanced(ds: Dataset) -> bool:
    """Whether ``ds`` describes its frames with functional groups (an enhanced / multi-frame IOD)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _instance_frames(ds: Dataset) -> list[_FrameGeometry]:
    """(position, orientation, pixel spacing, thickness, slope, intercept) of each frame of ``ds``."""
    frames = int(_number(ds.get("NumberOfFrames", 1) or 1, "NumberOfFrames"))
    if not _is_enhanced(ds):
        if frames != 1:
            raise _HeaderError(
                f"{frames} frames but no per-frame functional groups to place them in space"
            )
        slope, intercept = _rescale(ds)
        return [(
            _floats(ds, "ImagePositionPatient", 3),
            _floats(ds, "ImageOrientationPatient", 6),
            _floats(ds, "PixelSpacing", 2),
            _optional_number(ds, "SliceThickness"),
            slope,
            intercept,
        )]

    shared_seq = ds.get("SharedFunctionalGroupsSequence", None)
    shared = shared_seq[0] if shared_seq else Dataset()
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    if len(per_frame_seq) != frames:
        raise _HeaderError(
            f"NumberOfFrames is {frames} but PerFrameFunctionalGroupsSequence has {len(per_frame_seq)} items"
        )
    result: list[_FrameGeometry] = []
    for frame, per_frame in enumerate(per_frame_seq):
        where = f" frame {frame + 1}"
        try:
            position = _floats(_group(ds, shared, per_frame, "PlanePositionSequence"), "ImagePositionPatient", 3)
            orientation = _floats(
                _group(ds, shared, per_frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
            )
            measures = _group(ds, shared, per_frame, "PixelMeasuresSequence")
            spacing = _floats(measures, "PixelSpacing", 2)
            thick = _optional_number(measures, "SliceThickness")
            slope, intercept = _rescale(_group(ds, shared, per_frame, "PixelValueTransformationSequence"))
        except _HeaderError as exc:
            raise _HeaderError(str(exc), where) from exc
        result.append((position, orientation, spacing, thick, slope, intercept))
    return result


def _group(ds: Dataset, shared: Dataset, per_frame: Dataset, keyword: str) -> Dataset:
    """The functional group item ``keyword`` of one frame: per-frame, else shared, else ``ds`` itself.

    Falling back to the top level lets objects that keep e.g. PixelSpacing there still load.
    """
    for group in (per_frame, shared):
        sequence = group.get(keyword, None)
        if sequence:
            return sequence[0]
    return ds


def _rescale(item: Dataset) -> tuple[float, float]:
    """(slope, intercept) of ``item``; identity when absent (MR, enhanced MR)."""
    slope = _optional_number(item, "RescaleSlope")
    intercept = _optional_number(item, "RescaleIntercept")
    slope = 1.0 if slope is None else slope
    if slope == 0:
        raise _HeaderError("RescaleSlope is 0")
    return slope, 0.0 if intercept is None else intercept


def _floats(item: Dataset, keyword: str, count: int) -> npt.NDArray[np.float64]:
    """``count`` finite numbers of multi-valued attribute ``keyword``; raises _HeaderError otherwise."""
    value = item.get(keyword, None)
    if value is None or value == "":
        raise _HeaderError(f"missing {keyword}")
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if len(values) != count:
        raise _HeaderError(f"{keyword} has {len(values)} values, expected {count}: {value}")
    try:
        result = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _HeaderError(f"{keyword} is not numeric: {value}") from exc
    if not np.all(np.isfinite(result)):
        raise _HeaderError(f"{keyword} is not finite: {value}")
    return result


def _number(value: object, keyword: str) -> float:
    """One finite number, or _HeaderError naming ``keyword``."""
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise _HeaderError(f"{keyword} is not numeric: {value}") from exc
    if not math.isfinite(result):
        raise _HeaderError(f"{keyword} is not finite: {value}")
    return result


def _optional_number(item: Dataset, keyword: str) -> float | None:
    """Single-valued number ``keyword`` of ``item``, None when absent or empty."""
    value = item.get(keyword, None)
    if value is None or value == "":
        return None
    return _number(value, keyword)


def check_plane(
    uid: str, frames: Frames
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Row cosines, column cosines and pixel spacing shared by every frame.

    Raises for an orientation that is not two orthonormal vectors, mixed
    orientations or mixed pixel spacings, naming the first frame that differs.
    """
    reference = frames.orientations[0]
    row, column = reference[:3], reference[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
        or abs(float(np.dot(row, column))) > ORIENTATION_TOLERANCE
    ):
        raise VolumeError(
            f"series {uid}: ImageOrientationPatient {_fmt(reference)} of {frames.describe(0)} "
            "is not two orthonormal direction cosines"
        )
    differs = np.flatnonzero(np.abs(frames.orientations - reference).max(axis=1) > ORIENTATION_TOLERANCE)
    if differs.size:
        row_index = int(differs[0])
        raise VolumeError(
            f"series {uid}: mixed orientations: {frames.describe(row_index)} has ImageOrientationPatient "
            f"{_fmt(frames.orientations[row_index])} but {frames.describe(0)} has {_fmt(reference)} "
            f"({differs.size} of {len(frames.refs)} frames differ)"
        )
    spacing = frames.pixel_spacings[0]
    if np.any(spacing <= 0):
        raise VolumeError(f"series {uid}: {frames.describe(0)} has invalid PixelSpacing {_fmt(spacing)}")
    differs = np.flatnonzero(
        (np.abs(frames.pixel_spacings - spacing) > PIXEL_SPACING_TOLERANCE * spacing).any(axis=1)
    )
    if differs.size:
        row_index = int(differs[0])
        raise VolumeError(
            f"series {uid}: mixed pixel spacings: {frames.describe(row_index)} has "
            f"{_fmt(frames.pixel_spacings[row_index])} mm but {frames.describe(0)} has {_fmt(spacing)} mm"
        )
    return row / np.linalg.norm(row), column / np.linalg.norm(column), spacing


def stack_frames(
    uid: str,
    frames: Frames,
    normal: npt.NDArray[np.float64],
    pixel_spacing: npt.NDArray[np.float64],
) -> Stack:
    """Order frames along ``normal`` and check they form a regular stack; return order and spacing."""
    along = frames.positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    count = len(order)
    if count == 1:
        thickness = frames.slice_thickness[0]
        if thickness is None or thickness <= 0:
            raise VolumeError(
                f"series {uid}: a single slice ({frames.describe(0)}) without a positive SliceThickness "
                "cannot form a 3-D volume (at least 2 slices are needed otherwise)"
            )
        return Stack(order=order, slice_spacing=float(thickness))

    gaps = np.diff(along)
    duplicate = np.flatnonzero(gaps <= DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise VolumeError(
            f"series {uid}: duplicate slice position {_mm(along[i])} mm along the normal: "
            f"{frames.describe(int(order[i]))} and {frames.describe(int(order[i + 1]))}"
            + (f" ({duplicate.size} duplicates in all)" if duplicate.size > 1 else "")
        )

    # Positions must lie on the line through the first slice along the normal.
    offsets = frames.positions[order] - frames.positions[order[0]]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    in_plane_tolerance = max(MIN_TOLERANCE_MM, GRID_TOLERANCE_FRACTION * float(pixel_spacing.min()))
    worst = int(np.argmax(drift))
    if drift[worst] > in_plane_tolerance:
        tilt = math.degrees(math.atan2(float(drift[worst]), float(along[worst] - along[0])))
        raise VolumeError(
            f"series {uid}: slice positions are not along the slice normal (gantry tilt or "
            f"non-orthogonal stacking): slice at index {worst} ({frames.describe(int(order[worst]))}) "
            f"is {_mm(drift[worst])} mm off the normal through index 0, a tilt of {tilt:.2f} degrees"
        )

    typical = float(np.median(gaps))
    tolerance = max(MIN_TOLERANCE_MM, GRID_TOLERANCE_FRACTION * typical)
    irregular = np.flatnonzero(np.abs(gaps - typical) > 2 * tolerance)
    if irregular.size:
        multiples = np.rint(gaps[irregular] / typical)
        if np.all(multiples >= 2) and np.all(np.abs(gaps[irregular] - multiples * typical) <= 2 * tolerance):
            i = int(irregular[0])
            missing = int(np.sum(multiples - 1))
            raise VolumeError(
                f"series {uid}: {missing} slice(s) missing: gap of {_mm(gaps[i])} mm before index {i + 1} "
                f"(between {_mm(along[i])} and {_mm(along[i + 1])} mm along the normal) where the spacing "
                f"is {_mm(typical)} mm" + (f"; {irregular.size} gaps in all" if irregular.size > 1 else "")
            )
        i = int(irregular[0])
        raise VolumeError(
            f"series {uid}: slice spacing varies {_mm(gaps.min())}-{_mm(gaps.max())} mm at index {i + 1} "
            f"({_mm(gaps[i])} mm after index {i}, typical spacing {_mm(typical)} mm; indices in order "
            "along the normal)"
        )

    spacing = float((along[-1] - along[0]) / (count - 1))
    residual = np.abs(along - (along[0] + spacing * np.arange(count)))
    worst = int(np.argmax(residual))
    if residual[worst] > max(MIN_TOLERANCE_MM, GRID_TOLERANCE_FRACTION * spacing):
        raise VolumeError(
            f"series {uid}: slice spacing varies {_mm(gaps.min())}-{_mm(gaps.max())} mm at index {worst} "
            f"(it lies {_mm(residual[worst])} mm off a regular {_mm(spacing)} mm grid)"
        )
    return Stack(order=order, slice_spacing=spacing)


def sop_of(ds: Dataset) -> str:
    """SOPInstanceUID of ``ds`` for messages."""
    return str(ds.get("SOPInstanceUID", "") or "<no SOPInstanceUID>")


def describe_frame(ref: FrameRef) -> str:
    """``instance X`` or ``instance X frame N``."""
    return f"instance {ref.sop_instance_uid}" + (
        f" frame {ref.frame_number}" if ref.frame_number is not None else ""
    )


def _mm(value: float) -> str:
    """A length for messages: at most 3 decimals, e.g. 2.5, 5.0, 1.25."""
    return str(round(float(value), 3) + 0.0)


def _fmt(values: npt.ArrayLike) -> str:
    """A vector for messages, e.g. [1.0, 0.0, 0.0]."""
    return "[" + ", ".join(_mm(v) for v in np.asarray(values, dtype=np.float64)) + "]"
