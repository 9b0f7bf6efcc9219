"""Running a model again on a series, and sending existing results again: the rows behind both.

Why a module of its own: three paths create a later *generation* of a job (the same model
on the same series of a study) and must agree on what that means - an operator's
re-process, the node's own re-run of a job that gave up on an incomplete series that has
since received more instances (self-healing, from :func:`dicom_node.db.jobs.record_routing`),
and nothing else. A later generation never reuses the earlier one's UIDs (the worker makes
new objects in a new series), and the earlier job is marked ``superseded`` when the later
one's results are ready - at once when the earlier job had no results to replace. Re-sending
never re-runs anything: it makes the existing results' deliveries due again.

Everything here works inside the caller's transaction (``session``) or as one short
transaction of its own, like :mod:`dicom_node.db.jobs`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    ResultObject,
    Series,
    Study,
    StudyEvent,
    StudyState,
    json_object,
)
from dicom_node.routing import JobSpec

__all__ = [
    "ACTIVE_JOB_STATES",
    "GAVE_UP_STATES",
    "NOTICE_KIND",
    "RESENDABLE_JOB_STATES",
    "Rerun",
    "Lineage",
    "ResendTarget",
    "grown_since",
    "input_instances_now",
    "job_destinations",
    "latest_jobs",
    "lineage",
    "make_due",
    "mark_superseded",
    "add_job",
    "never_sent_to",
    "reprocess",
    "resend_deliveries",
    "result_count",
    "supersede_on_success",
]

#: A job still on its way (a re-run of its model on its series waits for it).
ACTIVE_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)
#: A job that gave up on its series: run again when the series has received more instances since.
GAVE_UP_STATES = (JobState.DEAD.value, JobState.NOT_APPLICABLE.value)
#: A job whose results may be sent (again).
RESENDABLE_JOB_STATES = (JobState.SUCCEEDED.value, JobState.RELEASED.value)
#: States whose results a later generation replaces only once its own results are ready.
_WITH_RESULTS = (JobState.SUCCEEDED.value, JobState.RELEASED.value, JobState.HELD.value)

#: The kind of the "AI analysis not performed" SR (a result object like SEG or SR, sent only where asked).
NOTICE_KIND = "NOTICE"


def input_instances_now() -> ScalarSelect[Any]:
    """A correlated subquery for UPDATEs of ``jobs``: how many instances the job's series holds now.

    Claiming a job records it (``jobs.input_instances``), so that the node can tell later that
    the series received more instances than the job read.
    """
    return (
        select(Series.instance_count)
        .where(Series.study_id == Job.study_id, Series.series_instance_uid == Job.series_instance_uid)
        .scalar_subquery()
    )


def _destinations_json(spec: JobSpec) -> str:
    """A job spec's destinations as the ``jobs.destinations`` column stores them."""
    return json.dumps(spec.destinations if spec.destinations == "default" else list(spec.destinations))


def latest_jobs(session: Session, study_id: int) -> dict[tuple[str, str], Job]:
    """The latest generation of each (pipeline, series) of study ``study_id``."""
    latest: dict[tuple[str, str], Job] = {}
    for job in session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.generation)):
        latest[(job.pipeline, job.series_instance_uid)] = job
    return latest


def grown_since(session: Session, job: Job) -> int:
    """How many more instances ``job``'s series holds now than when the job read it (0: none, or unknown)."""
    now_count = session.scalar(
        select(Series.instance_count).where(Series.study_id == job.study_id,
                                            Series.series_instance_uid == job.series_instance_uid))
    if now_count is None or job.input_instances is None:
        return 0
    return max(0, int(now_count) - int(job.input_instances))


def add_job(session: Session, study_id: int, spec: JobSpec, *, now: datetime, max_attempts: int, queued: bool,
            earlier: Job | None = None) -> Job:
    """Add a job for ``spec`` on study ``study_id``: the first of its model on its series, or the next generation
    of ``earlier`` (the latest one), which it supersedes.

    ``queued``: the new job is ``queued`` and the caller sends its message after commit (the
    router); otherwise it is ``failed`` with no attempt made, like a manual retry, and the node's
    next sweep queues it, so whoever asks needs no queue. An earlier job without results to
    replace (dead, not applicable, cancelled, discarded) is marked superseded at once.
    """
    job = Job(
        study_id=study_id, series_instance_uid=spec.series_instance_uid, pipeline=spec.pipeline, rule=spec.rule,
        destinations=_destinations_json(spec), priority=spec.priority,
        state=(JobState.QUEUED if queued else JobState.FAILED).value, attempts=0, max_attempts=max_attempts,
        created_at=now, queued_at=now, state_changed_at=now,
        generation=1 if earlier is None else earlier.generation + 1,
        supersedes_job_id=None if earlier is None else earlier.id,
    )
    session.add(job)
    session.flush()
    if earlier is not None and earlier.state not in _WITH_RESULTS and earlier.superseded_at is None:
        earlier.superseded_at = now
    return job


