"""Jobs, their result objects and deliveries: every state change as one short transaction.

Why: the database is the source of truth for the pipeline (the queue only carries
ids), so a process that dies mid-task loses nothing: :func:`requeue_jobs` and
:func:`due_deliveries` find what is left and it is sent again, and a message the
broker lost is sent again by :func:`resend_queued_jobs` and :func:`resend_pending_deliveries`. Claiming a job or a
delivery is a conditional UPDATE, so two workers never run the same one, and a
redelivered message for a finished job is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import job_reruns
from dicom_node.db.job_checks import outcome_reason
from dicom_node.db.notifications import notify_when_delivered
from dicom_node.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    ResultObject,
    Study,
    StudyEvent,
    StudyState,
    json_object,
)
from dicom_node.routing import RoutingDecision

__all__ = [
    "DeliveryClaim",
    "JobClaim",
    "ResultSpec",
    "cancel_job",
    "claim_delivery",
    "claim_job",
    "due_deliveries",
    "fail_delivery",
    "fail_job",
    "finish_delivery",
    "finish_job",
    "hand_back_delivery",
    "hand_back_job",
    "heartbeat_job",
    "own_result_series",
    "requeue_jobs",
    "resend_pending_deliveries",
    "resend_queued_jobs",
    "unfinished_deliveries",
    "unfinished_jobs",
    "record_routing",
    "results_of_job",
    "retry_delivery",
    "retry_job",
    "studies_to_route",
]


@dataclass(frozen=True)
class JobClaim:
    """What a worker needs to run a job it has just claimed."""

    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    attempt: int
    destinations: list[str] | str


@dataclass(frozen=True)
class ResultSpec:
    """A result object a job wrote to the outbox."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: int
    job_id: int
    destination: str
    attempt: int
    #: The result kinds this delivery carries; None: every kind the destination takes but NOTICE.
    kinds: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DeliverySpec:
    """A delivery to create: the destination and the kinds it carries (None: the results, see DeliveryClaim)."""

    destination: str
    kinds: tuple[str, ...] | None = None


#: The kind of the "AI analysis not performed" SR (defined beside the re-runs, which leave it out of resends).
NOTICE_KIND = job_reruns.NOTICE_KIND
#: How a finished job ended: what the worker reports to :func:`finish_job`.
FINISHED_STATES = (JobState.SUCCEEDED.value, JobState.NOT_APPLICABLE.value, JobState.HELD.value)


def studies_to_route(sessions: sessionmaker[Session]) -> list[tuple[int, str]]:
    """(id, Study Instance UID) of every study that is complete and not yet routed."""
    with sessions() as session:
        rows = session.execute(
            select(Study.id, Study.study_instance_uid).where(Study.state == StudyState.COMPLETE.value)
        ).all()
    return [(int(i), str(u)) for i, u in rows]


def own_result_series(sessions: sessionmaker[Session], study_id: int, series_uids: Iterable[str]) -> set[str]:
    """Which of ``series_uids`` (series of the study ``study_id``) are results this node produced for that study.

    Keyed by study like every series lookup: a Series Instance UID alone may belong to several studies.
    """
    uids = list(series_uids)
    if not uids:
        return set()
    with sessions() as session:
        rows = session.execute(
            select(ResultObject.series_instance_uid).join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_id == study_id, ResultObject.series_instance_uid.in_(uids)).distinct()
        ).all()
    return {str(r[0]) for r in rows}


