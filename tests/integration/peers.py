"""Real peers for the slow integration tests: the node as a process, Orthanc, DCMTK.

* :class:`NodeProcess` runs ``dicom-node serve`` as a subprocess with its own YAML
  config, data dir and port, so it can be killed (``kill -9``) and restarted like a
  real deployment. Its log (stdout and stderr) goes to a file.
* :class:`Orthanc` runs a real Orthanc (``/usr/sbin/Orthanc``) with its own JSON
  config and storage, driven over its REST API.

Every log file of a peer started during a test is registered in :data:`PEER_LOGS`;
``tests/integration/conftest.py`` attaches the logs to the report of a failing test,
so the node's own account of what went wrong is printed with the failure.

DCMTK and Orthanc on Debian leave Nagle's algorithm on unless ``TCP_NODELAY=1`` is in
their environment (about 45 ms stalled per C-STORE), so every peer here gets it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml
from sqlalchemy import create_engine, text

T = TypeVar("T")

#: Log files of the peers alive now: label -> path (see the module docstring).
PEER_LOGS: dict[str, Path] = {}

LOCALHOST = "127.0.0.1"
#: The PostgreSQL server the tests (and bench/scale.py) make their throw-away databases on.
POSTGRES_ADMIN_URL = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _venv_script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (next to {sys.executable} or on PATH)")
    return found


NODE_COMMAND = _venv_script("dicom-node")
ORTHANC_COMMAND = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_PLUGINS_DIR = Path("/usr/share/orthanc/plugins")


# -- small shared helpers ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def peer_env() -> dict[str, str]:
    """The environment for DCMTK tools and Orthanc: Nagle off (see the module docstring)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(command: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (or any peer CLI) with TCP_NODELAY set; output captured as text."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=peer_env(), **kwargs)


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


def tail(path: Path, max_chars: int = 30_000) -> str:
    """The end of a (log) file, for failure reports."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    if len(text) > max_chars:
        return f"... ({len(text) - max_chars} characters left out)\n" + text[-max_chars:]
    return text


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """Split a DICOM Part 10 file into (file meta group 0002, dataset bytes as encoded).

    Walks the Explicit VR Little Endian meta elements rather than trusting the group
    length, so the dataset bytes are exactly what follows the last (0002,xxxx) element.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    position = 132
    while position + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            length = struct.unpack_from("<I", data, position + 8)[0]
            position += 12 + length
        else:
            length = struct.unpack_from("<H", data, position + 6)[0]
            position += 8 + length
    return data[132:position], data[position:]


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    return split_part10(path.read_bytes())[1]


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"dicom.port": 1, "completion__quiet_seconds": 2}`` -> nested dicts."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.replace("__", ".").split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


# -- the node as a process -------------------------------------------------------

#: Settings every test node gets unless a test overrides them: fast completion, no
#: free-space floor (CI disks are small), listening on loopback only.
#: States of a study that has been judged complete (routing moves it on from "complete").
COMPLETED_STATES = {"complete", "routed", "ignored"}

NODE_TEST_DEFAULTS: dict[str, Any] = {
    "log_level": "INFO",
    "dicom": {"bind_address": LOCALHOST},
    "storage": {"min_free_mb": 0},
    "completion": {"quiet_seconds": 1.0, "check_interval_seconds": 0.2},
    # Receiving tests queue jobs but run no inference; the pipeline tests turn the worker on.
    "queue": {"embedded_worker_queues": []},
}


