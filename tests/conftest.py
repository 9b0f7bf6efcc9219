"""Shared fixtures: databases (SQLite and PostgreSQL), generated CT series, running nodes.

Every peer here is real: PostgreSQL on 127.0.0.1:5432, DCMTK tools, Orthanc. A missing
peer is a failed test, not a skip: ``make test`` installs them.

A failing test's report carries the logs of the peer processes (``peers.py``: node
processes, Orthanc, workers, private servers) alive while it ran, in sections
"peer log: ...", so the node's own account of the failure is printed next to the assertion.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from dicom_node.db.session import make_engine, upgrade
from dicom_node.app.node import Node
from dicom_node.settings import Settings, load_settings
from peers import PEER_LOGS, postgres_database, tail
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for label, path in list(PEER_LOGS.items()):
            report.sections.append((f"peer log: {label}", tail(path)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` where PyTorch sees no CUDA device: the hardware is absent (CI, the development
    machines), not a dependency; they run on GPU machines (tests/gpu, bench/gpu.py). torch is imported only when
    such a test was collected, and a missing torch is an error, not a skip."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False on this machine "
                            f"(torch {torch.__version__}); run on a GPU machine")
    for item in marked:
        item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """DCMTK on Debian leaves Nagle on unless told; every DCMTK process gets this."""
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """A 12-slice 64x64 axial CT series, written once per test session."""
    return generate_ct_series(
        tmp_path_factory.mktemp("small_series"),
        geometry=SeriesGeometry(rows=64, columns=64, slices=12, pixel_spacing=(2.0, 2.0), slice_spacing=5.0),
        seed=11,
    )


@pytest.fixture(scope="session")
def second_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """Another small study (different seed, so different UIDs)."""
    return generate_ct_series(
        tmp_path_factory.mktemp("second_series"),
        geometry=SeriesGeometry(rows=64, columns=64, slices=6, pixel_spacing=(2.0, 2.0), slice_spacing=5.0),
        seed=12,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a throw-away PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start in-process nodes on free ports; ``overrides`` are dotted settings."""
    started: list[Node] = []

    def start(**overrides: Any) -> Node:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"node{len(started)}",
            "dicom.port": free_port(),
            "dicom.bind_address": "127.0.0.1",
            "web.port": free_port(),
            "storage.min_free_mb": 0,
            "completion.quiet_seconds": 1.0,
            "completion.check_interval_seconds": 0.2,
            "queue.embedded_worker_queues": [],  # receiving tests run no inference
        }
        values.update({key.replace("__", "."): value for key, value in overrides.items()})
        node = Node(load_settings(None, values))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def node_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path, "dicom.port": free_port(), "web.port": free_port(),
                              "storage.min_free_mb": 0}
    values.update(overrides)
    return load_settings(None, values)


def run(command: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a peer tool with TCP_NODELAY set, capturing its output as text."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), **kwargs)
