"""Distributed mode with no shared filesystem (issue 26): the node on PostgreSQL and Redis, two
``dicom-node worker`` processes that each have their own EMPTY data directory and reach the node only over
HTTP (``worker.node_access: http``, a worker account's API token); a chest CT in, its results in Orthanc.

One worker is killed (SIGKILL) while it runs a job; the node takes the job back when its lease runs out and
the other worker finishes it. Nothing is lost or duplicated: each model's results arrive in Orthanc once
(one SEG, one SR per model), each job's delivery is sent once, and the workers wrote nothing into the node's
data directory (series came by WADO-RS into their own caches, results went up by PUT into the node's outbox).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
import requests
import yaml
from sqlalchemy import create_engine, text

from peers import NODE_COMMAND, NodeProcess, Orthanc, WorkerProcess, wait_for
from tests.conftest import postgres_database
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

REDIS_URL = "redis://127.0.0.1:6379/11"  # a database of its own: other tests use 8
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
LEASE_SECONDS = 8.0


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL database (the node's and both workers')."""
    with postgres_database("dicom_node_net") as url:
        yield url


@pytest.fixture
def redis_db() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def _cli(node: NodeProcess, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([NODE_COMMAND, *args, "--config", str(node.config_path), "--data-dir",
                             str(node.data_dir)], input=stdin, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"dicom-node {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(1200)  # two workers load both models at once on 2 cores: minutes
def test_two_network_workers_one_killed_mid_job(tmp_path: Path, postgres_url: str, redis_db: str) -> None:
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(1, 1), nodule_diameter_mm=(14.0, 16.0)), seed=2626)
    series_dir, _ = write_dicom_case(phantom, tmp_path / "case", seed=2626)
    files = sorted(series_dir.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="orthanc-net")
    orthanc.start()
    engine = create_engine(postgres_url)
    workers: list[WorkerProcess] = []
    node: NodeProcess | None = None
    try:
        destinations_file = tmp_path / "destinations.yaml"
        destinations_file.write_text(yaml.safe_dump({"destinations": [
            {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "default": True}]}))
        queue = {"broker_url": redis_db, "sweep_interval_seconds": 0.5, "resend_after_seconds": 15.0}
        # The node: receive, route, deliver (its own io queue); no inference (no gpu queue) and no shared disk.
        node = NodeProcess(tmp_path / "node", overrides={
            "database_url": postgres_url, "queue": {**queue, "embedded_worker_queues": ["io"]},
            "routing.destinations_file": str(destinations_file), "routing.job_lease_seconds": LEASE_SECONDS,
        }, label="node-net").start(timeout=60)
        base_url = f"http://127.0.0.1:{node.web_port}"
        _cli(node, "users", "create", "gpu-workers", "--role", "worker", "--password-stdin",
             stdin="a-password-never-used-123\n")
        token = _cli(node, "tokens", "create", "gpu-workers", "--name", "ci workers").strip()
        assert re.fullmatch(r"\S+", token), token
        # The worker account reads DICOMweb but nothing of the admin API.
        assert requests.get(f"{base_url}/api/v1/studies", headers={"Authorization": f"Bearer {token}"},
                            timeout=10).status_code == 403

        for label in ("gpu-a", "gpu-b"):
            data_dir = tmp_path / label / "data"
            data_dir.mkdir(parents=True)
            config = tmp_path / label / "worker.yaml"
            config.write_text(yaml.safe_dump({
                "database_url": postgres_url, "log_level": "INFO", "queue": queue,
                "routing": {"job_lease_seconds": LEASE_SECONDS},
                "worker": {"node_access": "http", "node_url": base_url, "token": token, "cache_max_mb": 512},
            }))
            workers.append(WorkerProcess(node, tmp_path / label, label, config=config, data_dir=data_dir,
                                         queues="gpu"))
        by_pid = {w.process.pid: w for w in workers}

        def jobs(sql: str = "SELECT id, pipeline, state, worker, attempts FROM jobs ORDER BY id") -> list[Any]:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql))]

        result = node.storescu(files, called_ae=node.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr

        def running_on_our_worker() -> tuple[int, WorkerProcess] | None:
            for job_id, _, state, worker, _ in jobs():
                pid = int(worker.rsplit(":", 1)[1]) if state == "running" and worker else None
                if pid in by_pid:
                    return job_id, by_pid[pid]
            return None

        # Both workers load their models first (minutes on 2 cores); a job then runs on one of them.
        job_id, victim = wait_for("a job running on one of the workers", running_on_our_worker, timeout=500,
                                  interval=0.2)
        time.sleep(2.0)  # mid-job: fetching its series or running its model
        assert jobs(f"SELECT state FROM jobs WHERE id = {job_id}") == [("running",)]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        survivor = next(w for w in workers if w is not victim)
        killed_at = time.monotonic()

        def results_in_orthanc() -> dict[str, list[dict[str, Any]]] | None:
            orthanc_study = orthanc.lookup_study(study_uid)
            if orthanc_study is None:
                return None
            try:
                series = orthanc.get(f"/studies/{orthanc_study}/series")
            except requests.RequestException:
                return None
            found: dict[str, list[dict[str, Any]]] = {"SEG": [], "SR": []}
            for entry in series:
                modality = entry["MainDicomTags"].get("Modality", "")
                if modality in found:
                    found[modality].append(entry)
            done = jobs("SELECT state FROM jobs") == [("succeeded",), ("succeeded",)]
            return found if done and found["SEG"] and len(found["SR"]) >= 2 else None

        found = wait_for("both jobs done and their SEG and SRs in Orthanc", results_in_orthanc, timeout=600,
                         interval=1.0)
        recovered_after = time.monotonic() - killed_at
        time.sleep(3)  # any duplicate delivery would arrive now

        # Every job succeeded, the killed one on the survivor; each model's results in Orthanc exactly once.
        rows = jobs()
        assert all(state == "succeeded" for _, _, state, _, _ in rows), rows
        assert {worker.rsplit(":", 1)[1] for _, _, _, worker, _ in rows} == {str(survivor.process.pid)}, rows
        found = results_in_orthanc()
        assert found is not None
        assert [len(s["Instances"]) for s in found["SEG"]] == [1]
        sr_series = sorted(int(s["MainDicomTags"]["SeriesNumber"]) for s in found["SR"])
        assert sr_series == [9012, 9022], sr_series  # one SR series per model ...
        assert [len(s["Instances"]) for s in found["SR"]] == [1, 1]  # ... holding one SR each
        with engine.connect() as connection:
            deliveries = [tuple(r) for r in connection.execute(text(
                "SELECT job_id, state, attempts FROM deliveries ORDER BY job_id"))]
            results = connection.execute(text("SELECT path FROM result_objects")).scalars().all()
        assert [(state, attempts) for _, state, attempts in deliveries] == [("delivered", 1), ("delivered", 1)], \
            deliveries

        # The workers shared no disk with the node: they cached the series and wrote nothing of their own
        # results (the node's outbox holds them); the node's data dir is the node's alone.
        for worker in workers:
            data_dir = worker.log_path.parent / "data"
            cached = _files_under(data_dir / "series-cache")
            assert not (data_dir / "outbox").exists() and not (data_dir / "spool").exists(), _files_under(data_dir)
            if worker is survivor:
                assert len([p for p in cached if p.suffix == ".dcm"]) == len(files)
        outbox = _files_under(node.data_dir / "outbox")
        assert any(p.name.startswith("seg-") for p in outbox) and any(p.name.startswith("sr-") for p in outbox)
        assert len(results) >= 3  # SEG + SR, SR (+ GSPS, KO)
        for path in results:
            assert (node.data_dir / "outbox" / path).is_file(), path
        assert "fetched series" in survivor.log()
        print(f"\nnetwork workers: killed {victim.log_path.parent.name} in job {job_id}; both jobs done and "
              f"delivered {recovered_after:.1f} s later (lease {LEASE_SECONDS:g} s); jobs {rows}")
    finally:
        for worker in workers:
            worker.stop()
        if node is not None:
            node.close()
        orthanc.stop()
        engine.dispose()

