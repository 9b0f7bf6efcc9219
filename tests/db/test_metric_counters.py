"""The counts the database keeps for /metrics and the queue depths (migration 0012) equal a full count of the
rows after every kind of change the node makes - associations, refused instances, indexing, routing, jobs
and deliveries through all their states - across a restart (a new engine on the same database), before
and after PostgreSQL's deltas are folded; on SQLite and on PostgreSQL. Also: the migration starts them
from the rows already there, goes down and up again, and every trigger is in place at the head revision.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, func, select, text, update

from bench.growth import fill
from dicom_node.db import counters, jobs, monitoring, repo
from dicom_node.db.models import (
    AssociationOutcome,
    AssociationProtocol,
    AssociationRecord,
    Delivery,
    DeliveryState,
    IngestError,
    Job,
    MetricDelta,
    Study,
)
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.header import InstanceHeader
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome
from dicom_node.web.routes.ops import STAGE_BUCKETS

T0 = datetime(2026, 12, 8, 8, 0, tzinfo=timezone.utc)
CT = "1.2.840.10008.5.1.4.1.1.2"
RAN = ("succeeded", "not_applicable", "held", "released", "discarded")
#: Reject reasons as the SCP and dicom_node.access word them, and a few it does not.
REASONS = ("called AE title 'OTHER' is not this node's (NODE)", "calling AE title 'EVIL' is not allowed",
           "calling AE title 'PACS' is not allowed from address 10.9.9.9", "too many associations open (8)",
           "connection closed without a valid association request", "TLS handshake failed")


def full_counts(engine: Engine) -> dict[str, Any]:
    """What /metrics says, counted from every row (how it was computed before migration 0012)."""
    with engine.connect() as connection:
        rows = lambda sql: connection.execute(text(sql)).all()  # noqa: E731
        ended = rows("SELECT protocol, outcome, count(*), coalesce(sum(instances_stored), 0), "
                     "coalesce(sum(bytes_received), 0) FROM associations WHERE outcome <> 'open' "
                     "GROUP BY protocol, outcome")
        stages: Counter[tuple[str, str, str]] = Counter()
        sums: Counter[tuple[str, str]] = Counter()
        for pipeline, raw in rows(f"SELECT pipeline, stage_seconds FROM jobs WHERE state IN {RAN} "
                                  "AND finished_at IS NOT NULL AND stage_seconds IS NOT NULL"):
            try:
                parsed = json.loads(raw)
            except ValueError:  # a damaged value counts nothing
                continue
            for stage, seconds in parsed.items():
                if isinstance(seconds, (int, float)):
                    stages[(stage, pipeline, next((repr(b) for b in STAGE_BUCKETS if seconds <= b), "+Inf"))] += 1
                    sums[(stage, pipeline)] += seconds
        return {
            "studies": dict(rows("SELECT state, count(*) FROM studies GROUP BY state")),
            "jobs": {(s, p): n for s, p, n in rows(
                "SELECT state, pipeline, count(*) FROM jobs GROUP BY state, pipeline")},
            "deliveries": {(s, d): n for s, d, n in rows(
                "SELECT state, destination, count(*) FROM deliveries GROUP BY state, destination")},
            "associations": {o: n for p, o, n, _, _ in ended if p != "stow-rs"},
            "stow_requests": {o: n for p, o, n, _, _ in ended if p == "stow-rs"},
            "instances_received": sum(int(i) for _, _, _, i, _ in ended),
            "bytes_received": sum(int(b) for _, _, _, _, b in ended),
            "associations_open": dict(rows("SELECT protocol, count(*) FROM associations WHERE outcome = 'open' "
                                           "GROUP BY protocol")),
            "rejected": dict(Counter(monitoring.normalise_reject_reason(r) for (r,) in rows(
                "SELECT reject_reason FROM associations WHERE outcome = 'rejected'"))),
            "ingest_errors": {f"0x{s:04X}": n for s, n in rows(
                "SELECT status, count(*) FROM ingest_errors GROUP BY status")},
            "stage_buckets": dict(stages),
            "stage_seconds": dict(sums),
        }


def kept_counts(engine: Engine) -> dict[str, Any]:
    """The same, as /metrics reads it now (the counts the database keeps)."""
    sessions = make_session_factory(engine)
    s = monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60)
    with sessions() as session:
        open_now = counters.read(session, ("associations_open",)).labelled("associations_open")
    assert s.associations_open == sum(n for protocol, n in open_now.items() if protocol != "stow-rs")
    nonzero = lambda d: {k: v for k, v in d.items() if v}  # noqa: E731 - a gauge may keep a row at 0
    return {
        "studies": nonzero(s.studies), "jobs": nonzero(s.jobs), "deliveries": nonzero(s.deliveries),
        "associations": s.associations, "stow_requests": s.stow_requests, "instances_received": s.instances_received,
        "bytes_received": s.bytes_received, "associations_open": nonzero(open_now), "rejected": nonzero(s.rejected), "ingest_errors": s.ingest_errors,
        "stage_buckets": s.stage_buckets, "stage_seconds": s.stage_seconds,
    }


def assert_kept_equal_full(engine: Engine) -> None:
    kept, full = kept_counts(engine), full_counts(engine)
    stage_seconds = kept.pop("stage_seconds")
    expected_seconds = full.pop("stage_seconds")
    assert kept == full
    assert stage_seconds.keys() == expected_seconds.keys()
    for key, seconds in expected_seconds.items():
        assert abs(stage_seconds[key] - seconds) < 1e-5, key


def header(study: str, sop: str) -> InstanceHeader:
    return InstanceHeader(CT, sop, study, f"{study}.1", "PID", "DOE^J", "A1", "20261208", "Chest", "CT", 2, "Axial",
                          "CHEST", 1)


def decision(*pipelines: str, series: str) -> RoutingDecision:
    return RoutingDecision(
        jobs=tuple(JobSpec(pipeline=p, series_instance_uid=series, rule="r", priority=0, destinations="default")
                   for p in pipelines),
        outcomes=(RuleOutcome(rule="r", matched=bool(pipelines), reasons=("why",)),))


def life(engine: Engine, prefix: str, at: datetime) -> int:
    """A day of the node, through its own functions: studies received in associations (one released, one
    interrupted, one rejected per reason; a STOW-RS request), refused instances, studies completed and routed (one ignored),
    jobs that succeed, fail and retry, die, are held and released, deliveries delivered, failed, handed
    back, lost to an expired lease, dead and retried. Returns the delivery attempts that failed."""
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    try:
        association = repo.open_association(sessions, calling_ae_title="PACS", called_ae_title="NODE",
                                            peer_address="10.0.0.1", peer_port=104, tls=False, now=at)
        for study in range(3):
            uid = f"{prefix}.{study}"
            for n in range(2):
                indexer.index(IndexRecord(header(uid, f"{uid}.1.{n}"), "1.2.840.10008.1.2.1", f"x/{uid}/{n}.dcm",
                                          1000, at, association))
        repo.close_association(sessions, association, outcome=AssociationOutcome.RELEASED, now=at,
                               instances_stored=6, instances_failed=1, bytes_received=6000)
        repo.record_ingest_error(sessions, now=at, association_id=association, calling_ae_title="PACS",
                                 sop_class_uid=CT, sop_instance_uid=f"{prefix}.bad", status=0xC210,
                                 reason="cannot decode", quarantine_path=None)
        repo.record_ingest_error(sessions, now=at, association_id=None, calling_ae_title="PACS", sop_class_uid=CT,
                                 sop_instance_uid=None, status=0xA700, reason="disk full", quarantine_path=None)
        for reason in REASONS:
            repo.open_association(sessions, calling_ae_title="X", called_ae_title="NODE", peer_address="10.9.9.9",
                                  peer_port=1, tls=False, now=at, reject_reason=reason)
        stow = repo.open_association(sessions, calling_ae_title="", called_ae_title="NODE", peer_address="10.0.0.2",
                                     peer_port=443, tls=True, now=at, protocol=AssociationProtocol.STOW_RS,
                                     username="sender")
        repo.close_association(sessions, stow, outcome=AssociationOutcome.RELEASED, now=at, instances_stored=0,
                               instances_failed=0, bytes_received=100)
        repo.open_association(sessions, calling_ae_title="PACS", called_ae_title="NODE", peer_address="10.0.0.1",
                              peer_port=104, tls=False, now=at)
        repo.interrupt_open_associations(sessions, at)  # the node stopped while one was open
        later = at + timedelta(minutes=5)
        completed = repo.complete_due_studies(sessions, now=later, quiet_seconds=10, max_wait_seconds=600)
        assert {f"{prefix}.{n}" for n in range(3)} <= set(completed)
        with sessions() as session:
            ids = dict(session.execute(select(Study.study_instance_uid, Study.id)
                                       .where(Study.study_instance_uid.like(f"{prefix}.%"))).all())
        seg, det = jobs.record_routing(sessions, ids[f"{prefix}.0"], decision("seg", "det", series=f"{prefix}.0.1"),
                                       now=later, max_attempts=2)
        [held] = jobs.record_routing(sessions, ids[f"{prefix}.1"], decision("seg", series=f"{prefix}.1.1"), now=later,
                                     max_attempts=2)
        assert jobs.record_routing(sessions, ids[f"{prefix}.2"], decision(series=f"{prefix}.2.1"), now=later,
                                   max_attempts=2) == []  # ignored
        # seg succeeds and is delivered to one destination; its other delivery has a hard time
        assert jobs.claim_job(sessions, seg, worker="w", now=later, lease_seconds=60)
        stages: dict[str, Any] = {"load": 0.2, "inference": 42.0, "note": "not a number"}
        pacs, archive = jobs.finish_job(sessions, seg, now=later, stage_seconds=stages, summary={}, results=[],
                                        destinations=["pacs", "archive"], delivery_max_attempts=3) or []
        assert jobs.claim_delivery(sessions, pacs, now=later, lease_seconds=60)
        jobs.finish_delivery(sessions, pacs, now=later, objects_sent=1)
        backoff = {"backoff_initial_seconds": 1.0, "backoff_max_seconds": 1.0}
        claim = jobs.claim_delivery(sessions, archive, now=later, lease_seconds=60)
        assert claim is not None
        jobs.fail_delivery(sessions, archive, now=later, error="refused", retryable=True, **backoff)  # failure 1
        assert archive in jobs.due_deliveries(sessions, now=later + timedelta(seconds=2))
        claim = jobs.claim_delivery(sessions, archive, now=later, lease_seconds=60)
        assert claim is not None and jobs.hand_back_delivery(sessions, archive, attempt=claim.attempt, now=later,
                                                             reason="stopping")  # does not count
        assert jobs.claim_delivery(sessions, archive, now=later, lease_seconds=60)
        assert archive in jobs.due_deliveries(sessions, now=later + timedelta(minutes=2))  # lease lost: failure 2
        assert jobs.claim_delivery(sessions, archive, now=later, lease_seconds=60)
        jobs.fail_delivery(sessions, archive, now=later, error="no such AE", retryable=False, **backoff)  # failure 3
        assert jobs.retry_delivery(sessions, archive, now=later)  # an operator's retry: the count stays
        # det fails, is retried, dies, and an operator retries it
        assert jobs.claim_job(sessions, det, worker="w", now=later, lease_seconds=60)
        assert jobs.fail_job(sessions, det, now=later, error="gap", retryable=True) == "failed"
        assert det in jobs.requeue_jobs(sessions, now=later)
        assert jobs.claim_job(sessions, det, worker="w", now=later, lease_seconds=60)
        assert jobs.fail_job(sessions, det, now=later, error="gap", retryable=True) == "dead"
        assert jobs.retry_job(sessions, det, now=later)
        # a held result, released: its stage times count once
        assert jobs.claim_job(sessions, held, worker="w", now=later, lease_seconds=60)
        jobs.finish_job(sessions, held, now=later, stage_seconds={"inference": 0.05, "encoding": 700.0}, summary={},
                        results=[], delivery_max_attempts=3, state="held")
        assert jobs.release_job(sessions, held, now=later, destinations=["pacs"], delivery_max_attempts=3,
                                by="tester") is not None
        for protocol in (AssociationProtocol.DICOM, AssociationProtocol.STOW_RS):  # open when the day ends
            repo.open_association(sessions, calling_ae_title="PACS", called_ae_title="NODE", peer_address="10.0.0.1",
                                  peer_port=104, tls=False, now=later, protocol=protocol)
        return 3
    finally:
        indexer.stop()


def test_kept_counts_equal_a_full_count_through_every_change_and_a_restart(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    failures = life(engine, "2.25.1", T0)
    assert_kept_equal_full(engine)
    sessions = make_session_factory(engine)
    assert monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60).delivery_failures == {
        "archive": failures}
    snapshot = monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60)
    assert snapshot.stage_buckets[("inference", "seg", "60.0")] == 1 and ("note", "seg", "+Inf") not in \
        snapshot.stage_buckets
    assert snapshot.stage_buckets[("encoding", "seg", "+Inf")] == 1  # 700 s: beyond the last bucket
    engine.dispose()

    restarted = make_engine(url)  # the node starts again: nothing of the counts lived in the process
    try:
        upgrade(restarted)
        sessions = make_session_factory(restarted)
        before = kept_counts(restarted)
        assert before["studies"] and before["instances_received"] == 6 and before["stow_requests"] == {"released": 1}
        failures += life(restarted, "2.25.2", T0 + timedelta(hours=1))
        with sessions() as session:
            pending = session.scalar(select(func.count()).select_from(MetricDelta))
        assert_kept_equal_full(restarted)
        folded = counters.fold(sessions)
        assert (folded > 0) == (restarted.dialect.name == "postgresql") and folded == pending
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(MetricDelta)) == 0
        assert_kept_equal_full(restarted)
        snapshot = monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60)
        assert snapshot.delivery_failures == {"archive": failures} and snapshot.instances_received == 12
        depths = {q.queue: q for q in snapshot.queues}
        with sessions() as session:
            job_states = Counter(session.scalars(select(Job.state)).all())
            delivery_states = Counter(session.scalars(select(Delivery.state)).all())
        assert (depths["gpu"].waiting, depths["gpu"].dead) == (job_states["queued"] + job_states["failed"],
                                                               job_states["dead"])
        assert (depths["io"].waiting, depths["io"].retrying) == (
            delivery_states[DeliveryState.PENDING.value] + delivery_states[DeliveryState.FAILED.value],
            delivery_states[DeliveryState.FAILED.value]) and depths["io"].waiting == 4  # retried, released: x 2
        # a row deleted: the gauges follow, the counters of what happened do not go back
        assert snapshot.associations_open == 1
        with sessions.begin() as session:
            session.execute(Delivery.__table__.delete())
            session.execute(IngestError.__table__.delete())
            session.execute(AssociationRecord.__table__.delete())
        after = monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60)
        assert not any(after.deliveries.values()) and after.ingest_errors == snapshot.ingest_errors
        assert after.delivery_failures == snapshot.delivery_failures and after.associations_open == 0
        assert after.associations == snapshot.associations and after.stow_requests == snapshot.stow_requests == {
            "released": 2, "interrupted": 1}  # the STOW-RS request open at the end of the first day was interrupted
    finally:
        restarted.dispose()


def test_rejected_associations_are_labelled_as_monitoring_labels_them(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    for reason in REASONS:
        repo.open_association(sessions, calling_ae_title="X", called_ae_title="NODE", peer_address="10.9.9.9",
                              peer_port=1, tls=False, now=T0, reject_reason=reason)
    with sessions.begin() as session:  # a reason changed afterwards, and one set to NULL
        first, second = session.scalars(select(AssociationRecord.id).order_by(AssociationRecord.id).limit(2)).all()
        for association_id, reason in ((first, "too many associations open (9)"), (second, None)):
            session.execute(update(AssociationRecord).where(AssociationRecord.id == association_id)
                            .values(reject_reason=reason))
    kept = monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60).rejected
    labels = {label: n for label, n in kept.items() if n}  # a reason changed away from a label leaves it at 0
    assert labels == full_counts(engine)["rejected"]
    assert labels == {"too_many_associations": 2, "other": 2, "calling_address": 1, "invalid_request": 1}


def _triggers(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.execute(text("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' "
                                           "AND name LIKE 'metric_%'")).all()
        else:
            rows = connection.execute(text("SELECT tgname, tgrelid::regclass::text FROM pg_trigger "
                                           "WHERE tgname LIKE 'metric_%' AND NOT tgisinternal")).all()
    return {str(name): str(table) for name, table in rows}


def test_every_counting_trigger_is_there_at_the_head_revision(engine: Engine) -> None:
    """A later migration that rebuilds one of these tables on SQLite (batch mode) drops its triggers; this
    names the ones missing."""
    found = _triggers(engine)
    expected = {f"metric_{t}_{op}": t for t in ("studies", "jobs", "deliveries")
                for op in ("insert", "update", "delete")}
    expected |= {"metric_job_stages_update": "jobs", "metric_delivery_failures": "deliveries",
                 "metric_associations_insert": "associations", "metric_associations_update": "associations",
                 "metric_associations_delete": "associations",
                 "metric_ingest_errors_insert": "ingest_errors"}
    if engine.dialect.name == "sqlite":  # PostgreSQL counts inserted finished jobs in metric_jobs_insert
        expected["metric_job_stages_insert"] = "jobs"
    assert found == expected


def test_0012_starts_from_the_rows_there_and_goes_down_and_up(database_url: str) -> None:
    from alembic import command

    from dicom_node.db.session import _alembic_config

    engine = make_engine(database_url)
    try:
        upgrade(engine, "0011")
        fill(engine, 300, instances=1, days=1, now=T0)  # a history written before the counters existed
        with engine.begin() as connection:
            connection.execute(text("UPDATE jobs SET stage_seconds = :s WHERE state = 'succeeded' AND id % 7 = 0"),
                               {"s": json.dumps({"inference": 3.0, "load": 0.04})})
            connection.execute(text("UPDATE jobs SET stage_seconds = 'not json' WHERE id = 6"))
            connection.execute(text("UPDATE deliveries SET attempts = 3 WHERE state = 'failed'"))
        failed_attempts = 3 * 3  # 300 studies: 3 failed deliveries (i % 100 == 4), 3 attempts each
        upgrade(engine)
        assert_kept_equal_full(engine)
        sessions = make_session_factory(engine)
        assert monitoring.metrics_snapshot(sessions, now=T0, worker_stale_seconds=60).delivery_failures == {
            "pacs": failed_attempts}
        command.downgrade(_alembic_config(engine), "0011")
        assert _triggers(engine) == {}
        fill_more = life(engine, "2.25.9", T0)  # changes while the counters are gone
        upgrade(engine)  # and up again: counted afresh from the rows
        assert fill_more and _triggers(engine)
        assert_kept_equal_full(engine)
    finally:
        engine.dispose()


def test_a_bulk_fill_is_counted(engine: Engine) -> None:
    """Rows written by plain SQL (the growth benchmark's fill: one INSERT ... SELECT per table) are counted too."""
    fill(engine, 1_000, instances=2, days=2, now=T0)
    assert_kept_equal_full(engine)
    counters.fold(make_session_factory(engine))
    assert_kept_equal_full(engine)
