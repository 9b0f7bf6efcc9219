"""Worker heartbeats: the thread keeps a real row fresh, a silent worker goes offline, a real worker
context reports real model load states and its running job, and the node's embedded worker beats too."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine

from dicom_node.db import jobs, repo, workers
from dicom_node.db.session import make_engine, make_session_factory
from dicom_node.header import InstanceHeader
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.ingest import utc_now
from dicom_node.app.node import Node, worker_heartbeat
from dicom_node.queue import CeleryQueue
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome
from dicom_node.settings import load_settings
from tests.conftest import free_port
from tests.unit.workers.model_fixtures import write_threshold_bundle
from workers.celery_app import make_celery_app
from workers.context import build_worker_context, preload_models
from workers.heartbeat import TrackedModels, WorkerHeartbeat


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def row(sessions, name: str, stale: float = 60.0) -> workers.WorkerView | None:  # type: ignore[no-untyped-def]
    return next((w for w in workers.list_workers(sessions, now=utc_now(), stale_seconds=stale) if w.name == name), None)


def test_heartbeat_thread_keeps_its_row_fresh_and_a_silent_worker_goes_offline(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    beating = WorkerHeartbeat(sessions, name="gpu-host:101", queues=["gpu", "io"], device="cpu", interval_seconds=0.05)
    beating.start()
    try:
        first = wait_for(lambda: row(sessions, "gpu-host:101"))
        assert first.queues == ("gpu", "io") and first.device == "cpu" and first.online  # type: ignore[attr-defined]
        # A worker that wrote once and then died (killed, machine gone): nothing refreshes its row.
        WorkerHeartbeat(sessions, name="dead-host:7", queues=["io"], device=None).beat()
        time.sleep(0.5)
        later = row(sessions, "gpu-host:101", stale=0.3)
        assert later is not None and later.online and later.last_seen_at > first.last_seen_at  # type: ignore[attr-defined]
        dead = row(sessions, "dead-host:7", stale=0.3)
        assert dead is not None and not dead.online
        assert workers.count_online(sessions, now=utc_now(), stale_seconds=0.3) == 1
        listed = [w.name for w in workers.list_workers(sessions, now=utc_now(), stale_seconds=0.3)]
        assert listed == ["gpu-host:101", "dead-host:7"]  # online first
    finally:
        beating.stop()
    assert row(sessions, "gpu-host:101") is None  # a clean stop removes the row
    assert row(sessions, "dead-host:7") is not None
    # Long-silent workers are forgotten by the next heartbeat's start.
    assert workers.prune_workers(sessions, now=utc_now() + timedelta(days=8)) == 1
    assert workers.list_workers(sessions, now=utc_now(), stale_seconds=60) == []


def test_heartbeat_interval_must_be_positive(tmp_path: Path) -> None:
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    with pytest.raises(ValueError, match="interval_seconds must be positive, got 0"):
        WorkerHeartbeat(sessions, name="x:1", queues=["gpu"], device=None, interval_seconds=0)


def test_worker_context_sets_cudnn_benchmark_from_the_settings(tmp_path: Path) -> None:
    """``worker.cudnn_benchmark`` reaches torch when a worker (embedded or not) builds its context."""
    import torch

    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    before = torch.backends.cudnn.benchmark
    try:
        for wanted in (False, True, False):
            settings = load_settings(None, {"data_dir": tmp_path / "data", "worker.cudnn_benchmark": wanted})
            build_worker_context(settings, sessions, CeleryQueue(make_celery_app("memory://")))
            assert torch.backends.cudnn.benchmark is wanted
        assert load_settings(None, {"data_dir": tmp_path}).worker.cudnn_benchmark is True  # the default
    finally:
        torch.backends.cudnn.benchmark = before


def _routed_job(engine: Engine, series: str = "1.2.9.1") -> int:
    """One study indexed, completed and routed through the node's functions; returns its job id."""
    sessions = make_session_factory(engine)
    at = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", f"{series}.1", "1.2.9", series, "PID", "Doe^J", "A1",
                            "20260301", "Chest", "CT", 1, "Axial", "CHEST", 1)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    indexer.index(IndexRecord(header, "1.2.840.10008.1.2.1", "x/1.dcm", 10, at, None))
    indexer.stop()
    assert repo.complete_due_studies(sessions, now=at + timedelta(minutes=1), quiet_seconds=1, max_wait_seconds=600)
    [(study_id, _)] = jobs.studies_to_route(sessions)
    decision = RoutingDecision(jobs=(JobSpec(pipeline="thr", series_instance_uid=series, rule="r", priority=0,
                                             destinations=()),), outcomes=(RuleOutcome(rule="r", matched=True, reasons=("CT",)),))
    [job] = jobs.record_routing(sessions, study_id, decision, now=at, max_attempts=3)
    return job


