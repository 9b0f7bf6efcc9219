"""The order in which workers take queued jobs (dicom_node.db.job_scheduling), on SQLite and on PostgreSQL.

Rule priority first; then the expected duration learned from this site's finished jobs (or declared by
the model registry) minus the time waited, so short jobs go first and long ones do not starve; then the
series whose volume the worker holds; two workers never take the same job; what a worker claimed is what
it hands back when it stops.
"""

from __future__ import annotations

import itertools
import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs
from dicom_node.db.job_scheduling import (
    HISTORY,
    CachedVolume,
    claim_next_job,
    expected_durations,
    rank_queued_jobs,
)
from dicom_node.db.models import Job
from dicom_node.db.session import make_session_factory
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome
from dicom_node.work_in_flight import WorkInFlight, hand_back_unfinished
from test_hand_back import RecordingQueue
from test_jobs import T0, complete_study

_uids = itertools.count(1)


def route(sessions: sessionmaker[Session], *specs: tuple[str, str, int], at: datetime) -> list[int]:
    """A new complete study routed at ``at`` to ``(pipeline, series, priority)`` jobs; their ids in that order."""
    study_id = complete_study(sessions, f"1.2.826.0.1.{next(_uids)}")
    decision = RoutingDecision(
        jobs=tuple(JobSpec(pipeline=p, series_instance_uid=s, rule="r", priority=prio, destinations="default")
                   for p, s, prio in specs),
        outcomes=(RuleOutcome(rule="r", matched=True, reasons=("why",)),),
    )
    return jobs.record_routing(sessions, study_id, decision, now=at, max_attempts=3)


def history(sessions: sessionmaker[Session], pipeline: str, walls: list[float], *, state: str = "succeeded",
            at: datetime = T0 - timedelta(days=1)) -> None:
    """Finished jobs of ``pipeline`` that took ``walls`` seconds each, the last one finishing latest."""
    ids = route(sessions, *[(pipeline, f"9.{next(_uids)}", 0) for _ in walls], at=at)
    for k, (job_id, wall) in enumerate(zip(ids, walls)):
        started = at + timedelta(minutes=10 * k)  # one after the other
        assert jobs.claim_job(sessions, job_id, worker="old", now=started, lease_seconds=60) is not None
        assert jobs.finish_job(sessions, job_id, now=started + timedelta(seconds=wall), stage_seconds={},
                               summary=None, results=(), delivery_max_attempts=1, state=state) is not None


def claim(sessions: sessionmaker[Session], now: datetime, **kwargs: object) -> int | None:
    claimed = claim_next_job(sessions, worker="w", now=now, lease_seconds=60, **kwargs)  # type: ignore[arg-type]
    return None if claimed is None else claimed.job_id


def test_rule_priority_goes_before_expected_duration_and_waiting(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [60.0])
    history(sessions, "det", [5.0])
    [short_low] = route(sessions, ("det", "1.1", 0), at=T0)
    [long_high] = route(sessions, ("seg", "2.1", 10), at=T0 + timedelta(minutes=30))
    now = T0 + timedelta(minutes=30)  # the low-priority job waited 30 minutes: priority still wins
    assert claim(sessions, now) == long_high
    assert claim(sessions, now) == short_low
    assert claim(sessions, now) is None


def test_the_shorter_job_by_learned_duration_goes_first_even_when_queued_later(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [50.0, 60.0, 900.0])  # the median, not the mean: one slow outlier changes nothing
    history(sessions, "det", [4.0, 5.0, 6.0])
    assert expected_durations(sessions, ["seg", "det"]) == {"seg": 60.0, "det": 5.0}
    seg, det = route(sessions, ("seg", "1.1", 0), ("det", "1.1", 0), at=T0)
    [det_later] = route(sessions, ("det", "2.1", 0), at=T0 + timedelta(seconds=20))
    now = T0 + timedelta(seconds=20)
    ranked = rank_queued_jobs(sessions, now=now)
    assert [job.job_id for job in ranked] == [det, det_later, seg]
    assert (ranked[0].expected_seconds, ranked[0].waited_seconds, ranked[0].cost) == (5.0, 20.0, -15.0)
    assert [claim(sessions, now) for _ in range(3)] == [det, det_later, seg]


def test_learned_durations_use_the_latest_jobs_that_ran_the_model(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [300.0] * 25 + [40.0] * HISTORY)  # the 25 older ones fall out of the window
    history(sessions, "seg", [0.5] * 30, state="not_applicable")  # declined: the model did not run
    history(sessions, "det", [8.0, 8.0], state="held")  # held results: the model ran
    assert expected_durations(sessions, ["seg", "det"]) == {"seg": 40.0, "det": 8.0}


