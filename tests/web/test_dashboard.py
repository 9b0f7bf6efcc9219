"""The dashboard: numbers from a database with a known history (real ingest, routing, jobs, deliveries),
the live fragment, the JSON API and the worker list."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_node.db import monitoring
from dicom_node.db.models import Instance
from dicom_node.ingest import utc_now
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.ops_data import HOSTILE_ERROR, Scenario, build_scenario, make_series
from training.phantoms.ct_series import GeneratedSeries

# receiving: "waiting" (not complete); waiting: "in_progress" (its one job still queued, none started);
# in_progress: "retrying" (a delivery waiting for its retry); done: "done" and, in the day, "old_done".
EXPECTED = {
    "hour": {"received": 6, "receiving": 1, "waiting": 1, "in_progress": 1, "done": 1, "held": 0, "failed": 1,
             "ignored": 1},
    "day": {"received": 7, "receiving": 1, "waiting": 1, "in_progress": 1, "done": 2, "held": 0, "failed": 1,
            "ignored": 1},
}
#: As the API gives them: every window counted in full (far under monitoring.STUDY_COUNT_CAP).
EXPECTED_API = {window: {"complete": True, **counts} for window, counts in EXPECTED.items()}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[GeneratedSeries]:
    return make_series(tmp_path_factory.mktemp("ops_series"))


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, series: list[GeneratedSeries]) -> Iterator[tuple[WebEnv, Scenario]]:
    """One web app on SQLite holding the scenario (read-only for the tests of this module)."""
    env = make_web_env(tmp_path_factory.mktemp("ops_web"))
    yield env, build_scenario(env.settings, env.sessions, series, utc_now())


@pytest.fixture
def viewer_of(filled: tuple[WebEnv, Scenario]) -> LoggedIn:
    return filled[0].login("viewer")


def _row_counts(html: str, window: str) -> dict[str, int]:
    row = re.search(rf'<tr data-window="{window}">(.*?)</tr>', html, re.S)
    assert row, f"no {window} row in the dashboard"
    return {k: int(v) for k, v in re.findall(r'data-count="(\w+)">(\d+)<', row.group(1))}


def test_dashboard_counts_studies_by_outcome_in_each_window(filled: tuple[WebEnv, Scenario],
                                                           viewer_of: LoggedIn) -> None:
    page = viewer_of.client.get("/")
    assert page.status_code == 200
    assert _row_counts(page.text, "hour") == EXPECTED["hour"]
    assert _row_counts(page.text, "day") == EXPECTED["day"]
    api = viewer_of.client.get("/api/v1/dashboard").json()
    assert api["studies"] == EXPECTED_API


def test_each_count_links_to_the_studies_the_list_shows_in_that_state(filled: tuple[WebEnv, Scenario],
                                                                      viewer_of: LoggedIn) -> None:
    env, scenario = filled
    html = viewer_of.client.get("/dashboard/live").text
    for window in ("hour", "day"):
        row = re.search(rf'<tr data-window="{window}">(.*?)</tr>', html, re.S)
        assert row
        links = re.findall(r'<a href="/studies\?([^"]+)" data-count="(\w+)">(\d+)</a>', row.group(1))
        assert {state for _, state, _ in links} == set(EXPECTED[window])
        for query, state, count in links:
            listed = viewer_of.client.get("/api/v1/studies?" + query.replace("&amp;", "&")).json()
            assert listed["total"] == int(count) == EXPECTED[window][state], (window, state, listed)
            if state != "received":
                assert {item["status"]["state"] for item in listed["items"]} <= {state}
            page = viewer_of.client.get("/studies?" + query.replace("&amp;", "&")).text
            assert f'<span class="muted">({count})</span>' in page
    # the studies the scenario made, each in its state, with the stage named
    shown = {item["study_instance_uid"]: item["status"]
             for item in viewer_of.client.get("/api/v1/studies").json()["items"]}
    assert shown[scenario.uids["failed"]]["state"] == "failed"
    assert shown[scenario.uids["failed"]]["reason"].startswith(f"job {scenario.job_ids['failed']} chest-seg dead: ")
    assert shown[scenario.uids["retrying"]]["reason"].startswith(
        "delivery 2 to pacs failed, will retry (attempt 1 of 5): C-STORE to pacs: association rejected")


def test_queue_depths_come_from_job_and_delivery_states(viewer_of: LoggedIn) -> None:
    queues = {q["queue"]: q for q in viewer_of.client.get("/api/v1/dashboard").json()["queues"]}
    # gpu: one queued detection job; one dead segmentation job. io: one delivery waiting for its retry.
    assert queues["gpu"] == {"queue": "gpu", "waiting": 1, "active": 0, "retrying": 0, "dead": 1}
    assert queues["io"] == {"queue": "io", "waiting": 1, "active": 0, "retrying": 1, "dead": 0}
    html = viewer_of.client.get("/dashboard/live").text
    assert re.search(r'data-queue="gpu">.*?data-count="waiting">1<', html, re.S)


def test_throughput_buckets_hold_the_done_studies_and_received_instances(filled: tuple[WebEnv, Scenario],
                                                                        viewer_of: LoggedIn) -> None:
    _, scenario = filled
    flow = viewer_of.client.get("/api/v1/dashboard").json()["throughput"]
    hours, minutes = flow["studies_per_hour"], flow["instances_per_minute"]
    assert len(hours) == 24 and len(minutes) == 60
    assert sum(b["count"] for b in hours) == 2  # "done" now and "old_done" three hours ago
    for role in ("done", "old_done"):
        at = scenario.done_at[role]
        [bucket] = [b for b in hours if _within(b["start"], at, timedelta(hours=1))]
        assert bucket["count"] == 1, (role, hours)
    recent = {at: n for at, n in scenario.instances_at.items() if at >= scenario.now - timedelta(hours=1)}
    assert sum(b["count"] for b in minutes) == sum(recent.values()) == 6 * 4
    for at, count in recent.items():
        [bucket] = [b for b in minutes if _within(b["start"], at, timedelta(minutes=1))]
        assert bucket["count"] == count


def _within(start: str, at: datetime, length: timedelta) -> bool:
    begin = datetime.fromisoformat(start)
    return begin <= at < begin + length


def test_latest_errors_list_dead_jobs_failed_deliveries_refusals_escaped_with_study_links(
        filled: tuple[WebEnv, Scenario], viewer_of: LoggedIn) -> None:
    _, scenario = filled
    errors = viewer_of.client.get("/api/v1/dashboard").json()["errors"]
    kinds = {(e["kind"], e["state"]) for e in errors}
    assert {("job", "dead"), ("delivery", "failed"), ("association", "rejected")} <= kinds
    assert any(e["kind"] == "ingest" and e["state"] == f"0x{scenario.refused_status:04X}" for e in errors)
    dead = next(e for e in errors if e["kind"] == "job")
    assert dead["error"] == HOSTILE_ERROR and dead["study_instance_uid"] == scenario.uids["failed"]
    assert dead["job_id"] == scenario.job_ids["failed"]
    assert [e["at"] for e in errors] == sorted((e["at"] for e in errors), reverse=True)
    html = viewer_of.client.get("/").text
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert f'href="/studies/{scenario.uids["failed"]}"' in html
    assert f'href="/studies/{scenario.uids["retrying"]}"' in html
    assert "is not in the allow-list" in html


def test_worker_table_shows_online_and_offline_workers_with_models_and_current_job(
        filled: tuple[WebEnv, Scenario], viewer_of: LoggedIn) -> None:
    env, scenario = filled
    listed = {w["name"]: w for w in viewer_of.client.get("/api/v1/workers").json()}
    assert list(listed) == ["gpu-1:42", "gone:7"]  # online first
    gpu, gone = listed["gpu-1:42"], listed["gone:7"]
    assert gpu["online"] is True and gone["online"] is False
    assert gpu["queues"] == ["gpu"] and gpu["device"] == "cuda:0 (Test GPU)"
    assert gpu["models"]["chest-seg"]["state"] == "loaded"
    assert gpu["current_job_id"] is None  # no job of gpu-1:42 is running
    html = viewer_of.client.get("/dashboard/live").text
    row = re.search(r'<tr data-worker="gpu-1:42">(.*?)</tr>', html, re.S)
    assert row and 'badge online' in row.group(1) and "chest-seg: loaded" in row.group(1)
    assert re.search(r'<tr data-worker="gone:7">.*?badge offline', html, re.S)


def test_live_fragment_is_a_fragment_and_the_page_refreshes_it(viewer_of: LoggedIn) -> None:
    page = viewer_of.client.get("/").text
    assert 'data-refresh-url="/dashboard/live"' in page and 'data-refresh-seconds="5"' in page
    fragment = viewer_of.client.get("/dashboard/live")
    assert fragment.status_code == 200 and fragment.headers["content-type"].startswith("text/html")
    assert "<html" not in fragment.text and 'data-window="hour"' in fragment.text
    assert "<svg" in fragment.text and 'class="bar"' in fragment.text
    assert " style=" not in fragment.text and "<script" not in fragment.text  # CSP: no inline style or script


def test_dashboard_needs_a_login_and_the_api_a_token(filled: tuple[WebEnv, Scenario]) -> None:
    env, _ = filled
    client = env.client()
    assert client.get("/dashboard/live").status_code == 303
    assert client.get("/api/v1/dashboard").status_code == 401
    assert client.get("/api/v1/workers").status_code == 401
    token = env.token("viewer")
    answer = client.get("/api/v1/dashboard", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200 and answer.json()["studies"]["day"]["received"] == 7


def test_empty_node_says_what_to_do(web: WebEnv, viewer: LoggedIn) -> None:
    html = viewer.client.get("/").text
    assert "No worker has reported yet" in html and "No errors." in html
    assert _row_counts(html, "day") == {k: 0 for k in EXPECTED["day"]}


def test_dashboard_numbers_are_the_same_on_every_database(tmp_path: Path, database_url: str,
                                                          series: list[GeneratedSeries]) -> None:
    env = make_web_env(tmp_path, database_url)
    scenario = build_scenario(env.settings, env.sessions, series, utc_now())
    token = env.token("viewer")
    data = env.client().get("/api/v1/dashboard", headers={"Authorization": f"Bearer {token}"}).json()
    assert data["studies"] == EXPECTED_API
    assert sum(b["count"] for b in data["throughput"]["instances_per_minute"]) == 6 * 4
    assert sum(b["count"] for b in data["throughput"]["studies_per_hour"]) == 2
    # The windows are found through the primary key: every cut-off gives the same as a plain filter.
    with env.sessions() as session:
        for minutes in (0, 1, 5, 11, 200):
            since = scenario.now - timedelta(minutes=minutes)
            first = monitoring._first_id_since(session, Instance.id, Instance.received_at, since)
            plain = session.scalar(select(func.min(Instance.id)).where(Instance.received_at >= since))
            assert first == plain, minutes
