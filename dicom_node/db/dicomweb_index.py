"""What the node's DICOMweb read endpoints (QIDO-RS, WADO-RS) find in the index: studies, series, instances.

Why a module of its own: the web routes render DICOM JSON and multipart bodies; which
rows match a query (exact UIDs and identifiers, bounded pages, stable order) is decided
here, so that the routes and the tests read the same thing. Only received instances
are listed, each with its path relative to the node's spool.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Series, Study

__all__ = ["IndexedInstance", "IndexedSeries", "IndexedStudy", "find_instances", "find_series", "find_studies"]


@dataclass(frozen=True)
class IndexedStudy:
    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    instance_count: int


@dataclass(frozen=True)
class IndexedSeries:
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int


@dataclass(frozen=True)
class IndexedInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    path: str  # relative to the spool directory
    size_bytes: int


def find_studies(sessions: sessionmaker[Session], *, study_instance_uid: str | None = None,
                 patient_id: str | None = None, accession_number: str | None = None,
                 limit: int = 100, offset: int = 0) -> list[IndexedStudy]:
    """Studies matching every given value exactly, oldest received first; at most ``limit`` from ``offset``."""
    query = select(Study).order_by(Study.id).limit(limit).offset(offset)
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    if patient_id is not None:
        query = query.where(Study.patient_id == patient_id)
    if accession_number is not None:
        query = query.where(Study.accession_number == accession_number)
    with sessions() as session:
        return [IndexedStudy(s.study_instance_uid, s.patient_id, s.patient_name, s.accession_number, s.study_date,
                             s.study_description, s.instance_count) for s in session.scalars(query)]


def find_series(sessions: sessionmaker[Session], *, study_instance_uid: str | None = None,
                series_instance_uid: str | None = None, modality: str | None = None,
                limit: int = 100, offset: int = 0) -> list[IndexedSeries]:
    """Series matching every given value exactly (a reused series UID gives one row per study)."""
    query = (select(Series, Study.study_instance_uid).join(Study, Study.id == Series.study_id)
             .order_by(Series.id).limit(limit).offset(offset))
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    if modality is not None:
        query = query.where(Series.modality == modality)
    with sessions() as session:
        return [IndexedSeries(study_uid, s.series_instance_uid, s.modality, s.series_number, s.series_description,
                              s.instance_count) for s, study_uid in session.execute(query)]


def find_instances(sessions: sessionmaker[Session], study_instance_uid: str, series_instance_uid: str, *,
                   sop_instance_uid: str | None = None) -> list[IndexedInstance]:
    """The received instances of one series of one study (or the one named), in the order they were indexed."""
    query = (select(Instance).join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
             .where(Study.study_instance_uid == study_instance_uid,
                    Series.series_instance_uid == series_instance_uid)
             .order_by(Instance.id))
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    with sessions() as session:
        return [IndexedInstance(study_instance_uid, series_instance_uid, i.sop_class_uid, i.sop_instance_uid,
                                i.instance_number, i.transfer_syntax_uid, i.path, i.size_bytes)
                for i in session.scalars(query)]
