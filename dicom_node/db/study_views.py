"""Read-only views of studies, their jobs, results and deliveries for the web UI and the API.

Why: the studies list, the study page, the job API and the preview all need the same
joined picture of a study (series, sources, jobs with stages, results, deliveries,
events). Building it here, in a handful of set-based queries per page (never one
query per row), keeps pages fast with hundreds of studies and lets the pages and the
API share one implementation. :func:`timeline` and :func:`findings` are pure
functions of a :class:`StudyDetail`, so the page, its live fragment and the API
show exactly the same thing.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.job_checks import ApplicabilityView, PlausibilityView, applicability_view, outcome_reason, \
    plausibility_view
from dicom_node.db.jobs import NOTICE_KIND
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
    StudyState,
)

__all__ = [
    "JOB_OUTCOMES",
    "NON_IMAGE_MODALITIES",
    "AssociationRow",
    "DeliveryRow",
    "FindingRow",
    "JobPage",
    "JobRow",
    "ResultRow",
    "SeriesRow",
    "StudyDetail",
    "StudyEventRow",
    "StudyFilters",
    "StudyPage",
    "StudyRow",
    "TimelineEntry",
    "findings",
    "get_delivery",
    "get_job",
    "job_counts_by_study",
    "list_jobs",
    "list_studies",
    "study_detail",
    "timeline",
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

_JOB_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)
_JOB_TROUBLE = (JobState.FAILED.value, JobState.DEAD.value)
#: Job states that end a run: the worker finished it (an operator may still act on a held one).
_JOB_ENDED = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value,
              JobState.NOT_APPLICABLE.value, JobState.HELD.value)
#: Job states whose results went (or may go) to the destinations.
_JOB_RESULTS_SENT = (JobState.SUCCEEDED.value, JobState.RELEASED.value)
_DELIVERY_ACTIVE = (DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.FAILED.value)
_DELIVERY_TROUBLE = (DeliveryState.FAILED.value, DeliveryState.DEAD.value)


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
class StudyRow:
    """One line of the studies list."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str
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
class ResultRow:
    id: int
    job_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    job_id: int
    study_instance_uid: str
    destination: str
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    objects_sent: int
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    state_changed_at: datetime
    #: The result kinds it carries; None: the job's results (every kind the destination takes).
    kinds: tuple[str, ...] | None = None

    @property
    def notice_only(self) -> bool:
        """True when it carries only the "AI analysis not performed" SR."""
        return self.kinds is not None and set(self.kinds) <= {NOTICE_KIND}


@dataclass(frozen=True)
class JobRow:
    id: int
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    rule: str
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    worker: str | None
    stage_seconds: dict[str, float]
    summary: dict[str, Any]
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    state_changed_at: datetime
    results: list[ResultRow] = field(default_factory=list)
    deliveries: list[DeliveryRow] = field(default_factory=list)
    #: ``{"applicability": ..., "plausibility": ...}``: the worker's checks before and after the model.
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def can_retry(self) -> bool:
        return self.state in (JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value)

    @property
    def can_cancel(self) -> bool:
        return self.state in (JobState.QUEUED.value, JobState.FAILED.value, JobState.RUNNING.value)

    @property
    def can_release(self) -> bool:
        """Held results may be released (sent after all) or discarded by an operator."""
        return self.state == JobState.HELD.value

    @property
    def applicability(self) -> ApplicabilityView | None:
        return applicability_view(self.checks)

    @property
    def plausibility(self) -> PlausibilityView | None:
        return plausibility_view(self.checks)

    @property
    def outcome_reason(self) -> str | None:
        """Why the model did not apply, or what a held result broke (None for other states)."""
        return outcome_reason(self.state, self.checks)

    @property
    def run_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None or self.finished_at < self.started_at:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class JobPage:
    items: list[JobRow]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class StudyDetail:
    """Everything the study page shows, read in a fixed number of queries."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str
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


@dataclass(frozen=True)
class TimelineEntry:
    """One step of a study's life; ``duration_seconds`` is how long the step took (or has taken so far)."""

    at: datetime
    kind: str
    title: str
    state: str | None = None
    duration_seconds: float | None = None
    duration_label: str = "took"
    detail: str | None = None
    stages: list[tuple[str, float]] = field(default_factory=list)
    job_id: int | None = None
    delivery_id: int | None = None


