"""``/api/v1/jobs``, ``/api/v1/deliveries`` and ``dicom-node jobs list`` by cursor (keyset pages, as the studies
list) and with bounded counts, on a database the growth benchmark fills (bench/growth.py), on SQLite and
PostgreSQL; pages stay complete while jobs arrive between them, and older clients' ``offset`` still works."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.growth import fill
from dicom_node.app.cli import main
from dicom_node.db import job_views, jobs
from dicom_node.db.models import Delivery, Job, Study, StudyState
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome
from tests.web.conftest import make_web_env

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)


def _add_job(sessions: sessionmaker[Session], number: int) -> int:
    """A study completed and routed now: one new queued job (it arrives between two pages)."""
    with sessions.begin() as session:
        study = Study(study_instance_uid=f"2.25.{number}", state=StudyState.COMPLETE.value, instance_count=1,
                      late_instance_count=0, first_received_at=NOW, last_received_at=NOW, receiving_since=NOW,
                      last_activity_at=NOW, completed_at=NOW, state_changed_at=NOW)
        session.add(study)
        session.flush()
        study_id = study.id
    decision = RoutingDecision(jobs=(JobSpec(pipeline="chest-seg", series_instance_uid=f"2.25.{number}.1", rule="r",
                                             priority=0, destinations="default"),),
                               outcomes=(RuleOutcome(rule="r", matched=True, reasons=("why",)),))
    [job_id] = jobs.record_routing(sessions, study_id, decision, now=NOW, max_attempts=3)
    return job_id


def _walk(client: Any, path: str, headers: dict[str, str], **params: Any) -> tuple[list[int], list[dict[str, Any]]]:
    """Every id of a list, page by page by cursor, and the pages."""
    ids: list[int] = []
    pages: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 40, **params}
    while True:
        page = client.get(path, params=query, headers=headers).json()
        pages.append(page)
        ids += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            return ids, pages
        query = {"limit": 40, **params, "after": page["next_cursor"]}


def test_jobs_and_deliveries_page_by_cursor(tmp_path: Path, database_url: str) -> None:
    env = make_web_env(tmp_path, database_url)
    fill(env.sessions.kw["bind"], 330, instances=1, days=2, now=NOW)
    client, headers = env.client(), {"Authorization": f"Bearer {env.token('viewer')}"}
    with env.sessions() as session:
        all_jobs = session.scalars(select(Job.id).order_by(Job.id.desc())).all()
        dead = session.scalars(select(Job.id).where(Job.state == "dead").order_by(Job.id.desc())).all()
        failed = session.scalars(select(Delivery.id).where(Delivery.state == "failed")
                                 .order_by(Delivery.id.desc())).all()
        all_deliveries = session.scalars(select(Delivery.id).order_by(Delivery.id.desc())).all()
    # jobs, while new ones arrive between the pages: each job of the first page's time exactly once, in order
    seen: list[int] = []
    page = client.get("/api/v1/jobs", params={"limit": 40}, headers=headers).json()
    arrived = []
    while True:
        assert page["total"] == len(all_jobs) + len(arrived) and page["total_exact"] and page["offset"] == 0
        seen += [item["id"] for item in page["items"]]
        arrived.append(_add_job(env.sessions, len(arrived)))
        if page["next_cursor"] is None:
            break
        page = client.get("/api/v1/jobs", params={"limit": 40, "after": page["next_cursor"]}, headers=headers).json()
    assert seen == list(all_jobs) and len(arrived) == 9
    first = client.get("/api/v1/jobs", params={"limit": 40}, headers=headers).json()
    assert [i["id"] for i in first["items"]][:9] == arrived[::-1] and first["previous_cursor"] is None
    second = client.get("/api/v1/jobs", params={"limit": 40, "after": first["next_cursor"]}, headers=headers).json()
    back = client.get("/api/v1/jobs", params={"limit": 40, "before": second["previous_cursor"]},
                      headers=headers).json()
    assert [i["id"] for i in back["items"]] == [i["id"] for i in first["items"]]
    # filtered: by state (index (state, id)) and pipeline, each item whole (its deliveries, its study)
    ids, pages = _walk(client, "/api/v1/jobs", headers, state="dead")
    assert ids == list(dead) and pages[0]["items"][0]["state"] == "dead" and pages[0]["items"][0]["study_instance_uid"]
    assert _walk(client, "/api/v1/jobs", headers, pipeline="nodule-det")[0] == []
    # deliveries: all, and the failed ones to one destination
    assert _walk(client, "/api/v1/deliveries", headers)[0] == list(all_deliveries)
    ids, pages = _walk(client, "/api/v1/deliveries", headers, state="failed", destination="pacs")
    assert ids == list(failed) and pages[0]["total"] == len(failed) == 4
    item = pages[0]["items"][0]
    assert item["destination"] == "pacs" and item["error"] == "association rejected" and item["study_instance_uid"]
    # older clients: offset
    by_offset = client.get("/api/v1/deliveries", params={"limit": 40, "offset": 80}, headers=headers).json()
    assert [i["id"] for i in by_offset["items"]] == list(all_deliveries[80:120]) and by_offset["offset"] == 80
    # a cursor the node did not give, or one of another list, is refused by name
    study_cursor = client.get("/api/v1/studies", params={"limit": 1}, headers=headers).json()["next_cursor"]
    for bad in ("bm90IGEgY3Vyc29y", study_cursor):
        answer = client.get("/api/v1/jobs", params={"after": bad}, headers=headers)
        assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "after", answer.text
        assert f"jobs cursor '{bad}' is not one this node gave" in answer.text
    answer = client.get("/api/v1/deliveries", params={"before": "bm90IGEgY3Vyc29y"}, headers=headers)
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "before"


def test_counts_stop_at_the_cap(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    fill(env.sessions.kw["bind"], 250, instances=1, days=1, now=NOW)
    with env.sessions() as session:
        job_ids = session.scalars(select(Job.id).order_by(Job.id.desc())).all()
        delivery_count = len(session.scalars(select(Delivery.id)).all())
    capped = job_views.list_jobs(env.sessions, limit=5, count_cap=100)
    exact = job_views.list_jobs(env.sessions, limit=5, count_cap=None)
    assert (capped.total, capped.total_exact) == (100, False) and (exact.total, exact.total_exact) == (245, True)
    assert [j.id for j in capped.items] == [j.id for j in exact.items] == list(job_ids[:5])
    assert job_views.list_jobs(env.sessions, limit=5, count_cap=245).total_exact
    deliveries = job_views.list_deliveries(env.sessions, limit=5, count_cap=100)
    assert (deliveries.total, deliveries.total_exact) == (100, False)
    client, headers = env.client(), {"Authorization": f"Bearer {env.token('viewer')}"}
    answer = client.get("/api/v1/deliveries", params={"limit": 1, "count": "exact"}, headers=headers).json()
    assert (answer["total"], answer["total_exact"]) == (delivery_count, True) and delivery_count > 100


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_jobs_list_pages_with_after(tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    env = make_web_env(tmp_path)
    fill(env.sessions.kw["bind"], 30, instances=1, days=1, now=NOW)
    data = ["--data-dir", str(env.data_dir)] + (["--json"] if as_json else [])
    assert main(["jobs", "list", "--limit", "20", *data]) == 0
    out = capsys.readouterr().out
    if as_json:  # JSON lists the page only
        assert len(json.loads(out)) == 20
        return
    last = out.strip().splitlines()[-1]
    assert last.startswith("older jobs: --after ")
    assert main(["jobs", "list", "--limit", "20", "--after", last.split()[-1], *data]) == 0
    rest = capsys.readouterr().out
    with env.sessions() as session:
        count = len(session.scalars(select(Job.id)).all())
    assert "older jobs" not in rest and rest.count(" attempts ") == count - 20 > 0
    assert main(["jobs", "list", "--after", "bm90IGEgY3Vyc29y", *data]) == 2
    assert "jobs cursor 'bm90IGEgY3Vyc29y' is not one this node gave" in capsys.readouterr().err
