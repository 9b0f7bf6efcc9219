"""What every DICOM result builder (SEG, SR, GSPS, ...) shares: identity, algorithm, source images, pixel coordinates.

Why: the builders must agree on how a result series is numbered and named (from
configuration, never random), how the algorithm is identified (CID 7162
"Artificial Intelligence" family, name, version; and as equipment, in the
Contributing Equipment Sequence every object carries), which source image and frame a
volume slice came from, and where a patient-space point falls on an image in
DICOM image coordinates. Each of those is written once, here.

Patient and study attributes are deliberately *not* copied here: highdicom's SOP
class constructors copy them from the source images (SEG, GSPS) or the evidence
(SR), which is what we want - copied, never retyped.

Image coordinates follow PS3.3 C.10.5.1.2 (GSPS graphic data) and C.18.6.1.1
(SR SCOORD): (0, 0) is the top left corner of the top left pixel, so the
centre of the pixel at (row r, column c) is (c + 0.5, r + 0.5) as (column, row).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.contracts import UID_PATTERN, AlgorithmInfo, CodedConcept
from workers.volume import Volume

__all__ = [
    "PROCESSING_EQUIPMENT",
    "content_identity",
    "contributing_equipment",
    "AI_ALGORITHM_FAMILY",
    "ImagePoint",
    "SeriesIdentity",
    "algorithm_identification",
    "code_string",
    "coded",
    "copy_body_part",
    "image_point",
    "nearest_slice",
    "slice_sources",
    "source_image",
]

#: Algorithm family of every model this node runs: (123110, DCM, "Artificial Intelligence"), CID 7162.
AI_ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence

#: Purpose of reference of the model's Contributing Equipment item: (109102, DCM, "Processing Equipment"), CID 7005.
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
_NOT_CODE_STRING = re.compile(r"[^A-Z0-9 _]")


def _node_version() -> str:
    """Version of the installed dicom-node distribution (SoftwareVersions of our results)."""
    try:
        return importlib.metadata.version("dicom-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class SeriesIdentity(BaseModel):
    """How one result series is identified and who made it; all of it comes from configuration.

    ``series_number`` and ``series_description`` name the series in the PACS
    (fixed per pipeline and output kind so radiologists recognise it);
    ``manufacturer``, ``manufacturer_model_name``, ``software_versions`` and
    ``device_serial_number`` fill the (Enhanced) General Equipment module.
    ``series_instance_uid`` / ``sop_instance_uid`` may be given (e.g. to make a
    retried job overwrite its own earlier result); when omitted a new UID is
    made for every build.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    series_number: int = Field(ge=1, le=2**31 - 1)
    series_description: str = Field(min_length=1, max_length=64)
    instance_number: int = Field(default=1, ge=1, le=2**31 - 1)
    manufacturer: str = Field(default="dicom-ai-node", min_length=1, max_length=64)
    manufacturer_model_name: str = Field(default="dicom-ai-node", min_length=1, max_length=64)
    software_versions: str = Field(default_factory=_node_version, min_length=1, max_length=64)
    device_serial_number: str = Field(default="0", min_length=1, max_length=64)
    series_instance_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)
    sop_instance_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN)

    def series_uid(self) -> hd.UID:
        """The configured Series Instance UID, or a new one (call once per built object)."""
        return hd.UID(self.series_instance_uid) if self.series_instance_uid else hd.UID()

    def sop_uid(self) -> hd.UID:
        """The configured SOP Instance UID, or a new one (call once per built object)."""
        return hd.UID(self.sop_instance_uid) if self.sop_instance_uid else hd.UID()


def coded(concept: CodedConcept) -> hd.sr.CodedConcept:
    """Our contract's coded concept as highdicom's (accepted wherever highdicom wants a code)."""
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification: AI family (CID 7162), model name and version, registry id as a parameter."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=AI_ALGORITHM_FAMILY,
        version=algorithm.version,
        parameters={"model_id": algorithm.model_id},
    )


def contributing_equipment(algorithms: AlgorithmInfo | Sequence[AlgorithmInfo],
                           series: SeriesIdentity) -> list[hd.ContributingEquipment]:
    """Contributing Equipment Sequence items (SOP Common, 0018,A001): each model that made the object, once.

    Why: IHE AI Results asks every result object to identify the algorithm that made it as
    equipment, so that a reader (or an audit) can tell which model version produced it without
    parsing the SR. The object's General Equipment module names this node (the software that
    wrote the object); each item here names a model: purpose of reference "Processing
    Equipment" (CID 7005), the model's manufacturer (else the node's), its name as the
    manufacturer's model name, its version as the software version, and its Device UID from
    the model registry (left out when not known).
    """
    items: list[hd.ContributingEquipment] = []
    seen: set[tuple[str, str]] = set()
    for algorithm in [algorithms] if isinstance(algorithms, AlgorithmInfo) else algorithms:
        if (algorithm.model_id, algorithm.version) in seen:
            continue
        seen.add((algorithm.model_id, algorithm.version))
        item = hd.ContributingEquipment(
            manufacturer=algorithm.manufacturer or series.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            contribution_description=f"AI model {algorithm.model_id} {algorithm.version}"[:1024],
        )
        if algorithm.device_uid is not None:
            item.DeviceUID = algorithm.device_uid
        items.append(item)
    return items