@dataclass(frozen=True)
class FindingRow:
    """One line of the findings table: a segment volume or a detection, from a job's summary."""

    job_id: int
    pipeline: str
    kind: str  # "segment" or "detection"
    label: str
    volume_ml: float | None = None
    diameter_mm: float | None = None
    score: float | None = None
    centre_mm: list[float] | None = None


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
        return job_in(_JOB_ACTIVE) | delivery_in(_DELIVERY_ACTIVE)
    if outcome == "failed":
        return job_in(_JOB_TROUBLE) | delivery_in(_DELIVERY_TROUBLE)
    if outcome == "held":
        return job_in((JobState.HELD.value,))
    if outcome == "done":
        unfinished_jobs = job_in(_JOB_ACTIVE + (JobState.DEAD.value, JobState.HELD.value))
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


# --------------------------------------------------------------------------- one study, jobs


def _load_json(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        logger.warning("%s is not valid JSON; shown as empty", what)
        return {}
    return value if isinstance(value, dict) else {}


def _job_rows(session: Session, query: Any) -> list[JobRow]:
    """Jobs selected by ``query`` (selecting Job and Study.study_instance_uid), with results and deliveries.

    Three queries: the jobs, their results, their deliveries.
    """
    rows = session.execute(query).all()
    ids = [job.id for job, _ in rows]
    results: dict[int, list[ResultRow]] = defaultdict(list)
    deliveries: dict[int, list[DeliveryRow]] = defaultdict(list)
    uid_of = {job.id: uid for job, uid in rows}
    if ids:
        for r in session.execute(select(ResultObject).where(ResultObject.job_id.in_(ids))
                                 .order_by(ResultObject.id)).scalars():
            results[r.job_id].append(ResultRow(
                id=r.id, job_id=r.job_id, kind=r.kind, sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid, series_instance_uid=r.series_instance_uid, path=r.path,
                created_at=r.created_at))
        for d in session.execute(select(Delivery).where(Delivery.job_id.in_(ids)).order_by(Delivery.id)).scalars():
            deliveries[d.job_id].append(_delivery_row(d, uid_of[d.job_id]))
    return [
        JobRow(
            id=job.id, study_instance_uid=uid, series_instance_uid=job.series_instance_uid, pipeline=job.pipeline,
            rule=job.rule, state=job.state, attempts=job.attempts, max_attempts=job.max_attempts, error=job.error,
            worker=job.worker, stage_seconds=_load_json(job.stage_seconds, f"stage_seconds of job {job.id}"),
            summary=_load_json(job.summary, f"summary of job {job.id}"), created_at=job.created_at,
            queued_at=job.queued_at, started_at=job.started_at, finished_at=job.finished_at,
            state_changed_at=job.state_changed_at, results=results[job.id], deliveries=deliveries[job.id],
            checks=_load_json(job.checks, f"checks of job {job.id}"),
        )
        for job, uid in rows
    ]


def _delivery_row(d: Delivery, study_uid: str) -> DeliveryRow:
    return DeliveryRow(
        id=d.id, job_id=d.job_id, study_instance_uid=study_uid, destination=d.destination, state=d.state,
        attempts=d.attempts, max_attempts=d.max_attempts, error=d.error, objects_sent=d.objects_sent,
        created_at=d.created_at, next_attempt_at=d.next_attempt_at, delivered_at=d.delivered_at,
        state_changed_at=d.state_changed_at, kinds=_kinds(d.kinds, d.id),
    )


def _kinds(text: str | None, delivery_id: int) -> tuple[str, ...] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list):
        logger.warning("kinds of delivery %d is not a JSON list (%r); shown as the results", delivery_id, text[:80])
        return None
    return tuple(str(v) for v in value)


def _jobs_query() -> Any:
    return select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)


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
        job_rows = _job_rows(session, _jobs_query().where(Job.study_id == study.id).order_by(Job.id))
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
            associations=associations, events=events, jobs=job_rows,
        )


