"""Stopping on SIGTERM: quickly, with no job or delivery lost or failed, and everything done after a restart.

``systemctl stop`` sends SIGTERM and kills the process after ``TimeoutStopSec=60``. The
node must not wait for its whole queue: the job running when the signal comes gets
``queue.stop_grace_seconds`` to finish, else it is handed back (queued again, the attempt
not counted, a study event saying why); queued jobs stay queued; a delivery being sent is
handed back the same way. A second SIGTERM or SIGINT ends the process at once (leases
then bring the work back). Each test runs real processes (``dicom-node serve``, and
``dicom-node worker`` on a real Redis) with the demo models on small CT series, a real
DICOM destination (a pynetdicom Storage SCP in this process) and the node's own database.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from peers import LOCALHOST, NodeProcess, WorkerProcess, free_port, wait_for
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

#: Minutes, not the suite's 300 s: each test starts the node or a worker two or three times, and each start
#: loads and warms up a model, which takes half a minute or more on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: Seconds a running job (or delivery) gets after SIGTERM in these tests.
GRACE_SECONDS = 0.5
#: What a stop may take beyond the grace period on a loaded 2-core CI machine (the node needs about 1-2 s;
#: before the fix it waited for every job its worker had taken: 10 s and more here).
STOP_MARGIN_SECONDS = 7.0

MODEL_ENTRIES = {
    "chest-ct-segmentation": {"id": "chest-ct-segmentation", "kind": "segmentation", "format": "monai_bundle",
                              "path": "package://workers/bundles/chest_ct_segmentation", "version": "0.1.0"},
    "lung-nodule-detection": {"id": "lung-nodule-detection", "kind": "detection", "format": "monai_bundle",
                              "path": "package://workers/bundles/lung_nodule_detection", "version": "0.1.0"},
}


class RecordingPACS:
    """A real DICOM Storage SCP (pynetdicom) that records what it stores; ``hold()`` makes each C-STORE wait
    until ``release()``, so a delivery can be caught in the middle of sending."""

    def __init__(self, ae_title: str = "PACS") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.stored: list[str] = []
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        self._ae = ae
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        if not self._open.is_set():
            self.waiting.set()
            self._open.wait(timeout=120)
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def hold(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def start(self) -> "RecordingPACS":
        self._server = self._ae.start_server((LOCALHOST, self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        self.release()
        self._ae.shutdown()

    def destination(self) -> dict[str, Any]:
        return {"type": "dicom", "name": "pacs", "ae_title": self.ae_title, "host": LOCALHOST, "port": self.port,
                "default": True, "timeout_seconds": 120}


@pytest.fixture
def pacs() -> Iterator[RecordingPACS]:
    server = RecordingPACS().start()
    yield server
    server.stop()


def node_settings(tmp_path: Path, pacs: RecordingPACS, model: str, **overrides: Any) -> dict[str, Any]:
    """Settings of a node that runs ``model`` on every CT study and sends the results to ``pacs``."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"rules": [{
        "name": "ct", "pipelines": [model], "conditions": [{"attribute": "modality", "in": ["CT"]}]}]}))
    (tmp_path / "destinations.yaml").write_text(yaml.safe_dump({"destinations": [pacs.destination()]}))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [MODEL_ENTRIES[model]]}))
    settings: dict[str, Any] = {
        "routing.rules_file": str(tmp_path / "rules.yaml"),
        "routing.destinations_file": str(tmp_path / "destinations.yaml"),
        "routing.models_file": str(tmp_path / "models.yaml"),
        "queue": {"embedded_worker_queues": ["gpu", "io"], "sweep_interval_seconds": 0.2,
                  "stop_grace_seconds": GRACE_SECONDS},
    }
    settings.update(overrides)
    return settings


def small_cts(tmp_path: Path, count: int) -> list[Path]:
    """``count`` small CT studies (16 slices of 48x48 at 6 mm): the segmentation model takes seconds on each."""
    geometry = SeriesGeometry(rows=48, columns=48, slices=16, pixel_spacing=(6.0, 6.0), slice_spacing=6.0,
                              slice_thickness=6.0)
    files: list[Path] = []
    for seed in range(count):
        files += generate_ct_series(tmp_path / f"ct{seed}", geometry=geometry, seed=500 + seed).paths
    return files


