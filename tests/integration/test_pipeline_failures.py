"""What the pipeline does with a series it cannot use: the job ends with the precise reason.

The node runs its embedded worker with the detection model only (fast on CPU). Faults
(a destination down, a worker or the node killed mid-job, the broker or the database
restarted) are in ``tests/fault``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dicom_node.app.cli import main
from peers import NodeProcess, free_port, wait_for
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
