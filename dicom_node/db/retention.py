"""Retention in the database: which studies hold unfinished work, and the two transactions of a purge.

Why a module of its own: what may be deleted is decided here, from the rows, in a fixed
number of set-based queries, and the state change that makes deleting safe is one
guarded UPDATE, so the plan (:mod:`dicom_node.retention`) and the guard can never
disagree about a study with unfinished work.

A purge is crash-safe by its order (see :mod:`dicom_node.retention` for the files):

1. :func:`mark_purge` sets ``studies.purged_at`` - only if the study still has no unfinished
   work and nothing arrived since it was planned - and audits who ordered it, in one commit.
   From then on the study says its files may be gone.
2. The caller deletes the files (instances, then results and previews).
3. :func:`finish_purge` deletes the Instance rows of the files it deleted (received up to
   ``purged_at``) and writes the study's ``purged`` event with what went.

Files go before their rows so that start-up recovery (which indexes spool files that have
no row) never brings a half-deleted study back; a kill between 1 and 3 leaves a study whose
``purged_at`` has no ``purged`` event after it, which :func:`unfinished_purges` finds and
the next run finishes. What stays: the study row, series, jobs, deliveries, events, audit
entries and the ResultObject rows with their paths (they name where each object was; the
node recognises its own results by their UIDs when a PACS sends them back).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.audit import add_entry
from dicom_node.db.jobs import preview_paths
from dicom_node.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyEvent,
    StudyState,
)

__all__ = [
    "BLOCKING_DELIVERY_STATES",
    "BLOCKING_JOB_STATES",
    "BLOCKING_STUDY_STATES",
    "PURGED_EVENT",
    "PurgeFiles",
    "StudyFootprint",
    "UnfinishedPurge",
    "finish_purge",
    "footprints",
    "mark_purge",
    "purge_files",
    "unfinished_purges",
]

#: Study states whose files are still needed: receiving, and complete but not yet routed.
BLOCKING_STUDY_STATES = (StudyState.RECEIVING.value, StudyState.COMPLETE.value)
#: Job states that still need the series or the results: queued, running, awaiting a retry, held for an operator.
BLOCKING_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value, JobState.HELD.value)
#: Delivery states that still need the result files: pending, sending, awaiting the next attempt.
BLOCKING_DELIVERY_STATES = (DeliveryState.PENDING.value, DeliveryState.SENDING.value, DeliveryState.FAILED.value)
#: The study event a finished purge writes (its detail says what went).
PURGED_EVENT = "purged"

_JOB_BLOCKERS = {
    JobState.QUEUED.value: "queued",
    JobState.RUNNING.value: "running",
    JobState.FAILED.value: "failed, awaiting its retry",
    JobState.HELD.value: "held: its results wait for an operator (release or discard)",
}
_DELIVERY_BLOCKERS = {
    DeliveryState.PENDING.value: "pending",
    DeliveryState.SENDING.value: "sending",
    DeliveryState.FAILED.value: "failed, awaiting its next attempt",
}


@dataclass(frozen=True)
class StudyFootprint:
    """A study as retention sees it: how old its last activity is, what it holds, what keeps it."""

    study_id: int
    study_instance_uid: str
    state: str
    #: The latest of: last instance or association release, state change, any job's or delivery's state change.
    last_activity_at: datetime
    #: ``studies.last_activity_at`` as read (the guard of :func:`mark_purge`: nothing arrived since the plan).
    received_marker: datetime
    purged_at: datetime | None
    instances: int
    instance_bytes: int
    #: Outbox-relative paths of the study's result objects and the previews its jobs drew.
    result_paths: tuple[str, ...]
    #: Why it must stay whatever its age (empty: nothing unfinished).
    blockers: tuple[str, ...]


@dataclass(frozen=True)
class PurgeFiles:
    """The files one purge deletes: the instances received up to ``purged_at`` (spool-relative, with their
    sizes as received) and, when results go too, the result objects and previews (outbox-relative)."""

    instances: tuple[tuple[str, int], ...]
    results: tuple[str, ...]


@dataclass(frozen=True)
class UnfinishedPurge:
    """A study marked purged whose purge did not write its ``purged`` event (the process died)."""

    study_id: int
    study_instance_uid: str
    purged_at: datetime


def _latest(*values: datetime | None) -> datetime:
    return max(v for v in values if v is not None)


def footprints(sessions: sessionmaker[Session]) -> list[StudyFootprint]:
    """Every study that still has files to delete (never purged, or received instances since), oldest last
    activity first. Five queries whatever the number of studies."""
    has_instances = exists().where(Series.study_id == Study.id, Instance.series_id == Series.id)
    with sessions() as session:
        studies = session.execute(
            select(Study.id, Study.study_instance_uid, Study.state, Study.last_activity_at, Study.last_received_at,
                   Study.state_changed_at, Study.purged_at)
            .where(Study.purged_at.is_(None) | has_instances)
        ).all()
        ids = [int(row[0]) for row in studies]
        if not ids:
            return []
        sizes = {int(study_id): (int(count), int(size or 0)) for study_id, count, size in session.execute(
            select(Series.study_id, func.count(Instance.id), func.sum(Instance.size_bytes))
            .join(Instance, Instance.series_id == Series.id).where(Series.study_id.in_(ids)).group_by(Series.study_id))}
        activity: dict[int, list[datetime]] = defaultdict(list)
        blockers: dict[int, list[str]] = defaultdict(list)
        results: dict[int, list[str]] = defaultdict(list)
        for job in session.execute(select(Job).where(Job.study_id.in_(ids)).order_by(Job.id)).scalars():
            activity[job.study_id].append(job.state_changed_at)
            if job.state in _JOB_BLOCKERS:
                blockers[job.study_id].append(f"job {job.id} ({job.pipeline}) is {_JOB_BLOCKERS[job.state]}")
            results[job.study_id].extend(preview_paths(job))
        for study_id, path in session.execute(
            select(Job.study_id, ResultObject.path).join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_id.in_(ids)).order_by(ResultObject.id)
        ):
            results[int(study_id)].append(str(path))
        for study_id, delivery_id, destination, state, changed in session.execute(
            select(Job.study_id, Delivery.id, Delivery.destination, Delivery.state, Delivery.state_changed_at)
            .join(Job, Job.id == Delivery.job_id).where(Job.study_id.in_(ids)).order_by(Delivery.id)
        ):
            activity[int(study_id)].append(changed)
            if state in _DELIVERY_BLOCKERS:
                blockers[int(study_id)].append(
                    f"delivery {delivery_id} to {destination} is {_DELIVERY_BLOCKERS[state]}")
    found = []
    for study_id, uid, state, last_activity, last_received, state_changed, purged_at in studies:
        own = []
        if state == StudyState.RECEIVING.value:
            own.append(f"still receiving (last instance {last_received:%Y-%m-%d %H:%M:%S} UTC)")
        elif state == StudyState.COMPLETE.value:
            own.append("complete, not yet routed")
        count, size = sizes.get(study_id, (0, 0))
        found.append(StudyFootprint(
            study_id=study_id, study_instance_uid=uid, state=state,
            last_activity_at=_latest(last_activity, last_received, state_changed, *activity[study_id]),
            received_marker=last_activity, purged_at=purged_at, instances=count, instance_bytes=size,
            result_paths=tuple(dict.fromkeys(results[study_id])), blockers=tuple(own + blockers[study_id])))
    found.sort(key=lambda f: (f.last_activity_at, f.study_id))
    return found


def _unfinished_work() -> Any:
    """The condition "study has unfinished work" (correlated to ``studies``), as :data:`BLOCKING_*` define it."""
    job = exists().where(Job.study_id == Study.id, Job.state.in_(BLOCKING_JOB_STATES))
    delivery = exists().where(Job.study_id == Study.id, Delivery.job_id == Job.id,
                              Delivery.state.in_(BLOCKING_DELIVERY_STATES))
    return Study.state.in_(BLOCKING_STUDY_STATES) | job | delivery


def mark_purge(sessions: sessionmaker[Session], footprint: StudyFootprint, *, now: datetime, actor: str,
               reason: str, planned: dict[str, Any], remote_addr: str | None = None,
               detail: str | None = None) -> bool:
    """Step 1 of a purge: set ``purged_at`` and audit ``study.purge`` by ``actor`` in one commit.

    Guarded in the UPDATE itself: only while the study has no unfinished work, nothing arrived
    since ``footprint`` was read, and no other purge marked it since. False (nothing changed)
    otherwise. ``planned``: what the plan expects to delete (counts, bytes), for the audit entry.
    """
    guard = [Study.id == footprint.study_id, ~_unfinished_work(),
             Study.last_activity_at == footprint.received_marker,
             Study.purged_at.is_(None) if footprint.purged_at is None else Study.purged_at == footprint.purged_at]
    with sessions.begin() as session:
        marked = session.execute(update(Study).where(*guard).values(purged_at=now)
                                 .execution_options(synchronize_session=False)).rowcount
        if not marked:
            return False
        add_entry(session, at=now, actor=actor, action="study.purge", target_kind="study",
                  target=footprint.study_instance_uid,
                  before={"state": footprint.state, "purged_at": footprint.purged_at,
                          "last_activity_at": footprint.last_activity_at},
                  after={"purged_at": now, **planned}, remote_addr=remote_addr,
                  detail="; ".join(part for part in (reason, detail) if part))
    return True


def _instances_up_to(study_id: int, purged_at: datetime) -> Any:
    """Instance rows of the study received up to ``purged_at`` (what a purge marked then deletes)."""
    return and_(Instance.series_id.in_(select(Series.id).where(Series.study_id == study_id)),
                Instance.received_at <= purged_at)


def purge_files(sessions: sessionmaker[Session], study_id: int, purged_at: datetime, *,
                with_results: bool) -> PurgeFiles:
    """Step 2's list: the files of the purge of ``study_id`` marked at ``purged_at``."""
    with sessions() as session:
        instances = tuple((str(path), int(size)) for path, size in session.execute(
            select(Instance.path, Instance.size_bytes).where(_instances_up_to(study_id, purged_at))
            .order_by(Instance.id)))
        results: list[str] = []
        if with_results:
            results = [str(p) for p in session.scalars(
                select(ResultObject.path).join(Job, Job.id == ResultObject.job_id)
                .where(Job.study_id == study_id).order_by(ResultObject.id))]
            for job in session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)):
                results.extend(preview_paths(job))
    return PurgeFiles(instances=instances, results=tuple(dict.fromkeys(results)))


