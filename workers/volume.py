"""A DICOM series as an oriented volume with its geometry: the single place for that logic.

Why: every model and every result builder needs the same answer to "which voxel
is where, and which source frame does slice k come from"; computing it twice is
how overlays end up misplaced. :class:`Volume` is that answer; the loader that
builds it from a series (slice ordering, rescale, consistency checks) lives here too.

Conventions: ``array`` is indexed ``[slice, row, column]``; ``axes[a]`` is the unit
vector (patient LPS) along which array axis ``a`` increases and ``spacing_mm[a]``
the distance between neighbours along it, so a voxel's world position is
``origin_mm + sum(index[a] * spacing_mm[a] * axes[a])``. For a classic series
``axes[2]`` is the row direction cosine (ImageOrientationPatient[0:3]),
``axes[1]`` the column direction cosine ([3:6]) and ``axes[0]`` their normal.

Loading: :func:`load_series` (files) and :func:`volume_from_datasets` (in-memory
instances) order slices along the normal, apply the rescale, check that the series
is one regular stack (or raise :class:`VolumeError` saying why not) and decode
pixel data straight into one preallocated float32 array.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

__all__ = ["FrameRef", "Volume", "VolumeError", "load_series", "volume_from_datasets"]

logger = logging.getLogger(__name__)


class VolumeError(ValueError):
    """A series that cannot be turned into a trustworthy volume; the message names series and cause."""


@dataclass(frozen=True)
class FrameRef:
    """The source of one slice: an instance, and its frame number for multi-frame instances (else None)."""

    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels of one series in patient space, and where each slice came from.

    ``array``: float32 (rescaled values, e.g. HU), shape (slices, rows, columns),
    slices in increasing position along ``axes[0]``. ``frames[k]`` is the source
    of slice ``k``; ``datasets`` the source instances' headers (pixel data removed),
    in slice order for single-frame series, the one instance for a multi-frame one.
    """

    array: npt.NDArray[np.float32]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    axes: npt.NDArray[np.float64]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    frames: tuple[FrameRef, ...]
    datasets: tuple[Dataset, ...]

    def __post_init__(self) -> None:
        """Reject a volume whose parts disagree (a bug in whoever built it)."""
        if self.array.ndim != 3:
            raise ValueError(f"volume array must be 3-D, got shape {self.array.shape}")
        if len(self.frames) != self.array.shape[0]:
            raise ValueError(f"{len(self.frames)} frame references for {self.array.shape[0]} slices")
        if self.axes.shape != (3, 3):
            raise ValueError(f"axes must be 3x3, got {self.axes.shape}")
        if any(not s > 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping homogeneous (slice, row, column, 1) indices to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = (self.axes * np.asarray(self.spacing_mm)[:, None]).T
        matrix[:3, 3] = self.origin_mm
        return matrix

    def index_to_world(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """LPS millimetres of (slice, row, column) indices; accepts (3,) or (N, 3), fractional allowed."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, point_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Fractional (slice, row, column) indices of LPS points; accepts (3,) or (N, 3)."""
        p = np.asarray(point_mm, dtype=np.float64) - self.affine[:3, 3]
        return p @ np.linalg.inv(self.affine[:3, :3]).T


# --------------------------------------------------------------------------------------
# Loading a series
# --------------------------------------------------------------------------------------

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
#: Header copies keep every element before Float Pixel Data (7FE0,0008), the first pixel data tag.
_FIRST_PIXEL_TAG = 0x7FE00008
#: How large an element must be for load_series to read it only when needed (the pixel data).
_DEFER_SIZE = "64 KB"


def load_series(paths: Sequence[str | Path]) -> Volume:
    """Read the DICOM files of one series and build its :class:`Volume`.

    Headers are read first (pixel data deferred), checked as in
    :func:`volume_from_datasets`, and only then is each instance's pixel data read,
    decoded into the preallocated float32 array and dropped, so at most one
    instance's raw and decoded pixels exist besides the volume. Raises
    :class:`VolumeError` for an unreadable file (naming its path) or an
    inconsistent series.
    """
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path, defer_size=_DEFER_SIZE))
        # pydicom raises many types for damaged files (InvalidDicomError, EOFError,
        # struct.error, ...): report each as a VolumeError naming the file.
        except Exception as exc:
            raise VolumeError(f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from exc
    return _assemble(datasets, release_pixels=True)


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Build the :class:`Volume` of one series from in-memory instances.

    What is accepted:

    * single-frame images (CT, MR, ...) and enhanced or legacy-converted enhanced
      multi-frame images (geometry and rescale from the per-frame functional groups,
      falling back to the shared groups and then the top-level attributes), or a mix;
    * one series, study and frame of reference; MONOCHROME1/2, one sample per pixel,
      8/16/32 bits allocated, any transfer syntax pydicom can decode with the
      installed plugins (native, deflate, RLE, JPEG baseline/lossless, JPEG-LS,
      JPEG 2000);
    * slices (all frames of all instances) are ordered by their position along the
      normal ``row x column`` of ImageOrientationPatient, never by InstanceNumber;
      the first one (lowest along the normal) gives ``origin_mm``;
    * voxel values are ``stored * RescaleSlope + RescaleIntercept`` for each slice
      (Pixel Value Transformation per frame in enhanced objects; slope 1 and
      intercept 0 when absent, as in MR).

    Geometry checks and tolerances: all frames must share ImageOrientationPatient
    (within :data:`ORIENTATION_TOLERANCE` per cosine), pixel spacing (within
    :data:`PIXEL_SPACING_TOLERANCE`) and rows/columns; positions must lie on the line
    along the normal and on a regular grid, each within
    ``max(MIN_TOLERANCE_MM, GRID_TOLERANCE_FRACTION * voxel size)`` - 5 % of a voxel,
    at least 0.01 mm; positions closer than :data:`DUPLICATE_TOLERANCE_MM` are
    duplicates. The slice spacing is then the mean distance between neighbours.

    A single slice is a valid 1-slice volume only when SliceThickness (> 0) is
    known: the thickness becomes the spacing along the normal. Without it a
    single slice raises, since a 3-D grid cannot be given a spacing.

    ``Volume.datasets`` are new datasets holding the headers without pixel data; they
    share element objects and file meta with ``datasets``, which are not modified.

    Raises :class:`VolumeError` naming the series and the cause for: no instances,
    mixed series/study/frame of reference UIDs or modalities, an instance given
    twice, no pixel data, unsupported photometric interpretation or bit depth,
    mixed rows/columns, missing or invalid geometry, mixed orientations or pixel
    spacings, positions not along the normal (gantry tilt), duplicate positions,
    missing slices, varying spacing, a single slice without SliceThickness, and
    pixel data that cannot be decoded.
    """
    return _assemble(list(datasets), release_pixels=False)


@dataclass
class _Frames:
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
        return _describe(self.refs[row])


@dataclass(frozen=True)
class _Stack:
    """Slice order and grid found by :func:`_stack`."""

    order: npt.NDArray[np.intp]  # frame rows in slice order
    slice_spacing: float


def _assemble(datasets: list[Dataset], *, release_pixels: bool) -> Volume:
    """Check, order and decode ``datasets``; ``release_pixels`` drops each one's pixel data once used."""
    started = time.perf_counter()
    if not datasets:
        raise VolumeError("empty series: no instances given")
    identity = _check_identity(datasets)
    uid = identity["SeriesInstanceUID"]
    rows, columns = _check_pixel_format(uid, datasets)
    frames = _collect_frames(uid, datasets)
    row_cosines, column_cosines, pixel_spacing = _check_plane(uid, frames)
    normal = np.cross(row_cosines, column_cosines)
    normal /= np.linalg.norm(normal)
    stack = _stack(uid, frames, normal, pixel_spacing)

    array = np.empty((len(stack.order), rows, columns), dtype=np.float32)
    _decode_into(uid, datasets, frames, stack.order, array, release_pixels=release_pixels)

    used: dict[int, None] = {}
    for row in stack.order:
        used.setdefault(int(frames.dataset_index[row]), None)
    volume = Volume(
        array=array,
        spacing_mm=(stack.slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin_mm=tuple(float(v) for v in frames.positions[stack.order[0]]),  # type: ignore[arg-type]
        axes=np.stack([normal, column_cosines, row_cosines]),
        series_instance_uid=uid,
        study_instance_uid=identity["StudyInstanceUID"],
        frame_of_reference_uid=identity["FrameOfReferenceUID"],
        modality=identity["Modality"],
        frames=tuple(frames.refs[row] for row in stack.order),
        # Datasets this module read are already stripped of pixel data and need no copy.
        datasets=tuple(datasets[index] if release_pixels else _header(datasets[index]) for index in used),
    )
    logger.debug(
        "series %s: %d slices of %dx%d, spacing %s mm, from %d instance(s) in %.3f s",
        uid, volume.shape[0], rows, columns, volume.spacing_mm, len(datasets), time.perf_counter() - started,
    )
    return volume


def _check_identity(datasets: list[Dataset]) -> dict[str, str]:
    """The series/study/frame-of-reference UIDs and modality shared by all instances.

    The series is named by the first instance's SeriesInstanceUID in every message.
    Also rejects an instance (SOPInstanceUID) given twice.
    """
    first_uid = str(datasets[0].get("SeriesInstanceUID", "") or "<no SeriesInstanceUID>")
    identity: dict[str, str] = {}
    sops = Counter(_sop(ds) for ds in datasets)
    repeated = [sop for sop, n in sops.items() if n > 1]
    if repeated:
        raise VolumeError(
            f"series {first_uid}: instance {repeated[0]} given {sops[repeated[0]]} times"
            + (f" ({len(repeated)} instances repeated)" if len(repeated) > 1 else "")
        )
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality"):
        values = [str(ds.get(keyword, "") or "") for ds in datasets]
        missing = [_sop(ds) for ds, value in zip(datasets, values, strict=True) if not value]
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


def _check_pixel_format(uid: str, datasets: list[Dataset]) -> tuple[int, int]:
    """Rows and columns shared by all instances, after checking each has decodable monochrome pixels."""
    sizes: Counter[tuple[int, int]] = Counter()
    first_of_size: dict[tuple[int, int], str] = {}
    for ds in datasets:
        sop = _sop(ds)
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


def _collect_frames(uid: str, datasets: list[Dataset]) -> _Frames:
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
        sop = _sop(ds)
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
    return _Frames(
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


def _check_plane(
    uid: str, frames: _Frames
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


def _stack(
    uid: str,
    frames: _Frames,
    normal: npt.NDArray[np.float64],
    pixel_spacing: npt.NDArray[np.float64],
) -> _Stack:
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
        return _Stack(order=order, slice_spacing=float(thickness))

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
    return _Stack(order=order, slice_spacing=spacing)


def _decode_into(
    uid: str,
    datasets: list[Dataset],
    frames: _Frames,
    order: npt.NDArray[np.intp],
    out: npt.NDArray[np.float32],
    *,
    release_pixels: bool,
) -> None:
    """Decode every frame straight into its slice of ``out`` and rescale it there.

    One instance at a time: native pixel data is viewed, not copied; compressed
    frames are decoded one by one. ``release_pixels`` deletes each instance's
    Pixel Data once decoded (for datasets this module read itself).
    """
    slice_of_row = np.empty(len(order), dtype=np.intp)
    slice_of_row[order] = np.arange(len(order))
    first_row = np.searchsorted(frames.dataset_index, np.arange(len(datasets)))
    frame_counts = np.bincount(frames.dataset_index, minlength=len(datasets))
    for index, ds in enumerate(datasets):
        start = int(first_row[index])
        sop = _sop(ds)
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
        if not syntax:
            raise VolumeError(f"series {uid}: instance {sop} has no TransferSyntaxUID in its file meta")
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise VolumeError(
                f"series {uid}: instance {sop}: transfer syntax {syntax} ({UID(syntax).name}) "
                "is not supported"
            ) from exc
        if not decoder.is_available:
            raise VolumeError(
                f"series {uid}: instance {sop}: no decoder installed for {UID(syntax).name}: "
                f"{'; '.join(decoder.missing_dependencies)}"
            )
        decoded = 0
        try:
            for frame, (pixels, _) in enumerate(decoder.iter_array(ds, raw=True, view_only=True)):
                row = start + frame
                target = out[slice_of_row[row]]
                np.copyto(target, pixels, casting="unsafe")
                slope, intercept = frames.slopes[row], frames.intercepts[row]
                if slope != 1.0:
                    target *= np.float32(slope)
                if intercept != 0.0:
                    target += np.float32(intercept)
                decoded += 1
        # The decoders (pydicom and its plugins) raise many types for damaged data.
        except Exception as exc:
            raise VolumeError(
                f"series {uid}: cannot decode pixel data of instance {sop} ({UID(syntax).name}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        expected = int(frame_counts[index])
        if decoded != expected:
            raise VolumeError(
                f"series {uid}: instance {sop}: decoded {decoded} frames, expected {expected}"
            )
        if release_pixels:
            del ds.PixelData


def _header(ds: Dataset) -> Dataset:
    """A new dataset with the elements of ``ds`` before its pixel data (element objects and file meta shared)."""
    header = ds[:_FIRST_PIXEL_TAG]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = meta
    return header


def _sop(ds: Dataset) -> str:
    """SOPInstanceUID of ``ds`` for messages."""
    return str(ds.get("SOPInstanceUID", "") or "<no SOPInstanceUID>")


def _describe(ref: FrameRef) -> str:
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