def signal_and_wait(process: Any, signum: int = signal.SIGTERM, timeout: float = 120.0) -> tuple[float, int]:
    """Send ``signum`` to a ``subprocess.Popen`` and wait for it to exit: (seconds it took, exit status)."""
    start = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=timeout)
    return time.monotonic() - start, code


def jobs_of(node: NodeProcess) -> list[dict[str, Any]]:
    columns = ("id", "state", "attempts", "worker", "error")
    return [dict(zip(columns, row)) for row in node.query(f"SELECT {', '.join(columns)} FROM jobs ORDER BY id")]


def events(node: NodeProcess, kind: str) -> list[str]:
    return [str(row[0]) for row in node.query("SELECT detail FROM study_events WHERE kind = ? ORDER BY id", [kind])]


def all_succeeded(node: NodeProcess) -> list[dict[str, Any]] | None:
    """The jobs once every one has succeeded, else None."""
    rows = jobs_of(node)
    return rows if rows and all(row["state"] == "succeeded" for row in rows) else None


def wait_for_running_job(node: NodeProcess, jobs_expected: int) -> int:
    """Wait until ``jobs_expected`` jobs exist and one runs; its id."""
    [(job_id,)] = wait_for(
        f"{jobs_expected} jobs, one of them running",
        lambda: (node.query("SELECT id FROM jobs WHERE state = 'running'")
                 if node.query("SELECT COUNT(*) FROM jobs")[0][0] == jobs_expected else None),
        timeout=300, interval=0.05)  # the model is loaded and warmed up first: minutes on a busy 2-core machine
    return int(job_id)


def assert_handed_back(node: NodeProcess, running: int, jobs_expected: int) -> None:
    """The job that ran at SIGTERM is queued again (attempt not counted, event saying why); the rest are queued."""
    rows = jobs_of(node)
    assert len(rows) == jobs_expected, rows
    by_id = {row["id"]: row for row in rows}
    assert by_id[running]["state"] == "queued", rows
    assert by_id[running]["attempts"] == 0, rows
    assert by_id[running]["worker"] is None, rows
    others = [row for row in rows if row["id"] != running]
    assert all(row["state"] == "queued" and row["attempts"] == 0 for row in others), rows
    [detail] = events(node, "job_handed_back")
    assert f"job {running} " in detail and "stopped" in detail and "does not count" in detail, detail


def stop_in_the_middle_of_a_job(tmp_path: Path, node: NodeProcess, worker: Any, log: Callable[[], str]) -> None:
    """Send three studies, SIGTERM ``worker`` (a ``Popen``) while the first job runs; check the stop and the DB."""
    assert node.storescu(small_cts(tmp_path, 3)).returncode == 0
    running = wait_for_running_job(node, jobs_expected=3)
    seconds, code = signal_and_wait(worker)
    assert code == 0, log()[-3000:]
    assert seconds < GRACE_SECONDS + STOP_MARGIN_SECONDS, f"stop took {seconds:.1f} s"
    assert_handed_back(node, running, jobs_expected=3)
    assert "handed back job" in log()


def assert_everything_done(node: NodeProcess, pacs: RecordingPACS, what: str) -> None:
    """Every job succeeded in one attempt (a handed-back one does not count), every result reached ``pacs`` once."""
    done = wait_for(f"every job to succeed {what}", lambda: all_succeeded(node), timeout=600)
    assert [row["attempts"] for row in done] == [1] * len(done), done
    wait_for("every delivery", lambda: node.query(
        "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'")[0][0] == len(done), timeout=60)
    sent = {str(row[0]) for row in node.query("SELECT sop_instance_uid FROM result_objects")}
    assert len(pacs.stored) == len(set(pacs.stored)) and set(pacs.stored) == sent


def test_serve_stops_within_the_grace_period_and_finishes_every_job_after_a_restart(
    tmp_path: Path, pacs: RecordingPACS
) -> None:
    node = NodeProcess(tmp_path / "node", overrides=node_settings(tmp_path, pacs, "chest-ct-segmentation"))
    try:
        node.start()
        stop_in_the_middle_of_a_job(tmp_path, node, node.process, node.log_text)
        node.start()
        assert_everything_done(node, pacs, "after the restart")
        seconds, code = signal_and_wait(node.process)  # nothing running: a stop of a second or two
        assert code == 0 and seconds < STOP_MARGIN_SECONDS, f"idle stop took {seconds:.1f} s (status {code})"
    finally:
        node.close()


