"""What an operator does to a whole study: send its results again, or run its models again.

Why a service: the study page, the REST API and ``dicom-node studies resend|reprocess`` offer
the same two actions and must behave alike - the same checks, the same refusals (as
:class:`StudyActionRefused`, with the HTTP status the API answers), one audit entry naming
who did it. Neither needs a queue: the deliveries and jobs they create are due at once and
the node's next sweep sends them (:class:`dicom_node.conductor.Conductor`).

* **Re-send** (:func:`resend_results`): the current results of the study (or of one job) go
  to the destinations their rule names *now* - so a destination added after the study was
  processed receives them - or to one named destination. Nothing runs again; the same
  objects (same UIDs) are sent, which a PACS takes as the same instances.
* **Re-process** (:func:`reprocess_study`): the routing rules are evaluated again (as the
  router does, :func:`dicom_node.conductor.decide`) and every model they ask for runs again
  on its series. The new results are new objects in new series; the earlier ones are marked
  superseded in the node when the new ones are ready, never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service.base import Actor, record_change
from dicom_node.conductor import decide
from dicom_node.db import config_repo
from dicom_node.db.job_reruns import (
    RESENDABLE_JOB_STATES,
    never_sent_to,
    Rerun,
    ResendTarget,
    job_destinations,
    reprocess,
    resend_deliveries,
    result_count,
)
from dicom_node.db.models import Job, JobState, Study, StudyState

__all__ = ["Reprocessed", "Resent", "StudyActionRefused", "reprocess_study", "resend_recent", "resend_results"]

logger = logging.getLogger(__name__)


class StudyActionRefused(Exception):
    """The action cannot be done: ``status`` 404 (no such study, job or destination) or 409 (not now)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Resent:
    """A re-send: the deliveries made due, and the jobs left out with the reason."""

    study_instance_uid: str
    targets: list[ResendTarget]
    skipped: list[str]


@dataclass(frozen=True)
class Reprocessed:
    """A re-process: one line per model the rules ask for (its new job, or why it was not run again)."""

    study_instance_uid: str
    reruns: list[Rerun]


@dataclass(frozen=True)
class _StudyRef:
    id: int
    uid: str
    state: str
    purged_at: datetime | None


def _study(sessions: sessionmaker[Session], study_uid: str) -> _StudyRef:
    with sessions() as session:
        row = session.execute(select(Study.id, Study.study_instance_uid, Study.state, Study.purged_at)
                              .where(Study.study_instance_uid == study_uid)).one_or_none()
    if row is None:
        raise StudyActionRefused(404, f"study {study_uid!r} was not received by this node")
    return _StudyRef(int(row[0]), str(row[1]), str(row[2]), row[3])


def _not_purged(study: _StudyRef, what: str) -> None:
    if study.purged_at is not None:
        raise StudyActionRefused(409, f"study {study.uid}: {what} were deleted by retention on "
                                      f"{study.purged_at:%Y-%m-%d %H:%M} UTC")


def resend_results(
    sessions: sessionmaker[Session], study_uid: str, *, now: datetime, actor: Actor, delivery_max_attempts: int,
    destination: str | None = None, job_id: int | None = None,
) -> Resent:
    """Send the current results of study ``study_uid`` (only job ``job_id``'s, if given) again.

    To ``destination`` when given, else to the destinations each job's rule names now
    (``default``: the destinations flagged default today). Refused (404/409) when there is
    nothing to send: an unknown study, job or destination, a purged study, or no job with results
    and a destination - the message says why for each job.
    """
    study = _study(sessions, study_uid)
    _not_purged(study, "its results")
    if destination is not None and config_repo.get_destination(sessions, destination) is None:
        known = ", ".join(d.name for d in config_repo.list_destinations(sessions)) or "none"
        raise StudyActionRefused(404, f"destination {destination!r} does not exist (destinations: {known})")
    plan: list[tuple[int, Sequence[str]]] = []
    skipped: list[str] = []
    with sessions() as session:
        current = list(session.scalars(select(Job).where(Job.study_id == study.id, Job.superseded_at.is_(None))
                                       .order_by(Job.id)))
        if job_id is not None:
            current = [job for job in current if job.id == job_id]
            if not current:
                raise StudyActionRefused(404, f"job {job_id} is not a current job of study {study_uid}")
        for job in current:
            name = f"job {job.id} ({job.pipeline})"
            if job.state not in RESENDABLE_JOB_STATES:
                hint = "; release it to send its held results" if job.state == JobState.HELD.value else ""
                skipped.append(f"{name} is {job.state.replace('_', ' ')}: no results to send{hint}")
                continue
            if not result_count(session, job.id):
                skipped.append(f"{name} has no result objects")
                continue
            names = [destination] if destination is not None else \
                config_repo.resolve_destination_names(sessions, job_destinations(job))
            if not names:
                skipped.append(f"{name}: its rule names {job_destinations(job)!r} and no such destination exists; "
                               "add one (flagged default for default rules) or name a destination")
                continue
            plan.append((job.id, names))
    if not plan:
        reasons = "; ".join(skipped) or "it has no jobs"
        raise StudyActionRefused(409, f"study {study_uid}: nothing to send: {reasons}")
    targets = resend_deliveries(sessions, plan, now=now, max_attempts=delivery_max_attempts, by=actor.name)
    record_change(sessions, now, actor, "study.resend", target_kind="study", target=study_uid, after={
        "deliveries": [{"job": t.job_id, "destination": t.destination, "delivery": t.delivery_id, "new": t.created}
                       for t in targets], "skipped": skipped})
    logger.info("study %s: results sent again by %s: %d delivery(ies)", study_uid, actor.name, len(targets))
    return Resent(study_uid, targets, skipped)


