"""Handing work back when a worker stops: the job queued again, the attempt not counted, the reason kept.

On SQLite and on PostgreSQL. The process-level part (signals, Celery, timing) is tested
with real processes in ``tests/integration/test_stop_on_sigterm.py``.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select

from dicom_node.db import jobs
from dicom_node.db.models import Job, StudyEvent
from dicom_node.db.session import make_session_factory
from dicom_node.work_in_flight import StopRequested, WorkInFlight, hand_back_unfinished
from test_jobs import T0, complete_study, decision


class RecordingQueue:
    """A :class:`dicom_node.queue.JobQueue` that keeps the ids it is given."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.deliveries: list[int] = []

    def enqueue_job(self, job_id: int) -> None:
        self.jobs.append(job_id)

    def enqueue_delivery(self, delivery_id: int) -> None:
        self.deliveries.append(delivery_id)


def job_row(sessions, job_id: int) -> Job:  # type: ignore[no-untyped-def]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def event_details(sessions, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(StudyEvent.detail).where(StudyEvent.kind == kind).order_by(StudyEvent.id)))


def test_a_handed_back_job_is_queued_again_without_counting_the_attempt(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    assert jobs.claim_job(sessions, job_id, worker="gpu-1:7", now=T0, lease_seconds=60) is not None

    assert not jobs.hand_back_job(sessions, job_id, worker="gpu-2:9", now=T0, reason="not its job")
    later = T0 + timedelta(seconds=5)
    assert jobs.hand_back_job(sessions, job_id, worker="gpu-1:7", now=later, reason="worker gpu-1:7 stopped")
    job = job_row(sessions, job_id)
    assert (job.state, job.attempts, job.worker, job.started_at, job.lease_expires_at) == ("queued", 0, None, None, None)
    assert job.queued_at == later
    assert event_details(sessions, "job_handed_back") == [
        f"job {job_id} (seg) handed back to the queue: worker gpu-1:7 stopped; attempt 1 does not count"]
    assert not jobs.hand_back_job(sessions, job_id, worker="gpu-1:7", now=later, reason="twice")  # queued now

    # Another worker takes it; the first worker's attempt, still computing, can no longer finish or fail it.
    assert jobs.claim_job(sessions, job_id, worker="gpu-2:9", now=later, lease_seconds=60).attempt == 1  # type: ignore[union-attr]
    stale = dict(now=later, stage_seconds={}, summary={}, results=[], destinations=[], delivery_max_attempts=1)
    assert jobs.finish_job(sessions, job_id, worker="gpu-1:7", **stale) is None  # type: ignore[arg-type]
    assert jobs.fail_job(sessions, job_id, now=later, error="x", retryable=True, worker="gpu-1:7") is None
    assert jobs.finish_job(sessions, job_id, worker="gpu-2:9", **stale) == []  # type: ignore[arg-type]
    assert job_row(sessions, job_id).state == "succeeded"
    assert not jobs.hand_back_job(sessions, job_id, worker="gpu-2:9", now=later, reason="too late")


def test_a_handed_back_delivery_is_pending_again_only_in_the_attempt_that_was_stopped(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60)
    [delivery_id] = jobs.finish_job(sessions, job_id, now=T0, stage_seconds={}, summary={}, results=[],  # type: ignore[misc]
                                    destinations=["pacs"], delivery_max_attempts=5)
    claim = jobs.claim_delivery(sessions, delivery_id, now=T0, lease_seconds=60)
    assert claim is not None and claim.attempt == 1
    assert not jobs.hand_back_delivery(sessions, delivery_id, attempt=2, now=T0, reason="another attempt")
    later = T0 + timedelta(seconds=3)
    assert jobs.hand_back_delivery(sessions, delivery_id, attempt=1, now=later, reason="worker w stopped")
    assert jobs.due_deliveries(sessions, now=later) == []  # pending, not failed: nothing for the sweeper
    assert jobs.unfinished_deliveries(sessions, now=later) == [delivery_id]
    again = jobs.claim_delivery(sessions, delivery_id, now=later, lease_seconds=60)
    assert again is not None and again.attempt == 1  # the handed-back attempt did not count
    [detail] = event_details(sessions, "delivery_handed_back")
    assert detail == f"delivery {delivery_id} to pacs handed back: worker w stopped; attempt 1 does not count"


def test_work_in_flight_claims_nothing_once_stopping_and_hands_back_what_it_holds(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study = complete_study(sessions)
    first, second = jobs.record_routing(sessions, study, decision("seg", "det"), now=T0, max_attempts=3)
    work, queue = WorkInFlight(), RecordingQueue()
    claimed = work.claim("job", first, lambda: jobs.claim_job(sessions, first, worker="w:1", now=T0, lease_seconds=60),
                         lambda c: c.attempt)
    assert claimed is not None and work.wait_finished(0.01) is False

    work.request_stop()
    with pytest.raises(StopRequested, match=f"not claiming job {second}: this worker is stopping"):
        work.claim("job", second, lambda: jobs.claim_job(sessions, second, worker="w:1", now=T0, lease_seconds=60),
                   lambda c: c.attempt)
    slots = threading.Semaphore(1)
    assert work.acquire(slots) is False and slots.acquire(blocking=False)  # the slot was not taken

    handed = hand_back_unfinished(work, sessions, queue, worker="w:1", reason="w:1 stopped", clock=lambda: T0)
    assert (handed.jobs, handed.deliveries) == ([first], [])
    assert queue.jobs == [first]  # a message for whichever worker comes next
    assert [job_row(sessions, j).state for j in (first, second)] == ["queued", "queued"]
    assert [job_row(sessions, j).attempts for j in (first, second)] == [0, 0]
    work.release("job", first)  # the stale attempt ends later
    assert work.wait_finished(0.01) is True
