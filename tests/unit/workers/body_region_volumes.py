"""Volumes for the body-region survey tests and ``bench/body_regions.py``, all offline.

* :func:`chest_volume` - a chest phantom (:mod:`training.phantoms.chest`) written as a DICOM
  series and read back with :func:`workers.volume.load_series`, as the workers see it;
* :func:`head_volume` - the real InVesalius head CT (Debian ``invesalius-examples``) the same
  way, in its own unusual orientation (rows run anterior);
* :func:`reoriented` - the same voxels acquired in another orientation or order (feet-first,
  sagittal, coronal): the survey must answer the same;
* :func:`cropped`, :func:`padded_with_air` - other fields of view of the same patient;
* :func:`legs_volume`, :func:`head_neck_chest_volume` - crude synthetic anatomy for the regions
  the phantoms lack (extremities, neck): they show the heuristics run, not that they are right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from training.data.dicom_pair import write_dicom_case
from training.data.invesalius import INVESALIUS_EXAMPLE, read_invesalius_project
from training.phantoms.chest import ChestPhantom, PhantomConfig, generate_chest_phantom
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, write_series
from workers.volume import FrameRef, Volume, load_series

#: Axes (per index axis, LPS) of a plain head-first axial series: slices superior, rows posterior, columns left.
AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def volume_from_array(array: npt.ArrayLike, spacing_mm: Sequence[float], *, axes: npt.ArrayLike = AXIAL,
              origin_mm: Sequence[float] = (0.0, 0.0, 0.0), modality: str = "CT") -> Volume:
    """A :class:`Volume` straight from voxels (no DICOM), for orientations and sizes a series cannot easily have."""
    voxels = np.ascontiguousarray(array, dtype=np.float32)
    return Volume(array=voxels, spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
                  origin_mm=(float(origin_mm[0]), float(origin_mm[1]), float(origin_mm[2])),
                  axes=np.asarray(axes, dtype=np.float64), series_instance_uid="1.2.3.4",
                  study_instance_uid="1.2.3", frame_of_reference_uid="1.2.3.5", modality=modality,
                  frames=tuple(FrameRef(f"1.2.3.6.{k}") for k in range(voxels.shape[0])), datasets=())


def reoriented(volume: Volume, order: Sequence[int], flip: Sequence[bool] = (False, False, False)) -> Volume:
    """The same patient voxels indexed differently: new axis k is old axis ``order[k]``, reversed where ``flip[k]``.

    Geometry follows (axes, spacing, origin), so every voxel keeps its patient position:
    ``order=(0, 1, 2), flip=(True, False, False)`` is the feet-first copy of a head-first
    axial series, ``order=(2, 0, 1)`` a sagittal acquisition of it.
    """
    array = np.transpose(volume.array, order)
    index0 = np.zeros(3)
    for k, (axis, reverse) in enumerate(zip(order, flip)):
        if reverse:
            array = np.flip(array, axis=k)
            index0[axis] = volume.array.shape[axis] - 1
    axes = np.array([volume.axes[axis] * (-1.0 if reverse else 1.0) for axis, reverse in zip(order, flip)])
    spacing = [volume.spacing_mm[axis] for axis in order]
    return volume_from_array(array, spacing, axes=axes, origin_mm=volume.index_to_world(index0),
                             modality=volume.modality)


def cropped(volume: Volume, region: tuple[slice, slice, slice]) -> Volume:
    """A smaller field of view (positive-step slices per axis) of the same patient."""
    starts = [s.indices(n)[0] for s, n in zip(region, volume.array.shape)]
    return volume_from_array(volume.array[region], volume.spacing_mm, axes=volume.axes,
                     origin_mm=volume.index_to_world(starts), modality=volume.modality)


def padded_with_air(volume: Volume, cells: int, *, levels: int = 0) -> Volume:
    """The same patient in a field of view ``cells`` voxels larger on each in-plane side (and ``levels`` slices
    more at each end), filled with air (-1000 HU)."""
    array = np.pad(volume.array, ((levels, levels), (cells, cells), (cells, cells)), constant_values=-1000.0)
    return volume_from_array(array, volume.spacing_mm, axes=volume.axes,
                     origin_mm=volume.index_to_world((-levels, -cells, -cells)), modality=volume.modality)


def with_modality(volume: Volume, modality: str) -> Volume:
    """``volume`` as if another modality had made it."""
    return volume_from_array(volume.array, volume.spacing_mm, axes=volume.axes, origin_mm=volume.origin_mm,
                     modality=modality)


def chest_phantom(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], seed: int) -> ChestPhantom:
    """A chest phantom with a few nodules and the default anatomy, on the given grid."""
    return generate_chest_phantom(PhantomConfig(shape=shape, spacing_mm=spacing_mm, nodule_count=(2, 4),
                                                nodule_diameter_mm=(6.0, 20.0)), seed=seed)


def chest_volume(phantom: ChestPhantom, out_dir: Path, seed: int) -> Volume:
    """``phantom`` as a DICOM series in ``out_dir``, loaded the way the workers load series."""
    series_dir, _ = write_dicom_case(phantom, out_dir, seed=seed)
    return load_series(sorted(series_dir.glob("*.dcm")))


def head_volume(out_dir: Path) -> Volume:
    """The InVesalius head CT as a DICOM series (rows run anterior, slices superior), loaded back."""
    project = read_invesalius_project(INVESALIUS_EXAMPLE)
    sz, sy, sx = project.spacing_zyx_mm
    nz, ny, nx = project.volume.shape
    geometry = SeriesGeometry(rows=ny, columns=nx, slices=nz, pixel_spacing=(sy, sx), slice_spacing=sz,
                              slice_thickness=sz, orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    datasets = ct_series_datasets(project.volume, geometry, seed=3, patient_id="INVESALIUS-0051",
                                  study_description="Head CT (InVesalius example)")
    return load_series(write_series(datasets, out_dir))


def legs_volume(slices: int = 60, spacing_mm: float = 5.0, size: int = 96, pixel_mm: float = 4.5) -> Volume:
    """Two thighs (muscle, a fat rim, a femur with marrow) in air, axial, with no trunk: extremities."""
    plane = _thighs(size, size, pixel_mm, pixel_mm)
    rng = np.random.default_rng(5)
    array = np.repeat(plane[None], slices, axis=0) + rng.normal(0.0, 15.0, (slices, size, size))
    return volume_from_array(array, (spacing_mm, pixel_mm, pixel_mm))


def _thighs(rows: int, columns: int, sy: float, sx: float) -> npt.NDArray[np.float64]:
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    y, x = (yy - (rows - 1) / 2) * sy, (xx - (columns - 1) / 2) * sx
    plane = np.full((rows, columns), -1000.0)
    for side in (-1.0, 1.0):
        r = np.hypot(x - side * 95.0, y)
        plane[r < 80.0] = -100.0  # subcutaneous fat
        plane[r < 68.0] = 50.0  # muscle
        plane[r < 15.0] = 700.0  # cortical bone
        plane[r < 9.0] = -50.0  # marrow
    return plane


def _upper_body(head: Volume, phantom: ChestPhantom, neck_mm: float) -> list[npt.NDArray[np.float32]]:
    """The phantom's chest, a neck (a soft-tissue cylinder with a vertebra and an airway) and the real
    head CT resampled on the phantom's grid, inferior to superior."""
    sz, sy, sx = phantom.spacing_mm
    nz, ny, nx = phantom.volume_hu.shape
    # The head on the phantom's grid: head axes are (superior, anterior, right), the phantom's
    # (superior, posterior, left); flip the in-plane axes and resample to the phantom's spacing.
    hu = np.asarray(head.array)[:, ::-1, ::-1]
    small = ndimage.zoom(hu, (head.spacing_mm[0] / sz, head.spacing_mm[1] / sy, head.spacing_mm[2] / sx), order=1)
    head_block = np.full((small.shape[0], ny, nx), -1000.0, dtype=np.float32)
    oy, ox = (ny - small.shape[1]) // 2, (nx - small.shape[2]) // 2
    h, w = min(ny, small.shape[1]), min(nx, small.shape[2])
    head_block[:, max(oy, 0):max(oy, 0) + h, max(ox, 0):max(ox, 0) + w] = \
        small[:, max(-oy, 0):max(-oy, 0) + h, max(-ox, 0):max(-ox, 0) + w]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    y, x = (yy - ny / 2) * sy, (xx - nx / 2) * sx
    neck_plane = np.full((ny, nx), -1000.0)
    neck_plane[np.hypot(y, x) < 60.0] = 40.0
    neck_plane[np.hypot(y - 25.0, x) < 12.0] = 600.0  # vertebra
    neck_plane[np.hypot(y + 20.0, x) < 8.0] = -1000.0  # airway
    neck = np.repeat(neck_plane[None], int(round(neck_mm / sz)), axis=0).astype(np.float32)
    return [phantom.volume_hu.astype(np.float32), neck, head_block]


