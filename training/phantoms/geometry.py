"""Shapes and smooth fields the chest phantom is drawn with (numpy, vectorised).

Why: the anatomy of :func:`training.phantoms.chest.generate_chest_phantom` and the
nodules of :mod:`training.phantoms.nodules` are built from the same few pieces:
a smooth random field, a capsule (a tube segment), a soft occupancy edge for
partial volume, and the grid they are evaluated on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BoolArray", "FloatArray", "Grid", "Vec3", "capsule", "occupancy", "random_perpendicular", "smooth_field",
           "smoothstep"]

Vec3 = tuple[float, float, float]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def smoothstep(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Hermite ramp 0 -> 1 on [0, 1], flat outside: smooth anatomical transitions."""
    t = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smooth_field(
    rng: np.random.Generator,
    coords: Sequence[npt.NDArray[np.float64]],
    corr_mm: float,
) -> FloatArray:
    """Smooth random field with unit standard deviation on a separable grid.

    Gaussian-kernel interpolation of white noise drawn on a coarse lattice with
    spacing ``corr_mm`` (one interpolation matrix per axis, applied with
    tensordot): smooth, cheap (no full-size FFT or spline), and deterministic.
    ``coords`` are the 1D coordinates (mm) of each axis; the result has shape
    ``tuple(len(c) for c in coords)``.
    """
    mats = []
    for c in coords:
        lo, hi = float(c.min()), float(c.max())
        n = max(2, int(math.ceil((hi - lo) / corr_mm)) + 3)
        ctrl = np.linspace(lo - corr_mm, lo - corr_mm + (n - 1) * corr_mm, n)
        w = np.exp(-0.5 * ((c[:, None] - ctrl[None, :]) / (0.6 * corr_mm)) ** 2)
        mats.append(w / w.sum(axis=1, keepdims=True))
    out = rng.standard_normal(tuple(m.shape[1] for m in mats))
    for axis, m in enumerate(mats):
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
    sd = float(out.std())
    return (out / (sd if sd > 0 else 1.0)).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates (mm) of each axis in the body-centred frame.

    ``X`` (patient left +), ``Y`` (posterior +) are relative to the body centre;
    ``Z`` is the height above the centre of slice 0. Used to rasterise shapes
    inside bounding boxes.
    """

    z: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    x: npt.NDArray[np.float64]
    spacing: Vec3

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of voxels with centres in the mm box ``lo..hi`` (x, y, z), or None."""
        out = []
        for axis_coords, s, a, b in zip(
            (self.z, self.y, self.x), self.spacing, (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])
        ):
            i0 = max(0, int(math.ceil((a - axis_coords[0]) / s)))
            i1 = min(len(axis_coords), int(math.floor((b - axis_coords[0]) / s)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[0], out[1], out[2])

    def sub(self, sl: tuple[slice, slice, slice]) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]
    ]:
        """Broadcastable (Z, Y, X) coordinate arrays of a box."""
        return (
            self.z[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.x[sl[2]][None, None, :],
        )

    def index(self, p: Sequence[float]) -> tuple[int, int, int] | None:
        """Nearest voxel (z, y, x) of point ``p`` = (X, Y, Z) mm, or None outside."""
        idx = []
        for axis_coords, s, v in zip((self.z, self.y, self.x), self.spacing, (p[2], p[1], p[0])):
            i = int(round((v - axis_coords[0]) / s))
            if not 0 <= i < len(axis_coords):
                return None
            idx.append(i)
        return (idx[0], idx[1], idx[2])


def capsule(
    grid: Grid, p0: npt.ArrayLike, p1: npt.ArrayLike, reach: float
) -> tuple[tuple[slice, slice, slice], FloatArray, FloatArray] | None:
    """Distance (mm) of voxels near segment p0-p1 (X, Y, Z mm) to the segment.

    Only voxels in the segment's bounding box grown by ``reach`` are
    evaluated. Returns (box slices, distance, t) where t in [0, 1] is the
    position of the closest point along the segment (for tapering), or None
    when the box misses the grid.
    """
    a = np.asarray(p0, dtype=np.float64)
    b = np.asarray(p1, dtype=np.float64)
    sl = grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
    if sl is None:
        return None
    z, y, x = grid.sub(sl)
    v = b - a
    length2 = float(v @ v) or 1e-12
    dx, dy, dz = x - a[0], y - a[1], z - a[2]
    t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2)
    return sl, dist.astype(np.float32), t.astype(np.float32)


def occupancy(dist: npt.NDArray[np.floating], radius: npt.ArrayLike, width: float) -> FloatArray:
    """Partial-volume fraction of a voxel at ``dist`` from the axis/centre of a
    structure of ``radius``: a one-voxel linear ramp across the surface, and
    a reduced peak for structures thinner than a voxel."""
    r = np.asarray(radius, dtype=np.float32)
    occ = np.clip(0.5 + (r - dist) / width, 0.0, 1.0) * np.minimum(1.0, 2.0 * r / width)
    return occ.astype(np.float32)


def random_perpendicular(rng: np.random.Generator, d: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A random unit vector perpendicular to unit vector ``d``."""
    while True:
        v = rng.standard_normal(3)
        v -= (v @ d) * d
        n = float(np.linalg.norm(v))
        if n > 1e-6:
            return v / n
