"""Moves studies from "complete" to jobs, and keeps jobs and deliveries moving.

Why: one loop, in the node process, owns the transitions nobody else triggers:
routing complete studies (through the same pure :func:`routing.evaluate` the CLI's
``rules test`` uses), re-enqueueing jobs whose worker died or that failed and may be
retried, sending deliveries whose backoff has expired, and sending again the
messages of jobs and deliveries that wait too long (the broker may have lost them). Because it reads
everything from the database, it also rebuilds the queue after a restart (the
embedded ``memory://`` broker keeps nothing).

Threads: rules are evaluated only in the conductor's own thread (``tick``), never in
one the DICOM listener or the web server needs; :meth:`Conductor.recover`, which the
node runs at start before the listener opens, only re-enqueues and evaluates nothing,
so a rule cannot hold up the start. The other callers of :func:`evaluate_with` are
``dicom-node rules test`` (its own process) and the web rule tester (admins only, one
request). Each evaluation is bounded: regexes run on RE2 (linear time, patterns of at
most 500 characters, see :mod:`dicom_node.routing`) over indexed values of at most 64
characters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import config_repo, jobs, model_settings
from dicom_node.periodic import Periodic
from dicom_node.queue import JobQueue
from dicom_node.routing import Rule, RoutingDecision, StudyFacts, evaluate
from dicom_node.study_facts import study_facts

__all__ = ["Conductor", "decide", "evaluate_with"]

logger = logging.getLogger(__name__)


def decide(sessions: sessionmaker[Session], spool_dir: Path, study_id: int) -> RoutingDecision:
    """What the rules stored now decide for the study with database id ``study_id`` (no state change).

    The router and ``dicom-node rules test`` both call this, so what an admin tests is what runs.
    Models an admin disabled (:mod:`dicom_node.db.model_settings`) get no job.
    """
    return evaluate_with(sessions, config_repo.list_rules(sessions), study_facts(sessions, spool_dir, study_id))


def evaluate_with(sessions: sessionmaker[Session], rules: Sequence[Rule], facts: StudyFacts) -> RoutingDecision:
    """:func:`routing.evaluate` of ``rules`` on ``facts`` in the router's context (models admins disabled).

    The router uses it for the stored rules; the UI's rule tester for a rule being edited.
    """
    return evaluate(rules, facts, disabled_pipelines=frozenset(model_settings.disabled_models(sessions)))


class Conductor:
    """Routes complete studies and re-sends due work to the queue, on a timer or on demand."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        spool_dir: Path,
        queue: JobQueue,
        clock: Callable[[], datetime],
        *,
        job_max_attempts: int,
        interval_seconds: float = 1.0,
        resend_after_seconds: float = 120.0,
    ) -> None:
        self._sessions = sessions
        self._spool_dir = spool_dir
        self._queue = queue
        self._clock = clock
        self._job_max_attempts = job_max_attempts
        self._resend_after_seconds = resend_after_seconds
        self._loop = Periodic("conductor", interval_seconds, self.tick)

    def decide(self, study_id: int) -> RoutingDecision:
        """What the current rules decide for a study (no state change)."""
        return decide(self._sessions, self._spool_dir, study_id)

    def route_complete_studies(self) -> list[int]:
        """Route every complete, unrouted study; enqueue and return the new job ids."""
        new_jobs: list[int] = []
        for study_id, study_uid in jobs.studies_to_route(self._sessions):
            try:
                decision = self.decide(study_id)
            except Exception:  # one broken study must not stop routing of the others
                logger.exception("routing study %s failed; it stays complete and is retried", study_uid)
                continue
            created = jobs.record_routing(
                self._sessions, study_id, decision, now=self._clock(), max_attempts=self._job_max_attempts
            )
            if decision.jobs:
                logger.info("study %s routed: %d new job(s)", study_uid, len(created))
            else:
                logger.info("study %s ignored: %s", study_uid, decision.ignored_reason)
            for job_id in created:
                self._queue.enqueue_job(job_id)
            new_jobs += created
        return new_jobs

    def sweep(self) -> tuple[list[int], list[int]]:
        """Re-enqueue jobs to retry or whose worker died, deliveries that are due, and both whose
        message the broker may have lost (still waiting ``resend_after_seconds`` after it was sent)."""
        now = self._clock()
        job_ids = jobs.requeue_jobs(self._sessions, now=now)
        delivery_ids = jobs.due_deliveries(self._sessions, now=now)
        lost_jobs = jobs.resend_queued_jobs(self._sessions, now=now, after_seconds=self._resend_after_seconds)
        lost_deliveries = jobs.resend_pending_deliveries(self._sessions, now=now,
                                                         after_seconds=self._resend_after_seconds)
        if lost_jobs or lost_deliveries:
            logger.info("sending again %d job(s) and %d delivery(ies) still waiting for a worker (their message "
                        "may have been lost): jobs %s, deliveries %s", len(lost_jobs), len(lost_deliveries),
                        lost_jobs, lost_deliveries)
        job_ids += lost_jobs
        delivery_ids += lost_deliveries
        for job_id in job_ids:
            self._queue.enqueue_job(job_id)
        for delivery_id in delivery_ids:
            self._queue.enqueue_delivery(delivery_id)
        return job_ids, delivery_ids

    def recover(self) -> tuple[list[int], list[int]]:
        """At start: enqueue everything unfinished (the queue may have lost it)."""
        now = self._clock()
        job_ids = jobs.unfinished_jobs(self._sessions, now=now)
        delivery_ids = jobs.unfinished_deliveries(self._sessions, now=now)
        for job_id in job_ids:
            self._queue.enqueue_job(job_id)
        for delivery_id in delivery_ids:
            self._queue.enqueue_delivery(delivery_id)
        if job_ids or delivery_ids:
            logger.info("re-enqueued %d unfinished job(s) and %d delivery(ies)", len(job_ids), len(delivery_ids))
        return job_ids, delivery_ids

    def tick(self) -> None:
        self.route_complete_studies()
        self.sweep()

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