def head_neck_chest_volume(head: Volume, phantom: ChestPhantom, neck_mm: float = 80.0) -> Volume:
    """A crude upper body on the phantom's grid: its chest, a neck and the real head CT, axial head-first."""
    return volume_from_array(np.concatenate(_upper_body(head, phantom, neck_mm), axis=0), phantom.spacing_mm,
                             origin_mm=phantom.origin_xyz_mm)


def whole_body_volume(head: Volume, phantom: ChestPhantom) -> Volume:
    """Crude whole body on the phantom's grid, feet to head: thighs (200 mm), a pelvis (the phantom's lowest
    slice, an abdomen, with two lateral bone plates for iliac wings and femoral heads, 120 mm), an abdomen
    (that slice with a few gas bubbles, 160 mm), then :func:`head_neck_chest_volume`'s upper body."""
    sz, sy, sx = phantom.spacing_mm
    nz, ny, nx = phantom.volume_hu.shape
    belly = phantom.volume_hu[0].astype(np.float32)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    y, x = (yy - (ny - 1) / 2) * sy, (xx - (nx - 1) / 2) * sx
    abdomen = np.repeat(belly[None], int(round(160.0 / sz)), axis=0)
    for k, (cy, cx) in enumerate(((-40.0, 30.0), (-20.0, -50.0), (10.0, 60.0))):
        level = (k + 1) * abdomen.shape[0] // 4
        abdomen[level, np.hypot(y - cy, x - cx) < 12.0] = -1000.0  # bowel gas
    wide = float(np.abs(x[belly > -500]).max())
    pelvis = np.repeat(belly[None], int(round(120.0 / sz)), axis=0)
    for side in (-1.0, 1.0):
        plate = (np.abs(x - side * 0.6 * wide) < 0.12 * wide) & (np.abs(y) < 45.0)
        pelvis[:, plate] = 500.0
    thighs = np.repeat(_thighs(ny, nx, sy, sx)[None], int(round(200.0 / sz)), axis=0).astype(np.float32)
    array = np.concatenate([thighs, pelvis, abdomen, *_upper_body(head, phantom, 80.0)], axis=0)
    return volume_from_array(array, phantom.spacing_mm)
