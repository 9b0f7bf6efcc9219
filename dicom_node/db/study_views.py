"""Read-only views of studies for the web UI and the API: the studies list and one study's detail.

Why: the studies list, the study page, the job API and the preview all need the same
joined picture of a study (series, sources, jobs with stages, results, deliveries,
events). Building it here, in a handful of set-based queries per page (never one
query per row), keeps pages fast with hundreds of studies and lets the pages and the
API share one implementation. A study's jobs are read by
:func:`dicom_node.db.job_views.job_rows` (shared with the job API); its timeline and
findings are pure functions of the :class:`StudyDetail`
(:mod:`dicom_node.db.study_timeline`), so the page, its live fragment and the API show
exactly the same thing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.job_views import (
    DELIVERY_ACTIVE_STATES,
    DELIVERY_TROUBLE_STATES,
    JOB_ACTIVE_STATES,
    JOB_TROUBLE_STATES,
    JobRow,
    ResultRow,
    job_rows,
    jobs_query,
)
from dicom_node.db.models import (
    AssociationRecord,
    AssociationStudy,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyEvent,
)

# ResultRow and JobRow are part of a StudyDetail (its jobs and their results): named here for its readers.
__all__ = [
    "JOB_OUTCOMES",
    "NON_IMAGE_MODALITIES",
    "AssociationRow",
    "JobRow",
    "ResultRow",
    "SeriesRow",
    "StudyDetail",
    "StudyEventRow",
    "StudyFilters",
    "StudyHeader",
    "StudyPage",
    "StudyRow",
    "list_studies",
    "study_detail",
]

logger = logging.getLogger(__name__)

#: The "jobs" filter of the studies list: what became of the study's jobs and deliveries.
#: in_progress: a job queued, running or awaiting its retry, or a delivery not yet final;
#: done: jobs exist and all finished - succeeded, not applicable (the model was not made for the
#: series), released or discarded by an operator, or cancelled - and every delivery arrived;
#: held: a job's results were judged implausible and wait for an operator (release or discard);
#: failed: a job or delivery whose last attempt failed, or that is dead;
#: none: no job at all (still receiving, ignored, or not yet routed).
JOB_OUTCOMES = ("in_progress", "done", "held", "failed", "none")

#: Modalities of series that are not images (results, reports, presentation states).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC",
                                  "REG", "FID", "AU", "ECG"})

# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class StudyFilters:
    """What the studies list may be narrowed by; ``None`` (or empty) means "any".

    Dates are DICOM dates (YYYYMMDD), inclusive. ``patient_name`` matches any part,
    case-insensitively; the others match exactly. ``jobs`` is one of :data:`JOB_OUTCOMES`.
    """

    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    state: str | None = None
    jobs: str | None = None
    modality: str | None = None
    source_ae: str | None = None

    def active(self) -> dict[str, str]:
        """The filters that are set, by name (for links that keep them)."""
        return {name: value for name, value in self.__dict__.items() if value}


@dataclass(frozen=True)
class StudyHeader:
    """Who and what a study is, as the list and the study page both head it."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str


@dataclass(frozen=True)
class StudyRow(StudyHeader):
    """One line of the studies list."""

    modalities: list[str]
    source_ae_titles: list[str]
    series_count: int
    instance_count: int
    job_counts: dict[str, int]
    delivery_counts: dict[str, int]
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True)
class StudyPage:
    items: list[StudyRow]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    is_result: bool  # a series of results this node produced (sent back to us by a PACS)

    @property
    def is_image(self) -> bool:
        return not self.is_result and (self.modality or "").upper() not in NON_IMAGE_MODALITIES


@dataclass(frozen=True)
class AssociationRow:
    id: int
    calling_ae_title: str
    peer_address: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    instances_stored: int


@dataclass(frozen=True)
class StudyEventRow:
    at: datetime
    kind: str
    detail: str | None