def record_routing(
    sessions: sessionmaker[Session], study_id: int, decision: RoutingDecision, *, now: datetime, max_attempts: int
) -> list[int]:
    """Store the router's decision for a complete study; returns the ids of new jobs to enqueue.

    A job that already exists for the same study, pipeline and series is not created
    again (a study that completes again, e.g. when our own results come back, does
    not re-run) - except one that gave up on its series (dead: e.g. slices missing;
    not applicable: e.g. too few slices) when the series has received more instances
    since: its next generation is queued, with a ``rerun_on_more_instances`` event saying why
    (an interrupted PACS send that the PACS repeats heals itself). The study becomes ``routed`` when it has any job, else ``ignored``
    with the reason kept as a study event. A rule that cannot be applied (a regex
    stored before RE2, see :meth:`dicom_node.routing.Rule.problems`) adds a
    ``rule_unusable`` event naming it, whatever the other rules decided.
    """
    new_ids: list[int] = []
    with sessions.begin() as session:
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or study.state != StudyState.COMPLETE.value:
            return []  # routed meanwhile by someone else, or reopened
        latest = job_reruns.latest_jobs(session, study_id)
        kept: list[str] = []
        for spec in decision.jobs:
            earlier = latest.get((spec.pipeline, spec.series_instance_uid))
            grown = job_reruns.grown_since(session, earlier) \
                if earlier is not None and earlier.state in job_reruns.GAVE_UP_STATES else 0
            if earlier is not None and not grown:
                kept.append(f"{spec.pipeline} on {spec.series_instance_uid}: job {earlier.id} {earlier.state}")
                continue
            job = job_reruns.add_job(session, study_id, spec, now=now, max_attempts=max_attempts, queued=True,
                                     earlier=earlier)
            new_ids.append(job.id)
            if earlier is not None:
                checks = json_object(earlier.checks, f"checks of job {earlier.id}")
                why = earlier.error or outcome_reason(earlier.state, checks) or earlier.state
                session.add(StudyEvent(study_id=study_id, at=now, kind="rerun_on_more_instances", detail=(
                    f"job {job.id} runs {spec.pipeline} again on series {spec.series_instance_uid}: the series "
                    f"received {grown} more instance(s) since job {earlier.id} ended "
                    f"{earlier.state.replace('_', ' ')} ({why})")))
        has_jobs = bool(decision.jobs) or bool(latest)
        study.state = (StudyState.ROUTED if has_jobs else StudyState.IGNORED).value
        study.state_changed_at = now
        if decision.jobs:
            detail = ", ".join(f"{j.pipeline} on {j.series_instance_uid} (rule {j.rule})" for j in decision.jobs)
            if kept:
                detail += ("; not run again: " + "; ".join(kept) + " (finished jobs run again only on request, "
                           "`dicom-node studies reprocess`, or when a series they gave up on received more instances)")
            session.add(StudyEvent(study_id=study_id, at=now, kind="routed", detail=detail))
        elif latest:  # completed again (late instances, our results coming back): its jobs stand
            session.add(StudyEvent(study_id=study_id, at=now, kind="routed", detail=(
                f"no new job: {decision.ignored_reason}; its {len(latest)} earlier job(s) stand")))
        else:
            session.add(StudyEvent(study_id=study_id, at=now, kind="ignored", detail=decision.ignored_reason))
        for outcome in decision.outcomes:  # a rule that cannot be applied is visible even when others matched
            if outcome.problems:
                session.add(StudyEvent(study_id=study_id, at=now, kind="rule_unusable",
                                       detail=f"rule {outcome.rule} was not applied: " + "; ".join(outcome.problems)))
    return new_ids


def claim_job(
    sessions: sessionmaker[Session], job_id: int, *, worker: str, now: datetime, lease_seconds: float
) -> JobClaim | None:
    """Move a queued job to running for ``worker``; None if it is not queued (a duplicate message)."""
    with sessions.begin() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
            .values(
                state=JobState.RUNNING.value, attempts=Job.attempts + 1, worker=worker[:255], started_at=now,
                finished_at=None, lease_expires_at=now + timedelta(seconds=lease_seconds), state_changed_at=now,
                input_instances=job_reruns.input_instances_now(),
            )
        ).rowcount
        if not claimed:
            return None
        row = session.execute(
            select(Job.id, Study.study_instance_uid, Job.series_instance_uid, Job.pipeline, Job.attempts,
                   Job.destinations)
            .join(Study, Study.id == Job.study_id)
            .where(Job.id == job_id)
        ).one()
    return JobClaim(int(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), json.loads(row[5]))


def heartbeat_job(sessions: sessionmaker[Session], job_id: int, *, now: datetime, lease_seconds: float) -> None:
    """Extend a running job's lease (a long inference is not taken for a dead worker)."""
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        )


