"""The peers of the end-to-end benchmark (bench/e2e.py): the study it sends, a real Orthanc, and a
``dicom-node serve`` started for the run with its own settings, database and rules.

Why a module of its own: setting up the peers is independent of what is measured, and
the measuring script stays readable on its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.peers import Orthanc  # noqa: E402
from training.data.dicom_pair import write_dicom_case  # noqa: E402
from training.phantoms.chest import ChestPhantom, PhantomConfig, generate_chest_phantom  # noqa: E402

ENV = {key: value for key, value in os.environ.items() if not key.startswith("DICOM_NODE_")} | {
    "TCP_NODELAY": "1",
    "PYTHONUNBUFFERED": "1",
}
LOCALHOST = "127.0.0.1"
NODE_AE, ORTHANC_AE = "DICOM_NODE", "ORTHANC"
SCAN_RANGE_MM = 300.0


class BenchError(RuntimeError):
    """The benchmark cannot go on: a peer did not start, a model is missing, a job failed."""


# -- small helpers ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now (loopback)."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, max_chars: int = 4000) -> str:
    """The end of a log file, for error messages."""
    text = path.read_text(errors="replace") if path.exists() else f"<{path} does not exist>"
    return text[-max_chars:]


def db_time(value: str | None) -> float | None:
    """A naive-UTC SQLite timestamp as seconds since the epoch (None stays None)."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- the study -------------------------------------------------------------------


def make_phantom(slices: int, seed: int) -> ChestPhantom:
    """A chest CT phantom of ``slices`` x 512 x 512 covering 300 mm (1.0 mm slices at 300)."""
    config = PhantomConfig(
        shape=(slices, 512, 512),
        spacing_mm=(SCAN_RANGE_MM / slices, 0.7, 0.7),
        nodule_count=(2, 3),
        nodule_diameter_mm=(8.0, 20.0),
    )
    return generate_chest_phantom(config, seed=seed)


def write_study(phantom: ChestPhantom, out_dir: Path, seed: int) -> tuple[list[Path], str]:
    """Write ``phantom`` as a CT series with UIDs drawn from ``seed``; returns (files, Study Instance UID)."""
    series_dir, _reference_seg = write_dicom_case(phantom, out_dir, seed=seed)
    files = sorted(series_dir.glob("*.dcm"))
    if not files:
        raise BenchError(f"write_dicom_case wrote no files into {series_dir}")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return files, study_uid


def check_models(pipelines: Sequence[str]) -> None:
    """Fail clearly when a pipeline is unknown or its bundle is not on disk (yet)."""
    from workers.models.registry import default_registry

    registry = default_registry()
    for pipeline in pipelines:
        if pipeline not in registry.ids:
            raise BenchError(f"--pipelines: {pipeline!r} is not a demo model (known: {', '.join(registry.ids)})")
        path = registry.path(pipeline)
        weights = [path / "models" / name for name in ("model.pt", "model.ts")]
        if not (path / "configs" / "metadata.json").is_file() or not any(w.is_file() for w in weights):
            others = [p for p in pipelines if p != pipeline] or [p for p in registry.ids if p != pipeline]
            raise BenchError(
                f"model {pipeline}: bundle {path} is missing (no configs/metadata.json or models/model.pt|.ts); "
                f"train/export it first or run with --pipelines {','.join(others)}"
            )


# -- peers -----------------------------------------------------------------------


@contextmanager
def orthanc_running(work_dir: Path) -> Iterator[Orthanc]:
    """The tests' real Orthanc peer (its own config, storage and ports), without verbose logging."""
    peer = Orthanc(work_dir, aet=ORTHANC_AE, label="e2e-bench", verbose=False)
    try:
        try:
            peer.start(timeout=60.0)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        yield peer
    finally:
        peer.stop()


@dataclass
class NodePeer:
    """``dicom-node serve`` as a subprocess: where its data, database and log are."""

    data_dir: Path
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "dicom-node.db"

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query on the node's SQLite database (WAL: never blocks the node)."""
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return list(connection.execute(sql, tuple(parameters)))
        finally:
            connection.close()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"dicom-node exited with status {self.process.returncode}:\n{tail(self.log_path)}")


def node_command() -> str:
    beside = Path(sys.executable).with_name("dicom-node")
    found = str(beside) if beside.exists() else shutil.which("dicom-node")
    if found is None:
        raise BenchError(f"dicom-node is not installed (next to {sys.executable} or on PATH)")
    return found


def wait_for_echo(node: NodePeer, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node.check_alive()
        done = subprocess.run(["echoscu", "-aec", NODE_AE, LOCALHOST, str(node.port)], env=ENV, capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise BenchError(
        f"dicom-node does not answer C-ECHO on port {node.port} within {timeout:g} s:\n{tail(node.log_path)}"
    )


def write_routing_files(work_dir: Path, orthanc: Orthanc, pipelines: Sequence[str]) -> tuple[Path, Path]:
    """The rules file (every CT study: ``pipelines``) and the destinations file (``orthanc`` the default) of a
    benchmarked node, written into ``work_dir``; returns (rules, destinations)."""
    destinations = work_dir / "destinations.yaml"
    destinations.write_text(yaml.safe_dump({"destinations": [{
        "type": "dicom", "name": "pacs", "ae_title": orthanc.aet, "host": LOCALHOST, "port": orthanc.dicom_port,
        "default": True,
    }]}))
    rules = work_dir / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "e2e-bench", "description": "every CT study: the benchmarked pipelines", "enabled": True,
        "match": "all", "conditions": [{"attribute": "modality", "in": ["CT"]}], "series": {"prefer": "thinnest"},
        "pipelines": list(pipelines), "destinations": "default", "priority": 0,
    }]}, sort_keys=False))
    return rules, destinations


@contextmanager
def node_running(
    work_dir: Path, orthanc: Orthanc, pipelines: Sequence[str], quiet_seconds: float,
    pending_encodes: int | None = None,
) -> Iterator[NodePeer]:
    """Start the node with Orthanc as its default destination and a rule running ``pipelines`` on CT;
    ``pending_encodes``: its ``worker.pending_encodes`` (None: the default)."""
    work_dir.mkdir(parents=True)
    rules, destinations = write_routing_files(work_dir, orthanc, pipelines)
    config = work_dir / "node.yaml"
    config.write_text(yaml.safe_dump({
        "log_level": "INFO",
        "dicom": {"bind_address": LOCALHOST},
        "storage": {"min_free_mb": 0},
        "completion": {"quiet_seconds": quiet_seconds, "check_interval_seconds": 0.1},
        "queue": {"sweep_interval_seconds": 0.1},
        "routing": {"rules_file": str(rules), "destinations_file": str(destinations)},
    } | ({} if pending_encodes is None else {"worker": {"pending_encodes": pending_encodes}}), sort_keys=False))
    port = free_port()
    data_dir = work_dir / "data"
    log_path = work_dir / "node.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [node_command(), "serve", "--config", str(config), "--data-dir", str(data_dir), "--port", str(port),
             "--web-port", str(free_port()), "--ae-title", NODE_AE],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=work_dir,
        )
    node = NodePeer(data_dir, port, log_path, process)
    try:
        wait_for_echo(node)
        yield node
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
