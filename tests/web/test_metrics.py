"""/metrics, /healthz and /readyz: Prometheus text that matches the database, tokens, readiness checks,
and the separate monitoring port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicom_node.db import jobs
from dicom_node.db.models import Instance
from dicom_node.db.session import head_revision, make_engine, make_session_factory, upgrade
from dicom_node.ingest import utc_now
from dicom_node.settings import load_settings
from dicom_node.web.app import create_app, create_ops_app
from tests.conftest import NodeFactory, free_port
from tests.web.conftest import WebEnv, make_web_env
from tests.web.ops_data import STAGES, Scenario, build_scenario, make_series
from training.phantoms.ct_series import GeneratedSeries

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: object, **headers: str) -> Samples:
    """GET /metrics and parse it with Prometheus' own parser: {(sample name, sorted labels): value}."""
    answer = client.get("/metrics", headers=headers)  # type: ignore[attr-defined]
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[GeneratedSeries]:
    return make_series(tmp_path_factory.mktemp("metrics_series"))


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, series: list[GeneratedSeries]) -> Iterator[tuple[WebEnv, Scenario]]:
    """The scenario on SQLite, shared by the tests that only read it."""
    env = make_web_env(tmp_path_factory.mktemp("metrics_web"))
    yield env, build_scenario(env.settings, env.sessions, series, utc_now())


@pytest.fixture
def own_filled(tmp_path: Path, series: list[GeneratedSeries]) -> Iterator[tuple[WebEnv, Scenario]]:
    """The scenario for a test that changes it."""
    env = make_web_env(tmp_path)
    yield env, build_scenario(env.settings, env.sessions, series, utc_now())


def test_metrics_parse_and_match_what_the_node_did(filled: tuple[WebEnv, Scenario]) -> None:
    env, scenario = filled
    samples = scrape(env.client())
    with env.sessions() as session:
        indexed = session.scalar(select(func.count()).select_from(Instance))
    assert value(samples, "dicom_node_database_up") == 1
    assert value(samples, "dicom_node_instances_received_total") == scenario.instances == indexed == 7 * 4
    assert value(samples, "dicom_node_bytes_received_total") == scenario.bytes > 0
    assert value(samples, "dicom_node_associations_total", outcome="released") == 7
    assert value(samples, "dicom_node_associations_total", outcome="rejected") == 1
    assert value(samples, "dicom_node_associations_rejected_total", reason="calling_ae_title") == 1
    assert value(samples, "dicom_node_associations_rejected_total", reason="called_ae_title") == 0
    assert value(samples, "dicom_node_ingest_errors_total", status=f"0x{scenario.refused_status:04X}") == 1
    assert value(samples, "dicom_node_studies", state="routed") == 5
    assert value(samples, "dicom_node_studies", state="ignored") == 1
    assert value(samples, "dicom_node_studies", state="receiving") == 1
    assert value(samples, "dicom_node_jobs", state="succeeded", pipeline="chest-seg") == 3
    assert value(samples, "dicom_node_jobs", state="dead", pipeline="chest-seg") == 1
    assert value(samples, "dicom_node_jobs", state="queued", pipeline="nodule-det") == 1
    assert value(samples, "dicom_node_queue_depth", queue="gpu") == 1
    assert value(samples, "dicom_node_queue_depth", queue="io") == 1
    assert value(samples, "dicom_node_deliveries", state="delivered", destination="pacs") == 1
    assert value(samples, "dicom_node_deliveries", state="failed", destination="pacs") == 1
    assert value(samples, "dicom_node_delivery_failures_total", destination="pacs") == 1
    assert value(samples, "dicom_node_workers_online") == 1
    count = value(samples, "dicom_node_job_stage_seconds_count", stage="inference", pipeline="chest-seg")
    assert count == 3
    assert value(samples, "dicom_node_job_stage_seconds_sum", stage="inference", pipeline="chest-seg") == \
        pytest.approx(3 * STAGES["inference"])
    assert value(samples, "dicom_node_job_stage_seconds_bucket", stage="inference", pipeline="chest-seg", le="1.0") == 0
    assert value(samples, "dicom_node_job_stage_seconds_bucket", stage="inference", pipeline="chest-seg", le="2.5") == 3


def test_metrics_carry_no_patient_identifiers(filled: tuple[WebEnv, Scenario], series: list[GeneratedSeries]) -> None:
    env, scenario = filled
    text = env.client().get("/metrics").text
    first = pydicom.dcmread(series[0].paths[0])
    for identifier in (str(first.PatientID), str(first.PatientName), str(first.AccessionNumber or "ACC-NONE"),
                       *scenario.uids.values(), series[0].series_uid):
        assert identifier not in text
    assert "EVIL" not in text and "10.9.9.9" not in text  # reject reasons are reduced to a few labels


