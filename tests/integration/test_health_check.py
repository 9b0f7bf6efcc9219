"""``dicom-node serve --check`` and ``dicom-node worker --check``, the deploy files' health checks, against
a real running node (its /readyz) and a real Celery worker consuming from Redis.

What must hold: each check answers yes only while the process it asks runs and answers
(a stopped node, a stopped worker, a wrong health token, an unreachable broker are each
a no with the reason), and the command-line form finds the port, token and broker from
the same settings sources as the process (here environment variables, as in the
compose file and the Helm chart).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from dicom_node.app.cli import main
from dicom_node.app.health_check import check_node, check_worker, node_ready_url
from dicom_node.settings import load_settings
from dicom_node.work_in_flight import WorkInFlight
from workers.celery_app import EmbeddedWorker, make_celery_app, worker_nodename

#: A Redis database of its own: the pings of this test never meet the pipeline tests' workers (database 8).
BROKER = "redis://127.0.0.1:6379/12"


@pytest.fixture
def empty_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A settings file with nothing in it: the command line's settings are the defaults and the environment."""
    path = tmp_path_factory.mktemp("config") / "node.yaml"
    path.write_text("{}\n")
    return str(path)


def test_serve_check_asks_the_running_node(node_factory, monkeypatch: pytest.MonkeyPatch, empty_config: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    node = node_factory(**{"web.health_token": "probe-token"})
    settings = node.settings
    assert node_ready_url(settings) == f"http://127.0.0.1:{settings.web.port}/readyz"

    ready = check_node(settings)
    assert ready.ok and ": 200 ready" in ready.detail, ready.detail

    wrong_token = load_settings(None, {"data_dir": settings.data_dir, "web.port": settings.web.port,
                                       "web.health_token": "not-the-token"})
    refused = check_node(wrong_token)
    assert not refused.ok and ": 401" in refused.detail, refused.detail

    # The command line: the port and the token from DICOM_NODE_ variables, like the compose file gives them.
    monkeypatch.setenv("DICOM_NODE_WEB__PORT", str(settings.web.port))
    monkeypatch.setenv("DICOM_NODE_WEB__HEALTH_TOKEN", "probe-token")
    assert main(["serve", "--check", "--config", empty_config, "--data-dir", str(settings.data_dir)]) == 0
    assert "dicom-node serve --check: ok" in capsys.readouterr().out

    node.stop()
    stopped = check_node(settings, timeout=2.0)
    assert not stopped.ok and "no answer" in stopped.detail, stopped.detail
    assert main(["serve", "--check", "--config", empty_config, "--data-dir", str(settings.data_dir)]) == 1
    assert "dicom-node serve --check: failed" in capsys.readouterr().err


def test_serve_check_uses_the_monitoring_port_when_there_is_one(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path, "web.host": "0.0.0.0", "web.port": 8080,
                                    "web.ops_host": "::", "web.ops_port": 9090})
    assert node_ready_url(settings) == "http://[::1]:9090/readyz"
    disabled = load_settings(None, {"data_dir": tmp_path, "web.enabled": False})
    result = check_node(disabled)
    assert not result.ok and "web.enabled is false" in result.detail


def test_worker_check_pings_the_workers_of_this_machine(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path, "queue.broker_url": BROKER})
    host = f"check-{uuid.uuid4().hex[:8]}"  # a host no other worker on this machine has
    assert not check_worker(settings, timeout=1.0, host=host).ok

    worker = EmbeddedWorker(make_celery_app(BROKER), ["io", "gpu"], work=WorkInFlight(), hand_back=lambda: None,
                            concurrency=1, hostname=worker_nodename(["io", "gpu"], host))
    worker.start()
    try:
        alive = _wait_for(lambda: check_worker(settings, timeout=1.0, host=host))
        assert alive.ok and alive.detail == f"io+gpu@{host} answered", alive.detail
    finally:
        assert worker.stop(0.0)
    gone = check_worker(settings, timeout=1.0, host=host)
    assert not gone.ok and f"no worker of {host} answered" in gone.detail, gone.detail


def test_worker_check_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_config: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``dicom-node worker --check`` pings this host's names; no database is needed (none is created)."""
    worker = EmbeddedWorker(make_celery_app(BROKER), ["gpu"], work=WorkInFlight(), hand_back=lambda: None,
                            concurrency=1, hostname=worker_nodename(["gpu"], socket.gethostname()))
    monkeypatch.setenv("DICOM_NODE_QUEUE__BROKER_URL", BROKER)
    worker.start()
    try:
        _wait_for(lambda: check_worker(load_settings(None, {"data_dir": tmp_path, "queue.broker_url": BROKER}),
                                       timeout=1.0))
        assert main(["worker", "--check", "--config", empty_config, "--data-dir", str(tmp_path)]) == 0
        assert f"gpu@{socket.gethostname()} answered" in capsys.readouterr().out
    finally:
        assert worker.stop(0.0)
    assert not any(tmp_path.iterdir()), "a health check created files"

    check = ["worker", "--check", "--config", empty_config, "--data-dir", str(tmp_path)]
    assert main([*check, "--broker", "redis://127.0.0.1:1/0"]) == 1
    assert "broker redis://127.0.0.1:1/0 not reachable" in capsys.readouterr().err
    assert main([*check, "--broker", "memory://"]) == 1
    assert "memory://" in capsys.readouterr().err


def _wait_for(check, attempts: int = 20):  # type: ignore[no-untyped-def]
    """The first ok result of ``check`` (the worker needs a moment to consume), else the last one."""
    for _ in range(attempts):
        result = check()
        if result.ok:
            return result
    return result
