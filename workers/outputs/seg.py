"""A model's label map as a DICOM Segmentation (BINARY) that overlays the source series frame by frame.

Why: radiologists see segmentations in their own viewer (OHIF, the PACS viewer)
as a DICOM SEG overlay; it must land on exactly the image each label-map slice
came from, carry coded segment meanings (SNOMED CT category and type), a
display colour, and say which AI algorithm produced it.

Decisions:

* One segment per label value *present* in the label map, numbered 1..N in
  increasing label value (segment numbers must be consecutive, label values
  need not be). Labels the model declares but did not find get no segment.
* Empty frames are **kept**: every segment has one frame per source image (or
  per source frame), in the same order, even where it is empty. highdicom omits
  them by default, and OHIF has repeatedly misplaced overlays of SEGs with
  omitted frames, notably gaps inside a segment (OHIF/Viewers#2833,
  highdicom#214, monai-deploy-app-sdk#397). The cost is size: BINARY frames
  are bit-packed, rows*columns/8 bytes each (32 KiB at 512x512), so a
  300-slice CT with two segments is about 19 MiB, uncompressed (Explicit VR
  Little Endian, which every SEG reader supports).
* No label present at all: :func:`build_seg` returns ``None`` (a SEG without
  frames is not valid); the SR reports that nothing was found.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_node.contracts import AlgorithmInfo, SegmentLabel
from workers.models.base import SegmentationResult
from workers.outputs.common import (
    SeriesIdentity,
    algorithm_identification,
    coded,
    content_identity,
    copy_body_part,
    slice_sources,
)
from workers.outputs.measurements import label_counts
from workers.volume import Volume

__all__ = ["build_seg", "present_labels"]

logger = logging.getLogger(__name__)


def present_labels(volume: Volume, result: SegmentationResult) -> tuple[SegmentLabel, ...]:
    """The declared labels whose value occurs in the label map, in increasing value = segment order.

    Raises ValueError when the label map does not match the volume's shape or
    holds values that no declared label describes. The SR uses this to number
    its references to SEG segments the same way.
    """
    label_map = np.asarray(result.label_map)
    if label_map.shape != volume.shape:
        raise ValueError(
            f"series {volume.series_instance_uid}: label map shape {label_map.shape} "
            f"differs from volume shape {volume.shape}"
        )
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"series {volume.series_instance_uid}: label map dtype {label_map.dtype} is not integer")
    declared: dict[int, SegmentLabel] = {}
    for label in result.labels:
        if label.value in declared:
            raise ValueError(f"label value {label.value} declared twice ({declared[label.value].name}, {label.name})")
        declared[label.value] = label
    values = [int(v) for v in np.flatnonzero(label_counts(label_map)[1:]) + 1]
    unknown = [v for v in values if v not in declared]
    if unknown:
        raise ValueError(
            f"series {volume.series_instance_uid}: label map holds values {unknown} that no label "
            f"describes (declared: {sorted(declared)})"
        )
    return tuple(declared[v] for v in values)


def _segment_description(number: int, label: SegmentLabel, algorithm: AlgorithmInfo) -> hd.seg.SegmentDescription:
    """One segment: coded category/type, label name, CIELab colour, AUTOMATIC by the given algorithm."""
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=coded(label.property_category),
        segmented_property_type=coded(label.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        display_color=hd.color.CIELabColor.from_rgb(*label.color_rgb),
    )


def _source_arrangement(
    volume: Volume, segment_map: npt.NDArray[np.uint8]
) -> tuple[Sequence[Dataset], npt.NDArray[np.uint8]]:
    """Source images for highdicom and the segment map reordered to correspond with them frame for frame.

    Single-frame series: the instances in slice order, map unchanged. One
    multi-frame instance: the map reordered so that ``map[i]`` is frame
    ``i + 1`` (highdicom's correspondence rule); the volume must use every frame.
    """
    sources = slice_sources(volume)
    frame_numbers = [frame for _, frame in sources]
    if all(frame is None for frame in frame_numbers):
        uids = [str(ds.SOPInstanceUID) for ds, _ in sources]
        if len(set(uids)) != len(uids):
            raise ValueError(f"series {volume.series_instance_uid}: several slices refer to the same instance")
        return [ds for ds, _ in sources], segment_map
    instances = {str(ds.SOPInstanceUID) for ds, _ in sources}
    if any(frame is None for frame in frame_numbers) or len(instances) != 1:
        raise ValueError(
            f"series {volume.series_instance_uid}: slices come from {len(instances)} instances, some multi-frame; "
            "a SEG needs either single-frame instances or one multi-frame instance"
        )
    dataset = sources[0][0]
    frame_count = int(dataset.get("NumberOfFrames", 1))
    if sorted(frame_numbers) != list(range(1, frame_count + 1)):  # type: ignore[type-var]
        raise ValueError(
            f"series {volume.series_instance_uid}: volume uses {len(frame_numbers)} of the {frame_count} frames "
            f"of instance {dataset.SOPInstanceUID}; a SEG of part of a multi-frame source is not supported"
        )
    by_frame = np.empty_like(segment_map)
    by_frame[np.asarray(frame_numbers, dtype=np.int64) - 1] = segment_map
    return [dataset], by_frame


def _segment_map(label_map: npt.NDArray[np.integer], labels: Sequence[SegmentLabel]) -> npt.NDArray[np.uint8]:
    """``label_map`` with every present label value replaced by its segment number (1..N, in ``labels`` order).

    When the present values already are 1..N (the usual case) the map is
    returned as it is (uint8, not copied: highdicom only reads it), which
    saves a pass over every voxel.
    """
    array = np.asarray(label_map)
    if array.dtype == np.uint8 and [label.value for label in labels] == list(range(1, len(labels) + 1)):
        return array
    lut = np.zeros(256, dtype=np.uint8)  # present_labels checked: every value is a declared 1..255 label or 0
    for number, label in enumerate(labels, start=1):
        lut[label.value] = number
    return lut[array]


def build_seg(
    volume: Volume,
    result: SegmentationResult,
    algorithm: AlgorithmInfo,
    series: SeriesIdentity,
) -> hd.seg.Segmentation | None:
    """A BINARY Segmentation of ``result`` on ``volume``'s source images, or None if no label is present.

    Patient, study and frame-of-reference attributes are copied from the
    source images by highdicom; every frame references its source image (and
    frame) and carries that image's position. See the module docstring for
    segment numbering and why empty frames are kept.
    """
    labels = present_labels(volume, result)
    if not labels:
        logger.info("segmentation by %s %s found no label; no SEG built", algorithm.name, algorithm.version)
        return None
    source_images, pixel_array = _source_arrangement(volume, _segment_map(result.label_map, labels))
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(n, label, algorithm) for n, label in enumerate(labels, start=1)],
        **content_identity(series, algorithm),
        omit_empty_frames=False,
    )
    copy_body_part(seg, source_images[0])
    logger.debug(
        "SEG %s of series %s: %d segments x %d frames",
        seg.SOPInstanceUID,
        volume.series_instance_uid,
        len(labels),
        pixel_array.shape[0],
    )
    return seg