def finish_job(
    sessions: sessionmaker[Session],
    job_id: int,
    *,
    now: datetime,
    stage_seconds: dict[str, float],
    summary: dict[str, Any] | None,
    results: Sequence[ResultSpec],
    destinations: Sequence[str] = (),
    delivery_max_attempts: int,
    deliveries: Sequence[DeliverySpec] = (),
    worker: str | None = None,
    state: str = JobState.SUCCEEDED.value,
    checks: dict[str, Any] | None = None,
    events: Sequence[tuple[str, str]] = (),
) -> list[int] | None:
    """Mark a running job finished (``state``: succeeded, not_applicable or held) with its result objects,
    the checks made before and after the model ran, and timeline ``events`` ``(kind, detail)``; create
    one delivery of the results per name in ``destinations`` and one per item of ``deliveries``.

    A held job's deliveries carry only its notice (if any); :func:`release_job` sends the rest.
    Returns the new delivery ids, or None when the job is no longer running (cancelled,
    or reconciled and run elsewhere) - or, with ``worker``, no longer running on that
    worker (handed back and taken by another): it is left alone and nothing is recorded.
    """
    if state not in FINISHED_STATES:
        raise ValueError(f"finish_job: state {state!r} is not one of {FINISHED_STATES}")
    with sessions.begin() as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value, *_running_on(worker))
            .values(
                state=state, finished_at=now, lease_expires_at=None, error=None,
                stage_seconds=json.dumps(stage_seconds), summary=None if summary is None else json.dumps(summary),
                checks=None if checks is None else json.dumps(checks), state_changed_at=now,
            )
        ).rowcount
        if not done:
            return None
        study_id = session.execute(select(Job.study_id).where(Job.id == job_id)).scalar_one()
        if state == JobState.SUCCEEDED.value:
            job_reruns.supersede_on_success(session, job_id, now=now)
        for kind, detail in events:
            session.add(StudyEvent(study_id=study_id, at=now, kind=kind, detail=detail))
        for result in results:
            session.add(ResultObject(
                job_id=job_id, kind=result.kind, sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid, series_instance_uid=result.series_instance_uid,
                path=result.path, created_at=now,
            ))
        specs = [DeliverySpec(name) for name in destinations] + list(deliveries)
        created = [_new_delivery(session, job_id, spec, now=now, max_attempts=delivery_max_attempts)
                   for spec in specs]
        session.flush()
        notify_when_delivered(session, job_id, now=now, max_attempts=delivery_max_attempts)
        return [d.id for d in created]


def _new_delivery(session: Session, job_id: int, spec: DeliverySpec, *, now: datetime, max_attempts: int) -> Delivery:
    delivery = Delivery(
        job_id=job_id, destination=spec.destination, state=DeliveryState.PENDING.value, attempts=0,
        max_attempts=max_attempts, next_attempt_at=now, created_at=now, state_changed_at=now,
        kinds=None if spec.kinds is None else json.dumps(list(spec.kinds)),
    )
    session.add(delivery)
    return delivery


@dataclass(frozen=True)
class HeldJob:
    """A held job as the release and discard actions see it."""

    job_id: int
    study_id: int
    pipeline: str
    destinations: list[str] | str
    reason: str | None


def held_job(sessions: sessionmaker[Session], job_id: int) -> HeldJob | None:
    """Job ``job_id`` if it is held (None otherwise)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.HELD.value:
            return None
        return HeldJob(job.id, job.study_id, job.pipeline, json.loads(job.destinations), job.error)


def release_job(
    sessions: sessionmaker[Session], job_id: int, *, now: datetime, destinations: Sequence[str],
    delivery_max_attempts: int, by: str,
) -> list[int] | None:
    """Send a held job's results after all: ``held`` -> ``released``, one delivery of its results per destination.

    A destination that already had the job's notice gets the results on the same delivery row.
    The deliveries are due now (``failed`` with no attempts made, like a manual retry): the node's
    next sweep sends them, so whoever releases needs no queue. Returns their ids, or None when
    the job is not held.
    """
    with sessions.begin() as session:
        job = _leave_held(session, job_id, JobState.RELEASED, now)
        if job is None:
            return None
        existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))}
        queued = []
        for name in destinations:
            delivery = existing.get(name)
            if delivery is None:
                delivery = _new_delivery(session, job_id, DeliverySpec(name), now=now, max_attempts=delivery_max_attempts)
            job_reruns.make_due(delivery, now)
            queued.append(delivery)
        session.add(StudyEvent(study_id=job.study_id, at=now, kind="job_released", detail=(
            f"job {job_id} ({job.pipeline}): held results released by {by} to "
            f"{', '.join(destinations) or 'no destination'}")))
        session.flush()
        job_reruns.supersede_on_success(session, job_id, now=now)
        notify_when_delivered(session, job_id, now=now, max_attempts=delivery_max_attempts)
        return [d.id for d in queued]


def _leave_held(session: Session, job_id: int, state: JobState, now: datetime) -> Job | None:
    """Move a held job to ``state`` (one conditional update: two operators cannot both act); None if not held."""
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.HELD.value)
        .values(state=state.value, state_changed_at=now)
    ).rowcount
    return session.get(Job, job_id) if done else None


def preview_paths(job: Job) -> list[str]:
    """The outbox paths of the preview picture ``job``'s summary names (``summary["preview"]``: png and facts)."""
    preview = json_object(job.summary, f"summary of job {job.id}").get("preview")
    if not isinstance(preview, dict):
        return []
    return [path for role, path in preview.items() if role != "error" and isinstance(path, str)]


