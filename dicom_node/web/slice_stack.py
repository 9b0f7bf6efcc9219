"""The slices of a stored series, read from their headers, and the pixels of one slice on demand.

Why: a study preview shows one key slice with the results drawn on it. To choose
that slice and place SEG frames and detections on it, the web process needs the
series' geometry (slice order along the normal, spacing, which instance and frame
each slice is) - not its voxels. So this module reads every instance's header
(pixel data deferred, never loaded), checks that the frames form one regular
stack, and decodes a single frame when :meth:`SliceStack.pixels` asks for it: a
300-slice CT costs a few megabytes of headers and one 512x512 slice, not the
300 MB float32 volume the workers build. It uses pydicom and highdicom only; the
node's web code never imports the workers (DESIGN.md, "Layers").

Conventions as in the workers' volumes: slice ``k`` counts from the lowest
position along the normal ``row x column`` of ImageOrientationPatient; indices are
``(slice, row, column)``; world positions are patient LPS millimetres.
Single-frame images and enhanced multi-frame images (geometry and rescale from the
per-frame functional groups, else the shared groups, else the top level) are read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array

__all__ = ["SliceStack", "SliceStackError", "StackSlice", "read_slice_stack"]

logger = logging.getLogger(__name__)

#: Elements larger than this are left unread in the headers (the pixel data).
_DEFER_SIZE = "64 KB"
#: Direction cosines differing by less than this are the same orientation (~0.06 degree).
_ORIENTATION_TOLERANCE = 1e-3
#: Slice gaps may differ from the mean spacing by this fraction and still be one regular stack.
_SPACING_TOLERANCE = 0.05
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


class SliceStackError(ValueError):
    """A series whose slices cannot be shown: the message names the series (and instance) and the cause."""


@dataclass(frozen=True, eq=False)
class StackSlice:
    """One slice: the file and frame it comes from, its header (no pixel data) and its rescale."""

    path: Path
    header: Dataset
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance; None for a single-frame one
    position: npt.NDArray[np.float64]
    slope: float
    intercept: float


@dataclass(frozen=True, eq=False)
class SliceStack:
    """The slices of one series in order along the normal, and the grid they lie on.

    ``affine`` maps homogeneous ``(slice, row, column, 1)`` indices to LPS mm;
    ``spacing_mm`` is (slice spacing, row spacing, column spacing).
    """

    series_instance_uid: str
    modality: str
    rows: int
    columns: int
    slices: tuple[StackSlice, ...]
    spacing_mm: tuple[float, float, float]
    affine: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.slices)

    def world_to_index(self, point_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Fractional (slice, row, column) indices of an LPS point."""
        p = np.asarray(point_mm, dtype=np.float64) - self.affine[:3, 3]
        return p @ np.linalg.inv(self.affine[:3, :3]).T

    def pixels(self, k: int) -> npt.NDArray[np.float32]:
        """Slice ``k``'s values (``stored * RescaleSlope + RescaleIntercept``, e.g. HU), decoded from its file now."""
        item = self.slices[k]
        index = 0 if item.frame_number is None else item.frame_number - 1
        try:
            stored = pixel_array(item.path, index=index)
        except Exception as exc:  # pydicom and its decoder plugins raise many types for damaged data
            raise SliceStackError(
                f"series {self.series_instance_uid}: cannot decode pixel data of instance {item.sop_instance_uid}"
                f"{_frame_text(item.frame_number)}: {type(exc).__name__}: {exc}") from exc
        if stored.shape != (self.rows, self.columns):
            raise SliceStackError(
                f"series {self.series_instance_uid}: instance {item.sop_instance_uid}"
                f"{_frame_text(item.frame_number)} decoded to {stored.shape}, expected {(self.rows, self.columns)}")
        values = stored.astype(np.float32)
        if item.slope != 1.0:
            values *= np.float32(item.slope)
        if item.intercept != 0.0:
            values += np.float32(item.intercept)
        return values


