"""Later generations of a job: self-healing of incomplete series, re-processing, superseding, re-sending.

On SQLite and on PostgreSQL (the ``engine`` fixture), through the same functions the router,
the worker and the operator actions call.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, select

from dicom_node.db import job_reruns, jobs
from dicom_node.db.models import Delivery, DeliveryState, Job, JobState, Series, Study, StudyEvent, StudyState
from dicom_node.db.session import make_session_factory
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
SERIES = "1.2.9.1"


def study_with_series(sessions, instances: int) -> int:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.9", state=StudyState.COMPLETE.value, instance_count=instances,
                      late_instance_count=0, first_received_at=T0, last_received_at=T0, receiving_since=T0,
                      last_activity_at=T0, completed_at=T0, state_changed_at=T0)
        session.add(study)
        session.flush()
        session.add(Series(study_id=study.id, series_instance_uid=SERIES, modality="CT", instance_count=instances,
                           first_received_at=T0, last_received_at=T0))
        return int(study.id)


def decision(*pipelines: str) -> RoutingDecision:
    return RoutingDecision(
        jobs=tuple(JobSpec(pipeline=p, series_instance_uid=SERIES, rule="r", priority=0, destinations="default")
                   for p in pipelines),
        outcomes=(RuleOutcome(rule="r", matched=bool(pipelines), reasons=("why",)),),
    )


def receive_more(sessions, study_id: int, count: int) -> None:  # type: ignore[no-untyped-def]
    """The PACS sent the rest: the series grows and the study completes again."""
    with sessions.begin() as session:
        series = session.scalars(select(Series).where(Series.study_id == study_id)).one()
        series.instance_count = count
        session.get(Study, study_id).state = StudyState.COMPLETE.value  # type: ignore[union-attr]


def run(sessions, job_id: int, at: datetime, *, state: str = "succeeded", results: int = 0) -> None:  # type: ignore[no-untyped-def]
    assert jobs.claim_job(sessions, job_id, worker="w", now=at, lease_seconds=60) is not None
    if state == "dead":
        assert jobs.fail_job(sessions, job_id, now=at, error="series 1.2.9.1: 39 slice(s) missing: gap of 30 mm",
                             retryable=False) == "dead"
        return
    specs = [jobs.ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", f"2.25.{job_id}{n}", f"2.25.{job_id}9", f"p{n}")
             for n in range(results)]
    assert jobs.finish_job(sessions, job_id, now=at, stage_seconds={}, summary=None, results=specs,
                           delivery_max_attempts=5, state=state) is not None


def events(sessions, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return [str(d) for d in session.scalars(select(StudyEvent.detail).where(StudyEvent.kind == kind))]


def job(sessions, job_id: int) -> Job:  # type: ignore[no-untyped-def]
    with sessions() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def test_a_job_that_died_on_an_incomplete_series_runs_again_when_the_series_grows(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 57)
    [first] = jobs.record_routing(sessions, study_id, decision("seg"), now=T0, max_attempts=3)
    run(sessions, first, T0, state="dead")
    assert job(sessions, first).input_instances == 57

    # Completing again with nothing new (our own results came back) runs nothing.
    receive_more(sessions, study_id, 57)
    assert jobs.record_routing(sessions, study_id, decision("seg"), now=T0, max_attempts=3) == []
    assert job(sessions, first).superseded_at is None

    receive_more(sessions, study_id, 96)
    later = T0 + timedelta(minutes=5)
    [second] = jobs.record_routing(sessions, study_id, decision("seg"), now=later, max_attempts=3)
    new = job(sessions, second)
    assert (new.state, new.generation, new.supersedes_job_id) == (JobState.QUEUED.value, 2, first)
    assert job(sessions, first).superseded_at == later  # it had no results to replace
    [why] = events(sessions, "rerun_on_more_instances")
    assert f"job {second} runs seg again" in why and "39 more instance(s)" in why and "slice(s) missing" in why

    # Once healed and succeeded, more instances do not run it again (late instances after success).
    run(sessions, second, later)
    receive_more(sessions, study_id, 97)
    assert jobs.record_routing(sessions, study_id, decision("seg"), now=later, max_attempts=3) == []
    assert f"seg on {SERIES}: job {second} succeeded" in events(sessions, "routed")[-1]


def test_a_not_applicable_job_runs_again_on_more_slices_but_a_dead_one_without_growth_does_not(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 20)
    seg, det = jobs.record_routing(sessions, study_id, decision("seg", "det"), now=T0, max_attempts=3)
    run(sessions, seg, T0, state="not_applicable")
    run(sessions, det, T0, state="dead")
    with sessions.begin() as session:  # det died on something else, after the series had grown already
        session.get(Job, det).input_instances = 80  # type: ignore[union-attr]
    receive_more(sessions, study_id, 80)
    [again] = jobs.record_routing(sessions, study_id, decision("seg", "det"), now=T0, max_attempts=3)
    assert job(sessions, again).pipeline == "seg" and job(sessions, det).superseded_at is None


def test_reprocess_supersedes_only_when_the_new_results_are_ready(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 96)
    [first] = jobs.record_routing(sessions, study_id, decision("seg"), now=T0, max_attempts=3)
    run(sessions, first, T0, results=2)

    later = T0 + timedelta(hours=1)
    [rerun] = job_reruns.reprocess(sessions, study_id, decision("seg").jobs, now=later, max_attempts=3, by="alice")
    assert rerun.supersedes_job_id == first and rerun.job_id is not None
    new = job(sessions, rerun.job_id)
    assert (new.state, new.attempts, new.generation) == (JobState.FAILED.value, 0, 2)  # due: the sweep queues it
    assert job(sessions, first).superseded_at is None  # the old results stay current until the new ones exist
    assert "re-process requested by alice" in events(sessions, "reprocess")[0]

    # A second request while it waits does not stack another generation.
    [skipped] = job_reruns.reprocess(sessions, study_id, decision("seg").jobs, now=later, max_attempts=3, by="bob")
    assert skipped.job_id is None and f"job {rerun.job_id} is still failed" in (skipped.skipped or "")

    assert rerun.job_id in jobs.requeue_jobs(sessions, now=later)
    run(sessions, rerun.job_id, later, results=1)
    assert job(sessions, first).superseded_at == later
    [superseded] = events(sessions, "results_superseded")
    assert f"replaces the results of job(s) {first}" in superseded and f"SR 2.25.{first}0" in superseded
    # New objects, new UIDs: nothing the earlier job recorded is reused.
    assert {r.sop_instance_uid for r in jobs.results_of_job(sessions, rerun.job_id)}.isdisjoint(
        {r.sop_instance_uid for r in jobs.results_of_job(sessions, first)})


def test_a_rerun_gets_the_findings_its_predecessor_reported_for_their_tracking_uids(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 96)
    [first] = jobs.record_routing(sessions, study_id, decision("seg"), now=T0, max_attempts=3)
    tracking = [{"key": "segment:SCT:39607008:Left lung", "uid": "2.25.11"},
                {"key": "detection:SCT:27925004:Nodule", "uid": "2.25.12", "centre_mm": [1.0, 2.0, 3.0]}]
    assert jobs.claim_job(sessions, first, worker="w", now=T0, lease_seconds=60) is not None
    assert jobs.finish_job(sessions, first, now=T0, stage_seconds={}, summary={"kind": "segmentation",
                                                                                "tracking": tracking},
                           results=[jobs.ResultSpec("SR", "1.2.840.10008.5.1.4.1.1.88.34", "2.25.13", "2.25.14", "p")],
                           delivery_max_attempts=5) is not None
    assert job_reruns.lineage(sessions, first).earlier_tracking == ()  # a first run has no history

    [rerun] = job_reruns.reprocess(sessions, study_id, decision("seg").jobs, now=T0, max_attempts=3, by="alice")
    assert rerun.job_id is not None
    found = job_reruns.lineage(sessions, rerun.job_id)
    assert (found.generation, found.replaced_reports, found.earlier_tracking) == (
        2, (("1.2.840.10008.5.1.4.1.1.88.34", "2.25.13", "2.25.14"),), tuple(tracking))


def test_reprocess_of_an_ignored_study_routes_it_and_a_failed_rerun_leaves_the_old_results_current(
        engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 96)
    assert jobs.record_routing(sessions, study_id, decision(), now=T0, max_attempts=3) == []
    [rerun] = job_reruns.reprocess(sessions, study_id, decision("det").jobs, now=T0, max_attempts=1, by="cli")
    assert rerun.supersedes_job_id is None and rerun.job_id is not None
    with sessions() as session:
        assert session.get(Study, study_id).state == StudyState.ROUTED.value  # type: ignore[union-attr]
    jobs.requeue_jobs(sessions, now=T0)
    run(sessions, rerun.job_id, T0, results=1)
    [again] = job_reruns.reprocess(sessions, study_id, decision("det").jobs, now=T0, max_attempts=1, by="cli")
    assert again.job_id is not None
    jobs.requeue_jobs(sessions, now=T0)
    run(sessions, again.job_id, T0, state="dead")
    assert job(sessions, rerun.job_id).superseded_at is None


def test_resend_makes_existing_and_new_deliveries_due_and_skips_superseded_jobs(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    study_id = study_with_series(sessions, 96)
    [first] = jobs.record_routing(sessions, study_id, decision("seg"), now=T0, max_attempts=3)
    assert jobs.claim_job(sessions, first, worker="w", now=T0, lease_seconds=60)
    [delivery] = jobs.finish_job(sessions, first, now=T0, stage_seconds={}, summary=None, destinations=["pacs"],
                                 results=[jobs.ResultSpec("SEG", "1.2", "2.25.1", "2.25.2", "p")],
                                 delivery_max_attempts=5) or [0]
    jobs.claim_delivery(sessions, delivery, now=T0, lease_seconds=60)
    jobs.finish_delivery(sessions, delivery, now=T0, objects_sent=1)

    later = T0 + timedelta(days=1)
    targets = job_reruns.resend_deliveries(sessions, [(first, ["pacs", "archive"])], now=later, max_attempts=5,
                                           by="alice")
    assert [(t.destination, t.created) for t in targets] == [("pacs", False), ("archive", True)]
    with sessions() as session:
        rows = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.job_id == first))}
    assert all(d.state == DeliveryState.FAILED.value and d.attempts == 0 and d.next_attempt_at == later
               for d in rows.values())
    assert set(jobs.due_deliveries(sessions, now=later)) == {rows["pacs"].id, rows["archive"].id}
    assert "results sent again by alice to pacs, archive" in events(sessions, "results_resent")[0]

    with sessions.begin() as session:
        session.get(Job, first).superseded_at = later  # type: ignore[union-attr]
    assert job_reruns.resend_deliveries(sessions, [(first, ["pacs"])], now=later, max_attempts=5, by="x") == []
