"""Gather what routing needs to know of a complete study from the index and the spool.

Why: :func:`dicom_node.routing.evaluate` is pure; this module is its only input side.
Per series it reads the header of one received instance (pixel data never read) for
the attributes the receive path does not index (manufacturer, slice thickness,
orientation), so receiving stays as fast as it is and routing costs one small read
per series.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.jobs import own_result_series
from dicom_node.db.models import AssociationRecord, AssociationStudy, Instance, Series, Study
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

_HEADER_TAGS = ["Manufacturer", "SliceThickness", "ImageOrientationPatient", "Rows", "SharedFunctionalGroupsSequence"]


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for storage SOP classes that hold no image (see :data:`NON_IMAGE_SOP_CLASS_PREFIXES`)."""
    return not any(sop_class_uid.startswith(prefix) for prefix in NON_IMAGE_SOP_CLASS_PREFIXES)


def _header_facts(path: Path) -> tuple[str | None, float | None, list[float] | None]:
    """(Manufacturer, SliceThickness, ImageOrientationPatient) of one instance; Nones where unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, InvalidDicomError, ValueError) as exc:
        logger.warning("cannot read the header of %s for routing: %s", path, exc)
        return None, None, None
    thickness = ds.get("SliceThickness")
    orientation = ds.get("ImageOrientationPatient")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:  # enhanced multi-frame: orientation and thickness live in the functional groups
        group = shared[0]
        if orientation is None and group.get("PlaneOrientationSequence"):
            orientation = group.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        if thickness is None and group.get("PixelMeasuresSequence"):
            thickness = group.PixelMeasuresSequence[0].get("SliceThickness")
    manufacturer = str(ds.get("Manufacturer") or "").strip() or None
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    try:
        iop = [float(v) for v in orientation] if orientation is not None and len(orientation) == 6 else None
    except (TypeError, ValueError):
        iop = None
    return manufacturer, thickness_mm, iop


def study_facts(sessions: sessionmaker[Session], spool_dir: Path, study_id: int) -> StudyFacts:
    """The :class:`StudyFacts` of the study with database id ``study_id``."""
    with sessions() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise KeyError(f"study id {study_id} does not exist")
        titles = session.execute(
            select(AssociationRecord.calling_ae_title, AssociationRecord.called_ae_title)
            .join(AssociationStudy, AssociationStudy.association_id == AssociationRecord.id)
            .where(AssociationStudy.study_id == study_id)
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
        manufacturer, thickness, iop = _header_facts(spool_dir / path)
        facts.append(
            SeriesFacts(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                body_part_examined=series.body_part_examined,
                series_description=series.series_description,
                manufacturer=manufacturer,
                series_number=series.series_number,
                slice_thickness_mm=thickness,
                orientation=orientation_of(iop),
                instance_count=series.instance_count,
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