def mark_superseded(session: Session, job: Job, *, now: datetime) -> list[int]:
    """Mark every earlier generation ``job`` supersedes (its chain) as superseded; returns their ids.

    Called when ``job``'s results are ready (it succeeded, or its held results were released).
    """
    marked = []
    earlier_id = job.supersedes_job_id
    while earlier_id is not None:
        earlier = session.get(Job, earlier_id)
        if earlier is None:
            break
        if earlier.superseded_at is None:
            earlier.superseded_at = now
            marked.append(earlier.id)
        earlier_id = earlier.supersedes_job_id
    return marked


def supersede_on_success(session: Session, job_id: int, *, now: datetime) -> None:
    """``job_id``'s results are ready: mark what it supersedes, with a timeline event naming the objects."""
    job = session.get(Job, job_id)
    if job is None or job.supersedes_job_id is None:
        return
    marked = mark_superseded(session, job, now=now)
    replaced = session.execute(
        select(ResultObject.kind, ResultObject.sop_instance_uid)
        .where(ResultObject.job_id.in_(marked), ResultObject.kind != NOTICE_KIND).order_by(ResultObject.id)
    ).all() if marked else []
    if replaced:
        objects = ", ".join(f"{kind} {uid}" for kind, uid in replaced)
        session.add(StudyEvent(study_id=job.study_id, at=now, kind="results_superseded", detail=(
            f"job {job.id} ({job.pipeline}, run {job.generation}) replaces the results of job(s) "
            f"{', '.join(map(str, marked))}: {objects} are superseded (the new objects are in new series; "
            "the PACS keeps the earlier ones until someone removes them)")))


@dataclass(frozen=True)
class Lineage:
    """Where a job stands among the runs of its model on its series, for the worker that encodes its results."""

    generation: int
    #: (SOP Class UID, SOP Instance UID, Series Instance UID) of the reports (SR) of the nearest earlier run that
    #: made any: what this run's report replaces.
    replaced_reports: tuple[tuple[str, str, str], ...]
    #: The findings that earlier run's report stated (its summary's ``tracking`` records: key, tracking UID,
    #: where a detection lay), so that the same findings keep their tracking UIDs.
    earlier_tracking: tuple[Any, ...] = ()


def lineage(sessions: sessionmaker[Session], job_id: int) -> Lineage:
    """Job ``job_id``'s generation and the earlier reports it replaces (none for a first run)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise KeyError(f"job {job_id} does not exist")
        generation, earlier_id = job.generation or 1, job.supersedes_job_id
        while earlier_id is not None:
            reports = session.execute(
                select(ResultObject.sop_class_uid, ResultObject.sop_instance_uid, ResultObject.series_instance_uid)
                .where(ResultObject.job_id == earlier_id, ResultObject.kind == "SR").order_by(ResultObject.id)
            ).all()
            if reports:
                summary = session.scalar(select(Job.summary).where(Job.id == earlier_id))
                tracking = json_object(summary, f"summary of job {earlier_id}").get("tracking")
                return Lineage(generation, tuple((str(a), str(b), str(c)) for a, b, c in reports),
                               tuple(tracking) if isinstance(tracking, list) else ())
            earlier_id = session.scalar(select(Job.supersedes_job_id).where(Job.id == earlier_id))
    return Lineage(generation, ())


def make_due(delivery: Delivery, now: datetime) -> None:
    """Make ``delivery`` carry all of its job's results, due now with a fresh attempt budget (``failed`` with no
    attempt made, like a manual retry: the node's next sweep sends it)."""
    delivery.kinds = None
    delivery.state = DeliveryState.FAILED.value
    delivery.attempts = 0
    delivery.error = None
    delivery.next_attempt_at = now
    delivery.lease_expires_at = None
    delivery.state_changed_at = now


@dataclass(frozen=True)
class ResendTarget:
    """One delivery made due again by a re-send: the job, the destination, the delivery row."""

    job_id: int
    pipeline: str
    destination: str
    delivery_id: int
    created: bool  # a new delivery (the destination never had these results) rather than a repeated one


