"""Read-only views of jobs with their results and deliveries, for the study page, the job API and the CLI.

Why a module of its own: a job row (its stages, checks, results and deliveries) is what the
study page, ``GET /api/v1/jobs``, the job actions and ``dicom-node jobs`` all show, and it is
built in a fixed number of set-based queries (never one per row) by :func:`job_rows`, which
:func:`dicom_node.db.study_views.study_detail` uses for a study's jobs too. The groups of job
and delivery states below are the single definition of "in progress", "in trouble" and
"ended" for the studies filter and the timeline.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.job_checks import ApplicabilityView, PlausibilityView, applicability_view, outcome_reason, \
    plausibility_view
from dicom_node.db.job_reruns import job_destinations
from dicom_node.db.jobs import NOTICE_KIND
from dicom_node.db.keyset import COUNT_CAP, Cursor, Keyset, Page, capped_count
from dicom_node.db.models import Delivery, DeliveryState, Job, JobState, ResultObject, Study, json_object

__all__ = [
    "DELIVERY_ACTIVE_STATES",
    "DELIVERY_TROUBLE_STATES",
    "JOB_ACTIVE_STATES",
    "JOB_ENDED_STATES",
    "JOB_RESULTS_SENT_STATES",
    "JOB_TROUBLE_STATES",
    "DeliveryPage",
    "DeliveryRow",
    "JobPage",
    "JobRow",
    "ResultRow",
    "get_delivery",
    "get_job",
    "job_counts_by_study",
    "job_rows",
    "jobs_query",
    "list_deliveries",
    "list_jobs",
]

logger = logging.getLogger(__name__)

#: Jobs queued, running or awaiting their retry.
JOB_ACTIVE_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)
#: Jobs whose last attempt failed, or that are dead.
JOB_TROUBLE_STATES = (JobState.FAILED.value, JobState.DEAD.value)
#: Job states that end a run: the worker finished it (an operator may still act on a held one).
JOB_ENDED_STATES = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value,
                    JobState.NOT_APPLICABLE.value, JobState.HELD.value)
#: Job states whose results went (or may go) to the destinations.
JOB_RESULTS_SENT_STATES = (JobState.SUCCEEDED.value, JobState.RELEASED.value)
#: Deliveries not yet final, and those whose last attempt failed or that are dead.
DELIVERY_ACTIVE_STATES = (DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.FAILED.value)
DELIVERY_TROUBLE_STATES = (DeliveryState.FAILED.value, DeliveryState.DEAD.value)


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
    #: 1 for the job routing created; 2, 3, ... for re-runs of the model on the series (re-process, self-healing).
    generation: int = 1
    #: The earlier job whose results this one replaces (when its own are ready).
    supersedes_job_id: int | None = None
    #: When a later job's results replaced this job's: history, no longer a current job of its study.
    superseded_at: datetime | None = None
    #: What the job's rule named: a list of destination names, or "default".
    destinations: list[str] | str = "default"

    @property
    def can_retry(self) -> bool:
        """Failed, dead or cancelled, and not superseded by a later run of its model on its series."""
        return self.superseded_at is None and \
            self.state in (JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value)

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


#: One page of the jobs list and of the deliveries list (:class:`~dicom_node.db.keyset.Page`).
JobPage = Page[JobRow]
DeliveryPage = Page[DeliveryRow]


def job_rows(session: Session, query: Any) -> list[JobRow]:
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
            worker=job.worker, stage_seconds=json_object(job.stage_seconds, f"stage_seconds of job {job.id}"),
            summary=json_object(job.summary, f"summary of job {job.id}"), created_at=job.created_at,
            queued_at=job.queued_at, started_at=job.started_at, finished_at=job.finished_at,
            state_changed_at=job.state_changed_at, results=results[job.id], deliveries=deliveries[job.id],
            checks=json_object(job.checks, f"checks of job {job.id}"), generation=job.generation or 1,
            supersedes_job_id=job.supersedes_job_id, superseded_at=job.superseded_at,
            destinations=job_destinations(job),
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


def deleted_by_retention(sessions: sessionmaker[Session], study_instance_uid: str, what: str) -> str | None:
    """"retention deleted its <what> on <when> UTC" when retention purged the study, else None: why a job or
    delivery of it cannot run or be sent again."""
    with sessions() as session:
        purged = session.scalar(select(Study.purged_at).where(Study.study_instance_uid == study_instance_uid))
    return None if purged is None else f"retention deleted its {what} on {purged:%Y-%m-%d %H:%M} UTC"


def jobs_query() -> Any:
    """Jobs with their study's UID: what :func:`job_rows` reads (add ``where`` and ``order_by``)."""
    return select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)