def reprocess_study(
    sessions: sessionmaker[Session], spool_dir: Path, study_uid: str, *, now: datetime, actor: Actor,
    job_max_attempts: int, models: Sequence[str] = (),
) -> Reprocessed:
    """Evaluate the routing rules on study ``study_uid`` again and run the models they ask for again.

    ``models``: only these (each must be one the rules ask for now). Refused (404/409) for an
    unknown study, one still receiving, a purged one, or when no rule asks for any model now
    (the message gives the router's reason).
    """
    study = _study(sessions, study_uid)
    _not_purged(study, "its instances")
    if study.state == StudyState.RECEIVING.value:
        raise StudyActionRefused(409, f"study {study_uid} is still receiving; it is routed when complete")
    decision = decide(sessions, spool_dir, study.id)
    specs = list(decision.jobs)
    if not specs:
        raise StudyActionRefused(409, f"study {study_uid}: no rule asks for a model now: {decision.ignored_reason}")
    if models:
        asked = {spec.pipeline for spec in specs}
        unknown = [m for m in models if m not in asked]
        if unknown:
            raise StudyActionRefused(409, f"study {study_uid}: the rules do not ask for {', '.join(unknown)} now "
                                          f"(they ask for {', '.join(sorted(asked))})")
        specs = [spec for spec in specs if spec.pipeline in models]
    reruns = reprocess(sessions, study.id, specs, now=now, max_attempts=job_max_attempts, by=actor.name)
    if reruns is None:
        raise StudyActionRefused(404, f"study {study_uid!r} was not received by this node")
    record_change(sessions, now, actor, "study.reprocess", target_kind="study", target=study_uid, after={
        "jobs": [{"model": r.pipeline, "series": r.series_instance_uid, "job": r.job_id,
                  "supersedes": r.supersedes_job_id, "skipped": r.skipped} for r in reruns]})
    logger.info("study %s: re-processed by %s: %d new job(s)", study_uid, actor.name,
                sum(r.job_id is not None for r in reruns))
    return Reprocessed(study_uid, reruns)


#: The longest look back of :func:`resend_recent`, in hours (90 days).
MAX_RECENT_HOURS = 24 * 90


def resend_recent(
    sessions: sessionmaker[Session], destination: str, *, hours: float, now: datetime, actor: Actor,
    delivery_max_attempts: int,
) -> list[ResendTarget]:
    """Send ``destination`` (typically just added) the results of the last ``hours`` it never had.

    Every current job with results that finished in that window and has no delivery to the
    destination gets one, due now. Refused (404) for an unknown destination, (422) for hours
    outside 0-:data:`MAX_RECENT_HOURS`. Returns the deliveries (none when there was nothing to send).
    """
    if config_repo.get_destination(sessions, destination) is None:
        raise StudyActionRefused(404, f"destination {destination!r} does not exist")
    if not 0 < hours <= MAX_RECENT_HOURS:
        raise StudyActionRefused(422, f"hours must be more than 0 and at most {MAX_RECENT_HOURS}, got {hours:g}")
    job_ids = never_sent_to(sessions, destination, finished_since=now - timedelta(hours=hours))
    targets = resend_deliveries(sessions, [(job_id, [destination]) for job_id in job_ids], now=now,
                                max_attempts=delivery_max_attempts, by=actor.name)
    record_change(sessions, now, actor, "destination.send_recent", target_kind="destination", target=destination,
                  after={"hours": hours, "jobs": [t.job_id for t in targets],
                         "deliveries": [t.delivery_id for t in targets]})
    logger.info("destination %s: the results of %d job(s) of the last %g hours sent to it by %s", destination,
                len(targets), hours, actor.name)
    return targets