class NodeProcess:
    """``dicom-node serve`` as a subprocess; see the module docstring.

    ``overrides`` are settings, nested (``{"dicom": {"allowed_callers": [...]}}``) or
    dotted (``{"completion.quiet_seconds": 2}``); they are written to ``node.yaml`` in
    ``work_dir``. The port and AE title are passed on the command line, as the README
    does. The data dir survives :meth:`kill9` / :meth:`terminate`, so :meth:`start`
    again restarts the node on the same data (and, by default, the same port).
    ``env`` adds to (or replaces) the environment the process inherits, e.g. a private ``TMPDIR``.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
        ae_title: str = "DICOM_NODE",
        label: str = "node",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.env = dict(env or {})
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir) if data_dir is not None else self.work_dir / "data"
        self.port = port or free_port()
        self.web_port = free_port()
        self.ae_title = ae_title
        self.label = label
        self.config_path = self.work_dir / "node.yaml"
        self.log_path = self.work_dir / "node.log"
        self.config: dict[str, Any] = dict(NODE_TEST_DEFAULTS)
        for key, value in (overrides or {}).items():
            self.config = _deep_merge(self.config, _nested({key: value}))
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # paths
    @property
    def db_path(self) -> Path:
        return self.data_dir / "dicom-node.db"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the node was never started")
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # lifecycle
    def start(self, timeout: float = 30.0) -> "NodeProcess":
        """Start ``dicom-node serve`` and wait until it answers a C-ECHO."""
        if self.is_running():
            raise RuntimeError(f"{self.label} is already running (pid {self.pid})")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"===== start #{self.starts}: port {self.port}, data {self.data_dir} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [
                    NODE_COMMAND,
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(self.port),
                    "--web-port",
                    str(self.web_port),
                    "--ae-title",
                    self.ae_title,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=self.work_dir,
            )
        PEER_LOGS[f"{self.label} log ({self.log_path})"] = self.log_path
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the node answers ``echoscu``.

        An A-ASSOCIATE-RJ counts as an answer: a node whose ``allowed_callers`` leave
        out ECHOSCU is up all the same. (No bare TCP probe: the node records every
        connection without an association request.)
        """
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with status {self.process.returncode} while starting:\n{tail(self.log_path)}"
                )
            result = self.echo()
            last = result.stdout + result.stderr
            if result.returncode == 0 or "Association Rejected" in last:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} did not answer C-ECHO within {timeout:g} s ({last.strip()}):\n{tail(self.log_path)}")

    def kill9(self) -> None:
        """``kill -9``: no shutdown code runs, like a power cut for the process."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean stop), SIGKILL if it does not exit within ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def close(self) -> None:
        """Stop the node if it runs and forget its log (fixture teardown)."""
        self.terminate()
        PEER_LOGS.pop(f"{self.label} log ({self.log_path})", None)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # DICOM with DCMTK
    def echo(self, called_ae: str | None = None, calling_ae: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
        return run_tool(
            ["echoscu", "-to", "5", "-aet", calling_ae, "-aec", called_ae or self.ae_title, LOCALHOST, str(self.port)],
            timeout=30,
        )

    def storescu(
        self,
        files: Iterable[Path | str],
        *options: str,
        called_ae: str | None = None,
        calling_ae: str = "STORESCU",
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``storescu [options] -aet calling -aec called 127.0.0.1 port files...``."""
        return run_tool(
            [
                "storescu",
                "-to",
                "30",
                *options,
                "-aet",
                calling_ae,
                "-aec",
                called_ae or self.ae_title,
                LOCALHOST,
                str(self.port),
                *(str(f) for f in files),
            ],
            timeout=timeout,
        )

    # what the node knows
    def studies(self) -> list[dict[str, Any]]:
        """``dicom-node studies --json`` on this node's data dir."""
        result = subprocess.run(
            [NODE_COMMAND, "studies", "--json", "--config", str(self.config_path), "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"dicom-node studies failed ({result.returncode}): {result.stderr}")
        return list(json.loads(result.stdout))

    def study(self, study_instance_uid: str) -> dict[str, Any] | None:
        for study in self.studies():
            if study["study_instance_uid"] == study_instance_uid:
                return study
        return None

    def wait_for_study(
        self,
        study_instance_uid: str,
        *,
        state: str | None = "complete",
        instances: int | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """Poll the studies CLI until the study is in stored ``state`` with ``instances`` instances.

        ``state="complete"`` means completion was reached: the router moves a complete
        study on to ``routed`` or ``ignored`` within a sweep, so those count too.
        """
        wanted = COMPLETED_STATES if state == "complete" else {state}

        def probe() -> dict[str, Any] | None:
            study = self.study(study_instance_uid)
            if study is None:
                return None
            # "state" is the shown state (done, failed, ...); how far routing went is "stored_state"
            if state is not None and study["stored_state"] not in wanted:
                return None
            if instances is not None and study["instances"] != instances:
                return None
            return study

        try:
            return wait_for(
                f"study {study_instance_uid} state={state} instances={instances} on {self.label}",
                probe,
                timeout=timeout,
                interval=0.25,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstudies now: {json.dumps(self.studies(), indent=1)}") from None

    def query(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query on the node's SQLite database."""
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return list(connection.execute(sql, tuple(parameters)))
        finally:
            connection.close()

    def associations(self) -> list[dict[str, Any]]:
        """Every recorded association, oldest first."""
        columns = (
            "id",
            "calling_ae_title",
            "called_ae_title",
            "peer_address",
            "outcome",
            "reject_reason",
            "instances_stored",
            "instances_failed",
        )
        rows = self.query(f"SELECT {', '.join(columns)} FROM associations ORDER BY id")
        return [dict(zip(columns, row)) for row in rows]

    def settled_associations(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """:meth:`associations` once none is still ``open``.

        The node records how an association ended just after the connection closes
        (on a thread of its own), so a client that has exited may be a moment ahead.
        """

        def probe() -> list[dict[str, Any]] | None:
            records = self.associations()
            return None if any(a["outcome"] == "open" for a in records) else records

        try:
            return wait_for(f"every association on {self.label} to be closed", probe, timeout=timeout, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.associations()}") from None

    def instances(self) -> list[dict[str, Any]]:
        """Every indexed instance with its study, series and association."""
        columns = (
            "sop_instance_uid",
            "sop_class_uid",
            "transfer_syntax_uid",
            "path",
            "size_bytes",
            "association_id",
            "late",
            "study_instance_uid",
            "series_instance_uid",
        )
        rows = self.query(
            "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, i.size_bytes,"
            " i.association_id, i.late, st.study_instance_uid, se.series_instance_uid"
            " FROM instances i JOIN series se ON i.series_id = se.id JOIN studies st ON se.study_id = st.id"
            " ORDER BY i.id"
        )
        return [dict(zip(columns, row)) for row in rows]

    def spool_file(self, relative: str) -> Path:
        return self.spool_dir / relative

    def __repr__(self) -> str:
        return f"NodeProcess({self.label}, port={self.port}, data_dir={self.data_dir})"


class PostgresNode(NodeProcess):
    """A :class:`NodeProcess` whose database is PostgreSQL: :meth:`query` reads it there."""

    def __init__(self, work_dir: Path, *, database_url: str, **kwargs: Any) -> None:
        super().__init__(work_dir, **kwargs)
        self.conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def query(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query (``?`` placeholders, as for SQLite)."""
        import psycopg  # here: a machine that runs no PostgreSQL test (the GPU machines) need not have it

        with psycopg.connect(self.conninfo, connect_timeout=5) as connection:
            return list(connection.execute(sql.replace("?", "%s"), tuple(parameters)).fetchall())


@contextmanager
def postgres_database(prefix: str = "dicom_node_test") -> Iterator[str]:
    """The URL of a throw-away PostgreSQL database, dropped afterwards (its connections ended first)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name}
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# -- Orthanc ---------------------------------------------------------------------------


class WorkerProcess:
    """``dicom-node worker`` on the node's config and data, as its own process; or, with ``config`` and
    ``data_dir``, on a configuration and data directory of its own (a worker on another machine)."""

    def __init__(self, node: NodeProcess, work: Path, label: str, *, config: Path | None = None,
                 data_dir: Path | None = None, queues: str = "gpu,io") -> None:
        self.log_path = work / f"{label}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [NODE_COMMAND, "worker", "--config", str(config or node.config_path),
                 "--data-dir", str(data_dir or node.data_dir), "--queues", queues],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=work,
            )
        PEER_LOGS[f"{label} log ({self.log_path})"] = self.log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()


class Orthanc:
    """A real Orthanc with its own configuration, storage, DICOM and HTTP ports.

    ``modalities`` go to ``DicomModalities`` (name -> ``[AET, host, port]`` or the
    object form); more can be added at run time with :meth:`set_modality`.
    ``lua_scripts`` are written next to the config and listed in ``LuaScripts``
    (for auto-routing). ``extra_config`` is merged last.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Any] | None = None,
        lua_scripts: Mapping[str, str] | None = None,
        plugins: Iterable[str] = (),
        extra_config: Mapping[str, Any] | None = None,
        label: str = "orthanc",
        verbose: bool = True,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.verbose = verbose  # benchmarks turn it off: logging every request costs Orthanc time
        self.config_dir = self.work_dir / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.label = label
        self.log_path = self.work_dir / "orthanc.log"
        lua_paths = []
        for name, source in (lua_scripts or {}).items():
            script = self.work_dir / name
            script.write_text(source)
            lua_paths.append(str(script))
        config: dict[str, Any] = {
            "Name": f"test-{label}",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpCompressionEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 15,
            "DicomAssociationCloseDelay": 0,
            "DicomModalities": dict(modalities or {}),
            "DicomModalitiesInDatabase": False,
            "TcpNoDelay": True,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "StableAge": 1,
            "LuaScripts": lua_paths,
            "Plugins": [str(ORTHANC_PLUGINS_DIR / plugin) for plugin in plugins],
        }
        self.config = _deep_merge(config, extra_config or {})
        (self.config_dir / "orthanc.json").write_text(json.dumps(self.config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    def start(self, timeout: float = 30.0) -> "Orthanc":
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC_COMMAND, *(["--verbose"] if self.verbose else []), str(self.config_dir) + "/"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                cwd=self.work_dir,
            )
        PEER_LOGS[f"{self.label} log ({self.log_path})"] = self.log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode}:\n{tail(self.log_path)}")
            try:
                if self.http.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:g} s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.http.close()
        PEER_LOGS.pop(f"{self.label} log ({self.log_path})", None)

    # REST helpers
    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.http.get(f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def system(self) -> dict[str, Any]:
        return dict(self.get("/system"))

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST one DICOM file to /instances; returns Orthanc's answer (ID, ParentStudy, ...)."""
        response = self.http.post(
            f"{self.url}/instances",
            data=Path(path).read_bytes(),
            headers={"Content-Type": "application/dicom"},
            timeout=30,
        )
        response.raise_for_status()
        return dict(response.json())

    def upload_files(self, paths: Iterable[Path | str]) -> list[dict[str, Any]]:
        return [self.upload(path) for path in paths]

    def instances(self) -> list[str]:
        """Orthanc IDs of every instance it holds."""
        return list(self.get("/instances"))

    def study_instances(self, orthanc_study_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/studies/{orthanc_study_id}/instances"))

    def instance_tags(self, orthanc_instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_instance_id}/simplified-tags"))

    def instance_file(self, orthanc_instance_id: str) -> bytes:
        """The DICOM file as Orthanc stores it (GET /instances/{id}/file)."""
        response = self.http.get(f"{self.url}/instances/{orthanc_instance_id}/file", timeout=30)
        response.raise_for_status()
        return response.content

    def lookup_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of a study, from its Study Instance UID."""
        response = self.http.post(f"{self.url}/tools/lookup", data=study_instance_uid, timeout=30)
        response.raise_for_status()
        for match in response.json():
            if match.get("Type") == "Study":
                return str(match["ID"])
        return None

    def lookup_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's ID of the instance with this SOP Instance UID, None while it does not hold it."""
        response = self.http.post(f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=10)
        response.raise_for_status()
        for match in response.json():
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None

    def sop_class(self, orthanc_instance_id: str) -> str:
        response = self.http.get(f"{self.url}/instances/{orthanc_instance_id}/metadata/SopClassUid", timeout=10)
        response.raise_for_status()
        return response.text.strip()

    def delete_instance(self, orthanc_instance_id: str) -> None:
        self.http.delete(f"{self.url}/instances/{orthanc_instance_id}", timeout=30).raise_for_status()

    def set_modality(self, name: str, aet: str, port: int, host: str = LOCALHOST, **options: Any) -> None:
        """Add or replace a DICOM modality (PUT /modalities/{name}); options like LocalAet."""
        response = self.http.put(
            f"{self.url}/modalities/{name}",
            json={"AET": aet, "Host": host, "Port": port, **options},
            timeout=30,
        )
        response.raise_for_status()

    def modalities(self) -> list[str]:
        return list(self.get("/modalities"))

    def echo(self, modality: str) -> requests.Response:
        return self.http.post(f"{self.url}/modalities/{modality}/echo", json={}, timeout=60)

    def store(
        self,
        modality: str,
        resources: str | Iterable[str],
        *,
        synchronous: bool = True,
        local_aet: str | None = None,
        timeout: float = 120,
    ) -> requests.Response:
        """POST /modalities/{modality}/store (C-STORE SCU); returns the raw response.

        Not raised on error: a rejected association is an HTTP error the caller checks.
        """
        body: dict[str, Any] = {
            "Resources": [resources] if isinstance(resources, str) else list(resources),
            "Synchronous": synchronous,
        }
        if local_aet is not None:
            body["LocalAet"] = local_aet
        return self.http.post(f"{self.url}/modalities/{modality}/store", json=body, timeout=timeout)

    def __repr__(self) -> str:
        return f"Orthanc({self.aet}, dicom={self.dicom_port}, http={self.http_port})"
