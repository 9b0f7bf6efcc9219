"""Volumes and bundles for the model loader tests, all generated in seconds.

* :func:`volume_from_geometry` / :func:`sample_world` - a :class:`Volume` of any
  orientation whose voxels are a function of their patient (LPS) position, so the
  same object can be "scanned" axially, sagittally or obliquely.
* :func:`write_threshold_bundle` - a real MONAI bundle (the project's own
  ``inference.json`` layout) whose network is a 1x1x1 convolution that labels
  voxels brighter than 0 HU: its correct output is known for any volume.
* :func:`write_random_chest_bundle` - the chest segmentation bundle's layout and
  SegResNet with random weights (the trained one ships later), TorchScript included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from training.bundle import write_bundle
from training.labels import CHEST_LABELS, LabelSpec, label_by_name
from training.phantoms.ct_series import SeriesGeometry
from training.segmentation.export import bundle_metadata as segmentation_metadata
from training.segmentation import inference_config, network_def
from workers.volume import FrameRef, Volume

#: HU window of the threshold bundle: 0 HU scales to 0.5, the network's decision boundary.
THRESHOLD_WINDOW_HU = (-1000.0, 1000.0)
#: The single label of the threshold bundle (value 1).
THRESHOLD_LABEL = dataclasses.replace(label_by_name("bone"), value=1)


def centred_geometry(
    orientation: Sequence[float],
    *,
    shape: tuple[int, int, int] = (36, 44, 44),
    pixel_spacing: tuple[float, float] = (2.4, 2.4),
    slice_spacing: float = 3.0,
    centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> SeriesGeometry:
    """A (slices, rows, columns) grid with ImageOrientationPatient ``orientation`` centred on ``centre_mm``."""
    probe = SeriesGeometry(rows=shape[1], columns=shape[2], slices=shape[0], pixel_spacing=pixel_spacing,
                           slice_spacing=slice_spacing, slice_thickness=slice_spacing,
                           orientation=tuple(float(v) for v in orientation), origin=(0.0, 0.0, 0.0))  # type: ignore[arg-type]
    half = (
        probe.row_cosines * (shape[2] - 1) / 2 * pixel_spacing[1]
        + probe.column_cosines * (shape[1] - 1) / 2 * pixel_spacing[0]
        + probe.normal * (shape[0] - 1) / 2 * slice_spacing
    )
    origin = np.asarray(centre_mm, dtype=np.float64) - half
    return dataclasses.replace(probe, origin=tuple(float(v) for v in origin))


def oblique_orientation(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial plane turned about z, then tilted about x."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = rx @ rz
    return (*m[:, 0], *m[:, 1])


def volume_from_geometry(
    geometry: SeriesGeometry, array: npt.ArrayLike, *, modality: str = "CT", series_uid: str = "1.2.826.0.1.1"
) -> Volume:
    """The :class:`Volume` of a series with ``geometry`` and voxels ``array`` (slices, rows, columns)."""
    data = np.asarray(array, dtype=np.float32)
    assert geometry.origin is not None
    return Volume(
        array=data,
        spacing_mm=(float(geometry.slice_spacing), float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1])),
        origin_mm=tuple(float(v) for v in geometry.origin),  # type: ignore[arg-type]
        axes=np.stack([geometry.normal, geometry.column_cosines, geometry.row_cosines]),
        series_instance_uid=series_uid,
        study_instance_uid="1.2.826.0.1.2",
        frame_of_reference_uid="1.2.826.0.1.3",
        modality=modality,
        frames=tuple(FrameRef(f"{series_uid}.{k + 1}") for k in range(data.shape[0])),
        datasets=(),
    )


def world_grid(volume: Volume) -> npt.NDArray[np.float64]:
    """LPS position (mm) of every voxel: shape (slices, rows, columns, 3)."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), axis=-1)
    return volume.index_to_world(index.reshape(-1, 3)).reshape(*volume.shape, 3)


def sample_world(geometry: SeriesGeometry, hu: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.floating]],
                 **kwargs: str) -> Volume:
    """A volume whose voxel values are ``hu(world positions (..., 3))``."""
    empty = volume_from_geometry(geometry, np.zeros(geometry.shape, dtype=np.float32), **kwargs)
    return volume_from_geometry(geometry, hu(world_grid(empty)), **kwargs)


# An asymmetric object (an "L" of two boxes, LPS mm): flipped or transposed results cannot match it.
_BOXES = (((-30.0, -20.0, -15.0), (10.0, 0.0, 25.0)), ((-30.0, 0.0, -15.0), (-10.0, 30.0, 5.0)))


def inside_object(points: npt.NDArray[np.float64], grow_mm: float = 0.0) -> npt.NDArray[np.bool_]:
    """Whether LPS points lie in the L-shaped object grown (or, negative, shrunk) by ``grow_mm``."""
    result = np.zeros(points.shape[:-1], dtype=bool)
    for lo, hi in _BOXES:
        lo_a, hi_a = np.asarray(lo) - grow_mm, np.asarray(hi) + grow_mm
        result |= np.all((points >= lo_a) & (points <= hi_a), axis=-1)
    return result


