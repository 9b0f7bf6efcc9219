"""Fixtures for the slow tests against real peers (see ``peers.py``).

A failing test's report carries the logs of the peers that were alive while it ran
(the hook is in ``tests/conftest.py``, for every suite that starts peers).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from peers import NodeProcess, Orthanc

NodeProcessFactory = Callable[..., NodeProcess]


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcessFactory]:
    """Start ``dicom-node serve`` processes; each is stopped (SIGTERM) at teardown.

    ``node_process(overrides={...}, label="node", **NodeProcess kwargs)`` returns a
    started :class:`NodeProcess` (it answered a C-ECHO).
    """
    started: list[NodeProcess] = []

    def start(overrides: Mapping[str, Any] | None = None, *, label: str | None = None, **kwargs: Any) -> NodeProcess:
        name = label or f"node{len(started)}"
        node = NodeProcess(tmp_path / name, overrides=overrides, label=name, **kwargs)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One real Orthanc for the module (AE ``ORTHANC``); tests add modalities over REST."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), aet="ORTHANC")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database (number 8), emptied before and after the test."""
    url = "redis://127.0.0.1:6379/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA, a server certificate and a client certificate (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test CA")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
