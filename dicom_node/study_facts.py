"""Gather what routing needs to know of a complete study from the index and the spool.

Why: :func:`dicom_node.routing.evaluate` is pure; this module is its only input side.
Per series it reads the header of one received instance (pixel data never read) for
the attributes the receive path does not index (manufacturer, protocol, slice
thickness and spacing, pixel spacing, orientation, contrast agent), so receiving stays
as fast as it is and routing costs one small read per series. Only a multi-frame series
costs more: the slice count is then the sum of NumberOfFrames over its instances, one
small header read each (single-frame series: one slice per instance, nothing read).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.jobs import own_result_series
from dicom_node.db.models import AssociationProtocol, AssociationRecord, AssociationStudy, Instance, Series, Study
from dicom_node.routing import SeriesFacts, StudyFacts, orientation_of

__all__ = ["NON_IMAGE_SOP_CLASS_PREFIXES", "is_image_sop_class", "study_facts"]

logger = logging.getLogger(__name__)

#: Storage SOP classes that carry no image a model could read (segmentations, reports,
#: presentation states, key objects, RT structures/plans/doses, documents, waveforms, raw data).
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, fiducials, SEG, surface SEG
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT plan
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)

#: Top-level attributes read from the first instance of every series (never the pixel data,
#: never the per-frame functional groups, which hold one item per frame).
_HEADER_TAGS = [
    "Manufacturer", "SliceThickness", "ImageOrientationPatient", "NumberOfFrames", "ProtocolName",
    "PixelSpacing", "SpacingBetweenSlices", "ContrastBolusAgent", "ContrastBolusAgentSequence",
    "SharedFunctionalGroupsSequence",
]
#: ContrastBolusAgent values that say "no contrast" rather than name an agent.
_NO_AGENT = frozenset({"", "NONE", "NO", "N/A", "NA", "NIL", "-", "NO CONTRAST", "NON CONTRAST", "NONCONTRAST"})


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for storage SOP classes that hold no image (see :data:`NON_IMAGE_SOP_CLASS_PREFIXES`)."""
    return not any(sop_class_uid.startswith(prefix) for prefix in NON_IMAGE_SOP_CLASS_PREFIXES)


@dataclass(frozen=True)
class _Header:
    """What one instance's header says for routing (None where absent or unreadable)."""

    manufacturer: str | None = None
    protocol_name: str | None = None
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: float | None = None
    slice_spacing_mm: float | None = None
    orientation: list[float] | None = None
    contrast_agent: str | None = None
    frames: int = 1


def _text(value: Any) -> str | None:
    text = str(value or "").strip()
    return text or None


def _float(value: Any) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _smaller_spacing(value: Any) -> float | None:
    """The smaller of PixelSpacing's two values (row and column spacing), None unless both are positive numbers."""
    try:
        spacings = [_float(v) for v in value] if value is not None else []
    except TypeError:
        return None
    if len(spacings) != 2 or any(v is None or v <= 0 for v in spacings):
        return None
    return min(v for v in spacings if v is not None)


def _frames(value: Any) -> int:
    """NumberOfFrames as a count of slices: 1 when absent or not a positive whole number."""
    try:
        frames = int(str(value).strip()) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1
    return frames if frames > 0 else 1


def _contrast_agent(ds: Dataset, group: Dataset | None) -> str | None:
    """The contrast agent as short text: ContrastBolusAgent, else the enhanced agent sequence.

    Enhanced objects name their agents in ContrastBolusAgentSequence (coded) and say per
    agent in the Contrast/Bolus Usage functional group whether it was administered; an agent
    marked ``NO`` there is not counted. Values that mean "none" give None.
    """
    agent = _text(ds.get("ContrastBolusAgent"))
    if agent is not None and agent.upper() not in _NO_AGENT:
        return agent[:64]
    usage = group.get("ContrastBolusUsageSequence") if group is not None else None
    administered = {
        str(item.get("ContrastBolusAgentNumber")): str(item.get("ContrastBolusAgentAdministered", "")).upper()
        for item in (usage or []) if item.get("ContrastBolusAgentNumber") is not None
    }
    names = []
    for item in ds.get("ContrastBolusAgentSequence") or []:
        number = item.get("ContrastBolusAgentNumber")
        if number is not None and administered.get(str(number)) == "NO":
            continue
        name = _text(item.get("CodeMeaning")) or _text(item.get("CodeValue"))
        if name is not None and name.upper() not in _NO_AGENT and name not in names:
            names.append(name)
    return ", ".join(names)[:64] or None