#: The jobs list's and the deliveries list's order, newest first: by id (the primary key, or the (state, id),
#: (pipeline, id) and (destination, id) indexes of migration 0012 when filtered).
_JOB_ORDER = Keyset(Job.id, lambda row: Cursor(None, int(row[0])), what="jobs")
_DELIVERY_ORDER = Keyset(Delivery.id, lambda row: Cursor(None, int(row[0])), what="deliveries")


def list_jobs(
    sessions: sessionmaker[Session], *, state: str | None = None, pipeline: str | None = None,
    study_instance_uid: str | None = None, limit: int = 100, offset: int = 0, after: str | None = None,
    before: str | None = None, count_cap: int | None = COUNT_CAP,
) -> JobPage:
    """The newest jobs first, optionally of one state, pipeline and/or study, with results and deliveries.

    Pages as the studies list's (:mod:`dicom_node.db.keyset`): by cursor (``after`` a page's ``next_cursor``,
    ``before`` its ``previous_cursor``), flat with the size of the database, or by ``offset``; ``total``
    counts up to ``count_cap`` (None: exactly). ValueError names a cursor this node did not give."""
    conditions = []
    if state:
        conditions.append(Job.state == state)
    if pipeline:
        conditions.append(Job.pipeline == pipeline)
    if study_instance_uid:  # by the study's unique UID, then its jobs by the study_id index
        conditions.append(Job.study_id.in_(select(Study.id).where(Study.study_instance_uid == study_instance_uid)))
    with sessions() as session:
        total, exact = capped_count(session, select(Job.id).where(*conditions), count_cap)
        page = _JOB_ORDER.page(session, select(Job.id).where(*conditions), limit=limit, offset=offset, after=after,
                               before=None if after else before)
        ids = [int(row[0]) for row in page.rows]
        by_id = {job.id: job for job in job_rows(session, jobs_query().where(Job.id.in_(ids)))} if ids else {}
    return JobPage(items=[by_id[i] for i in ids if i in by_id], total=total, limit=limit,
                   offset=0 if after or before else offset, total_exact=exact, next_cursor=page.next_cursor,
                   previous_cursor=page.previous_cursor)


def list_deliveries(
    sessions: sessionmaker[Session], *, state: str | None = None, destination: str | None = None, limit: int = 100,
    offset: int = 0, after: str | None = None, before: str | None = None, count_cap: int | None = COUNT_CAP,
) -> DeliveryPage:
    """The newest deliveries first, optionally of one state and/or destination, paged and counted as
    :func:`list_jobs`. ValueError names a cursor this node did not give."""
    conditions = []
    if state:
        conditions.append(Delivery.state == state)
    if destination:
        conditions.append(Delivery.destination == destination)
    with sessions() as session:
        total, exact = capped_count(session, select(Delivery.id).where(*conditions), count_cap)
        page = _DELIVERY_ORDER.page(session, select(Delivery.id).where(*conditions), limit=limit, offset=offset,
                                    after=after, before=None if after else before)
        ids = [int(row[0]) for row in page.rows]
        rows = session.execute(
            select(Delivery, Study.study_instance_uid).join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id).where(Delivery.id.in_(ids))
        ).all() if ids else []
    by_id = {delivery.id: _delivery_row(delivery, uid) for delivery, uid in rows}
    return DeliveryPage(items=[by_id[i] for i in ids if i in by_id], total=total, limit=limit,
                        offset=0 if after or before else offset, total_exact=exact, next_cursor=page.next_cursor,
                        previous_cursor=page.previous_cursor)


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
        found = job_rows(session, jobs_query().where(Job.id == job_id))
    return found[0] if found else None


def get_delivery(sessions: sessionmaker[Session], delivery_id: int) -> DeliveryRow | None:
    """One delivery (with its study's UID, for links back); None if unknown."""
    with sessions() as session:
        row = session.execute(
            select(Delivery, Study.study_instance_uid).join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id).where(Delivery.id == delivery_id)
        ).one_or_none()
    return None if row is None else _delivery_row(row[0], row[1])