def discard_job(sessions: sessionmaker[Session], job_id: int, *, now: datetime, by: str) -> list[str] | None:
    """Throw a held job's results away: ``held`` -> ``discarded``; returns the outbox paths to remove (the
    result objects and the preview picture the worker drew of them).

    The notice (when one was sent) stays: it said AI looked and declined. None when the job is not held.
    """
    with sessions.begin() as session:
        job = _leave_held(session, job_id, JobState.DISCARDED, now)
        if job is None:
            return None
        results = list(session.scalars(
            select(ResultObject).where(ResultObject.job_id == job_id, ResultObject.kind != NOTICE_KIND)))
        paths = [r.path for r in results] + preview_paths(job)
        for result in results:
            session.delete(result)
        session.add(StudyEvent(study_id=job.study_id, at=now, kind="job_discarded", detail=(
            f"job {job_id} ({job.pipeline}): held results discarded by {by}")))
        return paths


def fail_job(
    sessions: sessionmaker[Session], job_id: int, *, now: datetime, error: str, retryable: bool,
    stage_seconds: dict[str, float] | None = None, worker: str | None = None,
) -> str | None:
    """Record a failed attempt: ``failed`` (to be retried) while attempts remain and retrying can help, else ``dead``.

    Returns the new state, or None when the job was not running (on ``worker``, if given).
    """
    with sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state != JobState.RUNNING.value or (worker is not None and job.worker != worker[:255]):
            return None
        state = JobState.FAILED if retryable and job.attempts < job.max_attempts else JobState.DEAD
        job.state = state.value
        job.error = error
        job.finished_at = now
        job.lease_expires_at = None
        job.state_changed_at = now
        if stage_seconds is not None:
            job.stage_seconds = json.dumps(stage_seconds)
        return state.value


def _running_on(worker: str | None) -> list[Any]:
    """The extra condition that a job runs on ``worker`` (none when ``worker`` is None)."""
    return [] if worker is None else [Job.worker == worker[:255]]


def hand_back_job(sessions: sessionmaker[Session], job_id: int, *, worker: str, now: datetime, reason: str) -> bool:
    """Put a job that ``worker`` is running back to ``queued`` as if the attempt had not started.

    For a worker that stops (SIGTERM) before the job finished: the attempt does not
    count, the claim (worker, start, lease) is cleared and the study gets a
    ``job_handed_back`` event with ``reason``. False when the job no longer runs on
    ``worker`` (it finished, failed or was cancelled meanwhile): nothing changes.
    """
    with sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state != JobState.RUNNING.value or job.worker != worker[:255]:
            return False
        attempt = job.attempts
        job.state = JobState.QUEUED.value
        job.attempts = max(0, attempt - 1)
        job.worker = None
        job.started_at = None
        job.lease_expires_at = None
        job.queued_at = now
        job.state_changed_at = now
        session.add(StudyEvent(study_id=job.study_id, at=now, kind="job_handed_back", detail=(
            f"job {job.id} ({job.pipeline}) handed back to the queue: {reason}; attempt {attempt} "
            "does not count")))
    return True


def _unpurged_studies() -> Any:
    """The ids of studies whose files retention has not deleted (a subquery)."""
    return select(Study.id).where(Study.purged_at.is_(None))


