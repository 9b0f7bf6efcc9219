"""Serve the lung nodule detector bundle (CenterNet, :mod:`workers.models.detection_network`) as a detection Model.

Why: a detector's postprocessing (heatmap peaks, box sizes, suppression) is not a
chain of MONAI transforms, so a detection bundle cannot be run from its
``inference.json`` alone: the decoding lives in
:func:`~workers.models.detection_network.detect`, which is also what measured the
bundle's FROC (:mod:`training.detection`). Serving through that same function keeps
serving and evaluation identical.

``detect`` takes an axial series: a ``(z, y, x)`` HU array whose axes run along
patient +z, +y, +x (LPS), and reports LPS millimetres. :func:`axial_lps_grid`
turns any :class:`~workers.volume.Volume` into that: exactly (flips and axis
swaps, no interpolation) for axial, coronal and sagittal series in any slice
order, by trilinear resampling at the detector's own spacing for oblique ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.contracts import Detection, SegmentLabel
from dicom_node.model_catalog import BundleError, label_mapping, metadata_labels, read_bundle_json
from workers.models.base import DetectionResult, ModelKind
from workers.models.detection_network import DetectorConfig, detect, load_detector
from workers.models.loading import BundleModel, open_bundle
from workers.volume import Volume

__all__ = ["AxialGrid", "NoduleDetectorModel", "axial_lps_grid"]

logger = logging.getLogger(__name__)

#: HU of voxels outside an oblique series after resampling (air).
_OUTSIDE_HU = -1024.0
#: How far (cosine) an axis may be from a patient axis and still count as aligned with it.
_ALIGNED_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class AxialGrid:
    """A volume as :func:`~workers.models.detection_network.detect` takes it.

    ``array``: HU, ``(z, y, x)`` with indices increasing along patient +z, +y, +x (for an
    axis-aligned series a view of the volume's array, flipped and transposed, not a copy:
    read it, do not write it);
    ``spacing_zyx_mm``; ``origin_xyz_mm``: LPS position of the centre of voxel (0, 0, 0).
    """

    array: npt.NDArray[np.float32]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]


def _patient_axes(axes: npt.NDArray[np.float64]) -> tuple[list[int], list[float]] | None:
    """(patient axis, sign) of each array axis if ``axes`` is a signed permutation of LPS, else None."""
    which = [int(np.argmax(np.abs(axis))) for axis in axes]
    if sorted(which) != [0, 1, 2]:
        return None
    signs = [float(np.sign(axes[a][which[a]])) for a in range(3)]
    for a in range(3):
        if abs(abs(axes[a][which[a]]) - 1.0) > _ALIGNED_TOLERANCE:
            return None
    return which, signs


def axial_lps_grid(volume: Volume, resample_spacing_zyx_mm: tuple[float, float, float]) -> AxialGrid:
    """``volume`` on an LPS-aligned ``(z, y, x)`` grid.

    Axis-aligned volumes (axial, coronal, sagittal, any slice order) are only
    transposed and flipped, so every voxel keeps its value and position; the grid's
    array is then a view of the volume's (:func:`~workers.models.detection_network.to_network_grid`
    makes the one copy the network needs, so a 1,000-slice CT is not held three times). Oblique
    volumes are resampled (trilinear) at ``resample_spacing_zyx_mm`` onto the grid
    that covers them; voxels outside the series are air.
    """
    aligned = _patient_axes(np.asarray(volume.axes, dtype=np.float64))
    if aligned is not None:
        which, signs = aligned
        array = volume.array
        corner = np.zeros(3)
        for a in range(3):
            if signs[a] < 0:
                array = np.flip(array, axis=a)
                corner[a] = volume.shape[a] - 1
        # output axis j (0: z, 1: y, 2: x) is the array axis along patient axis 2 - j
        order = [which.index(2 - j) for j in range(3)]
        origin = volume.index_to_world(corner)
        return AxialGrid(
            array=np.asarray(array.transpose(order), dtype=np.float32),
            spacing_zyx_mm=tuple(float(volume.spacing_mm[a]) for a in order),  # type: ignore[arg-type]
            origin_xyz_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        )
    return _resample_oblique(volume, resample_spacing_zyx_mm)


def _resample_oblique(volume: Volume, spacing_zyx: tuple[float, float, float]) -> AxialGrid:
    from scipy import ndimage

    shape = np.asarray(volume.shape)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = volume.index_to_world(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    spacing_xyz = np.asarray(spacing_zyx, dtype=np.float64)[::-1]
    size_xyz = np.floor((hi - lo) / spacing_xyz).astype(int) + 1
    # target index (z, y, x) -> LPS world -> source index (slice, row, column)
    to_world = np.zeros((3, 3))
    for j in range(3):
        to_world[2 - j, j] = spacing_xyz[2 - j]
    to_source = np.linalg.inv(volume.affine[:3, :3])
    matrix = to_source @ to_world
    offset = to_source @ (lo - volume.affine[:3, 3])
    array = ndimage.affine_transform(
        np.asarray(volume.array, dtype=np.float32),
        matrix,
        offset=offset,
        output_shape=tuple(int(n) for n in size_xyz[::-1]),
        order=1,
        mode="constant",
        cval=_OUTSIDE_HU,
    )
    logger.debug("series %s is oblique: resampled to %s at %s mm", volume.series_instance_uid, array.shape, spacing_zyx)
    return AxialGrid(
        array=array.astype(np.float32, copy=False),
        spacing_zyx_mm=(float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2])),
        origin_xyz_mm=(float(lo[0]), float(lo[1]), float(lo[2])),
    )


class NoduleDetectorModel(BundleModel):
    """A CenterNet detection bundle (written by :mod:`training.detection`), loaded once.

    ``bundle_dir``: the bundle. ``device``: see :func:`~workers.models.loading.resolve_device`
    (AMP on CUDA, as :func:`~workers.models.detection_network.predict_heads` does). ``labels``:
    ``{class index: SegmentLabel}`` (default: the metadata's ``dicom_node.labels``
    matched to the bundle's classes by name). ``overrides``: :class:`~workers.models.detection_network.DetectorConfig`
    fields to change, e.g. ``{"score_threshold": 0.25}``. ``prefer_torchscript``:
    run ``models/model.ts`` instead of ``network_def`` + ``models/model.pt``.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        labels: Mapping[int, SegmentLabel] | None = None,
        overrides: Mapping[str, Any] | None = None,
        prefer_torchscript: bool = False,
        model_id: str | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        started = time.perf_counter()
        bundle = open_bundle(bundle_dir, kind=None, device=device, model_id=model_id, name=name, version=version,
                             need_config=False)
        source = self._keep(bundle)
        inference = read_bundle_json(self.bundle_dir, "inference.json")
        kind = (bundle.meta.get("dicom_node") or {}).get("kind")
        if kind != "detection" or "detection" not in inference:
            raise BundleError(
                f"{source}: not a CenterNet detection bundle (dicom_node.kind {kind!r}, "
                f"inference.json {'has' if 'detection' in inference else 'lacks'} a 'detection' section)"
            )
        network, config = load_detector(self.bundle_dir, device=self.device, prefer_torchscript=prefer_torchscript)
        if overrides:
            known = {f.name for f in dataclasses.fields(DetectorConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise BundleError(f"{source}: overrides {unknown} are not DetectorConfig fields ({sorted(known)})")
            config = dataclasses.replace(config, **dict(overrides))
        self._network = network
        self._config = config
        classes = [str(c) for c in (inference.get("postprocessing") or {}).get("classes", [])]
        self._mapping = dict(labels) if labels is not None else _class_labels(bundle.meta, classes, source)
        self._source = source
        logger.info(
            "loaded %s as model %s on %s in %.1f s",
            source, self._algorithm.model_id, self.device, time.perf_counter() - started,
        )

    @property
    def kind(self) -> ModelKind:
        return "detection"

    def predict(self, volume: Volume) -> DetectionResult:
        """Nodules in ``volume``: boxes in LPS mm with scores, best first."""
        grid = axial_lps_grid(volume, tuple(reversed(self._config.spacing_mm)))  # type: ignore[arg-type]
        found = detect(
            self._network, grid.array, grid.spacing_zyx_mm, grid.origin_xyz_mm, config=self._config, device=self.device
        )
        detections = []
        for item in found:
            label = self._mapping.get(int(item.label))
            if label is None:
                logger.debug("%s: class %d has no label; detection dropped", self._source, item.label)
                continue
            size = item.size_xyz_mm or (item.diameter_mm,) * 3
            detections.append(
                Detection(
                    centre_mm=tuple(float(v) for v in item.centre_xyz_mm),  # type: ignore[arg-type]
                    size_mm=tuple(float(v) for v in size),  # type: ignore[arg-type]
                    diameter_mm=float(item.diameter_mm),
                    score=min(max(float(item.score), 0.0), 1.0),
                    label=label,
                )
            )
        detections.sort(key=lambda d: d.score, reverse=True)
        return DetectionResult(detections=tuple(detections))


def _class_labels(meta: Mapping[str, Any], classes: list[str], source: str) -> dict[int, SegmentLabel]:
    """``{class index: label}``: each of the bundle's classes matched by name to a metadata label."""
    entries = metadata_labels(meta, source)
    if entries is None:
        raise BundleError(f"{source}: metadata has no dicom_node.labels; give the labels in config/models.yaml")
    by_name = {entry.name.lower(): entry for entry in entries}
    if not classes:
        raise BundleError(f"{source}: inference.json postprocessing lists no 'classes'")
    mapped = []
    for index, name in enumerate(classes):
        entry = by_name.get(name.lower())
        if entry is None:
            raise BundleError(
                f"{source}: class {index} {name!r} has no dicom_node label (labels: {sorted(by_name)})"
            )
        mapped.append(entry.model_copy(update={"bundle_value": index}))
    return label_mapping(mapped, source)