def list_jobs(
    sessions: sessionmaker[Session], *, state: str | None = None, pipeline: str | None = None,
    study_instance_uid: str | None = None, limit: int = 100, offset: int = 0,
) -> JobPage:
    """The newest jobs first, optionally of one state, pipeline and/or study, with results and deliveries."""
    conditions = []
    if state:
        conditions.append(Job.state == state)
    if pipeline:
        conditions.append(Job.pipeline == pipeline)
    if study_instance_uid:
        conditions.append(Study.study_instance_uid == study_instance_uid)
    with sessions() as session:
        total = int(session.scalar(select(func.count()).select_from(Job).join(Study, Study.id == Job.study_id)
                                   .where(*conditions)) or 0)
        items = _job_rows(session, _jobs_query().where(*conditions).order_by(Job.id.desc()).limit(limit).offset(offset))
    return JobPage(items=items, total=total, limit=limit, offset=offset)


def job_counts_by_study(sessions: sessionmaker[Session], study_uids: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{Study Instance UID: {job state: count}}`` of the given studies (one query; a study without jobs is left out)."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    if not study_uids:
        return {}
    with sessions() as session:
        for uid, state, count in session.execute(
            select(Study.study_instance_uid, Job.state, func.count()).join(Job, Job.study_id == Study.id)
            .where(Study.study_instance_uid.in_(list(study_uids))).group_by(Study.study_instance_uid, Job.state)
        ):
            counts[str(uid)][str(state)] = int(count)
    return dict(counts)


def get_job(sessions: sessionmaker[Session], job_id: int) -> JobRow | None:
    """One job with its results and deliveries; None if unknown."""
    with sessions() as session:
        found = _job_rows(session, _jobs_query().where(Job.id == job_id))
    return found[0] if found else None


def get_delivery(sessions: sessionmaker[Session], delivery_id: int) -> DeliveryRow | None:
    """One delivery (with its study's UID, for links back); None if unknown."""
    with sessions() as session:
        row = session.execute(
            select(Delivery, Study.study_instance_uid).join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id).where(Delivery.id == delivery_id)
        ).one_or_none()
    return None if row is None else _delivery_row(row[0], row[1])


# --------------------------------------------------------------------------- timeline, findings


