"""A DICOM series as an oriented volume with its geometry: the single place for that logic.

Why: every model and every result builder needs the same answer to "which voxel
is where, and which source frame does slice k come from"; computing it twice is
how overlays end up misplaced. :class:`Volume` is that answer; the loader that
builds it from a series lives here too, reading each frame's geometry and rescale and
checking the stack with :mod:`workers.series_frames` before it decodes any pixel data.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from workers.series_frames import (
    FrameRef,
    Frames,
    VolumeError,
    check_identity,
    check_pixel_format,
    check_plane,
    collect_frames,
    sop_of,
    stack_frames,
)

__all__ = ["FrameRef", "Volume", "VolumeError", "load_series", "volume_from_datasets"]

logger = logging.getLogger(__name__)


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
    (within :data:`~workers.series_frames.ORIENTATION_TOLERANCE` per cosine), pixel spacing (within
    :data:`~workers.series_frames.PIXEL_SPACING_TOLERANCE`) and rows/columns; positions must lie on the line
    along the normal and on a regular grid, each within
    ``max(MIN_TOLERANCE_MM, GRID_TOLERANCE_FRACTION * voxel size)`` - 5 % of a voxel,
    at least 0.01 mm; positions closer than :data:`~workers.series_frames.DUPLICATE_TOLERANCE_MM` are
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


def _assemble(datasets: list[Dataset], *, release_pixels: bool) -> Volume:
    """Check, order and decode ``datasets``; ``release_pixels`` drops each one's pixel data once used."""
    started = time.perf_counter()
    if not datasets:
        raise VolumeError("empty series: no instances given")
    identity = check_identity(datasets)
    uid = identity["SeriesInstanceUID"]
    rows, columns = check_pixel_format(uid, datasets)
    frames = collect_frames(uid, datasets)
    row_cosines, column_cosines, pixel_spacing = check_plane(uid, frames)
    normal = np.cross(row_cosines, column_cosines)
    normal /= np.linalg.norm(normal)
    stack = stack_frames(uid, frames, normal, pixel_spacing)

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


def _decode_into(
    uid: str,
    datasets: list[Dataset],
    frames: Frames,
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
        sop = sop_of(ds)
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