def retry_job(sessions: sessionmaker[Session], job_id: int, *, now: datetime) -> bool:
    """Manual retry of a failed or dead job with a fresh attempt budget; the node's next sweep enqueues it.

    A superseded job (a later run of its model on its series replaced it) is history, and a job of a
    purged study has no instances left: neither is retried."""
    with sessions.begin() as session:
        return bool(session.execute(
            update(Job)
            .where(Job.id == job_id, Job.superseded_at.is_(None), Job.study_id.in_(_unpurged_studies()),
                   Job.state.in_([JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value]))
            .values(state=JobState.FAILED.value, attempts=0, state_changed_at=now)
        ).rowcount)


def cancel_job(sessions: sessionmaker[Session], job_id: int, *, now: datetime) -> str | None:
    """Manual cancel of a queued, failed (awaiting retry) or running job; returns the state it had, or None
    when it does not exist or is in no state to cancel.

    A running attempt is not interrupted on its worker, but everything the worker
    does next is conditional on the job still being ``running`` (:func:`finish_job`,
    :func:`fail_job`, :func:`heartbeat_job`, :func:`requeue_jobs`), so its outcome is
    discarded: no result objects are recorded, no deliveries are created and
    ``cancelled`` stays. A cancelled job can be retried (:func:`retry_job`).
    """
    cancellable = (JobState.QUEUED.value, JobState.FAILED.value, JobState.RUNNING.value)
    with sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state not in cancellable:
            return None
        before = job.state
        job.state = JobState.CANCELLED.value
        job.lease_expires_at = None
        job.finished_at = now
        job.state_changed_at = now
        return before


def requeue_jobs(sessions: sessionmaker[Session], *, now: datetime) -> list[int]:
    """Put back to queued, and return, jobs to run again: failed ones with attempts left, and running
    ones whose worker stopped renewing the lease (that attempt counts; none left: dead)."""
    with sessions.begin() as session:
        stale = session.execute(
            select(Job.id, Job.attempts, Job.max_attempts, Job.worker)
            .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
        ).all()
        requeued = []
        for job_id, attempts, max_attempts, worker in stale:
            lost = f"worker {worker or '?'} stopped during attempt {attempts}"
            state = JobState.QUEUED if attempts < max_attempts else JobState.DEAD
            changed = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING.value)
                .values(state=state.value, error=lost + ("" if state is JobState.QUEUED else "; no attempts left"),
                        lease_expires_at=None, queued_at=now, state_changed_at=now)
            ).rowcount
            if changed and state is JobState.QUEUED:
                requeued.append(int(job_id))
        failed = [int(r[0]) for r in session.execute(
            select(Job.id).where(Job.state == JobState.FAILED.value).order_by(Job.priority.desc(), Job.id)
        ).all()]
        if failed:
            session.execute(
                update(Job).where(Job.id.in_(failed), Job.state == JobState.FAILED.value)
                .values(state=JobState.QUEUED.value, queued_at=now, state_changed_at=now)
            )
    return requeued + failed


def unfinished_jobs(sessions: sessionmaker[Session], *, now: datetime) -> list[int]:
    """At start-up: every job that still has to run (queued, failed, or running on a dead worker)."""
    requeue_jobs(sessions, now=now)
    with sessions() as session:
        rows = session.execute(
            select(Job.id).where(Job.state == JobState.QUEUED.value).order_by(Job.priority.desc(), Job.id)
        ).all()
    return [int(r[0]) for r in rows]


def results_of_job(sessions: sessionmaker[Session], job_id: int) -> list[ResultSpec]:
    with sessions() as session:
        rows = session.execute(
            select(ResultObject.kind, ResultObject.sop_class_uid, ResultObject.sop_instance_uid,
                   ResultObject.series_instance_uid, ResultObject.path)
            .where(ResultObject.job_id == job_id).order_by(ResultObject.id)
        ).all()
    return [ResultSpec(*map(str, row)) for row in rows]


