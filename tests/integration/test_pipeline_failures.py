"""What the pipeline does when things go wrong: readable errors, nothing lost, no re-run of inference.

The node runs its embedded worker with the detection model only (fast on CPU) and a
real Orthanc as the destination.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dicom_node.cli import main
from peers import NodeProcess, Orthanc, WorkerProcess, free_port, wait_for
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

DETECTION_ONLY = {"rules": [{"name": "ct", "pipelines": ["lung-nodule-detection"],
                             "conditions": [{"attribute": "modality", "in": ["CT"]}]}]}


def start_node(tmp_path: Path, destination_port: int, **overrides: object) -> NodeProcess:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(DETECTION_ONLY))
    (tmp_path / "destinations.yaml").write_text(yaml.safe_dump({"destinations": [{
        "type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination_port,
        "default": True}]}))
    settings = {
        "routing.rules_file": str(tmp_path / "rules.yaml"),
        "routing.destinations_file": str(tmp_path / "destinations.yaml"),
        "queue": {"embedded_worker_queues": ["gpu", "io"], "sweep_interval_seconds": 0.2},
        **overrides,
    }
    return NodeProcess(tmp_path / "node", overrides=settings).start()


def small_ct(tmp_path: Path, seed: int, **geometry: object) -> list[Path]:
    geom = SeriesGeometry(**{"rows": 48, "columns": 48, "slices": 16, "pixel_spacing": (6.0, 6.0),  # type: ignore[arg-type]
                             "slice_spacing": 6.0, "slice_thickness": 6.0, **geometry})
    return generate_ct_series(tmp_path / f"ct{seed}", geometry=geom, seed=seed).paths


def test_an_inconsistent_series_ends_its_job_with_the_precise_reason(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    node = start_node(tmp_path, free_port())
    try:
        files = small_ct(tmp_path, seed=71)
        del files[7]  # a slice missing in the middle of the series
        assert node.storescu(files).returncode == 0
        state = wait_for("the job to end", lambda: [r for r in node.query("SELECT state, error FROM jobs")
                                                    if r[0] in ("dead", "succeeded")], timeout=60)
        [(job_state, error)] = state
        assert job_state == "dead"
        assert "slice(s) missing" in error and "before index 7" in error
        code = main(["jobs", "list", "--config", str(node.config_path), "--data-dir", str(node.data_dir)])
        assert code == 0 and "slice(s) missing" in capsys.readouterr().out
    finally:
        node.close()


def test_a_destination_down_for_a_while_gets_the_results_when_it_returns(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="late-pacs")
    node = start_node(tmp_path, orthanc.dicom_port, **{
        "delivery": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0, "max_attempts": 50}})
    try:
        assert node.storescu(small_ct(tmp_path, seed=72)).returncode == 0
        failed = wait_for("a failed delivery attempt", lambda: node.query(
            "SELECT attempts, error FROM deliveries WHERE state = 'failed' AND attempts >= 2"), timeout=90)
        assert "connection refused" in failed[0][1].lower() or "refused" in failed[0][1]
        orthanc.start()  # the PACS comes back
        wait_for("the delivery", lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"),
                 timeout=60)
        [(attempts, sent)] = node.query("SELECT attempts, objects_sent FROM deliveries")
        assert attempts >= 3 and sent >= 1
        assert len(orthanc.instances()) == sent  # the SR (and GSPS when something was found)
        assert node.query("SELECT attempts FROM jobs") == [(1,)]  # inference ran once
    finally:
        node.close()
        orthanc.stop()


def test_a_worker_killed_mid_job_loses_nothing(tmp_path: Path, redis_url: str) -> None:
    """Redis mode: kill -9 the only worker while it runs a job; another worker finishes it after the lease."""
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="pacs").start()
    node = start_node(tmp_path, orthanc.dicom_port, **{
        "queue": {"broker_url": redis_url, "embedded_worker_queues": [], "sweep_interval_seconds": 0.2},
        "routing.job_lease_seconds": 3.0})
    first = second = None
    try:
        first = WorkerProcess(node, tmp_path, "worker-1")
        wait_for("the first worker to load its model", lambda: "loaded bundle" in first.log(), timeout=60)
        assert node.storescu(small_ct(tmp_path, seed=73)).returncode == 0
        wait_for("the job to run", lambda: node.query("SELECT 1 FROM jobs WHERE state = 'running'"), timeout=30)
        first.kill9()
        second = WorkerProcess(node, tmp_path, "worker-2")
        [(state, attempts, error)] = wait_for("the job to finish on the second worker", lambda: node.query(
            "SELECT state, attempts, error FROM jobs WHERE state IN ('succeeded', 'dead')"), timeout=120)
        assert (state, attempts) == ("succeeded", 2), error
        wait_for("the delivery", lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"), timeout=60)
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        node.close()
        orthanc.stop()