def _read_header(path: Path) -> _Header:
    """The routing facts of one instance's header; an empty :class:`_Header` when it cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, InvalidDicomError, ValueError) as exc:
        logger.warning("cannot read the header of %s for routing: %s", path, exc)
        return _Header()
    thickness = ds.get("SliceThickness")
    orientation = ds.get("ImageOrientationPatient")
    pixel_spacing = ds.get("PixelSpacing")
    slice_spacing = ds.get("SpacingBetweenSlices")
    shared = ds.get("SharedFunctionalGroupsSequence")
    group = shared[0] if shared else None
    if group is not None:  # enhanced multi-frame: geometry lives in the functional groups
        if orientation is None and group.get("PlaneOrientationSequence"):
            orientation = group.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        if group.get("PixelMeasuresSequence"):
            measures = group.PixelMeasuresSequence[0]
            thickness = thickness if thickness is not None else measures.get("SliceThickness")
            pixel_spacing = pixel_spacing if pixel_spacing is not None else measures.get("PixelSpacing")
            slice_spacing = slice_spacing if slice_spacing is not None else measures.get("SpacingBetweenSlices")
    try:
        iop = [float(v) for v in orientation] if orientation is not None and len(orientation) == 6 else None
    except (TypeError, ValueError):
        iop = None
    spacing_between = _float(slice_spacing)
    return _Header(
        manufacturer=_text(ds.get("Manufacturer")),
        protocol_name=_text(ds.get("ProtocolName")),
        slice_thickness_mm=_float(thickness),
        pixel_spacing_mm=_smaller_spacing(pixel_spacing),
        slice_spacing_mm=spacing_between if spacing_between is not None and spacing_between > 0 else None,
        orientation=iop,
        contrast_agent=_contrast_agent(ds, group),
        frames=_frames(ds.get("NumberOfFrames")),
    )


def _frame_count(path: Path) -> int:
    """NumberOfFrames of one instance (1 when single-frame; 1, with a warning, when unreadable)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    except (OSError, InvalidDicomError, ValueError) as exc:
        logger.warning("cannot read NumberOfFrames of %s for routing (counted as one slice): %s", path, exc)
        return 1
    return _frames(ds.get("NumberOfFrames"))


def _slice_count(sessions: sessionmaker[Session], spool_dir: Path, series_id: int, first: _Header,
                 instance_count: int) -> int:
    """Slices of a series' volume: its instance count when the first instance is single-frame,
    else the sum of NumberOfFrames over its instances (headers only)."""
    if first.frames <= 1:
        return instance_count
    with sessions() as session:
        paths = session.scalars(select(Instance.path).where(Instance.series_id == series_id)).all()
    return sum(_frame_count(spool_dir / path) for path in paths)


def study_facts(sessions: sessionmaker[Session], spool_dir: Path, study_id: int) -> StudyFacts:
    """The :class:`StudyFacts` of the study with database id ``study_id``."""
    with sessions() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise KeyError(f"study id {study_id} does not exist")
        titles = session.execute(
            select(AssociationRecord.calling_ae_title, AssociationRecord.called_ae_title)
            .join(AssociationStudy, AssociationStudy.association_id == AssociationRecord.id)
            .where(AssociationStudy.study_id == study_id,
                   AssociationRecord.protocol == AssociationProtocol.DICOM.value)  # STOW-RS has no AE titles
            .distinct()
        ).all()
        first_instance = (
            select(Instance.series_id, func.min(Instance.id).label("first_id"))
            .group_by(Instance.series_id)
            .subquery()
        )
        rows = session.execute(
            select(Series, Instance.path, Instance.sop_class_uid)
            .join(first_instance, first_instance.c.series_id == Series.id)
            .join(Instance, Instance.id == first_instance.c.first_id)
            .where(Series.study_id == study_id)
            .order_by(Series.series_number, Series.id)
        ).all()
        study_uid, description = study.study_instance_uid, study.study_description
    own = own_result_series(sessions, study_id, [series.series_instance_uid for series, _, _ in rows])
    facts = []
    for series, path, sop_class_uid in rows:
        header = _read_header(spool_dir / path)
        facts.append(
            SeriesFacts(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                body_part_examined=series.body_part_examined,
                series_description=series.series_description,
                protocol_name=header.protocol_name,
                manufacturer=header.manufacturer,
                series_number=series.series_number,
                slice_thickness_mm=header.slice_thickness_mm,
                pixel_spacing_mm=header.pixel_spacing_mm,
                slice_spacing_mm=header.slice_spacing_mm,
                orientation=orientation_of(header.orientation),
                contrast_agent=header.contrast_agent,
                instance_count=series.instance_count,
                slice_count=_slice_count(sessions, spool_dir, series.id, header, series.instance_count),
                is_image=is_image_sop_class(sop_class_uid),
                produced_by_node=series.series_instance_uid in own,
            )
        )
    return StudyFacts(
        study_instance_uid=study_uid,
        calling_ae_titles=tuple(sorted({str(c) for c, _ in titles})),
        called_ae_titles=tuple(sorted({str(c) for _, c in titles})),
        study_description=description,
        series=tuple(facts),
    )
