"""Lung nodules of the chest phantom: what one is, where it may go, how it is painted.

Why: nodules are the point of the phantoms (detection and segmentation targets);
placing them fully inside the lungs without overlap, and painting the three
radiological kinds (solid, part-solid, ground-glass) with a lobulated edge, is
its own piece of work, apart from the anatomy around them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from training.phantoms.geometry import BoolArray, FloatArray, Grid, Vec3, occupancy

__all__ = ["NODULE_KINDS", "Nodule", "NoduleKind", "paint_nodule", "place_nodules"]

NoduleKind = Literal["solid", "part-solid", "ground-glass"]
#: Nodule kinds, in the order of :attr:`PhantomConfig.nodule_kind_weights`.
NODULE_KINDS: tuple[NoduleKind, ...] = ("solid", "part-solid", "ground-glass")

# Nominal nodule values (HU); per-nodule jitter is added.
SOLID_NODULE_HU = 30.0
PART_SOLID_CORE_HU = 20.0
PART_SOLID_HALO_HU = -500.0
GROUND_GLASS_HU = -550.0


@dataclass
class Nodule:
    """A lung nodule: where it is, how large, and what it looks like.

    ``centre_zyx`` is in (fractional) voxel indices of the phantom grid and
    ``centre_xyz_mm`` the same point in patient LPS world coordinates;
    ``diameter_mm`` is the nominal diameter (the surface is mildly lobulated
    around it by up to ~8%).
    """

    centre_zyx: Vec3
    centre_xyz_mm: Vec3
    diameter_mm: float
    kind: NoduleKind

    @property
    def radius_mm(self) -> float:
        """Half the nominal diameter."""
        return self.diameter_mm / 2.0

    @property
    def box_xyz_mm(self) -> tuple[float, float, float, float, float, float]:
        """Axis-aligned bounding box ``(cx, cy, cz, w, h, d)`` in world LPS mm."""
        cx, cy, cz = self.centre_xyz_mm
        d = float(self.diameter_mm)
        return (float(cx), float(cy), float(cz), d, d, d)


def place_nodules(
    rng: np.random.Generator,
    grid: Grid,
    lung3: BoolArray,
    hu: FloatArray,
    origin: Vec3,
    *,
    count_range: tuple[int, int],
    diameter_mm: tuple[float, float],
    kind_weights: Sequence[float],
) -> tuple[list[Nodule], BoolArray]:
    """Draw, place and paint the nodules; returns them and their label mask.

    Centres are drawn uniformly over lung voxels (plus sub-voxel jitter) and
    accepted when every voxel centre within 1.12 radius + 1 mm is lung (so the
    lobulated nodule lies fully inside the lung, vessels included) and the
    nodule keeps >= 2 mm from every nodule already placed. Largest first;
    after 200 failed draws the diameter shrinks by 20% (not below the minimum),
    and a nodule that still does not fit is dropped. ``hu`` is painted in place.
    """
    shape = lung3.shape
    mask = np.zeros(shape, dtype=bool)
    lo, hi = count_range
    count = int(rng.integers(lo, hi + 1))
    dmin, dmax = diameter_mm
    diameters = np.exp(rng.uniform(math.log(dmin), math.log(dmax), size=count))
    weights = np.asarray(kind_weights, dtype=np.float64)
    kinds = rng.choice(len(NODULE_KINDS), size=count, p=weights / weights.sum())
    order = np.argsort(-diameters, kind="stable")
    lung_idx = np.flatnonzero(lung3)
    spacing = np.asarray(grid.spacing, dtype=np.float64)  # z, y, x
    width = float(spacing.mean())
    placed: list[tuple[npt.NDArray[np.float64], float]] = []  # (zyx mm-centre in grid frame, radius)
    nodules: list[Nodule] = []
    if lung_idx.size == 0:
        return nodules, mask
    lobe_max = 1.12

    def fits(centre_zyx: npt.NDArray[np.float64], radius: float) -> bool:
        """Whether every voxel centre within the (lobulated) radius + 1 mm is lung."""
        reach = lobe_max * radius + 1.0
        lo_i = np.ceil(centre_zyx - reach / spacing).astype(int)
        hi_i = np.floor(centre_zyx + reach / spacing).astype(int) + 1
        if (lo_i < 0).any() or (hi_i > np.asarray(shape)).any():
            return False
        zz, yy, xx = (
            ((np.arange(a, b) - c) * s)
            for a, b, c, s in zip(lo_i, hi_i, centre_zyx, spacing)
        )
        d2 = zz[:, None, None] ** 2 + yy[None, :, None] ** 2 + xx[None, None, :] ** 2
        sub = lung3[lo_i[0] : hi_i[0], lo_i[1] : hi_i[1], lo_i[2] : hi_i[2]]
        return bool(sub[d2 <= reach * reach].all())

    for n in order:
        diameter = float(diameters[n])
        centre: npt.NDArray[np.float64] | None = None
        while centre is None:
            radius = diameter / 2.0
            for _ in range(200):
                c = np.array(np.unravel_index(lung_idx[rng.integers(lung_idx.size)], shape), dtype=np.float64)
                c += rng.uniform(-0.5, 0.5, size=3)
                c_mm = c * spacing
                if any(
                    np.linalg.norm(c_mm - p) < lobe_max * (radius + pr) + 2.0 for p, pr in placed
                ):
                    continue
                if fits(c, radius):
                    centre = c
                    break
            if centre is None:
                if diameter * 0.8 < dmin:
                    break
                diameter *= 0.8
        if centre is None:
            continue
        radius = diameter / 2.0
        placed.append((centre * spacing, radius))
        kind = NODULE_KINDS[int(kinds[n])]
        paint_nodule(rng, hu, mask, centre, radius, kind, spacing, width)
        xyz = (
            origin[0] + centre[2] * spacing[2],
            origin[1] + centre[1] * spacing[1],
            origin[2] + centre[0] * spacing[0],
        )
        nodules.append(
            Nodule(
                centre_zyx=(float(centre[0]), float(centre[1]), float(centre[2])),
                centre_xyz_mm=(float(xyz[0]), float(xyz[1]), float(xyz[2])),
                diameter_mm=diameter,
                kind=kind,
            )
        )
    return nodules, mask


def paint_nodule(
    rng: np.random.Generator,
    hu: FloatArray,
    mask: BoolArray,
    centre: npt.NDArray[np.float64],
    radius: float,
    kind: NoduleKind,
    spacing: npt.NDArray[np.float64],
    width: float,
) -> None:
    """Blend one mildly lobulated nodule into ``hu`` and mark it in ``mask``.

    Lobulation: the surface radius varies by up to ~8% with direction (two
    random low-order angular harmonics). Partial volume: a one-voxel ramp
    (:func:`occupancy`). The label covers voxel centres inside the surface
    plus the voxel nearest the centre, so even a sub-voxel nodule is labelled.
    """
    reach = 1.12 * radius + width
    lo_i = np.maximum(np.ceil(centre - reach / spacing).astype(int), 0)
    hi_i = np.minimum(np.floor(centre + reach / spacing).astype(int) + 1, np.asarray(hu.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))
    dz = ((np.arange(lo_i[0], hi_i[0]) - centre[0]) * spacing[0])[:, None, None]
    dy = ((np.arange(lo_i[1], hi_i[1]) - centre[1]) * spacing[1])[None, :, None]
    dx = ((np.arange(lo_i[2], hi_i[2]) - centre[2]) * spacing[2])[None, None, :]
    dist = np.sqrt(dz**2 + dy**2 + dx**2)
    safe = np.maximum(dist, 1e-6)
    azimuth = np.arctan2(dy, dx)
    elevation = np.arcsin(np.clip(dz / safe, -1.0, 1.0))
    amp = {"solid": 0.08, "part-solid": 0.05, "ground-glass": 0.05}[kind]
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    lobe = 1.0 + amp * (np.cos(3 * azimuth + p1) * np.cos(elevation) + 0.5 * np.cos(2 * elevation + p2)) / 1.5
    r_eff = radius * lobe
    sub = hu[sl]
    if kind == "solid":
        occ = occupancy(dist, r_eff, width)
        sub += (SOLID_NODULE_HU + rng.uniform(-15, 15) - sub) * occ
    elif kind == "ground-glass":
        occ = occupancy(dist, r_eff, width)
        sub += (GROUND_GLASS_HU + rng.uniform(-60, 60) - sub) * occ
    else:
        occ = occupancy(dist, r_eff, width)
        sub += (PART_SOLID_HALO_HU + rng.uniform(-50, 50) - sub) * occ
        core = occupancy(dist, r_eff * rng.uniform(0.3, 0.55), width)
        sub += (PART_SOLID_CORE_HU + rng.uniform(-15, 15) - sub) * core
    inside = dist <= r_eff
    mask[sl] |= inside
    mask[tuple(int(round(c)) for c in centre)] = True
