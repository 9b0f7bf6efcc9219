"""Private Redis and PostgreSQL servers that a fault test may kill and restart.

Why: the distributed-mode fault tests restart the broker and the database under a
running node, and the system Redis (6379) and PostgreSQL (5432) serve other tests
and engineers at the same time, so they must never be touched. Each server here runs
as a child process on a free port with its own data, and ``restart()`` kills it
(SIGKILL for Redis, an immediate - crash-like - shutdown for PostgreSQL, which then
replays its WAL) and starts it again on the same port and data directory.

PostgreSQL refuses to run as root, so the cluster runs as the ``postgres`` user
(``runuser``) in a directory of its own under the system temp dir (pytest's
``tmp_path`` is private to root). Both servers log to files registered in
:data:`peers.PEER_LOGS`, so a failing test prints them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

from peers import LOCALHOST, PEER_LOGS, free_port, tail

__all__ = ["PostgresServer", "RedisServer"]


def _wait_until(what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path,
                timeout: float) -> None:
    """Poll ``ready`` until it is true; fail naming ``what`` (with its log) if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} while starting:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready within {timeout:g} s:\n{tail(log)}")


class _RestartableServer:
    """A server run as a child process that :meth:`crash` stops as a crash would; see the module docstring."""

    def crash(self) -> None:
        raise NotImplementedError

    def start(self) -> "_RestartableServer":
        raise NotImplementedError

    label: str
    port: int
    log_path: Path
    starts: int
    process: "subprocess.Popen[bytes] | None"

    def _answers(self) -> bool:
        raise NotImplementedError

    def _launch(self, what: str, command: list[str], timeout: float, cwd: Path | None = None) -> None:
        """Start ``command`` with its output appended to the log, and wait until the server answers."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"===== start #{self.starts} on port {self.port} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=cwd)
        PEER_LOGS[f"{self.label} log ({self.log_path})"] = self.log_path
        _wait_until(f"{what} on port {self.port}", self._answers, self.process, self.log_path, timeout)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Crash the server, stay down ``down_seconds``, and start it again on the same port (and data)."""
        self.crash()
        time.sleep(down_seconds)
        self.start()


class RedisServer(_RestartableServer):
    """``redis-server`` on a free port without persistence: a restart empties it, as a lost broker does."""

    def __init__(self, work_dir: Path, label: str = "redis") -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.label = label
        self.log_path = self.work_dir / f"{label}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self._launch("redis-server", ["redis-server", "--port", str(self.port), "--bind", LOCALHOST, "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.work_dir)], timeout)
        return self

    def _answers(self) -> bool:
        client = redis.Redis(host=LOCALHOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: the queue it held (messages waiting and unacknowledged) is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.crash()
        PEER_LOGS.pop(f"{self.label} log ({self.log_path})", None)


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed under /usr/lib/postgresql/*/bin")
    return found[-1]


class PostgresServer(_RestartableServer):
    """A PostgreSQL cluster of its own (trust authentication, user ``postgres``) on a free port.

    ``fsync`` stays on: a restart after an immediate shutdown must find every commit
    the node was told about, as on a production server.
    """

    USER = "postgres"

    def __init__(self, label: str = "postgres") -> None:
        self.label = label
        # Not under pytest's tmp_path: the postgres user cannot enter root's private directories.
        self.root = Path(tempfile.mkdtemp(prefix=f"fault-{label}-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / f"{label}.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        account = pwd.getpwnam(self.USER)
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self._as_postgres([_postgres_bin("initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", self.USER,
                           "--no-sync", "--no-instructions"], timeout=120)

    def _as_postgres(self, command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["runuser", "-u", self.USER, "--", *command], capture_output=True, text=True,
                                timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (psycopg 3)."""
        return f"postgresql+psycopg://{self.USER}@{LOCALHOST}:{self.port}/{database}"

    def _conninfo(self, database: str = "postgres") -> str:
        return f"host={LOCALHOST} port={self.port} user={self.USER} dbname={database} connect_timeout=2"

    def start(self, timeout: float = 30.0) -> "PostgresServer":
        self._launch("PostgreSQL", ["runuser", "-u", self.USER, "--", _postgres_bin("postgres"), "-D", str(self.data_dir),
                                    "-p", str(self.port), "-k", str(self.root), "-c", f"listen_addresses={LOCALHOST}",
                                    "-c", "max_connections=200"], timeout, cwd=self.root)
        return self

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self._conninfo()) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        with psycopg.connect(self._conninfo(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def crash(self) -> None:
        """Stop at once as a crash would (``pg_ctl stop -m immediate``: no checkpoint, WAL replay at the next start).

        Every client connection is cut; the postmaster and its backends are gone when this returns.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self._as_postgres([_postgres_bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w",
                           "-t", "30"], timeout=60)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """A fast shutdown, then the cluster's directory is removed."""
        if self.process is not None and self.process.poll() is None:
            try:
                self._as_postgres([_postgres_bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                                   "-t", "30"], timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.process.kill()
            self.process.wait(timeout=30)
        PEER_LOGS.pop(f"{self.label} log ({self.log_path})", None)
        shutil.rmtree(self.root, ignore_errors=True)