def _span(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


_EVENT_TITLES = {
    "complete": "Study complete",
    "routed": "Routed",
    "ignored": "Ignored (no rule matched)",
    "reopened": "Reopened by a late instance",
    "late_instance": "Late instance",
}

#: Timeline events about one job (the worker and the operator actions write them, naming the job first):
#: event kind -> (entry kind, what happened). not_applicable and held are shown on the job's own end entry.
_JOB_EVENTS = {
    "job_checked": ("job.checked", "checked before the model"),
    "job_released": ("job.released", "held results released"),
    "job_discarded": ("job.discarded", "held results discarded"),
}
_MERGED_JOB_EVENTS = frozenset({"job_not_applicable", "job_held"})
_EVENT_JOB = re.compile(r"^job (\d+)\b")
#: How a job's end is titled on the timeline, where its state's name is not plain words.
_END_TITLES = {JobState.NOT_APPLICABLE.value: "not applicable", JobState.HELD.value: "held: results not sent"}


def _event_job(event: StudyEventRow) -> int | None:
    found = _EVENT_JOB.match(event.detail or "")
    return int(found.group(1)) if found else None


def _job_event_entry(event: StudyEventRow, jobs_by_id: dict[int, JobRow]) -> TimelineEntry | None:
    """The entry of an event about a job (None: it is shown on the job's end entry instead)."""
    job_id = _event_job(event)
    job = jobs_by_id.get(job_id) if job_id is not None else None
    if event.kind in _MERGED_JOB_EVENTS and job is not None:
        return None
    kind, what = _JOB_EVENTS.get(event.kind, (f"study.{event.kind}", event.kind.replace("_", " ")))
    title = f"Job {job.id} · {job.pipeline}: {what}" if job is not None else what[:1].upper() + what[1:]
    state = kind.split(".", 1)[1] if kind in ("job.released", "job.discarded") else None
    return TimelineEntry(at=event.at, kind=kind, title=title, state=state, detail=event.detail,
                         job_id=job.id if job is not None else job_id)


def _end_detail(job: JobRow, end_kind: str) -> str | None:
    """What the end entry of a job says about how it ended."""
    if end_kind == JobState.FAILED.value:
        return f"{job.error or 'failed'}; attempt {job.attempts} of {job.max_attempts}, will be retried"
    if end_kind == JobState.DEAD.value:
        return f"{job.error or 'failed'}; attempt {job.attempts} of {job.max_attempts}, no retry"
    if end_kind == JobState.SUCCEEDED.value:
        return ", ".join(r.kind for r in job.results) or "no result objects"
    if end_kind == JobState.NOT_APPLICABLE.value:
        return job.outcome_reason or "the model was not made for this series"
    if end_kind == JobState.HELD.value:
        reasons = job.outcome_reason or "see the checks"
        if job.state != JobState.HELD.value:  # released or discarded since: its own entry says so
            return f"results judged implausible, held: {reasons}"
        kept = ", ".join(r.kind for r in job.results if r.kind != NOTICE_KIND) or "no result objects"
        return f"results judged implausible ({kept} kept, not sent): {reasons}"
    return job.error


def timeline(detail: StudyDetail, *, now: datetime) -> list[TimelineEntry]:
    """The study's life in time order: receiving, its events, each job's run and stages, each delivery.

    A job's checks (before the model) and an operator's release or discard of held results
    are entries of their own (kinds ``job.checked``, ``job.released``, ``job.discarded``); a job
    that was not applicable or held says why on its end entry (``job.not_applicable``, ``job.held``).

    Durations: receiving from the first to the last instance; complete after the last
    instance; a job's start after it was queued (waiting), its end after it started
    (running; a running job counts up to ``now``), with the stage times the worker
    measured; a delivery from its creation to its arrival or last failure.
    """
    entries: list[TimelineEntry] = [TimelineEntry(
        at=detail.first_received_at, kind="received", title="Receiving",
        state="receiving" if detail.state == StudyState.RECEIVING.value else None,
        duration_seconds=_span(detail.first_received_at, detail.last_received_at),
        duration_label="first to last instance",
        detail=f"{detail.instance_count} instance(s) in {len(detail.series)} series"
        + (f" from {', '.join(detail.source_ae_titles)}" if detail.source_ae_titles else "")
        + f"; last instance {detail.last_received_at:%Y-%m-%d %H:%M:%S}",
    )]
    jobs_by_id = {job.id: job for job in detail.jobs}
    late: list[StudyEventRow] = []
    for event in [*detail.events, None]:
        if event is not None and event.kind == "late_instance":
            late.append(event)  # one event per late instance: shown as one line per run of them
            continue
        if late:
            entries.append(TimelineEntry(
                at=late[0].at, kind="study.late_instance", title=f"{len(late)} late instance(s)",
                duration_seconds=_span(late[0].at, late[-1].at) if len(late) > 1 else None,
                detail=late[-1].detail))
            late = []
        if event is None or event.kind == "first_instance":  # the receiving entry already says it
            continue
        if event.kind.startswith("job_"):
            entry = _job_event_entry(event, jobs_by_id)
            if entry is not None:
                entries.append(entry)
            continue
        complete = event.kind == "complete"
        entries.append(TimelineEntry(
            at=event.at, kind=f"study.{event.kind}", title=_EVENT_TITLES.get(event.kind, event.kind.replace("_", " ")),
            state="ignored" if event.kind == "ignored" else ("complete" if complete else None),
            duration_seconds=_span(detail.last_received_at, event.at) if complete else None,
            duration_label="after the last instance", detail=event.detail))
    for job in detail.jobs:
        name = f"Job {job.id} · {job.pipeline}"
        entries.append(TimelineEntry(at=job.queued_at, kind="job.queued", title=f"{name} queued", state="queued",
                                     detail=f"rule {job.rule}, series {job.series_instance_uid}", job_id=job.id))
        if job.started_at is not None:
            entries.append(TimelineEntry(
                at=job.started_at, kind="job.started", title=f"{name} started (attempt {job.attempts})",
                duration_seconds=_span(job.queued_at, job.started_at), duration_label="waited in the queue",
                detail=f"on worker {job.worker or '?'}", stages=list(job.stage_seconds.items()), job_id=job.id))
        # A released or discarded job ended its run held; the operator's action is an entry of its own.
        end_kind = JobState.HELD.value if job.state in (JobState.RELEASED.value, JobState.DISCARDED.value) \
            else job.state if job.state in _JOB_ENDED else None
        if job.state == JobState.RUNNING.value and job.started_at is not None:
            entries.append(TimelineEntry(at=now, kind="job.running", title=f"{name} running", state="running",
                                         duration_seconds=_span(job.started_at, now), duration_label="so far",
                                         job_id=job.id))
        elif end_kind is not None:
            at = job.state_changed_at if end_kind == JobState.CANCELLED.value else (job.finished_at or job.state_changed_at)
            entries.append(TimelineEntry(
                at=at, kind=f"job.{end_kind}", title=f"{name} {_END_TITLES.get(end_kind, end_kind)}", state=end_kind,
                duration_seconds=None if end_kind == JobState.CANCELLED.value else _span(job.started_at, at),
                detail=_end_detail(job, end_kind), job_id=job.id))
        for d in job.deliveries:
            dname = f"Delivery {d.id} to {d.destination}" + (" ('not performed' notice)" if d.notice_only else "")
            entries.append(TimelineEntry(at=d.created_at, kind="delivery.created", title=f"{dname} created",
                                         state="pending", job_id=job.id, delivery_id=d.id))
            if d.state == DeliveryState.DELIVERED.value:
                entries.append(TimelineEntry(
                    at=d.delivered_at or d.state_changed_at, kind="delivery.delivered", title=f"{dname} delivered",
                    state="delivered", duration_seconds=_span(d.created_at, d.delivered_at or d.state_changed_at),
                    detail=f"{d.objects_sent} object(s), attempt {d.attempts}", job_id=job.id, delivery_id=d.id))
            elif d.state in _DELIVERY_TROUBLE:
                retry = (f"; next attempt {d.next_attempt_at:%Y-%m-%d %H:%M:%S}"
                         if d.state == DeliveryState.FAILED.value and d.next_attempt_at else "; no retry")
                entries.append(TimelineEntry(
                    at=d.state_changed_at, kind=f"delivery.{d.state}", title=f"{dname} {d.state}", state=d.state,
                    duration_seconds=_span(d.created_at, d.state_changed_at),
                    detail=f"{d.error or 'failed'}; attempt {d.attempts} of {d.max_attempts}{retry}",
                    job_id=job.id, delivery_id=d.id))
            elif d.state == DeliveryState.SENDING.value:
                entries.append(TimelineEntry(
                    at=d.state_changed_at, kind="delivery.sending", title=f"{dname} sending", state="sending",
                    duration_seconds=_span(d.state_changed_at, now), duration_label="so far",
                    detail=f"attempt {d.attempts}",
                    job_id=job.id, delivery_id=d.id))
    entries.sort(key=lambda e: e.at)
    return entries


def findings(detail: StudyDetail) -> list[FindingRow]:
    """Segment volumes and detections from the summaries of the study's succeeded (or released) jobs.

    A segmentation job's summary holds ``volumes_ml`` (label -> millilitres); a
    detection job's ``detections`` (centre, diameter, score), largest first here.
    """
    rows: list[FindingRow] = []
    for job in detail.jobs:
        if job.state not in _JOB_RESULTS_SENT:
            continue
        summary = job.summary
        volumes = summary.get("volumes_ml")
        if isinstance(volumes, dict):
            for label, volume in volumes.items():
                rows.append(FindingRow(job_id=job.id, pipeline=job.pipeline, kind="segment", label=str(label),
                                       volume_ml=_number(volume)))
        detections = summary.get("detections")
        if isinstance(detections, list):
            found = [d for d in detections if isinstance(d, dict)]
            found.sort(key=lambda d: _number(d.get("diameter_mm")) or 0.0, reverse=True)
            for n, item in enumerate(found, start=1):
                centre = item.get("centre_mm")
                rows.append(FindingRow(
                    job_id=job.id, pipeline=job.pipeline, kind="detection", label=str(item.get("label") or f"finding {n}"),
                    diameter_mm=_number(item.get("diameter_mm")), score=_number(item.get("score")),
                    centre_mm=[float(v) for v in centre] if isinstance(centre, list)
                    and all(isinstance(v, (int, float)) for v in centre) else None,
                ))
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
