"""A classifier's explanation map as DICOM: a Parametric Map (PMAP) and a colour Secondary Capture overlay (SC).

Why two objects: the Parametric Map is the faithful one - float values 0..1 on the
source slices' geometry (same frame of reference, same positions), which a viewer can
fuse with the CT in any colour map - but many PACS viewers do not display Parametric
Maps; the Secondary Capture series is what every viewer shows: the source slices in a
lung window with the map burned in as a colour overlay. Destinations ask for either or
both (``outputs`` PMAP / SC); neither is sent unless asked for.

* :func:`build_parametric_map`: one multi-frame Parametric Map, one frame per source
  slice in slice order, plane positions and orientation from the volume's geometry (so
  it works for single- and multi-frame sources), the source instances as its source
  images (highdicom writes them as Source Image Sequence and Referenced Series), one
  real-world value mapping "explanation, 0..1, no unit" naming the method.
* :func:`build_overlay_sc`: one single-frame RGB Secondary Capture per slice where the
  map reaches :data:`OVERLAY_SLICE_THRESHOLD` of its peak (at most
  :data:`MAX_OVERLAY_SLICES`, around the peak slice: a 300-slice CT does not get 300
  colour images), each referencing its source image (Source Image Sequence) and carrying
  its position (PATIENT coordinate system), with "NOT FOR DIAGNOSIS" burned in.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.sr.codedict import codes

from dicom_node.contracts import AlgorithmInfo
from workers.models.base import ClassificationResult
from workers.outputs.common import SeriesIdentity, code_string, contributing_equipment, copy_body_part
from workers.outputs.secondary_capture import instance_uid, slice_capture
from workers.volume import Volume

__all__ = ["MAX_OVERLAY_SLICES", "OVERLAY_SLICE_THRESHOLD", "build_overlay_sc", "build_parametric_map",
           "overlay_rgb", "overlay_slices"]

logger = logging.getLogger(__name__)

#: A slice gets an overlay image when the map reaches this fraction of its peak on it.
OVERLAY_SLICE_THRESHOLD = 0.5
#: At most this many overlay images per series (nearest the peak slice).
MAX_OVERLAY_SLICES = 32
#: Lung window of the overlay images (HU).
OVERLAY_WINDOW_HU = (-1350.0, 150.0)
#: Map values below this are not coloured.
_OVERLAY_FLOOR = 0.2
_OVERLAY_ALPHA = 0.55
#: "NOT FOR DIAGNOSIS" as a 5x7 bitmap font (rows of 5 bits per character).
_FONT = {
    "N": (0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11), "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11), "D": (0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    " ": (0, 0, 0, 0, 0, 0, 0),
}
_LABEL = "NOT FOR DIAGNOSIS"


def _explanation(result: ClassificationResult, volume: Volume) -> npt.NDArray[np.float32]:
    if result.explanation is None:
        raise ValueError(f"classification of series {volume.series_instance_uid}: the result has no explanation map")
    if result.explanation.shape != volume.shape:
        raise ValueError(f"explanation map shape {result.explanation.shape} differs from series "
                         f"{volume.series_instance_uid}'s {volume.shape}")
    return result.explanation


def _method(result: ClassificationResult) -> str:
    return result.explanation_method or "explanation"


def build_parametric_map(volume: Volume, result: ClassificationResult, algorithm: AlgorithmInfo,
                         series: SeriesIdentity) -> hd.pm.ParametricMap:
    """The explanation map of ``result`` as a float Parametric Map on ``volume``'s slices (see the module docstring).

    Raises ValueError when the result has no map or it is not on the volume's grid.
    """
    values = _explanation(result, volume)
    winner = result.winner
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=code_string(_method(result)),
        lut_explanation=f"{_method(result)} of '{winner.name}' (0..1)"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    positions = [hd.PlanePositionSequence(coordinate_system=hd.CoordinateSystemNames.PATIENT,
                                          image_position=tuple(float(v) for v in volume.index_to_world((k, 0.0, 0.0))))
                 for k in range(volume.shape[0])]
    orientation = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_orientation=tuple(float(v) for v in (*volume.axes[2], *volume.axes[1])),
    )
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=(float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
        slice_thickness=float(volume.datasets[0].get("SliceThickness") or volume.spacing_mm[0]),
        spacing_between_slices=float(volume.spacing_mm[0]),
    )
    pmap = hd.pm.ParametricMap(
        source_images=list(volume.datasets),
        pixel_array=np.ascontiguousarray(values, dtype=np.float32),
        series_instance_uid=series.series_uid(),
        series_number=series.series_number,
        sop_instance_uid=series.sop_uid(),
        instance_number=series.instance_number,
        manufacturer=series.manufacturer,
        manufacturer_model_name=series.manufacturer_model_name,
        software_versions=series.software_versions,
        device_serial_number=series.device_serial_number,
        contributing_equipment=contributing_equipment(algorithm, series),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label=code_string(algorithm.name),
        content_description=f"{algorithm.name} {algorithm.version}: {_method(result)}"[:64],
        pixel_measures=measures,
        plane_orientation=orientation,
        plane_positions=positions,
        series_description=series.series_description,
    )
    copy_body_part(pmap, volume.datasets[0])
    logger.debug("parametric map %s of series %s: %d frames", pmap.SOPInstanceUID, volume.series_instance_uid,
                 volume.shape[0])
    return pmap


def overlay_slices(explanation: npt.NDArray[np.float32]) -> list[int]:
    """The slices that get an overlay image: map >= threshold x peak there, at most the nearest to the peak slice."""
    per_slice = explanation.reshape(explanation.shape[0], -1).max(axis=1)
    peak = float(per_slice.max(initial=0.0))
    if peak <= 0.0:
        return []
    chosen = [int(k) for k in np.flatnonzero(per_slice >= OVERLAY_SLICE_THRESHOLD * peak)]
    top = int(np.argmax(per_slice))
    chosen.sort(key=lambda k: (abs(k - top), k))
    return sorted(chosen[:MAX_OVERLAY_SLICES])


def _colour(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A blue-green-yellow-red ramp for values 0..1, ``(..., 3)`` in 0..1."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.asarray([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    position = v * (len(stops) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(stops) - 2)
    fraction = position - low
    return (stops[low[..., 0]] * (1 - fraction) + stops[low[..., 0] + 1] * fraction).astype(np.float32)


def _burn_label(rgb: npt.NDArray[np.uint8]) -> None:
    """Burn "NOT FOR DIAGNOSIS" into the top left corner (white on the image, scaled to its width)."""
    rows, columns = rgb.shape[:2]
    scale = max(1, columns // 256)
    x = 2 * scale
    for char in _LABEL:
        glyph = _FONT[char]
        for r, bits in enumerate(glyph):
            for c in range(5):
                if bits & (1 << (4 - c)):
                    top, left = 2 * scale + r * scale, x + c * scale
                    if top + scale <= rows and left + scale <= columns:
                        rgb[top:top + scale, left:left + scale] = 255
        x += 6 * scale


def overlay_rgb(hu: npt.NDArray[np.float32], values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """One slice in the lung window, the map coloured over it where it is >= 0.2, label burned in; uint8 RGB."""
    low, high = OVERLAY_WINDOW_HU
    grey = np.clip((hu - low) / (high - low), 0.0, 1.0)[..., None].repeat(3, axis=-1)
    alpha = np.where(values >= _OVERLAY_FLOOR, _OVERLAY_ALPHA, 0.0)[..., None]
    rgb = np.rint(255.0 * ((1 - alpha) * grey + alpha * _colour(values))).astype(np.uint8)
    _burn_label(rgb)
    return rgb


def build_overlay_sc(volume: Volume, result: ClassificationResult, algorithm: AlgorithmInfo,
                     series: SeriesIdentity) -> list[hd.sc.SCImage]:
    """The explanation map burned into colour Secondary Captures of the slices where it matters (module docstring).

    One series (``series``); instance numbers 1.. in slice order. Empty when the map is all zero.
    """
    values = _explanation(result, volume)
    series_uid = series.series_uid()
    base = str(hd.UID())
    equipment = contributing_equipment(algorithm, series)
    images = []
    for number, k in enumerate(overlay_slices(values), start=1):
        images.append(slice_capture(
            volume, k, overlay_rgb(volume.array[k], values[k]), series, series_uid=str(series_uid),
            sop_instance_uid=instance_uid(series, base, number), number=number,
            description=series.series_description,
            comments=f"{algorithm.name} {algorithm.version}: {_method(result)} of '{result.winner.name}' "
                     f"({result.winner_probability:.0%}); NOT FOR DIAGNOSIS",
            derivation=f"{_method(result)} map over the source slice, lung window", equipment=equipment))
    logger.debug("%d overlay images of series %s", len(images), volume.series_instance_uid)
    return images

