"""Key Object Selection document: the source images a model's findings are on, flagged for the radiologist.

Why: a PACS shows a Key Object Selection (KOS) document as "key images" of the study, even
where it shows neither SEG nor SR, and IHE AI Results asks the evidence creator to flag the
images it found something on. One document per job lists, in slice order:

* detections: the slice through each detection's centre;
* segmentations: for each lesion-like segment (nodule, tumour, mass, ...; see
  :func:`workers.outputs.preview.is_lesion`), each connected lesion's slice of largest area;
  organ segments alone flag nothing;
* classifications: nothing (a whole-series finding has no key image).

No key image, no document. The title is (113000, DCM, "Of Interest") from CID 7010; the Key
Object Description names the model, its version and what was flagged; the model is the device
observer (its registry Device UID) and the contributing equipment. A multi-frame source gets
one reference per key frame (Referenced Frame Number). Pure: no I/O; patient and study
attributes are copied by highdicom from the referenced source instances.
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_node.contracts import AlgorithmInfo
from workers.models.base import DetectionResult, SegmentationResult
from workers.outputs.common import SeriesIdentity, contributing_equipment, nearest_slice, slice_sources
from workers.outputs.preview import is_lesion, lesion_voxels_per_slice
from workers.volume import Volume

__all__ = ["KEY_IMAGES_TITLE", "MAX_KEY_IMAGES", "build_key_object_selection", "key_slices"]

logger = logging.getLogger(__name__)

#: Document title of our key image notes: (113000, DCM, "Of Interest"), CID 7010.
KEY_IMAGES_TITLE = codes.cid7010.OfInterest
#: At most this many key images per document (the largest findings first): a reading list, not the series.
MAX_KEY_IMAGES = 50


def key_slices(volume: Volume, result: Any) -> list[int]:
    """Indices of ``volume``'s slices with findings of ``result``, ascending (see the module docstring)."""
    ranked: list[tuple[float, int]] = []  # (size, slice): the largest findings are kept first
    if isinstance(result, DetectionResult):
        for detection in result.detections:
            try:
                ranked.append((detection.diameter_mm, nearest_slice(volume, detection.centre_mm)))
            except ValueError:  # a centre outside the slab is on no image
                logger.debug("detection at %s mm lies on no slice of series %s", detection.centre_mm,
                             volume.series_instance_uid)
    elif isinstance(result, SegmentationResult):
        label_map = np.asarray(result.label_map)
        lesions = [label.value for label in result.labels if is_lesion(label)]
        on_slice = lesion_voxels_per_slice(label_map, lesions)
        if on_slice.any():
            # Connected lesions are labelled in the box that holds every lesion voxel (so the components are the
            # volume's): the slices that hold some (from the per-slice counts), cropped to their rows and columns.
            first, last = np.flatnonzero(on_slice)[[0, -1]]
            in_slab = label_map[first:last + 1]
            slab = in_slab == lesions[0] if len(lesions) == 1 else np.isin(in_slab, lesions)
            rows, columns = np.flatnonzero(slab.any(axis=(0, 2))), np.flatnonzero(slab.any(axis=(0, 1)))
            components, count = ndimage.label(slab[:, rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1])
            for number, found in enumerate(ndimage.find_objects(components), start=1):
                if found is None:
                    continue
                per_slice = (components[found] == number).reshape(found[0].stop - found[0].start, -1).sum(axis=1)
                ranked.append((float(per_slice.sum()), int(first) + found[0].start + int(np.argmax(per_slice))))
            logger.debug("%d lesion(s) in the segmentation of series %s", count, volume.series_instance_uid)
    chosen: list[int] = []
    for _, k in sorted(ranked, key=lambda item: -item[0]):
        if k not in chosen and len(chosen) < MAX_KEY_IMAGES:
            chosen.append(k)
    return sorted(chosen)


def _algorithm_observer(algorithm: AlgorithmInfo, series: SeriesIdentity) -> hd.sr.ObserverContext | None:
    """The model as the device that selected the images (None without a Device UID: the observer needs one)."""
    if algorithm.device_uid is None:
        return None
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer or series.manufacturer,
            model_name=algorithm.name,
        ),
    )


def build_key_object_selection(volume: Volume, result: Any, algorithm: AlgorithmInfo,
                               series: SeriesIdentity) -> hd.ko.KeyObjectSelectionDocument | None:
    """The key image note of ``result`` on ``volume``'s series, or None when no image has a finding."""
    slices = key_slices(volume, result)
    if not slices:
        return None
    sources = slice_sources(volume)
    referenced = [sources[k][0] for k in slices]
    what = "detections" if isinstance(result, DetectionResult) else "lesions"
    description = (f"AI key images: {len(slices)} slice(s) with {what} found by {algorithm.name} {algorithm.version} "
                   f"({algorithm.model_id}); not for primary diagnosis without review")
    content = hd.ko.KeyObjectSelection(
        document_title=KEY_IMAGES_TITLE,
        referenced_objects=referenced,
        observer_device_context=_algorithm_observer(algorithm, series),
        description=description[:1024],
    )
    references = [item for item in content[0].ContentSequence if item.get("ValueType") == "IMAGE"]
    for item, k in zip(references, slices, strict=True):
        frame_number = sources[k][1]
        if frame_number is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = frame_number
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=list({str(ds.SOPInstanceUID): ds for ds in referenced}.values()),
        content=content,
        series_instance_uid=series.series_uid(),
        series_number=series.series_number,
        sop_instance_uid=series.sop_uid(),
        instance_number=series.instance_number,
        manufacturer=series.manufacturer,
        contributing_equipment=contributing_equipment(algorithm, series),
    )
    document.SeriesDescription = series.series_description
    logger.debug("key object selection %s of series %s: slices %s", document.SOPInstanceUID,
                 volume.series_instance_uid, slices)
    return document