def test_worker_context_reports_real_model_load_states_and_its_running_job(engine: Engine, tmp_path: Path) -> None:
    bundle = write_threshold_bundle(tmp_path / "thr", spacing_mm=(5.0, 5.0, 5.0), roi_size=(32, 32, 16))
    registry = tmp_path / "models.yaml"
    registry.write_text(f"""models:
  - {{id: thr, kind: segmentation, format: monai_bundle, path: {bundle}, version: "0.1.0"}}
  - {{id: broken, kind: segmentation, format: monai_bundle, path: /nonexistent/bundle, version: "2.0"}}
""")
    settings = load_settings(None, {"data_dir": tmp_path / "data", "routing.models_file": registry})
    sessions = make_session_factory(engine)
    context = build_worker_context(settings, sessions, CeleryQueue(make_celery_app("memory://")))
    assert isinstance(context.models, TrackedModels)
    assert context.worker_name == f"{socket.gethostname()}:{os.getpid()}"
    heartbeat = worker_heartbeat(sessions, context.worker_name, context, ["gpu"], utc_now)
    heartbeat.beat()
    before = row(sessions, context.worker_name)
    assert before is not None and before.device is not None and before.device.startswith(("cpu", "cuda:0"))
    assert before.models == {
        "thr": {"state": "not loaded", "device": None, "error": None, "version": "0.1.0"},
        "broken": {"state": "not loaded", "device": None, "error": None, "version": "2.0"},
    }
    preload_models(context.models)  # what the worker does at start: load and warm up every model
    heartbeat.beat()
    after = row(sessions, context.worker_name)
    assert after is not None and after.models_loaded == 1
    assert after.models["thr"]["state"] == "loaded" and after.models["thr"]["device"] in ("cpu", "cuda:0")
    assert after.models["broken"]["state"] == "failed"
    assert "does not exist" in after.models["broken"]["error"]
    assert context.models.entry("thr").version == "0.1.0"  # still the registry for everything else
    # The job this worker claims is its current job; once it is finished, none.
    job = _routed_job(engine)
    assert after.current_job_id is None
    assert jobs.claim_job(sessions, job, worker=context.worker_name, now=utc_now(), lease_seconds=60)
    heartbeat.beat()
    assert row(sessions, context.worker_name).current_job_id == job  # type: ignore[union-attr]
    jobs.fail_job(sessions, job, now=utc_now(), error="stopped by the test", retryable=False)
    heartbeat.beat()
    assert row(sessions, context.worker_name).current_job_id is None  # type: ignore[union-attr]


def test_embedded_worker_of_the_node_beats_while_it_runs_and_leaves_when_it_stops(tmp_path: Path) -> None:
    settings = load_settings(None, {
        "data_dir": tmp_path, "dicom.port": free_port(), "dicom.bind_address": "127.0.0.1", "web.enabled": False,
        "storage.min_free_mb": 0, "queue.embedded_worker_queues": ["io"],
    })
    node = Node(settings)
    name = f"{socket.gethostname()}:{os.getpid()}"
    node.start()
    try:
        found = wait_for(lambda: row(node.sessions, name))
        assert found.queues == ("io",) and found.device is None and found.online  # type: ignore[attr-defined]
    finally:
        node.stop()
    engine = make_engine(settings.resolved_database_url)
    assert row(make_session_factory(engine), name) is None
    engine.dispose()