def finish_purge(sessions: sessionmaker[Session], study_id: int, purged_at: datetime, *, now: datetime,
                 detail: str) -> int | None:
    """Step 3: delete the study's Instance rows received up to ``purged_at`` and write its ``purged`` event
    (``detail``: what went). Returns how many rows were deleted; None when this purge was already finished
    (by another run) or the study was marked again since."""
    with sessions.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or study.purged_at != purged_at:
            return None
        done = session.scalar(select(func.count(StudyEvent.id)).where(
            StudyEvent.study_id == study_id, StudyEvent.kind == PURGED_EVENT, StudyEvent.at >= purged_at))
        if done:
            return None
        deleted = session.execute(delete(Instance).where(_instances_up_to(study_id, purged_at))
                                  .execution_options(synchronize_session=False)).rowcount
        session.add(StudyEvent(study_id=study_id, at=max(now, purged_at), kind=PURGED_EVENT, detail=detail))
    return int(deleted or 0)


def unfinished_purges(sessions: sessionmaker[Session]) -> list[UnfinishedPurge]:
    """Studies marked purged (step 1) without the ``purged`` event of that purge (step 3): a run died between."""
    finished = exists().where(StudyEvent.study_id == Study.id, StudyEvent.kind == PURGED_EVENT,
                              StudyEvent.at >= Study.purged_at)
    with sessions() as session:
        rows = session.execute(select(Study.id, Study.study_instance_uid, Study.purged_at)
                               .where(Study.purged_at.is_not(None), ~finished).order_by(Study.purged_at)).all()
    return [UnfinishedPurge(int(i), str(uid), at) for i, uid, at in rows]