def resend_deliveries(
    sessions: sessionmaker[Session], plan: Sequence[tuple[int, Sequence[str]]], *, now: datetime,
    max_attempts: int, by: str,
) -> list[ResendTarget]:
    """Make each job's results due at each named destination: ``plan`` is ``[(job_id, destinations)]``.

    A destination that already has a delivery of the job gets it again on the same row (fresh
    attempt budget); one that never had it gets a new delivery. Jobs that are no longer
    resendable (superseded, or not succeeded/released) meanwhile are left out. Due now: the
    node's next sweep sends them. Each job gets one ``results_resent`` timeline event naming ``by``.
    """
    targets: list[ResendTarget] = []
    with sessions.begin() as session:
        for job_id, names in plan:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state not in RESENDABLE_JOB_STATES or job.superseded_at is not None:
                continue
            existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))}
            for name in names:
                delivery = existing.get(name)
                created = delivery is None
                if delivery is None:
                    delivery = Delivery(job_id=job_id, destination=name, max_attempts=max_attempts, created_at=now,
                                        objects_sent=0)
                    session.add(delivery)
                make_due(delivery, now)
                session.flush()
                targets.append(ResendTarget(job_id, job.pipeline, name, delivery.id, created))
            if names:
                session.add(StudyEvent(study_id=job.study_id, at=now, kind="results_resent", detail=(
                    f"job {job_id} ({job.pipeline}): results sent again by {by} to {', '.join(names)}")))
    return targets


def job_destinations(job: Job) -> list[str] | str:
    """The destinations the job's rule named (a list of names, or ``"default"``)."""
    value = json.loads(job.destinations)
    return value if value == "default" else [str(v) for v in value]


def result_count(session: Session, job_id: int) -> int:
    """How many result objects (notices aside) job ``job_id`` has."""
    return int(session.scalar(select(func.count(ResultObject.id))
                              .where(ResultObject.job_id == job_id, ResultObject.kind != NOTICE_KIND)) or 0)


@dataclass(frozen=True)
class Rerun:
    """What a re-process did for one job spec: the new job (None when skipped) and what it replaces or why not."""

    pipeline: str
    series_instance_uid: str
    job_id: int | None
    supersedes_job_id: int | None
    skipped: str | None = None


def reprocess(
    sessions: sessionmaker[Session], study_id: int, specs: Sequence[JobSpec], *, now: datetime, max_attempts: int,
    by: str,
) -> list[Rerun] | None:
    """Run the models of ``specs`` (what the rules decide now) on study ``study_id`` again; None: no such study.

    Each spec gets a new job, due now (the next sweep queues it): the next generation of the
    latest job of its model and series (which it supersedes once its results are ready), or a
    first job when the rules now ask for a model that never ran on that series. A spec whose
    latest job is still queued, running or awaiting a retry is skipped (say so; it is about to
    run anyway). The study becomes ``routed`` (an ignored study too, when a rule matches now) and
    gets one ``reprocess`` event naming ``by``.
    """
    reruns: list[Rerun] = []
    with sessions.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study is None:
            return None
        latest = latest_jobs(session, study_id)
        for spec in specs:
            earlier = latest.get((spec.pipeline, spec.series_instance_uid))
            if earlier is not None and earlier.state in ACTIVE_JOB_STATES:
                reruns.append(Rerun(spec.pipeline, spec.series_instance_uid, None, None, skipped=(
                    f"job {earlier.id} is still {earlier.state}; it runs with the current model and rules")))
                continue
            job = add_job(session, study_id, spec, now=now, max_attempts=max_attempts, queued=False, earlier=earlier)
            reruns.append(Rerun(spec.pipeline, spec.series_instance_uid, job.id,
                                None if earlier is None else earlier.id))
        started = [r for r in reruns if r.job_id is not None]
        if started and study.state in (StudyState.COMPLETE.value, StudyState.IGNORED.value):
            study.state = StudyState.ROUTED.value
            study.state_changed_at = now
        done = "; ".join(
            f"{r.pipeline} on {r.series_instance_uid}: "
            + (f"not run again, {r.skipped}" if r.job_id is None else
               f"job {r.job_id}" + (f" replaces job {r.supersedes_job_id}" if r.supersedes_job_id else " (new)"))
            for r in reruns)
        session.add(StudyEvent(study_id=study_id, at=now, kind="reprocess",
                               detail=f"re-process requested by {by}: {done or 'no model to run'}"))
    return reruns


def never_sent_to(sessions: sessionmaker[Session], destination: str, *, finished_since: datetime) -> list[int]:
    """Current jobs with results, finished since ``finished_since``, that ``destination`` never had a delivery of
    (a destination added later: what it missed), oldest first; purged studies' jobs are left out."""
    with sessions() as session:
        had = select(Delivery.id).where(Delivery.job_id == Job.id, Delivery.destination == destination).exists()
        with_results = select(ResultObject.id).where(ResultObject.job_id == Job.id,
                                                     ResultObject.kind != NOTICE_KIND).exists()
        rows = session.execute(
            select(Job.id).join(Study, Study.id == Job.study_id)
            .where(Job.state.in_(RESENDABLE_JOB_STATES), Job.superseded_at.is_(None), Study.purged_at.is_(None),
                   Job.finished_at >= finished_since, ~had, with_results)
            .order_by(Job.finished_at, Job.id)
        ).all()
    return [int(r[0]) for r in rows]