def code_string(text: str, max_length: int = 16) -> str:
    """``text`` as a DICOM Code String value (A-Z, 0-9, space, underscore; 16 characters).

    Used for ContentLabel and GraphicLayer, which are CS and must be derived
    from free-text algorithm names. Raises ValueError when nothing usable is left.
    """
    value = _NOT_CODE_STRING.sub("_", text.strip().upper())[:max_length].strip()
    if not value.strip("_ "):
        raise ValueError(f"cannot make a DICOM code string from {text!r}")
    return value


def copy_body_part(target: Dataset, source: Dataset) -> None:
    """Copy the source's BodyPartExamined and Laterality (General Series) into a result object.

    Why: the result series shows the same body part; and without a body part,
    dciodvfy cannot tell that Laterality (Type 2C, needed for paired body
    parts) is not needed and reports it missing in a GSPS.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(target, keyword, source.get(keyword))


def slice_sources(volume: Volume) -> tuple[tuple[Dataset, int | None], ...]:
    """For every slice, in slice order: its source instance header and frame number (None if single-frame).

    Looks each slice up by SOP Instance UID through ``volume.frames``, so it
    does not depend on the order of ``volume.datasets`` (nor on instance numbers).
    """
    by_uid = {str(dataset.SOPInstanceUID): dataset for dataset in volume.datasets}
    sources: list[tuple[Dataset, int | None]] = []
    for index, frame in enumerate(volume.frames):
        dataset = by_uid.get(frame.sop_instance_uid)
        if dataset is None:
            raise ValueError(
                f"series {volume.series_instance_uid}: slice {index} refers to instance "
                f"{frame.sop_instance_uid}, which is not among the volume's datasets"
            )
        sources.append((dataset, frame.frame_number))
    return tuple(sources)


def source_image(volume: Volume, slice_index: int) -> tuple[Dataset, int | None]:
    """The source instance header of one slice and its frame number (None if single-frame); see :func:`slice_sources`."""
    if not 0 <= slice_index < volume.shape[0]:
        raise IndexError(
            f"series {volume.series_instance_uid}: slice {slice_index} outside 0..{volume.shape[0] - 1}"
        )
    return slice_sources(volume)[slice_index]


def nearest_slice(volume: Volume, point_mm: tuple[float, float, float]) -> int:
    """Index of the slice whose centre plane is nearest to ``point_mm`` (LPS).

    Raises ValueError when the point lies outside the volume's slab (more than
    half a slice beyond the first or last slice).
    """
    index = float(volume.world_to_index(point_mm)[0])
    nearest = int(np.floor(index + 0.5))
    if not 0 <= nearest < volume.shape[0]:
        raise ValueError(
            f"series {volume.series_instance_uid}: point {tuple(round(v, 2) for v in point_mm)} mm "
            f"lies at slice {index:.2f}, outside 0..{volume.shape[0] - 1}"
        )
    return nearest


class ImagePoint(BaseModel):
    """A patient-space point projected onto one slice, in DICOM image coordinates.

    ``column``/``row`` follow PS3.3 C.10.5.1.2 ((0, 0) = top left corner of the
    top left pixel); ``distance_mm`` is the signed distance of the point from
    the slice plane along the slice normal (row x column direction).
    """

    model_config = ConfigDict(frozen=True)

    slice_index: int
    column: float
    row: float
    distance_mm: float


def image_point(volume: Volume, slice_index: int, point_mm: tuple[float, float, float]) -> ImagePoint:
    """Project ``point_mm`` (LPS) onto slice ``slice_index``; see :class:`ImagePoint`.

    Works for any orientation and for slices stacked obliquely to their normal
    (gantry tilt): the projection is orthogonal onto the slice plane.
    """
    if not 0 <= slice_index < volume.shape[0]:
        raise IndexError(
            f"series {volume.series_instance_uid}: slice {slice_index} outside 0..{volume.shape[0] - 1}"
        )
    corner = volume.index_to_world((slice_index, 0.0, 0.0))
    down, right = volume.axes[1], volume.axes[2]  # directions of increasing row / column index
    normal = np.cross(right, down)  # DICOM: row direction cosines x column direction cosines
    normal /= np.linalg.norm(normal)
    offset = np.asarray(point_mm, dtype=np.float64) - corner
    return ImagePoint(
        slice_index=slice_index,
        column=float(offset @ right) / volume.spacing_mm[2] + 0.5,
        row=float(offset @ down) / volume.spacing_mm[1] + 0.5,
        distance_mm=float(offset @ normal),
    )


def content_identity(series: SeriesIdentity, algorithm: AlgorithmInfo) -> dict[str, Any]:
    """The series, instance, equipment and content-label arguments highdicom's SEG and GSPS constructors share
    (the model as contributing equipment included)."""
    return {
        "series_instance_uid": series.series_uid(),
        "series_number": series.series_number,
        "sop_instance_uid": series.sop_uid(),
        "instance_number": series.instance_number,
        "manufacturer": series.manufacturer,
        "manufacturer_model_name": series.manufacturer_model_name,
        "software_versions": series.software_versions,
        "device_serial_number": series.device_serial_number,
        "contributing_equipment": contributing_equipment(algorithm, series),
        "series_description": series.series_description,
        "content_label": code_string(algorithm.name),
        "content_description": f"{algorithm.name} {algorithm.version}"[:64],
    }