def object_hu(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """1000 HU inside the object, -1000 HU outside: edges blur to 0 HU, the threshold bundle's boundary."""
    return np.where(inside_object(points), 1000.0, -1000.0).astype(np.float32)


def object_centroid_mm() -> npt.NDArray[np.float64]:
    """Volume-weighted centre of the L-shaped object (its boxes do not overlap)."""
    volumes = [float(np.prod(np.asarray(hi) - np.asarray(lo))) for lo, hi in _BOXES]
    centres = [(np.asarray(lo) + np.asarray(hi)) / 2 for lo, hi in _BOXES]
    return np.average(np.asarray(centres), axis=0, weights=volumes)


def _write_conv_bundle(out: Path, network: torch.nn.Conv3d, network_def: dict[str, object],
                       spacing_mm: Sequence[float], roi_size: Sequence[int]) -> Path:
    """A bundle in the project's layout (training.segmentation's configs) around a fixed convolution."""
    return write_bundle(
        out,
        network=network,
        network_def=network_def,
        inference_config=inference_config(spacing_mm=spacing_mm, window_hu=THRESHOLD_WINDOW_HU, roi_size=roi_size),
        metadata=segmentation_metadata(labels=[THRESHOLD_LABEL], spacing_mm=spacing_mm, window_hu=THRESHOLD_WINDOW_HU,
                                       patch_size=roi_size, evaluation={}, training={}),
        example_input=torch.rand(1, 1, 8, 8, 8),
    )


def write_threshold_bundle(out: Path, *, spacing_mm: Sequence[float], roi_size: Sequence[int]) -> Path:
    """A bundle whose network labels (value 1) voxels above 0 HU."""
    network = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():  # logits (0.5 - x, x - 0.5): channel 1 wins where the scaled intensity x > 0.5
        network.weight.copy_(torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([0.5, -0.5]))
    network_def = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    return _write_conv_bundle(out, network, network_def, spacing_mm, roi_size)


def write_edge_bundle(out: Path, *, spacing_mm: Sequence[float], roi_size: Sequence[int]) -> Path:
    """A bundle whose network labels voxels where intensity rises along its first axis (RAS x: to the patient's right).

    In a correctly oriented (RAS) input that is the object's face towards the
    patient's left (its largest LPS x); an input that reached the network flipped
    or transposed would have other faces labelled.
    """
    network = torch.nn.Conv3d(1, 2, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    with torch.no_grad():  # channel 1: x[i + 1] - x[i - 1] - 0.5; channel 0: 0
        network.weight.zero_()
        network.bias.zero_()
        network.weight[1, 0, :, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])
        network.bias[1] = -0.5
    network_def = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": [3, 1, 1],
                   "padding": [1, 0, 0]}
    return _write_conv_bundle(out, network, network_def, spacing_mm, roi_size)


#: LPS x of the object's faces towards the patient's left (box A; the part of box B that A does not cover).
OBJECT_LEFT_FACES_X = (10.0, -10.0)
#: LPS x of the object's faces towards the patient's right.
OBJECT_RIGHT_FACE_X = -30.0


#: Grid of the random chest bundle: coarse, so a whole phantom is a handful of windows.
CHEST_SPACING_MM = (7.3, 7.3, 10.0)
CHEST_WINDOW_HU = (-1000.0, 500.0)
CHEST_ROI = (32, 32, 16)


def write_random_chest_bundle(out: Path, labels: Sequence[LabelSpec] = CHEST_LABELS, seed: int = 0) -> Path:
    """The chest segmentation bundle's layout (configs, model.pt, model.ts) with a randomly initialised SegResNet."""
    from monai.bundle import ConfigParser

    net_def = network_def(out_channels=len(labels) + 1, init_filters=8)
    torch.manual_seed(seed)
    network = ConfigParser({"net": net_def}).get_parsed_content("net")
    return write_bundle(
        out,
        network=network,
        network_def=net_def,
        inference_config=inference_config(spacing_mm=CHEST_SPACING_MM, window_hu=CHEST_WINDOW_HU, roi_size=CHEST_ROI),
        metadata=segmentation_metadata(labels=labels, spacing_mm=CHEST_SPACING_MM, window_hu=CHEST_WINDOW_HU,
                                       patch_size=CHEST_ROI, evaluation={}, training={}),
        example_input=torch.rand(1, 1, *CHEST_ROI),
    )


def as_sagittal(volume: Volume) -> Volume:
    """The same voxels of an axial ``volume`` as a sagittal series (IOP 0\\1\\0\\0\\0\\-1), without interpolation."""
    n0, _, n2 = volume.shape
    axes = np.asarray(volume.axes)
    return dataclasses.replace(
        volume,
        array=np.ascontiguousarray(volume.array[::-1, :, ::-1].transpose(2, 0, 1)),
        spacing_mm=(volume.spacing_mm[2], volume.spacing_mm[0], volume.spacing_mm[1]),
        origin_mm=tuple(float(v) for v in volume.index_to_world((n0 - 1, 0, n2 - 1))),
        axes=np.stack([-axes[2], -axes[0], axes[1]]),
        frames=tuple(FrameRef(f"{volume.series_instance_uid}.s{k + 1}") for k in range(n2)),
    )


def reslice(volume: Volume, geometry: SeriesGeometry, outside_hu: float = -1024.0) -> Volume:
    """``volume`` resampled (trilinear) at the voxel positions of ``geometry``: another "acquisition" of it."""
    from scipy import ndimage

    target = volume_from_geometry(geometry, np.zeros(geometry.shape, dtype=np.float32),
                                  series_uid=volume.series_instance_uid + ".9")
    index = volume.world_to_index(world_grid(target).reshape(-1, 3)).T
    values = ndimage.map_coordinates(volume.array, index, order=1, mode="constant", cval=outside_hu)
    return dataclasses.replace(target, array=values.reshape(geometry.shape).astype(np.float32))
