"""Jobs, result objects and deliveries: every state transition, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, select

from dicom_node.db import config_repo, job_views, jobs
from dicom_node.db.models import Job, JobState, Study, StudyEvent, StudyState
from dicom_node.db.session import make_session_factory
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def complete_study(sessions, uid: str = "1.2.9") -> int:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        study = Study(study_instance_uid=uid, state=StudyState.COMPLETE.value, instance_count=10,
                      late_instance_count=0, first_received_at=T0, last_received_at=T0, receiving_since=T0,
                      last_activity_at=T0, completed_at=T0, state_changed_at=T0)
        session.add(study)
        session.flush()
        return int(study.id)


def decision(*pipelines: str, series: str = "1.2.9.1") -> RoutingDecision:
    return RoutingDecision(
        jobs=tuple(JobSpec(pipeline=p, series_instance_uid=series, rule="r", priority=0, destinations="default")
                   for p in pipelines),
        outcomes=(RuleOutcome(rule="r", matched=bool(pipelines), reasons=("why",)),),
    )


def set_state(sessions, study_id: int, state: StudyState) -> None:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        session.get(Study, study_id).state = state.value  # type: ignore[union-attr]


def test_routing_creates_jobs_once_and_records_why(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = complete_study(sessions)
    assert jobs.studies_to_route(sessions) == [(study_id, "1.2.9")]
    first = jobs.record_routing(sessions, study_id, decision("seg", "det"), now=T0, max_attempts=3)
    assert len(first) == 2 and jobs.studies_to_route(sessions) == []
    # The study completes again (our own results came back): no job is repeated.
    set_state(sessions, study_id, StudyState.COMPLETE)
    again = jobs.record_routing(sessions, study_id, decision("seg", "det"), now=T0, max_attempts=3)
    assert again == []
    with sessions() as session:
        assert session.get(Study, study_id).state == StudyState.ROUTED.value  # type: ignore[union-attr]
        events = session.scalars(select(StudyEvent.detail).where(StudyEvent.kind == "routed")).all()
    assert "not run again: seg on 1.2.9.1: job 1 queued; det on 1.2.9.1: job 2 queued" in events[-1]


def test_study_without_matching_rule_is_ignored_with_the_reason(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = complete_study(sessions)
    assert jobs.record_routing(sessions, study_id, decision(), now=T0, max_attempts=3) == []
    with sessions() as session:
        assert session.get(Study, study_id).state == StudyState.IGNORED.value  # type: ignore[union-attr]
        detail = session.scalars(select(StudyEvent.detail).where(StudyEvent.kind == "ignored")).one()
    assert detail == "r: why"


def test_only_one_worker_claims_a_job(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    claims: list[object] = []
    barrier = threading.Barrier(4)

    def claim(n: int) -> None:
        barrier.wait()
        claims.append(jobs.claim_job(sessions, job_id, worker=f"w{n}", now=T0, lease_seconds=60))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1
    assert won[0].attempt == 1 and won[0].pipeline == "seg" and won[0].destinations == "default"  # type: ignore[attr-defined]


def test_failures_retry_until_attempts_run_out(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=2)
    jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60)
    assert jobs.fail_job(sessions, job_id, now=T0, error="CUDA out of memory", retryable=True) == "failed"
    assert jobs.requeue_jobs(sessions, now=T0) == [job_id]
    assert jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60) is not None
    assert jobs.fail_job(sessions, job_id, now=T0, error="again", retryable=True) == "dead"
    assert jobs.requeue_jobs(sessions, now=T0) == []
    assert jobs.retry_job(sessions, job_id, now=T0)  # manual retry from the CLI/UI: the next sweep enqueues it
    assert jobs.requeue_jobs(sessions, now=T0) == [job_id]
    assert jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60).attempt == 1  # type: ignore[union-attr]


def test_errors_retrying_cannot_fix_are_dead_at_once(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60)
    message = "series 1.2.9.1: slice spacing varies 2.5-5.0 mm at index 41"
    assert jobs.fail_job(sessions, job_id, now=T0, error=message, retryable=False) == "dead"
    [view] = job_views.list_jobs(sessions).items
    assert view.state == "dead" and view.error == message and view.attempts == 1


def test_a_worker_that_dies_loses_its_job_to_another_after_the_lease(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    jobs.claim_job(sessions, job_id, worker="gpu-1", now=T0, lease_seconds=60)
    jobs.heartbeat_job(sessions, job_id, now=T0 + timedelta(seconds=50), lease_seconds=60)
    assert jobs.requeue_jobs(sessions, now=T0 + timedelta(seconds=100)) == []  # lease renewed until 110 s
    assert jobs.requeue_jobs(sessions, now=T0 + timedelta(seconds=111)) == [job_id]
    [view] = job_views.list_jobs(sessions).items
    assert view.state == "queued" and "worker gpu-1 stopped during attempt 1" in view.error  # type: ignore[operator]
    # The late finish of the lost worker changes nothing.
    assert jobs.finish_job(sessions, job_id, now=T0, stage_seconds={}, summary={}, results=[], destinations=["x"],
                           delivery_max_attempts=3) is None
    assert jobs.unfinished_jobs(sessions, now=T0 + timedelta(seconds=112)) == [job_id]


def finished_job(sessions, destinations: list[str], max_attempts: int = 3) -> tuple[int, list[int]]:  # type: ignore[no-untyped-def]
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    jobs.claim_job(sessions, job_id, worker="w", now=T0, lease_seconds=60)
    results = [jobs.ResultSpec("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.9.100.1", "1.2.9.100", "job/seg.dcm"),
               jobs.ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9.101.1", "1.2.9.101", "job/sr.dcm")]
    deliveries = jobs.finish_job(sessions, job_id, now=T0, stage_seconds={"inference": 1.5}, summary={"n": 1},
                                 results=results, destinations=destinations, delivery_max_attempts=max_attempts)
    return job_id, deliveries


def test_finished_job_keeps_results_and_creates_a_delivery_per_destination(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    job_id, deliveries = finished_job(sessions, ["pacs", "archive"])
    assert len(deliveries) == 2
    assert [r.kind for r in jobs.results_of_job(sessions, job_id)] == ["SEG", "SR"]
    study_id = config_repo.study_id_for_uid(sessions, job_views.list_jobs(sessions).items[0].study_instance_uid)
    assert study_id is not None
    assert jobs.own_result_series(sessions, study_id, ["1.2.9.100", "1.2.9.1", "1.2.9.101"]) == {
        "1.2.9.100", "1.2.9.101"}
    assert jobs.own_result_series(sessions, study_id + 1, ["1.2.9.100"]) == set()  # results of this study only
    [view] = job_views.list_jobs(sessions).items
    assert view.state == "succeeded" and view.stage_seconds == {"inference": 1.5}
    assert sorted((d.destination, d.state) for d in view.deliveries) == [("archive", "pending"), ("pacs", "pending")]


def test_delivery_backs_off_exponentially_then_dies_and_can_be_retried(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    _, [delivery_id] = finished_job(sessions, ["pacs"], max_attempts=3)
    now = T0
    delays = []
    for _ in range(2):
        claim = jobs.claim_delivery(sessions, delivery_id, now=now, lease_seconds=60)
        assert claim is not None and claim.destination == "pacs"
        assert jobs.claim_delivery(sessions, delivery_id, now=now, lease_seconds=60) is None  # already sending
        state, next_at = jobs.fail_delivery(sessions, delivery_id, now=now, error="connection refused",
                                            retryable=True, backoff_initial_seconds=5, backoff_max_seconds=600)
        assert state == "failed" and next_at is not None
        delays.append((next_at - now).total_seconds())
        assert jobs.due_deliveries(sessions, now=next_at - timedelta(seconds=1)) == []
        assert jobs.due_deliveries(sessions, now=next_at) == [delivery_id]
        now = next_at
    assert delays == [5.0, 10.0]
    jobs.claim_delivery(sessions, delivery_id, now=now, lease_seconds=60)
    state, next_at = jobs.fail_delivery(sessions, delivery_id, now=now, error="refused", retryable=True,
                                        backoff_initial_seconds=5, backoff_max_seconds=600)
    assert (state, next_at) == ("dead", None)
    assert jobs.due_deliveries(sessions, now=now + timedelta(days=1)) == []
    assert jobs.retry_delivery(sessions, delivery_id, now=now)  # the next sweep sends it
    assert jobs.due_deliveries(sessions, now=now) == [delivery_id]
    assert jobs.unfinished_deliveries(sessions, now=now) == [delivery_id]


def test_a_sender_that_dies_mid_delivery_is_replaced_after_its_lease(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    _, [delivery_id] = finished_job(sessions, ["pacs"])
    jobs.claim_delivery(sessions, delivery_id, now=T0, lease_seconds=30)
    assert jobs.due_deliveries(sessions, now=T0 + timedelta(seconds=29)) == []
    assert jobs.due_deliveries(sessions, now=T0 + timedelta(seconds=31)) == [delivery_id]
    jobs.claim_delivery(sessions, delivery_id, now=T0 + timedelta(seconds=31), lease_seconds=30)
    jobs.finish_delivery(sessions, delivery_id, now=T0 + timedelta(seconds=32), objects_sent=2)
    [view] = job_views.list_jobs(sessions).items
    assert [(d.destination, d.state, d.attempts, d.error, d.id) for d in view.deliveries] == [
        ("pacs", "delivered", 2, None, delivery_id)]


def test_permanent_delivery_errors_are_dead_at_once(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    _, [delivery_id] = finished_job(sessions, ["pacs"])
    jobs.claim_delivery(sessions, delivery_id, now=T0, lease_seconds=30)
    state, _ = jobs.fail_delivery(sessions, delivery_id, now=T0, error="called AE title not recognised",
                                  retryable=False, backoff_initial_seconds=5, backoff_max_seconds=600)
    assert state == "dead"
    with make_session_factory(engine)() as session:
        assert session.scalars(select(Job.state)).one() == JobState.SUCCEEDED.value  # inference is not re-run


def test_a_queued_job_whose_message_was_lost_is_sent_again_less_and_less_often(engine: Engine) -> None:
    """The broker lost the message (a Redis restarted empty): nothing else would ever run the job."""
    sessions = make_session_factory(engine)
    [job_id] = jobs.record_routing(sessions, complete_study(sessions), decision("seg"), now=T0, max_attempts=3)
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    assert jobs.resend_queued_jobs(sessions, now=at(59), after_seconds=60) == []
    sent = [s for s in range(0, 1000) if jobs.resend_queued_jobs(sessions, now=at(s), after_seconds=60)]
    assert sent == [60, 120, 240, 480, 960]  # each re-send waits as long as the job had waited
    # A job handed to a worker is not sent again; requeued after a failure, its wait starts over.
    jobs.claim_job(sessions, job_id, worker="w", now=at(1000), lease_seconds=60)
    assert jobs.resend_queued_jobs(sessions, now=at(5000), after_seconds=60) == []
    jobs.fail_job(sessions, job_id, now=at(1001), error="CUDA out of memory", retryable=True)
    assert jobs.requeue_jobs(sessions, now=at(1002)) == [job_id]
    assert jobs.resend_queued_jobs(sessions, now=at(1061), after_seconds=60) == []
    assert jobs.resend_queued_jobs(sessions, now=at(1062), after_seconds=60) == [job_id]


def test_a_pending_delivery_whose_message_was_lost_is_sent_again(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    _, [delivery_id] = finished_job(sessions, ["pacs"])  # pending since T0, its message sent then
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731
    assert jobs.resend_pending_deliveries(sessions, now=at(29), after_seconds=30) == []
    sent = [s for s in range(0, 300) if jobs.resend_pending_deliveries(sessions, now=at(s), after_seconds=30)]
    assert sent == [30, 60, 120, 240]
    # Sending, failed (waiting for its backoff) or delivered: never sent again by this rule.
    jobs.claim_delivery(sessions, delivery_id, now=at(300), lease_seconds=3600)
    assert jobs.resend_pending_deliveries(sessions, now=at(1000), after_seconds=30) == []
    jobs.fail_delivery(sessions, delivery_id, now=at(301), error="refused", retryable=True,
                       backoff_initial_seconds=5, backoff_max_seconds=600)
    assert jobs.resend_pending_deliveries(sessions, now=at(1000), after_seconds=30) == []
    assert jobs.due_deliveries(sessions, now=at(400)) == [delivery_id]  # pending again from 400 s
    assert jobs.resend_pending_deliveries(sessions, now=at(429), after_seconds=30) == []
    assert jobs.resend_pending_deliveries(sessions, now=at(430), after_seconds=30) == [delivery_id]
