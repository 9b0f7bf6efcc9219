"""One colour Secondary Capture image of one source slice: what the explanation and the result overlay series share.

Why: every viewer shows a Secondary Capture, so both burned-in series (a classifier's
explanation map, :mod:`workers.outputs.explanation`; a segmentation's or detector's
outlines, :mod:`workers.outputs.overlay`) are single-frame RGB SC images of chosen source
slices. Each keeps the slice's place: same frame of reference, position and orientation
(PATIENT coordinate system, Patient Orientation letters), pixel spacing, body part, and a
Source Image Sequence naming the slice (and frame) it was derived from; it says that
text is burned in. Instance UIDs derive from the configured one (a retried job makes
the same UIDs) or from one new base per series.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from workers.outputs.common import SeriesIdentity, copy_body_part, slice_sources
from workers.volume import Volume

__all__ = ["instance_uid", "patient_orientation", "slice_capture"]


def instance_uid(series: SeriesIdentity, base: str, number: int) -> str:
    """SOP Instance UID of image ``number``: derived from the configured one (reproducible) or ``base``."""
    return str(generate_uid(entropy_srcs=[str(series.sop_instance_uid or base), "overlay", str(number)]))


def patient_orientation(volume: Volume) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction) letters of the slices, e.g. ("L", "P") for axial."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(direction: npt.NDArray[np.float64]) -> str:
        axis = int(np.argmax(np.abs(direction)))
        return letters[axis][0] if direction[axis] > 0 else letters[axis][1]

    return letter(volume.axes[2]), letter(volume.axes[1])


def slice_capture(volume: Volume, slice_index: int, rgb: npt.NDArray[np.uint8], series: SeriesIdentity, *,
                  series_uid: str, sop_instance_uid: str, number: int, description: str, comments: str,
                  derivation: str, equipment: Sequence[hd.ContributingEquipment] | None = None) -> hd.sc.SCImage:
    """``rgb`` (the slice's columns, at least its rows: text bands may be added above and below it; x 3) as an SC
    image of slice ``slice_index`` of ``volume``, with the slice's pixel spacing.

    ``description`` is the Series Description (64 characters at most); ``comments`` and
    ``derivation`` go to Image Comments and Derivation Description; ``equipment``: the Contributing
    Equipment Sequence (the model that made the image).
    """
    rows, columns = volume.shape[1:]
    if rgb.ndim != 3 or rgb.shape[1:] != (columns, 3) or rgb.shape[0] < rows or rgb.dtype != np.uint8:
        raise ValueError(f"overlay of series {volume.series_instance_uid} slice {slice_index}: image "
                         f"{rgb.shape} {rgb.dtype} is not the slice's {volume.shape[1:]} (or taller) in uint8 RGB")
    dataset, frame_number = slice_sources(volume)[slice_index]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=dataset,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=number,
        manufacturer=series.manufacturer,
        pixel_spacing=(float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
        patient_orientation=patient_orientation(volume),
        series_description=description[:64],
        manufacturer_model_name=series.manufacturer_model_name,
        software_versions=series.software_versions,
        contributing_equipment=equipment,
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = comments[:10240]
    sc.DerivationDescription = derivation[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = dataset.SOPClassUID
    reference.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    if frame_number is not None:
        reference.ReferencedFrameNumber = frame_number
    sc.SourceImageSequence = [reference]
    copy_body_part(sc, dataset)
    return sc
