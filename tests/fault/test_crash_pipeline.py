"""Faults around a job in embedded mode: the node killed mid-job, the destination down.

One ``dicom-node serve`` process runs everything (``memory://`` broker, SQLite, the
embedded worker) with the slow test model of :mod:`pipeline_setup`, and a real Orthanc
is the PACS the results go to. What must hold: the database, not the queue, knows
what is left to do, so a job interrupted by ``kill -9`` runs again after the restart
and a delivery that could not be made is made when the PACS returns - and the PACS
receives each job's results exactly once (one SEG series, one SR series).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from peers import NodeProcess, Orthanc, wait_for
from pipeline_setup import delivered_once, pipeline_settings, result_series_in_pacs, small_ct

pytestmark = pytest.mark.slow


def job_results(node: NodeProcess, job_id: int) -> dict[str, str]:
    """Kind -> Series Instance UID of the result objects the node recorded for a job."""
    return {str(kind): str(series) for kind, series in node.query(
        "SELECT kind, series_instance_uid FROM result_objects WHERE job_id = ?", [job_id])}


def test_a_node_killed_mid_job_runs_it_again_and_delivers_once(tmp_path: Path, slow_bundle: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="pacs").start()
    node = NodeProcess(tmp_path / "node", label="node", overrides=pipeline_settings(
        tmp_path / "config", bundle=slow_bundle, destination_port=orthanc.dicom_port, inference_delay_seconds=2.0))
    try:
        node.start()
        series = small_ct(tmp_path, seed=81)
        assert node.storescu(series.paths).returncode == 0
        wait_for("the job to run", lambda: node.query("SELECT 1 FROM jobs WHERE state = 'running'"), timeout=90)
        node.kill9()  # the embedded worker dies with the node, mid-inference
        assert node.query("SELECT state, attempts FROM jobs") == [("running", 1)]

        node.start()
        [(job_id, state, attempts, error)] = wait_for("the job to end after the restart", lambda: node.query(
            "SELECT id, state, attempts, error FROM jobs WHERE state IN ('succeeded', 'dead')"), timeout=120)
        assert (state, attempts) == ("succeeded", 2), error
        wait_for("the delivery", lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"), timeout=60)
        expected = job_results(node, job_id)
        assert set(expected) == {"SEG", "SR"}
        assert node.query("SELECT state, objects_sent FROM deliveries") == [("delivered", 2)]
        assert not delivered_once(result_series_in_pacs(orthanc, series.study_uid), expected)
    finally:
        node.close()
        orthanc.stop()


def test_a_destination_down_for_a_while_gets_the_results_once_when_it_returns(tmp_path: Path,
                                                                               slow_bundle: Path) -> None:
    """The PACS is down when the results are ready, the node is even killed meanwhile; then the PACS returns."""
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="late-pacs")  # not started: the outage
    node = NodeProcess(tmp_path / "node", label="node", overrides=pipeline_settings(
        tmp_path / "config", bundle=slow_bundle, destination_port=orthanc.dicom_port))
    try:
        node.start()
        series = small_ct(tmp_path, seed=82)
        assert node.storescu(series.paths).returncode == 0
        failed = wait_for("a failed delivery attempt", lambda: node.query(
            "SELECT attempts, error FROM deliveries WHERE state = 'failed' AND attempts >= 2"), timeout=90)
        assert "refused" in failed[0][1].lower(), failed

        node.kill9()  # the outage outlasts a crash of the node
        node.start()
        wait_for("another attempt after the restart", lambda: node.query(
            "SELECT 1 FROM deliveries WHERE attempts > ?", [failed[0][0]]), timeout=60)

        orthanc.start()  # the PACS comes back
        wait_for("the delivery", lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"),
                 timeout=60)
        [(job_id, job_attempts)] = node.query("SELECT id, attempts FROM jobs")
        assert job_attempts == 1  # inference ran once; only the sending was repeated
        [(attempts, sent)] = node.query("SELECT attempts, objects_sent FROM deliveries")
        assert attempts >= 3 and sent == 2
        assert not delivered_once(result_series_in_pacs(orthanc, series.study_uid), job_results(node, job_id))
    finally:
        node.close()
        orthanc.stop()
