"""deploy/compose.yaml without Docker: its node and worker environments, run as processes, with the
commands deploy/README.md gives for the worker account and token.

Base images cannot be pulled here, so the containers cannot run; what they would run can.
The node gets the compose file's ``environment`` (and the node image's own variables), a
real PostgreSQL and Redis stand in for the ``postgres`` and ``redis`` services, the worker
account and its token are made with the README's commands (the token written to the file
the compose secret mounts), and a ``dicom-node worker --queues gpu`` with the worker
service's environment (``worker.node_access: http``, the token file, its own empty data
directory) loads its models and answers ``dicom-node worker --check`` - the worker image's
health check - as the node answers ``dicom-node serve --check``. Only the host names
differ: ``postgres``, ``redis`` and ``node`` become this machine's addresses.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from peers import NODE_COMMAND, free_port, wait_for
from tests.conftest import postgres_database

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own (others use 8, 11, 12)
#: What node.Dockerfile sets in the image beside the compose file's environment (worker.Dockerfile: only the
#: data directory, which the test gives each process).
NODE_IMAGE_ENVIRONMENT = {"DICOM_NODE_DICOM__BIND_ADDRESS": "0.0.0.0", "DICOM_NODE_WEB__HOST": "0.0.0.0"}


def compose_environment(service: str, password: str) -> dict[str, str]:
    """The ``environment`` of a compose service, its ``${VAR:?...}`` references filled in (POSTGRES_PASSWORD).

    PyYAML resolves the file's anchors and ``<<`` merges as Compose does; ``docker-compose
    config`` itself checks the file in tests/unit/test_deploy_files.py.
    """
    source = (REPO_ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8")
    source = re.sub(r"\$\{POSTGRES_PASSWORD(:\?[^}]*)?\}", password, source)
    assert "${" not in source, "compose.yaml uses a variable this test does not fill in"
    environment = yaml.safe_load(source)["services"][service]["environment"]
    return {str(k): str(v) for k, v in environment.items()}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database("dicom_node_compose") as url:
        yield url


def _here(environment: dict[str, str], postgres_url: str, node_url: str) -> dict[str, str]:
    """The compose host names (postgres, redis, node) replaced by this machine's services."""
    database = environment["DICOM_NODE_DATABASE_URL"]
    assert re.fullmatch(r"postgresql\+psycopg://dicom_node:pw@postgres:5432/dicom_node", database), database
    replaced = {**environment, "DICOM_NODE_DATABASE_URL": postgres_url}
    assert replaced["DICOM_NODE_QUEUE__BROKER_URL"] == "redis://redis:6379/0"
    replaced["DICOM_NODE_QUEUE__BROKER_URL"] = REDIS_URL
    if "DICOM_NODE_WORKER__NODE_URL" in replaced:
        assert replaced["DICOM_NODE_WORKER__NODE_URL"] == "http://node:8080"
        replaced["DICOM_NODE_WORKER__NODE_URL"] = node_url
    return replaced


def _process_environment(settings: dict[str, str], home: Path) -> dict[str, str]:
    """Only these settings, as in the image: none of the test machine's DICOM_NODE_ variables, and an empty
    settings file instead of the checkout's config/default.yaml (an image has no checkout)."""
    empty = home / "empty-node.yaml"
    empty.write_text("{}\n", encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    return {**base, "HOME": str(home), "PYTHONUNBUFFERED": "1", "DICOM_NODE_CONFIG": str(empty), **settings}


def _run(argv: list[str], environment: dict[str, str], cwd: Path, stdin: str | None = None) -> str:
    result = subprocess.run([NODE_COMMAND, *argv], env=environment, cwd=cwd, input=stdin, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"dicom-node {' '.join(argv)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.postgres
@pytest.mark.slow  # about 1-3 minutes: the worker loads its models before it answers, as in the image
def test_the_compose_node_and_worker_run_and_answer_their_health_checks(tmp_path: Path, postgres_url: str) -> None:
    redis.Redis.from_url(REDIS_URL).flushdb()
    web_port, dicom_port = free_port(), free_port()
    node_settings = _here(compose_environment("node", "pw"), postgres_url, f"http://127.0.0.1:{web_port}")
    node_settings.update(NODE_IMAGE_ENVIRONMENT)
    node_settings.update({"DICOM_NODE_DATA_DIR": str(tmp_path / "node"), "DICOM_NODE_WEB__PORT": str(web_port),
                          "DICOM_NODE_DICOM__PORT": str(dicom_port), "DICOM_NODE_STORAGE__MIN_FREE_MB": "0"})
    node_env = _process_environment(node_settings, tmp_path)
    worker_env: dict[str, str] = {}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}

    def start(name: str, argv: list[str], environment: dict[str, str]) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as log:
            processes[name] = subprocess.Popen([NODE_COMMAND, *argv], env=environment, cwd=tmp_path,
                                               stdout=log, stderr=subprocess.STDOUT)

    def answers(name: str, environment: dict[str, str]) -> bool:
        assert processes[name].poll() is None, f"{name} exited: {logs[name].read_text(errors='replace')[-3000:]}"
        return subprocess.run([NODE_COMMAND, name, "--check"], env=environment, cwd=tmp_path, capture_output=True,
                              timeout=60).returncode == 0

    try:
        start("serve", ["serve"], node_env)  # the compose command: ["dicom-node", "serve"]
        wait_for("the node's serve --check", lambda: answers("serve", node_env), timeout=90, interval=1.0)

        # deploy/README.md, "Compose": the workers' account and token, written where the secret is mounted.
        _run(["users", "create", "gpu-workers", "--role", "worker", "--password-stdin"], node_env, tmp_path,
             stdin=secrets.token_urlsafe(32))
        token = _run(["tokens", "create", "gpu-workers", "--name", "compose-workers"], node_env, tmp_path)
        token_file = tmp_path / "run-secrets" / "worker_token"
        token_file.parent.mkdir()
        token_file.write_text(token, encoding="utf-8")

        node_url = f"http://127.0.0.1:{web_port}"
        worker_settings = _here(compose_environment("worker-gpu0", "pw"), postgres_url, node_url)
        assert worker_settings.pop("DICOM_NODE_WORKER__TOKEN_FILE") == "/run/secrets/worker_token"
        worker_settings.update({"DICOM_NODE_WORKER__TOKEN_FILE": str(token_file),
                                "DICOM_NODE_DATA_DIR": str(tmp_path / "worker")})
        worker_env.update(_process_environment(worker_settings, tmp_path))
        command = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())["x-worker"]["command"]
        assert command[:2] == ["dicom-node", "worker"]
        start("worker", command[1:], worker_env)
        # The models load before the worker consumes (the image's start period is 300 s).
        wait_for("the worker's worker --check", lambda: answers("worker", worker_env), timeout=240, interval=2.0)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        redis.Redis.from_url(REDIS_URL).flushdb()
    assert {name: p.returncode for name, p in processes.items()} == {"serve": 0, "worker": 0}, \
        {name: log.read_text(errors="replace")[-2000:] for name, log in logs.items()}
    worker_files = sorted(p.relative_to(tmp_path / "worker").as_posix()
                          for p in (tmp_path / "worker").rglob("*") if p.is_file())
    assert not any(f.endswith(".db") for f in worker_files), worker_files  # the worker used the node's database
