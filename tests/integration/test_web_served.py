"""``dicom-node serve`` serves the admin app and the monitoring endpoints on real sockets.

The first admin is made with the real ``users create`` command; a study sent with DCMTK
``storescu`` shows up in the API, in the dashboard and in ``/metrics``.
"""

from __future__ import annotations

import subprocess
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import NodeProcessFactory
from tests.integration.peers import NODE_COMMAND
from training.phantoms.ct_series import GeneratedSeries


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def test_serve_runs_the_web_app_with_login_api_and_metrics(
    node_process: NodeProcessFactory, small_series: GeneratedSeries
) -> None:
    node = node_process()
    base = f"http://127.0.0.1:{node.web_port}"
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert requests.get(f"{base}/api/v1/studies", timeout=5).status_code == 401

    created = subprocess.run(
        [NODE_COMMAND, "users", "create", "ops", "--role", "operator", "--password-stdin",
         "--config", str(node.config_path), "--data-dir", str(node.data_dir)],
        input="a long enough password\n", capture_output=True, text=True, timeout=60,
    )
    assert created.returncode == 0, created.stderr
    token = subprocess.run(
        [NODE_COMMAND, "tokens", "create", "ops", "--name", "test", "--config", str(node.config_path),
         "--data-dir", str(node.data_dir)], capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    assert token.startswith("dnt_")

    assert node.storescu(small_series.paths).returncode == 0
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 30
    while True:
        listing = requests.get(f"{base}/api/v1/studies", headers=headers, timeout=5).json()
        if listing["total"] == 1 and listing["items"][0]["instance_count"] == len(small_series.paths):
            break
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)
    patient_id = listing["items"][0]["patient_id"]
    assert patient_id
    metrics = requests.get(f"{base}/metrics", timeout=5).text
    assert _metric(metrics, "dicom_node_instances_received_total") == len(small_series.paths)
    assert patient_id not in metrics and small_series.study_uid not in metrics  # no identifiers

    session = requests.Session()
    login_page = session.get(f"{base}/login", timeout=5).text
    csrf = login_page.split('name="csrf_token" value="')[1].split('"')[0]
    home = session.post(f"{base}/login", data={"username": "ops", "password": "a long enough password",
                                                "csrf_token": csrf, "next": "/"}, timeout=10)
    assert home.status_code == 200 and "Dashboard" in home.text and "ops · operator" in home.text