def claim_delivery(
    sessions: sessionmaker[Session], delivery_id: int, *, now: datetime, lease_seconds: float
) -> DeliveryClaim | None:
    """Move a pending delivery to sending; None if it is not pending (already sent, or waiting for backoff)."""
    with sessions.begin() as session:
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING.value)
            .values(state=DeliveryState.SENDING.value, attempts=Delivery.attempts + 1,
                    lease_expires_at=now + timedelta(seconds=lease_seconds), state_changed_at=now)
        ).rowcount
        if not claimed:
            return None
        row = session.execute(
            select(Delivery.job_id, Delivery.destination, Delivery.attempts, Delivery.kinds)
            .where(Delivery.id == delivery_id)
        ).one()
    kinds = None if row[3] is None else tuple(str(k) for k in json.loads(row[3]))
    return DeliveryClaim(delivery_id, int(row[0]), str(row[1]), int(row[2]), kinds)


def finish_delivery(sessions: sessionmaker[Session], delivery_id: int, *, now: datetime, objects_sent: int,
                    notify_max_attempts: int | None = None) -> list[int]:
    """Mark a delivery being sent ``delivered``. With ``notify_max_attempts``, in the same transaction, make the
    job's notifications due when this was its last delivery outstanding
    (:func:`dicom_node.db.notifications.notify_when_delivered`); returns their ids."""
    with sessions.begin() as session:
        done = session.execute(
            update(Delivery).where(Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING.value)
            .values(state=DeliveryState.DELIVERED.value, delivered_at=now, objects_sent=objects_sent, error=None,
                    lease_expires_at=None, next_attempt_at=None, state_changed_at=now)
        ).rowcount
        if not done or notify_max_attempts is None:
            return []
        job_id = session.execute(select(Delivery.job_id).where(Delivery.id == delivery_id)).scalar_one()
        return notify_when_delivered(session, job_id, now=now, max_attempts=notify_max_attempts)


def fail_delivery(
    sessions: sessionmaker[Session], delivery_id: int, *, now: datetime, error: str, retryable: bool,
    backoff_initial_seconds: float, backoff_max_seconds: float,
) -> tuple[str, datetime | None]:
    """Record a failed attempt; exponential backoff while attempts remain, else ``dead``.

    Returns (new state, when the next attempt is due).
    """
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        if delivery is None:
            raise KeyError(f"delivery {delivery_id} does not exist")
        delivery.error = error
        delivery.lease_expires_at = None
        delivery.state_changed_at = now
        if retryable and delivery.attempts < delivery.max_attempts:
            delay = min(backoff_max_seconds, backoff_initial_seconds * 2 ** max(0, delivery.attempts - 1))
            delivery.state = DeliveryState.FAILED.value
            delivery.next_attempt_at = now + timedelta(seconds=delay)
        else:
            delivery.state = DeliveryState.DEAD.value
            delivery.next_attempt_at = None
        return delivery.state, delivery.next_attempt_at


def due_deliveries(sessions: sessionmaker[Session], *, now: datetime) -> list[int]:
    """Deliveries to send again now: failed ones whose backoff expired, and sending ones whose sender
    stopped renewing the lease; they become pending again."""
    with sessions.begin() as session:
        ids = [int(r[0]) for r in session.execute(
            select(Delivery.id).where(
                or_((Delivery.state == DeliveryState.FAILED.value) & (Delivery.next_attempt_at <= now),
                    (Delivery.state == DeliveryState.SENDING.value) & (Delivery.lease_expires_at < now))
            ).order_by(Delivery.id)
        ).all()]
        if ids:
            session.execute(
                update(Delivery).where(Delivery.id.in_(ids))
                .values(state=DeliveryState.PENDING.value, lease_expires_at=None, state_changed_at=now)
            )
    return ids


def unfinished_deliveries(sessions: sessionmaker[Session], *, now: datetime) -> list[int]:
    """At start-up: every delivery that is pending (or due again)."""
    due_deliveries(sessions, now=now)
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id).where(Delivery.state == DeliveryState.PENDING.value).order_by(Delivery.id)
        ).all()
    return [int(r[0]) for r in rows]