@dataclass(frozen=True)
class StudyDetail(StudyHeader):
    """Everything the study page shows, read in a fixed number of queries."""

    instance_count: int
    late_instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    receiving_since: datetime
    completed_at: datetime | None
    state_changed_at: datetime
    series: list[SeriesRow]
    associations: list[AssociationRow]
    events: list[StudyEventRow]
    jobs: list[JobRow]

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    @property
    def source_ae_titles(self) -> list[str]:
        return sorted({a.calling_ae_title for a in self.associations})


# --------------------------------------------------------------------------- studies list


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    """Case-insensitive "contains", with LIKE wildcards in ``text`` taken literally."""
    return func.lower(column).contains(text.lower(), autoescape=True)


def _conditions(filters: StudyFilters) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.patient_id:
        conditions.append(Study.patient_id == filters.patient_id)
    if filters.patient_name:
        conditions.append(_contains(Study.patient_name, filters.patient_name))
    if filters.accession_number:
        conditions.append(Study.accession_number == filters.accession_number)
    if filters.date_from:
        conditions.append(Study.study_date >= filters.date_from)
    if filters.date_to:
        conditions.append(Study.study_date <= filters.date_to)
    if filters.state:
        conditions.append(Study.state == filters.state)
    if filters.modality:
        conditions.append(exists().where(Series.study_id == Study.id, Series.modality == filters.modality))
    if filters.source_ae:
        conditions.append(exists().where(
            AssociationStudy.study_id == Study.id,
            AssociationRecord.id == AssociationStudy.association_id,
            AssociationRecord.calling_ae_title == filters.source_ae,
        ))
    if filters.jobs:
        conditions.append(_outcome_condition(filters.jobs))
    return conditions


def _outcome_condition(outcome: str) -> ColumnElement[bool]:
    def job_in(states: Sequence[str] | None) -> ColumnElement[bool]:
        where = [Job.study_id == Study.id] + ([Job.state.in_(states)] if states is not None else [])
        return exists().where(*where)

    def delivery_in(states: Sequence[str]) -> ColumnElement[bool]:
        return exists().where(Job.study_id == Study.id, Delivery.job_id == Job.id, Delivery.state.in_(states))

    if outcome == "in_progress":
        return job_in(JOB_ACTIVE_STATES) | delivery_in(DELIVERY_ACTIVE_STATES)
    if outcome == "failed":
        return job_in(JOB_TROUBLE_STATES) | delivery_in(DELIVERY_TROUBLE_STATES)
    if outcome == "held":
        return job_in((JobState.HELD.value,))
    if outcome == "done":
        unfinished_jobs = job_in(JOB_ACTIVE_STATES + (JobState.DEAD.value, JobState.HELD.value))
        undelivered = exists().where(Job.study_id == Study.id, Delivery.job_id == Job.id,
                                     Delivery.state != DeliveryState.DELIVERED.value)
        return and_(job_in(None), ~unfinished_jobs, ~undelivered)
    if outcome == "none":
        return ~job_in(None)
    raise ValueError(f"jobs filter {outcome!r} is not one of {', '.join(JOB_OUTCOMES)}")


