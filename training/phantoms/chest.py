"""A realistic synthetic chest CT phantom with a label map and lung nodules.

Why: the detection and segmentation networks need training and test data with
exact ground truth and without patient data. This generator draws a different
"patient" per seed - body habitus, fat and muscle layers, lung shape, heart,
great vessels, airways, spine, ribs, sternum, scapulae, a branching pulmonary
vessel tree, and 0..N lung nodules of three radiological kinds - and returns
the CT volume in Hounsfield units, a label map and the nodule list in patient
(DICOM LPS) coordinates. The dataset writers in :mod:`training.data` turn it
into the formats people already use (Decathlon/nnU-Net NIfTI, MONAI detection
box lists, DICOM CT + SEG).

Conventions (the same as :mod:`training.phantoms.ct_series`):

* arrays are indexed ``(z, y, x)``; spacings are given in the same order;
* world coordinates are DICOM patient coordinates (LPS, mm): array x runs to
  patient +X (left), array y to +Y (posterior), array z to +Z (superior), so
  slice 0 is the most inferior one and the series is a plain axial series with
  ImageOrientationPatient ``1\\0\\0\\0\\1\\0``;
* ``origin_xyz_mm`` is the world position of the *centre* of voxel (0, 0, 0).

Anatomy is defined relative to the field of view (the reconstruction field of
view and the scan range are fitted to the patient's chest, as on a scanner), so
any grid gives a complete chest; nodule sizes are in millimetres. Everything is
vectorised numpy/scipy: the default 96x160x160 volume takes well under a second.
The shapes it is drawn with are in :mod:`training.phantoms.geometry`, the
nodules (placement and painting) in :mod:`training.phantoms.nodules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from training.labels import label_names
from training.phantoms.geometry import Grid, Vec3, capsule, occupancy, random_perpendicular, smooth_field, smoothstep
from training.phantoms.nodules import NODULE_KINDS, Nodule, NoduleKind, place_nodules

__all__ = [
    "BACKGROUND",
    "BODY",
    "BONE",
    "HEART",
    "LABELS",
    "LUNG",
    "NODULE",
    "NODULE_KINDS",
    "ChestPhantom",
    "Nodule",
    "NoduleKind",
    "PhantomConfig",
    "generate_chest_phantom",
]

#: Label map values (see :mod:`training.labels` for their SNOMED CT codes).
LABELS: dict[int, str] = label_names()
BACKGROUND, BODY, LUNG, HEART, BONE, NODULE = 0, 1, 2, 3, 4, 5
assert LABELS == {0: "background", 1: "body", 2: "lung", 3: "heart", 4: "bone", 5: "nodule"}



# Nominal tissue values (HU); per-patient jitter is added where realistic.
AIR_HU = -1000.0
SKIN_HU = 30.0
FAT_HU = -100.0
MUSCLE_HU = 50.0
MEDIASTINAL_FAT_HU = -85.0
LUNG_HU = -850.0
VESSEL_HU = 40.0
BLOOD_HU = 38.0
MYOCARDIUM_HU = 52.0
LIVER_HU = 60.0
ABDOMEN_HU = 35.0
CORTICAL_HU = 700.0
CANCELLOUS_HU = 300.0
DISC_HU = 90.0
CSF_HU = 15.0
CARTILAGE_HU = 120.0
# Range a 12-bit CT scanner reports; the volume is clipped to it.
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True)
class PhantomConfig:
    """Acquisition grid and content of a generated chest phantom.

    ``shape`` and ``spacing_mm`` are (z, y, x); the defaults give a ~352 mm
    in-plane field of view and a 240 mm scan range, like a low-resolution
    chest CT. ``nodule_count`` and ``nodule_diameter_mm`` are inclusive
    (min, max) ranges: the count is uniform over the range (so 0 nodules
    happens), diameters are log-uniform. ``nodule_kind_weights`` are the
    relative frequencies of solid, part-solid and ground-glass nodules.
    ``vessel_count`` pulmonary vessel trees (split between the lungs) branch
    ``vessel_generations`` times. ``slice_thickness_mm`` (default: the slice
    spacing) and ``blur_sigma_mm`` set the partial-volume smoothing;
    ``noise_sd_hu`` is the standard deviation of the (in-plane correlated)
    scanner noise.

    The anatomy scales with the field of view, but tissue layers (fat, muscle,
    bone) are in mm, so keep the in-plane field of view near 300-400 mm: for
    small test grids raise the spacing (e.g. 64 columns at 5.5 mm) rather than
    shrinking the patient.
    """

    shape: tuple[int, int, int] = (96, 160, 160)
    spacing_mm: tuple[float, float, float] = (2.5, 2.2, 2.2)
    noise_sd_hu: float = 20.0
    nodule_count: tuple[int, int] = (0, 4)
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0)
    nodule_kind_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)
    vessel_count: int = 10
    vessel_generations: int = 6
    slice_thickness_mm: float | None = None
    blur_sigma_mm: float = 0.9

    def __post_init__(self) -> None:
        """Reject grids and ranges the generator cannot honour."""
        if len(self.shape) != 3 or min(self.shape) < 4:
            raise ValueError(f"shape must be 3 sizes >= 4, got {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be 3 positive values, got {self.spacing_mm}")
        lo, hi = self.nodule_count
        if not 0 <= lo <= hi:
            raise ValueError(f"nodule_count must be 0 <= min <= max, got {self.nodule_count}")
        dlo, dhi = self.nodule_diameter_mm
        if not 0 < dlo <= dhi:
            raise ValueError(f"nodule_diameter_mm must be 0 < min <= max, got {self.nodule_diameter_mm}")
        if len(self.nodule_kind_weights) != 3 or min(self.nodule_kind_weights) < 0 or sum(
            self.nodule_kind_weights
        ) <= 0:
            raise ValueError("nodule_kind_weights must be 3 non-negative weights, not all 0")
        if self.vessel_count < 0 or self.vessel_generations < 0:
            raise ValueError("vessel_count and vessel_generations must be >= 0")
        if self.noise_sd_hu < 0 or self.blur_sigma_mm < 0:
            raise ValueError("noise_sd_hu and blur_sigma_mm must be >= 0")
        if self.slice_thickness_mm is not None and self.slice_thickness_mm <= 0:
            raise ValueError("slice_thickness_mm must be positive")

    def with_spacing(self, spacing_mm: Sequence[float]) -> PhantomConfig:
        """This configuration on another grid (``spacing_mm`` z, y, x) covering about the same field of view.

        Why: a thin-slice chest CT (the grid nodules are read on) is the same
        patient on a finer grid; the shape follows so the anatomy keeps its size.
        """
        if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be 3 positive values, got {tuple(spacing_mm)}")
        shape = tuple(max(4, round(fov / s)) for fov, s in zip(self.field_of_view_mm, spacing_mm))
        return replace(self, shape=shape, spacing_mm=tuple(float(s) for s in spacing_mm))

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        """Extent of the volume (z, y, x) in mm: size times spacing."""
        return (
            self.shape[0] * self.spacing_mm[0],
            self.shape[1] * self.spacing_mm[1],
            self.shape[2] * self.spacing_mm[2],
        )

    @property
    def effective_slice_thickness_mm(self) -> float:
        """``slice_thickness_mm``, defaulting to the slice spacing."""
        return float(self.slice_thickness_mm or self.spacing_mm[0])


@dataclass
class ChestPhantom:
    """A generated chest CT: HU volume, label map, geometry and nodules.

    ``volume_hu`` (int16) and ``labels`` (uint8, values of :data:`LABELS`) are
    (z, y, x) arrays on the grid described by ``spacing_mm`` (z, y, x) and
    ``origin_xyz_mm`` (LPS world position of the centre of voxel (0, 0, 0));
    the grid axes are aligned with the patient axes (axial series).
    """

    volume_hu: npt.NDArray[np.int16]
    labels: npt.NDArray[np.uint8]
    spacing_mm: Vec3
    origin_xyz_mm: Vec3
    nodules: list[Nodule] = field(default_factory=list)
    seed: int = 0
    slice_thickness_mm: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (z, y, x)."""
        z, y, x = self.volume_hu.shape
        return (int(z), int(y), int(x))

    def voxel_to_world(self, zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """World LPS ``(x, y, z)`` mm of voxel index/indices ``(z, y, x)`` (shape (3,) or (N, 3))."""
        v = np.asarray(zyx, dtype=np.float64)
        spacing = np.asarray(self.spacing_mm, dtype=np.float64)[::-1]
        return np.asarray(self.origin_xyz_mm, dtype=np.float64) + v[..., ::-1] * spacing

    def world_to_voxel(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Fractional voxel index/indices ``(z, y, x)`` of world LPS point(s) ``(x, y, z)`` mm."""
        p = np.asarray(xyz, dtype=np.float64)
        spacing = np.asarray(self.spacing_mm, dtype=np.float64)[::-1]
        return ((p - np.asarray(self.origin_xyz_mm, dtype=np.float64)) / spacing)[..., ::-1]


# ---------------------------------------------------------------------- generator


def generate_chest_phantom(config: PhantomConfig = PhantomConfig(), seed: int = 0) -> ChestPhantom:
    """Draw one synthetic chest CT (HU volume, label map, nodules) from ``seed``.

    The volume contains air (-1000 HU) around an elliptical body with skin,
    a subcutaneous fat layer (~-100 HU) and chest-wall / paraspinal muscle
    (~50 HU); two lungs (~-850 HU, slightly denser posteriorly) with smooth
    irregular boundaries that taper to the apices and sit on domed
    hemidiaphragms (the right one higher) with liver and abdomen below;
    branching pulmonary vessel trees (~40 HU, labelled lung as in real lung
    masks); a heart (myocardium ~52 HU, blood ~38 HU, epicardial fat) in the
    lower anterior mediastinum, aorta, SVC, oesophagus, trachea and main
    bronchi; vertebrae (cortex ~700 HU, cancellous ~300 HU, discs, posterior
    elements), ribs that slope down anteriorly (so each slice shows arcs of
    several ribs) with costal cartilage, sternum and scapulae; and
    ``config.nodule_count`` lung nodules placed fully inside the lungs without
    overlapping (solid ~+30 HU; part-solid: ~+20 HU core in a ~-500 HU halo;
    ground-glass ~-550 HU), all labelled :data:`NODULE`.

    The sharp scene is blurred with a Gaussian PSF (partial volume; wider in z
    for thick slices) and in-plane correlated Gaussian noise with sd
    ``config.noise_sd_hu`` is added; HU are clipped to -1024..3071.

    Reproducible: independent streams spawned from ``np.random.default_rng(seed)``
    drive the anatomy, vessels, nodules and noise, so e.g. changing the noise
    level does not move the nodules. When a drawn nodule does not fit, its
    diameter is reduced (not below the configured minimum) and, failing that,
    it is dropped, so small grids may carry fewer nodules than drawn.
    """
    rng_anat, rng_vessel, rng_nod, rng_noise = np.random.default_rng(seed).spawn(4)
    nz, ny, nx = (int(n) for n in config.shape)
    sz, sy, sx = (float(s) for s in config.spacing_mm)
    origin: Vec3 = (
        round(-(nx - 1) / 2.0 * sx, 4),
        round(-(ny - 1) / 2.0 * sy, 4),
        round(-(nz - 1) / 2.0 * sz, 4),
    )
    fov_x, fov_y = nx * sx, ny * sy
    shape = (nz, ny, nx)

    # ---- patient habitus (body-centred frame: X left+, Y posterior+, Z up from slice 0)
    A = fov_x * rng_anat.uniform(0.40, 0.45)  # body half-width
    B = min(A * rng_anat.uniform(0.64, 0.74), fov_y * 0.44)  # body half AP depth
    bcx = fov_x * rng_anat.uniform(-0.01, 0.01)
    bcy = fov_y * rng_anat.uniform(-0.01, 0.03)
    grid = Grid(
        z=np.arange(nz) * sz,
        y=origin[1] + np.arange(ny) * sy - bcy,
        x=origin[0] + np.arange(nx) * sx - bcx,
        spacing=(sz, sy, sx),
    )
    Z1 = grid.z
    Y2 = grid.y[:, None]
    X2 = grid.x[None, :]
    Lz = max((nz - 1) * sz, 1e-6)
    z_lo = Lz * rng_anat.uniform(0.02, 0.07)  # lowest lung point (costophrenic recess)
    z_apex = Lz * rng_anat.uniform(0.93, 0.985)
    Lh = z_apex - z_lo

    harmonics = [(k, rng_anat.uniform(0.0, 0.02), rng_anat.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    f0 = rng_anat.uniform(6.0, 20.0)  # subcutaneous fat (mm)
    m0 = rng_anat.uniform(8.0, 13.0)  # chest-wall muscle (mm)
    m_post = rng_anat.uniform(32.0, 42.0)  # extra paraspinal muscle
    m_ant = rng_anat.uniform(5.0, 10.0)  # extra pectoral muscle

    def pert(th: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Relative body-outline radius at angle ``th`` (low-order harmonics: habitus)."""
        th = np.asarray(th, dtype=np.float64)
        return 1.0 + sum(a * np.cos(k * th + p) for k, a, p in harmonics)

    def fat_t(th: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Subcutaneous fat thickness (mm) at angle ``th``: thickest laterally."""
        return f0 * (1.0 + 0.35 * (1.0 - np.abs(np.sin(th))))

    def mus_t(th: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Muscle thickness (mm) at angle ``th``: paraspinal posteriorly, pectoral anteriorly."""
        s = np.sin(np.asarray(th, dtype=np.float64))
        return m0 + m_post * np.clip(s, 0, None) ** 2.5 + m_ant * np.clip(-s, 0, None) ** 2

    # Body: a perturbed super-ellipse; theta is constant along rays from the
    # centre, so the body (and every layer) boundary along a ray is r / rho.
    u, v = X2 / A, Y2 / B
    rho = (np.abs(u) ** 2.3 + np.abs(v) ** 2.3) ** (1 / 2.3)
    theta = np.arctan2(v, u)
    rho_e = rho / pert(theta)
    r = np.hypot(X2, Y2)
    depth = np.where(rho_e > 1e-9, r / np.maximum(rho_e, 1e-9) - r, 1e9)  # mm inside the skin
    fat2, mus2 = fat_t(theta), mus_t(theta)
    cdepth = depth - fat2 - mus2  # mm inside the thoracic cavity (negative: chest wall)
    body2 = depth >= 0
    cavity2 = cdepth > 0

    # The rib cage narrows towards the thoracic inlet - more laterally and
    # anteriorly than posteriorly - while the shoulders keep the body wide.
    h1 = (Z1 - z_lo) / Lh  # normalised lung height per slice
    cage = smoothstep((h1 - 0.35) / 0.65)  # 0 up to mid-chest, 1 at the apex
    s_th = np.sin(theta)
    k2 = 0.28 * np.cos(theta) ** 2 + np.where(s_th < 0, 0.2, 0.04) * s_th**2
    rc2 = cdepth + r  # cavity boundary radius along each ray (mm)
    cdepth3 = (rc2[None] * (1.0 - cage[:, None, None] * k2[None]) - r[None]).astype(np.float32)
    cavity3 = cdepth3 > 0

    def edge(th: float) -> float:
        """Distance (mm) from the body centre to the thoracic cavity wall along axis angle ``th``."""
        return float(pert(th) * (A if abs(math.cos(th)) > 0.5 else B) - fat_t(th) - mus_t(th))

    ac_left, ac_right = edge(0.0), edge(math.pi)  # cavity half-widths to patient left / right
    y_ca, y_cp = -edge(-math.pi / 2), edge(math.pi / 2)  # anterior / posterior cavity edge (Y)
    bc = (y_cp - y_ca) / 2.0
    y_mid = (y_cp + y_ca) / 2.0
    ac = (ac_left + ac_right) / 2.0

    hu2 = np.full((ny, nx), AIR_HU, dtype=np.float32)
    fat_field = 8.0 * smooth_field(rng_anat, (grid.y, grid.x), 40.0)
    hu2[body2] = SKIN_HU
    hu2[body2 & (depth >= 2.0)] = (FAT_HU + fat_field)[body2 & (depth >= 2.0)]
    hu2[body2 & (depth >= fat2)] = MUSCLE_HU
    hu2[cavity2] = MEDIASTINAL_FAT_HU

    # ---- spine (2D cross-section, discs vary along z)
    rvx = rng_anat.uniform(15.0, 18.0)
    rvy = rvx * rng_anat.uniform(0.85, 0.95)
    yv = y_cp - 0.25 * rvy
    ev = np.hypot(X2 / rvx, (Y2 - yv) / rvy)
    vert2 = ev <= 1.0
    vert_cortex2 = vert2 & (ev > 1.0 - 2.5 / rvx)
    rc = 7.5
    yc = yv + rvy + rc + 1.0
    dcan = np.hypot(X2, Y2 - yc)
    canal2 = dcan < rc
    post2 = (dcan >= rc) & (dcan < rc + 4.5) & (Y2 > yv + 0.6 * rvy)  # pedicles + laminae
    post2 |= (np.abs(X2) < 3.5) & (Y2 > yc + rc) & (Y2 < yc + rc + 28.0)  # spinous process
    post2 |= (np.abs(X2) >= rc) & (np.abs(X2) < rc + 20.0) & (np.abs(Y2 - yc) < 4.5)  # transverse
    post2 &= body2 & (depth > fat2 + 1.0) & ~vert2
    period = Lh / rng_anat.uniform(8.5, 9.5)
    phase = rng_anat.uniform(0, period)
    disc1 = ((Z1 - phase) % period) < 0.2 * period

    # ---- ribs (slope down anteriorly, follow the cage), costal cartilage, sternum, scapulae
    phi = np.arctan2(np.abs(X2), Y2)  # 0 = posterior midline, pi = anterior midline
    left2 = np.broadcast_to(X2 >= 0, (ny, nx))
    phi0 = 0.1 * np.pi
    band3 = (cdepth3 >= -9.5) & (cdepth3 <= -2.0)
    band3 &= (body2 & (phi >= phi0) & (phi <= 0.95 * np.pi))[None]
    n_ribs = 12
    rib_space = Lh * rng_anat.uniform(0.085, 0.1)
    rib_drop = Lh * rng_anat.uniform(0.18, 0.24)
    z_rib_top = z_apex + rng_anat.uniform(-5.0, 5.0)
    side_shift = rng_anat.uniform(-3.0, 3.0, size=2)
    phi_end = rng_anat.uniform(0.76, 0.84, size=2) * np.pi
    bz, by, bx = np.nonzero(band3)
    bphi = phi[by, bx]
    bside = left2[by, bx].astype(np.intp)
    bdr = (cdepth3[bz, by, bx] + 5.75) / 3.75  # radial offset in rib half-thicknesses
    zk = z_rib_top - rib_space * np.arange(n_ribs)[:, None] + side_shift[bside][None, :]
    zc = zk - rib_drop * ((bphi - phi0) / (np.pi - phi0))[None, :] ** 1.3  # (ribs, voxels)
    e2 = np.min(((Z1[bz][None, :] - zc) / 5.5) ** 2, axis=0) + bdr**2  # rib half-height 5.5 mm
    in_rib = e2 <= 1.0
    is_bone_part = bphi <= phi_end[bside]
    rib3 = np.zeros(shape, dtype=bool)
    rib_cortex3 = np.zeros(shape, dtype=bool)
    cart3 = np.zeros(shape, dtype=bool)
    sel = in_rib & is_bone_part
    rib3[bz[sel], by[sel], bx[sel]] = True
    sel &= e2 > 0.45
    rib_cortex3[bz[sel], by[sel], bx[sel]] = True
    sel = in_rib & ~is_bone_part
    cart3[bz[sel], by[sel], bx[sel]] = True

    ys = (y_ca * (1.0 - 0.2 * cage) - 5.0)[:, None, None]
    es3 = np.hypot(X2 / 15.0, (Y2 - ys) / 6.0)
    scap3 = (cdepth3 >= -14.0) & (cdepth3 <= -11.0) & (h1 >= 0.55)[:, None, None]
    scap3 &= (body2 & (depth > fat2 + 0.5) & (phi >= 0.2 * np.pi) & (phi <= 0.42 * np.pi))[None]
    scap3 &= (Z1 <= z_apex)[:, None, None]

    # ---- diaphragm (height above slice 0 of the lung base at each (x, y))
    h_dome = Lh * rng_anat.uniform(0.2, 0.26)
    right_extra = rng_anat.uniform(8.0, 18.0)

    def dome(xd: float, height: float) -> npt.NDArray[np.float64]:
        """Height map (mm) of a hemidiaphragm dome centred at X = ``xd``."""
        q = 1.0 - ((X2 - xd) / (0.75 * ac)) ** 2 - ((Y2 - (y_mid - 0.05 * bc)) / (1.1 * bc)) ** 2
        return height * np.clip(q, 0.0, 1.0) ** 0.6

    z_d2 = z_lo + np.maximum(dome(-0.4 * ac_right, h_dome + right_extra), dome(0.4 * ac_left, h_dome))
    z_d2 = z_d2 + 4.0 * smooth_field(rng_anat, (grid.y, grid.x), 60.0)

    # ---- heart (rotated ellipsoid resting on the diaphragm)
    ha, hb, hc = 0.42 * ac, 0.5 * bc, 0.28 * Lh
    psi = math.radians(rng_anat.uniform(25.0, 40.0))
    xh, yh = 0.18 * ac_left, y_mid - 0.3 * bc
    ih = grid.index((xh, yh, z_lo))
    zfloor = float(z_d2[ih[1], ih[2]]) if ih is not None else z_lo + h_dome
    zh = zfloor + 0.45 * hc
    z_heart_top = zh + hc

    # ---- great vessels and airways (tubes: points in X, Y, Z mm)
    xd_ao, yd_ao = rvx + 12.0, yv - 0.2 * rvy
    xa_ao, ya_ao = -0.08 * ac, y_mid - 0.25 * bc
    z_arch = z_lo + 0.72 * Lh
    arch = [
        (xa_ao + (xd_ao - xa_ao) * t, ya_ao + (yd_ao - ya_ao) * t, z_arch + 18.0 * math.sin(math.pi * t))
        for t in np.linspace(0.0, 1.0, 7)
    ]
    yt = yv - rvy - 24.0
    z_car = z_lo + 0.66 * Lh
    z_hilum = z_lo + 0.55 * Lh
    soft_tubes: list[tuple[list[Vec3], float]] = [
        ([(xd_ao, yd_ao, -30.0), (xd_ao, yd_ao, z_arch)], 11.0),  # descending aorta
        ([(xa_ao, ya_ao, zh), (xa_ao, ya_ao, z_arch)], 14.0),  # ascending aorta
        (arch, 12.5),
        ([(xa_ao - 24.0, ya_ao + 6.0, zh + 0.5 * hc), (xa_ao - 24.0, ya_ao + 6.0, Lz + 30.0)], 9.0),  # SVC
        ([(4.0, yv - rvy - 8.0, -30.0), (4.0, yv - rvy - 8.0, Lz + 30.0)], 7.0),  # oesophagus
    ]
    airways: list[tuple[list[Vec3], float]] = [
        ([(0.0, yt, Lz + 30.0), (0.0, yt, z_car)], 9.0),
        ([(0.0, yt, z_car), (-0.3 * ac_right, yt + 10.0, z_car - 0.07 * Lh)], 6.5),
        ([(0.0, yt, z_car), (0.3 * ac_left, yt + 12.0, z_car - 0.09 * Lh)], 6.0),
    ]

    # ---- assemble the 3D scene, soft structures first
    hu = np.broadcast_to(hu2, shape).copy()
    girdle3 = cavity2[None] & ~cavity3  # shoulder girdle above the narrowing cage
    hu[girdle3] = np.broadcast_to(np.where(np.abs(np.cos(theta)) > 0.8, -90.0, MUSCLE_HU), shape)[girdle3]
    zz3 = Z1[:, None, None]
    abd3 = cavity3 & (zz3 < z_d2[None] + 4.0)
    organ2 = np.where(X2 < 0.12 * ac_left, LIVER_HU, ABDOMEN_HU).astype(np.float32)
    hu[abd3] = np.where(zz3 >= z_d2[None], np.float32(45.0), organ2[None])[abd3]
    if rng_anat.random() < 0.6:  # gastric air-fluid level under the left dome
        gc = np.array([0.45 * ac_left, y_mid - 0.1 * bc, z_lo + h_dome - 22.0])
        box = grid.box(gc - [30, 25, 14], gc + [30, 25, 14])
        if box is not None:
            z, y, x = grid.sub(box)
            inside = ((x - gc[0]) / 30) ** 2 + ((y - gc[1]) / 25) ** 2 + ((z - gc[2]) / 14) ** 2 <= 1
            inside &= abd3[box] & (z < z_d2[None, box[1], box[2]] - 2.0)
            fill = np.broadcast_to(np.where(z > gc[2], AIR_HU, 20.0), inside.shape)
            hu[box][inside] = fill[inside]

    exclude3 = np.zeros(shape, dtype=bool)  # keeps lungs away from mediastinal structures
    for points, radius in soft_tubes:
        for p0, p1 in zip(points[:-1], points[1:]):
            cap = capsule(grid, p0, p1, radius + 4.0)
            if cap is None:
                continue
            sl, dist, _ = cap
            sub = hu[sl]
            m = (dist <= radius) & cavity3[sl]
            sub[m] = 40.0
            exclude3[sl] |= dist <= radius + 3.0
    for points, radius in airways:
        for p0, p1 in zip(points[:-1], points[1:]):
            cap = capsule(grid, p0, p1, radius + 5.0)
            if cap is None:
                continue
            sl, dist, _ = cap
            sub = hu[sl]
            m = cavity3[sl]
            sub[m & (dist <= radius + 2.0)] = 40.0  # cartilage/mucosa wall
            sub[m & (dist <= radius)] = AIR_HU
            exclude3[sl] |= dist <= radius + 4.0

    heart3 = np.zeros(shape, dtype=bool)
    reach = max(ha, hb) + 8.0
    hbox = grid.box((xh - reach, yh - reach, zh - hc - 8.0), (xh + reach, yh + reach, zh + hc + 8.0))
    if hbox is not None:
        z, y, x = grid.sub(hbox)
        c, s = math.cos(psi), math.sin(psi)
        pp = (x - xh) * c + (y - yh) * s  # long axis: towards patient left-anterior
        qq = -(x - xh) * s + (y - yh) * c
        qh = np.sqrt((pp / ha) ** 2 + (qq / hb) ** 2 + ((z - zh) / hc) ** 2)
        above = z > z_d2[None, hbox[1], hbox[2]] + 4.0
        inside_cav = cavity3[hbox]
        heart = (qh <= 1.0) & above & inside_cav
        wall = heart & ((qh > 1.0 - 9.0 / ((ha + hb + hc) / 3.0)) | (np.abs(qq) < 4.5))
        fat = (qh > 1.0) & (qh <= 1.0 + 5.0 / min(ha, hb)) & above & inside_cav
        sub = hu[hbox]
        sub[fat] = -90.0
        blood = np.broadcast_to(np.where(pp > 0, BLOOD_HU + 3.0, BLOOD_HU), heart.shape)
        sub[heart] = blood[heart]  # the two ventricles differ slightly
        sub[wall] = MYOCARDIUM_HU
        heart3[hbox] = heart
        exclude3[hbox] |= (qh <= 1.0 + 7.0 / min(ha, hb)) & above

    # ---- lungs
    lung_noise = smooth_field(rng_anat, (grid.z, grid.y, grid.x), 45.0)
    # Each lung: an ellipse filling its half of the cage (so the rib cage forms
    # its lateral wall), narrowing and moving posteriorly with the cage.
    csx = (1.0 - 0.28 * cage)[:, None, None]
    yl = (y_mid + 0.12 * bc + 0.08 * bc * cage)[:, None, None]
    ay = (1.2 * bc * (1.0 - 0.12 * cage))[:, None, None]
    q_right = np.hypot((X2 + 0.52 * ac_right * csx) / (0.62 * ac_right * csx), (Y2 - yl) / ay)
    q_left = np.hypot((X2 - 0.52 * ac_left * csx) / (0.62 * ac_left * csx), (Y2 - yl) / ay)
    q3 = np.minimum(q_right, q_left).astype(np.float32)
    taper = np.where(h1 <= 0.55, 1.0, np.sqrt(np.clip(1.0 - ((h1 - 0.55) / 0.45) ** 2, 0.0, 1.0)))
    taper = taper.astype(np.float32)[:, None, None]
    slab_w = 9.0 + 16.0 * smoothstep((Z1 - z_heart_top) / (0.2 * Lh))  # upper mediastinum wider
    lung3 = q3 < taper * (1.0 + 0.06 * lung_noise)
    lung3 &= cdepth3 > 1.5
    lung3 &= zz3 > z_d2[None] + 4.0 + 2.0 * lung_noise
    lung3 &= np.abs(X2)[None] >= slab_w[:, None, None]
    spine_keepout = (np.hypot(X2 / (rvx + 4.0), (Y2 - yv) / (rvy + 4.0)) <= 1.0) | (post2 | canal2)
    lung3 &= ~spine_keepout[None]
    lung3 &= ~exclude3
    lung_hu = LUNG_HU + 25.0 * ((Y2 - y_mid) / bc)[None] + 10.0 * lung_noise
    hu[lung3] = lung_hu[lung3]
    medfat3 = cavity3 & ~lung3 & (hu == np.float32(MEDIASTINAL_FAT_HU))

    # ---- pulmonary vessel trees (roots in the hila, clipped to lung + mediastinal fat)
    vessel_occ = np.zeros(shape, dtype=np.float32)
    width = float(np.mean(config.spacing_mm))
    stack: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float, int]] = []
    if config.vessel_count > 0:
        lz, ly, lx = np.nonzero(lung3)
        lX, lY, lZ = grid.x[lx], grid.y[ly], grid.z[lz]
        for i in range(config.vessel_count):
            side = -1 if i % 2 == 0 else 1
            on_side = np.flatnonzero(np.sign(lX) == side)
            if on_side.size == 0:
                continue
            # Root: the lung point nearest a hilar reference at a random height,
            # fed by a trunk from the mediastinum (a pulmonary artery branch).
            ref = (side * 30.0, y_mid + rng_vessel.normal(0, 0.2) * bc, z_lo + rng_vessel.uniform(0.3, 0.75) * Lh)
            score = np.hypot(np.hypot(lX[on_side] - ref[0], lY[on_side] - ref[1]), lZ[on_side] - ref[2])
            k = on_side[int(np.argmin(score))]
            root = np.array([lX[k], lY[k], lZ[k]])
            radius0 = rng_vessel.uniform(3.5, 5.0)
            trunk = np.array([side * 12.0, y_mid + 0.05 * bc, z_hilum])
            to_root = root - trunk
            n = max(float(np.linalg.norm(to_root)), 1e-6)
            stack.append((trunk, to_root / n, n, radius0 * 1.2, config.vessel_generations))  # no children
            length = 0.2 * (ac_right if side < 0 else ac_left) * rng_vessel.uniform(0.8, 1.2)
            for _attempt in range(8):  # prefer a direction into the lung
                d = np.array([side * rng_vessel.uniform(0.2, 1.0), rng_vessel.normal(0, 0.8), rng_vessel.normal(0, 1.0)])
                d /= np.linalg.norm(d)
                ic = grid.index(root + d * length)
                if ic is not None and lung3[ic]:
                    break
            stack.append((root, d, length, radius0, 0))
    while stack:
        start, d, length, radius, gen = stack.pop()
        end = start + d * length
        cap = capsule(grid, start, end, radius + width)
        if cap is not None:
            sl, dist, t = cap
            occ = occupancy(dist, radius * (1.0 - 0.15 * t), width)
            np.maximum(vessel_occ[sl], occ, out=vessel_occ[sl])
        if gen >= config.vessel_generations or radius < 0.6:
            continue
        ie = grid.index(end)
        if ie is None or not lung3[ie]:
            continue
        perp = random_perpendicular(rng_vessel, d)  # the two children diverge in one plane
        for sign in (1.0, -1.0):
            child_len = length * rng_vessel.uniform(0.65, 0.85)
            for attempt in range(4):  # prefer a direction that stays in the lung
                if attempt:
                    perp = random_perpendicular(rng_vessel, d)
                ang = math.radians(rng_vessel.uniform(20.0, 45.0))
                nd = math.cos(ang) * d + sign * math.sin(ang) * perp
                nd /= np.linalg.norm(nd)
                ic = grid.index(end + nd * child_len)
                if ic is not None and lung3[ic]:
                    stack.append((end, nd, child_len, radius * 0.78, gen + 1))
                    break
    vessel_region = (lung3 | medfat3) & (vessel_occ > 0)
    hu[vessel_region] += (VESSEL_HU - hu[vessel_region]) * vessel_occ[vessel_region]

    # ---- bones (last among the anatomy: they overwrite muscle and fat)
    vert3 = vert2[None] & ~disc1[:, None, None]
    hu[np.broadcast_to(vert2[None] & disc1[:, None, None], shape)] = DISC_HU
    hu[np.broadcast_to(vert3, shape)] = CANCELLOUS_HU
    hu[np.broadcast_to(vert_cortex2[None] & ~disc1[:, None, None], shape)] = CORTICAL_HU
    hu[np.broadcast_to(canal2, shape)] = CSF_HU
    hu[np.broadcast_to(post2, shape)] = 0.9 * CORTICAL_HU
    hu[cart3] = CARTILAGE_HU
    hu[rib3] = CANCELLOUS_HU - 50.0
    hu[rib_cortex3] = CORTICAL_HU + 50.0
    stern3 = (es3 <= 1.0) & body2[None] & ((Z1 >= zh) & (Z1 <= z_lo + 0.85 * Lh))[:, None, None]
    hu[stern3] = CANCELLOUS_HU - 50.0
    hu[stern3 & (es3 > 0.55)] = CORTICAL_HU - 50.0
    hu[scap3] = 0.8 * CORTICAL_HU
    bone3 = vert3 | post2[None] | rib3 | stern3 | scap3

    # ---- nodules
    nodules, nodule3 = place_nodules(rng_nod, grid, lung3, hu, origin, count_range=config.nodule_count,
                                     diameter_mm=config.nodule_diameter_mm, kind_weights=config.nodule_kind_weights)

    # ---- labels
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.broadcast_to(body2, shape)] = BODY
    labels[lung3] = LUNG
    labels[heart3] = HEART
    labels[np.broadcast_to(bone3, shape)] = BONE
    labels[nodule3] = NODULE

    # ---- partial volume blur + correlated scanner noise
    thick = config.effective_slice_thickness_mm
    sigma = (
        math.hypot(config.blur_sigma_mm, 0.42 * max(thick - sz, 0.0)) / sz,
        config.blur_sigma_mm / sy,
        config.blur_sigma_mm / sx,
    )
    if max(sigma) > 0:
        ndimage.gaussian_filter(hu, sigma, output=hu, mode="nearest", truncate=3.0)
    if config.noise_sd_hu > 0:
        noise = rng_noise.standard_normal(shape, dtype=np.float32)
        ns = 0.6
        ndimage.gaussian_filter(noise, (0.0, ns, ns), output=noise, truncate=3.0)
        k = ndimage.gaussian_filter1d(np.eye(1, 25, 12).ravel(), ns, truncate=3.0)
        noise *= np.float32(config.noise_sd_hu / float(np.sum(k**2)))
        hu += noise
    np.clip(hu, _HU_MIN, _HU_MAX, out=hu)
    volume = np.rint(hu).astype(np.int16)

    return ChestPhantom(
        volume_hu=volume,
        labels=labels,
        spacing_mm=(sz, sy, sx),
        origin_xyz_mm=origin,
        nodules=nodules,
        seed=seed,
        slice_thickness_mm=thick,
    )