def read_slice_stack(series_instance_uid: str, paths: Sequence[Path]) -> SliceStack:
    """Read the headers of a series' files and order their frames into a :class:`SliceStack`.

    Raises :class:`SliceStackError` for an unreadable file, an instance without
    monochrome pixel data, mixed matrix sizes, orientations or pixel spacings,
    missing geometry, slices that are not one regular stack (duplicates, gaps,
    varying spacing, gantry tilt), or a single slice without a SliceThickness.
    """
    uid = series_instance_uid
    slices: list[StackSlice] = []
    orientations: list[npt.NDArray[np.float64]] = []
    spacings: list[npt.NDArray[np.float64]] = []
    sizes: set[tuple[int, int]] = set()
    for path in paths:
        try:
            header = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        except Exception as exc:  # pydicom raises many types for damaged files (EOFError, struct.error, ...)
            raise SliceStackError(f"series {uid}: cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from exc
        sop = str(header.get("SOPInstanceUID", "") or path.name)
        _check_pixels(uid, sop, header)
        sizes.add((int(header.Rows), int(header.Columns)))
        try:
            for frame_number, groups in _frame_groups(header):
                slope, intercept = _rescale(groups["PixelValueTransformationSequence"])
                slices.append(StackSlice(path=Path(path), header=header, sop_instance_uid=sop,
                                         frame_number=frame_number, slope=slope, intercept=intercept,
                                         position=_floats(groups["PlanePositionSequence"], "ImagePositionPatient", 3)))
                orientations.append(_floats(groups["PlaneOrientationSequence"], "ImageOrientationPatient", 6))
                spacings.append(_floats(groups["PixelMeasuresSequence"], "PixelSpacing", 2))
        except ValueError as exc:
            raise SliceStackError(f"series {uid}: instance {sop}: {exc}") from exc
    if not slices:
        raise SliceStackError(f"series {uid}: no instances")
    if len(sizes) > 1:
        raise SliceStackError(f"series {uid}: mixed matrix sizes (rows, columns) {sorted(sizes)}")
    orientation, pixel_spacing = orientations[0], spacings[0]
    if np.abs(np.asarray(orientations) - orientation).max() > _ORIENTATION_TOLERANCE:
        raise SliceStackError(f"series {uid}: mixed orientations (ImageOrientationPatient differs between slices)")
    if not np.allclose(spacings, pixel_spacing, rtol=1e-4) or np.any(pixel_spacing <= 0):
        raise SliceStackError(f"series {uid}: mixed or invalid PixelSpacing (first {list(pixel_spacing)})")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    positions = np.asarray([s.position for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slice_spacing = _slice_spacing(uid, slices, positions, orientation)
    affine = np.eye(4)
    affine[:3, :3] = (np.stack([normal, column, row]) * np.asarray([slice_spacing, *pixel_spacing])[:, None]).T
    affine[:3, 3] = positions[order[0]]
    (rows, columns), = sizes
    first = slices[int(order[0])].header
    return SliceStack(series_instance_uid=uid, modality=str(first.get("Modality", "") or ""), rows=rows,
                      columns=columns, slices=tuple(slices[int(i)] for i in order),
                      spacing_mm=(slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])), affine=affine)


def _check_pixels(uid: str, sop: str, header: Dataset) -> None:
    """Monochrome pixel data with one sample per pixel, as a greyscale preview needs."""
    if "PixelData" not in header:
        raise SliceStackError(f"series {uid}: instance {sop} has no pixel data")
    photometric = str(header.get("PhotometricInterpretation", "") or "")
    samples = header.get("SamplesPerPixel")
    if photometric not in _MONOCHROME or samples != 1:
        raise SliceStackError(f"series {uid}: instance {sop}: unsupported photometric interpretation "
                              f"{photometric or '<missing>'} with {samples} sample(s) per pixel")
    if "Rows" not in header or "Columns" not in header:
        raise SliceStackError(f"series {uid}: instance {sop} has no Rows or Columns")


def _frame_groups(header: Dataset) -> list[tuple[int | None, dict[str, Dataset]]]:
    """(frame number, {functional group: item}) of each frame; a single-frame image is its own group item."""
    keywords = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                "PixelValueTransformationSequence")
    if "PerFrameFunctionalGroupsSequence" not in header and "SharedFunctionalGroupsSequence" not in header:
        if int(header.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{header.NumberOfFrames} frames but no functional groups to place them in space")
        return [(None, dict.fromkeys(keywords, header))]
    shared = (header.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != int(header.get("NumberOfFrames", 1) or 1):
        raise ValueError(f"NumberOfFrames is {header.get('NumberOfFrames')} but there are {len(per_frame)} "
                         "per-frame functional groups")
    return [(number, {k: (frame.get(k) or shared.get(k) or [header])[0] for k in keywords})
            for number, frame in enumerate(per_frame, start=1)]


def _floats(item: Dataset, keyword: str, count: int) -> npt.NDArray[np.float64]:
    value = item.get(keyword)
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [] if value in (None, "") else [value]
    if len(values) != count:
        raise ValueError(f"{keyword} must have {count} values, got {value!r}")
    result = np.asarray([float(v) for v in values], dtype=np.float64)
    if not np.all(np.isfinite(result)):
        raise ValueError(f"{keyword} is not finite: {value!r}")
    return result


def _rescale(item: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), identity when absent (MR)."""
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    slope = 1.0 if slope in (None, "") else float(slope)
    if slope == 0:
        raise ValueError("RescaleSlope is 0")
    return slope, 0.0 if intercept in (None, "") else float(intercept)


def _slice_spacing(uid: str, slices: list[StackSlice], positions: npt.NDArray[np.float64],
                   orientation: npt.NDArray[np.float64]) -> float:
    """The distance between neighbouring slices (highdicom's check that they are one regular stack)."""
    if len(slices) == 1:
        try:
            thickness = float(slices[0].header.get("SliceThickness") or 0)
        except (TypeError, ValueError):
            thickness = 0.0
        if not thickness > 0:
            raise SliceStackError(f"series {uid}: a single slice without a positive SliceThickness has no spacing")
        return thickness
    from highdicom.spatial import get_volume_positions

    spacing, _ = get_volume_positions(positions, orientation, rtol=_SPACING_TOLERANCE)
    if spacing is None or not spacing > 0:
        raise SliceStackError(f"series {uid}: its {len(slices)} slices are not one regular stack (duplicate or "
                              "missing slices, varying spacing or gantry tilt)")
    return float(spacing)


def _frame_text(frame_number: int | None) -> str:
    return "" if frame_number is None else f" frame {frame_number}"