def list_studies(
    sessions: sessionmaker[Session], filters: StudyFilters | None = None, *, limit: int = 50, offset: int = 0
) -> StudyPage:
    """One page of studies matching ``filters``, the most recently received first, with their summaries.

    Six queries whatever the page size: the count, the page, then series, senders,
    job states and delivery states of the studies on the page.
    """
    filters = filters or StudyFilters()
    conditions = _conditions(filters)
    with sessions() as session:
        total = int(session.scalar(select(func.count()).select_from(Study).where(*conditions)) or 0)
        rows = session.execute(
            select(Study.id, Study.study_instance_uid, Study.patient_id, Study.patient_name, Study.accession_number,
                   Study.study_date, Study.study_description, Study.state, Study.instance_count,
                   Study.first_received_at, Study.last_received_at, Study.completed_at)
            .where(*conditions)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
            .limit(limit).offset(offset)
        ).all()
        ids = [int(r[0]) for r in rows]
        modalities: dict[int, set[str]] = defaultdict(set)
        series_counts: dict[int, int] = defaultdict(int)
        sources: dict[int, set[str]] = defaultdict(set)
        job_counts: dict[int, dict[str, int]] = defaultdict(dict)
        delivery_counts: dict[int, dict[str, int]] = defaultdict(dict)
        if ids:
            for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(ids))
            ):
                series_counts[study_id] += 1
                if modality:
                    modalities[study_id].add(modality)
            for study_id, ae in session.execute(
                select(AssociationStudy.study_id, AssociationRecord.calling_ae_title)
                .join(AssociationRecord, AssociationRecord.id == AssociationStudy.association_id)
                .where(AssociationStudy.study_id.in_(ids)).distinct()
            ):
                sources[study_id].add(ae)
            for study_id, state, count in session.execute(
                select(Job.study_id, Job.state, func.count()).where(Job.study_id.in_(ids))
                .group_by(Job.study_id, Job.state)
            ):
                job_counts[study_id][state] = int(count)
            for study_id, state, count in session.execute(
                select(Job.study_id, Delivery.state, func.count()).join(Job, Job.id == Delivery.job_id)
                .where(Job.study_id.in_(ids)).group_by(Job.study_id, Delivery.state)
            ):
                delivery_counts[study_id][state] = int(count)
    items = [
        StudyRow(
            study_instance_uid=r[1], patient_id=r[2], patient_name=r[3], accession_number=r[4], study_date=r[5],
            study_description=r[6], state=r[7], modalities=sorted(modalities[r[0]]),
            source_ae_titles=sorted(sources[r[0]]), series_count=series_counts[r[0]], instance_count=r[8],
            job_counts=job_counts[r[0]], delivery_counts=delivery_counts[r[0]], first_received_at=r[9],
            last_received_at=r[10], completed_at=r[11],
        )
        for r in rows
    ]
    return StudyPage(items=items, total=total, limit=limit, offset=offset)


# --------------------------------------------------------------------------- one study


def study_detail(sessions: sessionmaker[Session], study_instance_uid: str) -> StudyDetail | None:
    """A study with its series, senders, events, jobs, results and deliveries; None if unknown.

    Eight queries whatever the size of the study.
    """
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
        if study is None:
            return None
        series_rows = session.execute(select(Series).where(Series.study_id == study.id)
                                      .order_by(Series.series_number, Series.id)).scalars().all()
        result_series = {str(r[0]) for r in session.execute(
            select(ResultObject.series_instance_uid).join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_id == study.id,
                   ResultObject.series_instance_uid.in_([s.series_instance_uid for s in series_rows])).distinct()
        )} if series_rows else set()
        associations = [
            AssociationRow(id=a.id, calling_ae_title=a.calling_ae_title, peer_address=a.peer_address,
                           started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome,
                           instances_stored=a.instances_stored)
            for a in session.execute(
                select(AssociationRecord).join(AssociationStudy, AssociationStudy.association_id == AssociationRecord.id)
                .where(AssociationStudy.study_id == study.id).order_by(AssociationRecord.started_at)
            ).scalars()
        ]
        events = [StudyEventRow(at=e.at, kind=e.kind, detail=e.detail) for e in session.execute(
            select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)).scalars()]
        study_jobs = job_rows(session, jobs_query().where(Job.study_id == study.id).order_by(Job.id))
        return StudyDetail(
            study_instance_uid=study.study_instance_uid, patient_id=study.patient_id, patient_name=study.patient_name,
            accession_number=study.accession_number, study_date=study.study_date,
            study_description=study.study_description, state=study.state, instance_count=study.instance_count,
            late_instance_count=study.late_instance_count, first_received_at=study.first_received_at,
            last_received_at=study.last_received_at, receiving_since=study.receiving_since,
            completed_at=study.completed_at, state_changed_at=study.state_changed_at,
            series=[SeriesRow(
                series_instance_uid=s.series_instance_uid, series_number=s.series_number, modality=s.modality,
                series_description=s.series_description, body_part_examined=s.body_part_examined,
                instance_count=s.instance_count, first_received_at=s.first_received_at,
                last_received_at=s.last_received_at, is_result=s.series_instance_uid in result_series,
            ) for s in series_rows],
            associations=associations, events=events, jobs=study_jobs,
        )
