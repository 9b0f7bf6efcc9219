"""Fixtures for the slow tests against real peers (see ``peers.py``).

A failing test's report carries the logs of the node processes and Orthanc servers
that were alive while it ran (section "peer log: ..."), so the node's own account of
the failure is printed next to the assertion.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from peers import PEER_LOGS, NodeProcess, Orthanc, tail

NodeProcessFactory = Callable[..., NodeProcess]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for label, path in list(PEER_LOGS.items()):
            report.sections.append((f"peer log: {label}", tail(path)))


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