def test_declared_durations_count_until_learned_and_unknown_pipelines_stay_in_the_middle(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    declared = {"seg": 40.0, "det": 6.0, "cls": 2.0}
    assert expected_durations(sessions, ["seg", "det"], declared=declared) == {"seg": 40.0, "det": 6.0}
    history(sessions, "seg", [3.0])  # a GPU site: learned beats declared
    durations = expected_durations(sessions, ["seg", "det", "new", "cls"], declared=declared)
    assert durations == {"seg": 3.0, "det": 6.0, "cls": 2.0, "new": 3.0}  # new: the median of the known
    # Nothing learned or declared: every job expects the same, so the oldest waiting job goes first (FIFO).
    assert expected_durations(sessions, ["x", "y"]) == {"x": 0.0, "y": 0.0}
    first, second = route(sessions, ("y", "1.1", 0), ("x", "1.1", 0), at=T0)
    [third] = route(sessions, ("x", "2.1", 0), at=T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=2)
    assert [job.job_id for job in rank_queued_jobs(sessions, now=now)] == [first, second, third]


def test_a_long_job_waits_about_its_expected_duration_at_most_then_goes_first(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [60.0])
    history(sessions, "det", [5.0])
    [seg] = route(sessions, ("seg", "1.1", 0), at=T0)
    [det_soon] = route(sessions, ("det", "2.1", 0), at=T0 + timedelta(seconds=40))
    [det_late] = route(sessions, ("det", "3.1", 0), at=T0 + timedelta(seconds=70))
    # At +70 s: seg 60 - 70 = -10; det_soon 5 - 30 = -25 (queued within 55 s of seg: before it);
    # det_late 5 - 0 = 5 (queued more than 55 s after seg: after it).
    now = T0 + timedelta(seconds=70)
    assert [job.job_id for job in rank_queued_jobs(sessions, now=now)] == [det_soon, seg, det_late]


def test_the_series_whose_volume_the_worker_holds_goes_first_by_the_load_it_saves(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [60.0])
    [first] = route(sessions, ("seg", "1.1", 0), at=T0)
    [held] = route(sessions, ("seg", "2.1", 0), at=T0 + timedelta(seconds=2))
    now = T0 + timedelta(seconds=10)
    assert [job.job_id for job in rank_queued_jobs(sessions, now=now)] == [first, held]
    # Loading series 2.1 took 3 s: its job saves that, more than the 2 s it waited less.
    cached = CachedVolume("2.1", load_seconds=3.0)
    assert [job.job_id for job in rank_queued_jobs(sessions, now=now, cached=cached)] == [held, first]
    # A load of 1 s saves less than the 2 s the first job waited longer: first come still goes first.
    assert claim(sessions, now, cached=CachedVolume("2.1", load_seconds=1.0)) == first


def test_two_workers_never_claim_the_same_job(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    queued = set(route(sessions, ("seg", "1.1", 0), ("det", "1.1", 0), ("cls", "1.1", 0), at=T0))
    claims: list[int | None] = []
    lock = threading.Lock()
    barrier = threading.Barrier(5)

    def worker(n: int) -> None:
        barrier.wait()
        claimed = claim_next_job(sessions, worker=f"w{n}", now=T0, lease_seconds=60)
        with lock:
            claims.append(None if claimed is None else claimed.job_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [job_id for job_id in claims if job_id is not None]
    assert sorted(won) == sorted(queued) and claims.count(None) == 2  # each job once; the rest found none
    with sessions() as session:
        workers = dict(session.execute(select(Job.id, Job.worker).where(Job.id.in_(queued))).all())
    assert len(set(workers.values())) == 3


def test_a_stopping_worker_hands_back_the_job_it_claimed_not_the_one_its_message_named(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    history(sessions, "seg", [60.0])
    history(sessions, "det", [5.0])
    seg, det = route(sessions, ("seg", "1.1", 0), ("det", "1.1", 0), at=T0)
    work, queue = WorkInFlight(), RecordingQueue()
    claimed = work.claim("job", seg, lambda: claim_next_job(sessions, worker="w:1", now=T0, lease_seconds=60),
                         lambda c: c.attempt, lambda c: c.job_id)
    assert claimed is not None and claimed.job_id == det  # the message of seg woke the worker; det runs first
    assert work.unfinished() == [("job", det, 1)]
    work.request_stop()
    handed = hand_back_unfinished(work, sessions, queue, worker="w:1", reason="w:1 stopped", clock=lambda: T0)
    assert handed.jobs == [det] and queue.jobs == [det]
    assert [job.job_id for job in rank_queued_jobs(sessions, now=T0)] == [det, seg]


def test_history_must_be_positive(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    with pytest.raises(ValueError, match="history must be >= 1, got 0"):
        expected_durations(sessions, ["seg"], history=0)