def test_worker_hands_back_its_job_on_sigterm_and_another_worker_finishes_the_queue(
    tmp_path: Path, pacs: RecordingPACS, redis_url: str
) -> None:
    settings = node_settings(tmp_path, pacs, "chest-ct-segmentation", queue={
        "broker_url": redis_url, "embedded_worker_queues": [], "sweep_interval_seconds": 0.2,
        "stop_grace_seconds": GRACE_SECONDS})
    node = NodeProcess(tmp_path / "node", overrides=settings)
    first = second = None
    try:
        node.start()
        first = WorkerProcess(node, tmp_path, "worker-1")
        stop_in_the_middle_of_a_job(tmp_path, node, first.process, first.log)
        assert not node.query("SELECT 1 FROM worker_status"), "the stopped worker is still listed"
        # The node did not restart: the broker still holds a message for every queued job.
        second = WorkerProcess(node, tmp_path, "worker-2")
        assert_everything_done(node, pacs, "on the second worker")
        seconds, code = signal_and_wait(second.process)
        assert code == 0 and seconds < STOP_MARGIN_SECONDS, f"idle worker stop took {seconds:.1f} s (status {code})"
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        node.close()


def test_a_delivery_being_sent_is_handed_back_and_a_second_signal_stops_at_once(
    tmp_path: Path, pacs: RecordingPACS
) -> None:
    settings = node_settings(tmp_path, pacs, "lung-nodule-detection", **{"delivery.lease_seconds": 2.0})
    node = NodeProcess(tmp_path / "node", overrides=settings)
    pacs.hold()
    try:
        node.start()
        assert node.storescu(small_cts(tmp_path, 1)).returncode == 0
        assert pacs.waiting.wait(timeout=300), "the delivery never reached the destination"

        # 1. SIGTERM while the destination holds the C-STORE: the delivery is handed back.
        seconds, code = signal_and_wait(node.process)
        assert code == 0, node.log_text()[-3000:]
        assert seconds < GRACE_SECONDS + STOP_MARGIN_SECONDS, f"stop took {seconds:.1f} s"
        assert node.query("SELECT state, attempts FROM jobs") == [("succeeded", 1)]
        assert node.query("SELECT state, attempts FROM deliveries") == [("pending", 0)]
        [detail] = events(node, "delivery_handed_back")
        assert "stopped" in detail and "does not count" in detail, detail

        # 2. A long grace period, and the destination still holding: the listener closes at once, the node
        # waits for the delivery, and a second signal (SIGINT here) ends it at once.
        node.config["queue"]["stop_grace_seconds"] = 30.0
        node.config_path.write_text(yaml.safe_dump(node.config, sort_keys=False))
        pacs.hold()
        node.start()
        assert pacs.waiting.wait(timeout=300), "the delivery was not sent again after the restart"
        node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_for("the listener to stop accepting associations", lambda: node.echo().returncode != 0, timeout=10)
        time.sleep(1.0)
        assert node.is_running(), "the node did not give the delivery its grace period"
        seconds, code = signal_and_wait(node.process, signal.SIGINT)
        assert seconds < 3.0, f"the second signal took {seconds:.1f} s"
        assert code != 0, "a stop that abandoned its work must not report success"
        assert node.query("SELECT state, attempts FROM deliveries") == [("sending", 1)]

        # 3. The destination answers again; the lease of the abandoned attempt expires and it is sent.
        pacs.release()
        node.start()
        wait_for("the delivery", lambda: node.query("SELECT 1 FROM deliveries WHERE state = 'delivered'"),
                 timeout=60)
        [(attempts,)] = node.query("SELECT attempts FROM deliveries")
        assert attempts == 2  # the abandoned attempt counts, the handed-back one does not
        assert node.query("SELECT state, attempts FROM jobs") == [("succeeded", 1)]
        assert set(pacs.stored) == {str(row[0]) for row in node.query("SELECT sop_instance_uid FROM result_objects")}
    finally:
        pacs.release()
        node.close()