def resend_queued_jobs(sessions: sessionmaker[Session], *, now: datetime, after_seconds: float) -> list[int]:
    """Queued jobs whose queue message may have been lost, to send again; returns their ids.

    A message is lost when the broker loses its queue (a Redis restarted without
    persistence) or could not take it (down when the job was queued). Nothing tells a
    lost message from one waiting behind others, so a job still queued ``after_seconds``
    after its message was sent is sent again, and each later re-send waits as long as
    the job had waited before it (after 1, 2, 4, ... times ``after_seconds``): a long
    queue costs a few extra messages per job, a lost message a bounded delay. A
    duplicate is harmless (only one claim of a queued job succeeds). ``queued_at``
    records when the message was last sent; ``state_changed_at`` when the wait began.
    """
    cutoff = now - timedelta(seconds=after_seconds)
    with sessions.begin() as session:
        rows = session.execute(
            select(Job.id, Job.queued_at, Job.state_changed_at)
            .where(Job.state == JobState.QUEUED.value, Job.queued_at <= cutoff)
            .order_by(Job.priority.desc(), Job.id)
        ).all()
        due = [int(job_id) for job_id, sent, since in rows
               if now - sent >= max(timedelta(seconds=after_seconds), sent - min(since, sent))]
        if due:
            session.execute(
                update(Job).where(Job.id.in_(due), Job.state == JobState.QUEUED.value).values(queued_at=now)
            )
    return due


def resend_pending_deliveries(sessions: sessionmaker[Session], *, now: datetime, after_seconds: float) -> list[int]:
    """Pending deliveries whose queue message may have been lost, to send again (see :func:`resend_queued_jobs`).

    For a pending delivery, ``next_attempt_at`` records when its message was last sent
    (the later of it and ``state_changed_at``, when it became pending).
    """
    cutoff = now - timedelta(seconds=after_seconds)
    with sessions.begin() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.next_attempt_at, Delivery.state_changed_at)
            .where(Delivery.state == DeliveryState.PENDING.value, Delivery.state_changed_at <= cutoff)
            .order_by(Delivery.id)
        ).all()
        due = []
        for delivery_id, next_attempt_at, since in rows:
            sent = max(since, next_attempt_at) if next_attempt_at is not None else since
            if now - sent >= max(timedelta(seconds=after_seconds), sent - since):
                due.append(int(delivery_id))
        if due:
            session.execute(
                update(Delivery).where(Delivery.id.in_(due), Delivery.state == DeliveryState.PENDING.value)
                .values(next_attempt_at=now)
            )
    return due


def hand_back_delivery(
    sessions: sessionmaker[Session], delivery_id: int, *, attempt: int, now: datetime, reason: str
) -> bool:
    """Put a delivery being sent in its attempt ``attempt`` back to ``pending``, due now, as if not tried.

    For a sender that stops (SIGTERM) before the destination answered: the attempt does
    not count and the study gets a ``delivery_handed_back`` event with ``reason``. False
    when the delivery is no longer in that attempt (it finished, or its lease expired
    and another sender took it): nothing changes.
    """
    with sessions.begin() as session:
        row = session.execute(
            select(Delivery, Job.study_id).join(Job, Job.id == Delivery.job_id)
            .where(Delivery.id == delivery_id).with_for_update()
        ).one_or_none()
        if row is None:
            return False
        delivery, study_id = row
        if delivery.state != DeliveryState.SENDING.value or delivery.attempts != attempt:
            return False
        delivery.state = DeliveryState.PENDING.value
        delivery.attempts = max(0, attempt - 1)
        delivery.lease_expires_at = None
        delivery.next_attempt_at = now
        delivery.state_changed_at = now
        session.add(StudyEvent(study_id=study_id, at=now, kind="delivery_handed_back", detail=(
            f"delivery {delivery.id} to {delivery.destination} handed back: {reason}; attempt {attempt} "
            "does not count")))
    return True


def retry_delivery(sessions: sessionmaker[Session], delivery_id: int, *, now: datetime) -> bool:
    """Manual retry of a failed or dead delivery, due now (the node's next sweep sends it; never re-runs inference).

    Not for a purged study's delivery: its result files were deleted."""
    unpurged_jobs = select(Job.id).where(Job.study_id.in_(_unpurged_studies()))
    with sessions.begin() as session:
        return bool(session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.job_id.in_(unpurged_jobs),
                   Delivery.state.in_([DeliveryState.FAILED.value, DeliveryState.DEAD.value]))
            .values(state=DeliveryState.FAILED.value, attempts=0, next_attempt_at=now, state_changed_at=now)
        ).rowcount)
