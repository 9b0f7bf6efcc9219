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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

__all__ = ["FrameRef", "Volume", "VolumeError"]


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