def test_stage_histogram_counts_each_succeeded_job_once(own_filled: tuple[WebEnv, Scenario]) -> None:
    env, scenario = own_filled
    client = env.client()
    before = value(scrape(client), "dicom_node_job_stage_seconds_count", stage="inference", pipeline="chest-seg")
    again = value(scrape(client), "dicom_node_job_stage_seconds_count", stage="inference", pipeline="chest-seg")
    assert before == again == 3
    # The queued detection job runs and succeeds: the next scrape adds exactly it.
    now = utc_now()
    job = scenario.job_ids["in_progress"]
    assert jobs.claim_job(env.sessions, job, worker="gpu-1:42", now=now, lease_seconds=60)
    jobs.finish_job(env.sessions, job, now=now, stage_seconds={"inference": 42.0}, summary={}, results=[],
                    destinations=[], delivery_max_attempts=3)
    samples = scrape(client)
    assert value(samples, "dicom_node_job_stage_seconds_count", stage="inference", pipeline="nodule-det") == 1
    assert value(samples, "dicom_node_job_stage_seconds_bucket", stage="inference", pipeline="nodule-det",
                 le="30.0") == 0
    assert value(samples, "dicom_node_job_stage_seconds_count", stage="inference", pipeline="chest-seg") == 3
    assert value(samples, "dicom_node_jobs", state="succeeded", pipeline="nodule-det") == 1
    assert value(samples, "dicom_node_queue_depth", queue="gpu") == 0
    # A new app on the same database starts from nothing and arrives at the same figures.
    fresh = create_app(env.settings, sessions=env.sessions)
    assert scrape(TestClient(fresh)) == scrape(client)


def test_metrics_token_and_health_token_are_enforced(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.metrics_token": "metrics-secret", "web.health_token": "health-secret"})
    client = env.client()
    for path, token in (("/metrics", "metrics-secret"), ("/healthz", "health-secret"), ("/readyz", "health-secret")):
        missing = client.get(path)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer", path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        other = "health-secret" if token == "metrics-secret" else "metrics-secret"
        assert client.get(path, headers={"Authorization": f"Bearer {other}"}).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200, path
    # A user's API token does not open them either: they have their own secrets.
    assert client.get("/metrics", headers={"Authorization": f"Bearer {env.token('admin')}"}).status_code == 401


def test_health_endpoints_need_no_login(web: WebEnv) -> None:
    client = web.client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert {c["name"] for c in ready.json()["checks"]} == {"database", "migrations"}
    assert client.get("/metrics").status_code == 200


def test_readyz_is_503_when_a_readiness_check_fails(web: WebEnv) -> None:
    def listener() -> tuple[bool, str]:
        return False, "not listening on port 11112"

    def broken() -> tuple[bool, str]:
        raise RuntimeError("probe crashed")

    app = create_app(web.settings, sessions=web.sessions,
                     readiness=[("dicom listener", listener), ("spool", broken), ("fine", lambda: (True, "ok"))])
    answer = TestClient(app).get("/readyz")
    assert answer.status_code == 503
    checks = {c["name"]: c for c in answer.json()["checks"]}
    assert answer.json()["status"] == "not ready"
    assert checks["dicom listener"] == {"name": "dicom listener", "ok": False, "detail": "not listening on port 11112"}
    assert checks["spool"]["ok"] is False and "probe crashed" in checks["spool"]["detail"]
    assert checks["fine"]["ok"] and checks["database"]["ok"] and checks["migrations"]["ok"]
    assert TestClient(app).get("/healthz").status_code == 200  # alive, only not ready


def test_readyz_is_503_when_the_database_is_at_an_older_revision(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path})
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine, "0002")
    client = TestClient(create_app(settings, sessions=make_session_factory(engine)))
    answer = client.get("/readyz")
    assert answer.status_code == 503
    checks = {c["name"]: c for c in answer.json()["checks"]}
    assert checks["database"]["ok"] and not checks["migrations"]["ok"]
    assert "0002" in checks["migrations"]["detail"] and head_revision() in checks["migrations"]["detail"]
    upgrade(engine)
    assert client.get("/readyz").status_code == 200


def test_unreachable_database_is_not_ready_and_metrics_say_so(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path,
                                    "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"})
    engine = make_engine(settings.resolved_database_url)
    client = TestClient(create_app(settings, sessions=make_session_factory(engine)))
    answer = client.get("/readyz")
    assert answer.status_code == 503
    [database] = [c for c in answer.json()["checks"] if c["name"] == "database"]
    assert database["ok"] is False and "OperationalError" in database["detail"]
    samples = scrape(client)
    assert value(samples, "dicom_node_database_up") == 0
    assert not any(name.startswith("dicom_node_studies") for name, _ in samples)


def test_ops_port_moves_the_endpoints_off_the_admin_app(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.ops_port": free_port()})
    admin_app = env.client()
    for path in ("/metrics", "/healthz", "/readyz"):
        assert admin_app.get(path).status_code == 404, path
    ops = create_ops_app(env.settings, sessions=env.sessions)
    client = TestClient(ops)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert value(scrape(client), "dicom_node_database_up") == 1
    for path in ("/", "/login", "/models", "/api/v1/me", "/api/v1/dashboard", "/api/v1/openapi.json",
                 "/api/docs", "/static/app.css"):
        assert client.get(path).status_code == 404, path  # nothing of the admin app on the monitoring port


def test_running_node_is_ready_and_serves_metrics_on_its_ops_port(node_factory: NodeFactory) -> None:
    ops_port = free_port()
    node = node_factory(web__ops_port=ops_port)
    web_port = node.settings.web.port
    ready = requests.get(f"http://127.0.0.1:{ops_port}/readyz", timeout=10)
    assert ready.status_code == 200
    listener = [c for c in ready.json()["checks"] if c["name"] == "dicom listener"]
    assert listener and listener[0]["ok"] and str(node.settings.dicom.port) in listener[0]["detail"]
    metrics = requests.get(f"http://127.0.0.1:{ops_port}/metrics", timeout=10)
    assert metrics.status_code == 200 and "dicom_node_database_up 1.0" in metrics.text
    assert requests.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10, allow_redirects=False).status_code != 200
    node.scp.stop()
    assert requests.get(f"http://127.0.0.1:{ops_port}/readyz", timeout=10).status_code == 503
