"""Studies, jobs and deliveries in the web UI and API, on studies received through the node's own ingest
path (see ``studies_fixtures``): list filters, the study page's timeline, actions, roles, escaping."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import event

from dicom_node.db import audit, job_views, jobs
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.studies_fixtures import (
    GEOMETRY,
    T0,
    complete_and_route,
    deliver,
    fail_delivery,
    fail_job_dead,
    ingest,
    run_job,
    write_study,
)

HOSTILE = "<script>alert(1)</script>"


# --------------------------------------------------------------------------- a small hospital


@dataclass
class Hospital:
    """Four studies in different states; UIDs by letter."""

    uids: dict[str, str]
    series: dict[str, str]
    job_ids: dict[str, int]
    delivery_ids: dict[str, int]


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("studies")
    return {
        "A": write_study(root / "a", seed=31, patient_id="PAT-A", patient_name="Doe^Jane", accession="ACC-A",
                         study_date="20260301", description="CT chest"),
        "B": write_study(root / "b", seed=32, patient_id="PAT-B", patient_name="O'Brien^\"Bob\" <b>",
                         accession="ACC-B", study_date="20260315", description=HOSTILE),
        "C": write_study(root / "c", seed=33, patient_id="PAT-C", patient_name="DOE^John", accession="ACC-C",
                         study_date="20260320", description="CT abdomen"),
        "D": write_study(root / "d", seed=34, patient_id="PAT-D", patient_name="Roe^Richard", accession="ACC-D",
                         study_date="20260325", description="CT chest follow-up"),
    }


def populate(env: WebEnv, files: dict[str, list[Path]]) -> Hospital:
    """A: routed, job succeeded, delivered (done). B: job dead, from PACS_B (failed).
    C: still receiving (no jobs). D: job queued (in progress). Received A, B, D, C in that order."""
    import pydicom

    uids = {k: str(pydicom.dcmread(v[0], stop_before_pixels=True).StudyInstanceUID) for k, v in files.items()}
    series = {k: str(pydicom.dcmread(v[0], stop_before_pixels=True).SeriesInstanceUID) for k, v in files.items()}
    sessions = env.sessions
    ingest(env, files["A"], calling_ae="PACS_A", at=T0)
    [job_a] = complete_and_route(sessions, uids["A"], series["A"], ["chest-seg"], at=T0 + timedelta(seconds=30))
    [delivery_a] = run_job(sessions, job_a, at=T0 + timedelta(seconds=40),
                           stages={"load": 0.5, "model_load": 2.0, "inference": 1.5, "encoding": 0.25, "outbox": 0.05})
    deliver(sessions, delivery_a, at=T0 + timedelta(seconds=50))

    ingest(env, files["B"], calling_ae="PACS_B", at=T0 + timedelta(minutes=5))
    [job_b] = complete_and_route(sessions, uids["B"], series["B"], ["chest-seg"], at=T0 + timedelta(minutes=6))
    fail_job_dead(sessions, job_b, at=T0 + timedelta(minutes=7), error="VolumeError: series has a gap")

    ingest(env, files["D"], calling_ae="PACS_A", at=T0 + timedelta(minutes=10))
    [job_d] = complete_and_route(sessions, uids["D"], series["D"], ["nodules"], at=T0 + timedelta(minutes=11))

    ingest(env, files["C"], calling_ae="PACS_A", at=T0 + timedelta(minutes=15))
    return Hospital(uids, series, {"A": job_a, "B": job_b, "D": job_d}, {"A": delivery_a})


def _uids(answer: object) -> list[str]:
    return [item["study_instance_uid"] for item in answer.json()["items"]]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the list


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_list_filters_narrow_on_sqlite_and_postgresql(
    tmp_path: Path, database_url: str, study_files: dict[str, list[Path]]
) -> None:
    env = make_web_env(tmp_path, database_url)
    h = populate(env, study_files)
    client, headers = env.client(), {"Authorization": f"Bearer {env.token('viewer')}"}

    def found(**query: str) -> list[str]:
        answer = client.get("/api/v1/studies", params=query, headers=headers)
        assert answer.status_code == 200, answer.text
        return _uids(answer)

    a, b, c, d = (h.uids[k] for k in "ABCD")
    assert found() == [c, d, b, a]  # newest first
    assert found(patient_id="PAT-B") == [b]
    assert found(patient_id="PAT") == []  # IDs match exactly
    assert found(patient_name="doe") == [c, a]  # any part, any case
    assert found(patient_name="100%") == []  # LIKE wildcards are literal
    assert found(accession_number="ACC-C") == [c]
    assert found(date_from="2026-03-10", date_to="2026-03-20") == [c, b]
    assert found(date_from="20260321") == [d]
    assert found(state="receiving") == [c]
    assert found(state="routed") == [d, b, a]
    assert found(jobs="done") == [a]
    assert found(jobs="failed") == [b]
    assert found(jobs="in_progress") == []  # D's one job is queued, none started: waiting
    assert found(jobs="none") == [c]
    assert found(status="waiting") == [d] and found(status="receiving") == [c]
    assert found(status="failed") == [b] and found(status="done") == [a] and found(status="held") == []
    assert found(modality="ct") == [c, d, b, a]
    assert found(modality="MR") == []
    assert found(source_ae="PACS_B") == [b]
    assert found(source_ae="PACS_A", jobs="done") == [a]

    page = client.get("/api/v1/studies", params={"limit": 2, "offset": 2}, headers=headers).json()
    assert page["total"] == 4 and [i["study_instance_uid"] for i in page["items"]] == [b, a]
    first = client.get("/api/v1/studies", params={"patient_id": "PAT-A"}, headers=headers).json()["items"][0]
    assert first["job_counts"] == {"succeeded": 1} and first["delivery_counts"] == {"delivered": 1}
    assert first["source_ae_titles"] == ["PACS_A"] and first["modalities"] == ["CT"]
    assert first["instance_count"] == GEOMETRY.slices and first["study_date"] == "20260301"

    bad = client.get("/api/v1/studies", params={"state": "lost", "date_from": "2026-13-01"}, headers=headers)
    assert bad.status_code == 422 and {e["field"] for e in bad.json()["errors"]} >= {"state"}
    bad_date = client.get("/api/v1/studies", params={"date_from": "2026-02-30"}, headers=headers)
    assert bad_date.status_code == 422 and bad_date.json()["errors"][0]["field"] == "date_from"


def test_list_page_shows_summaries_filters_and_paging(web: WebEnv, viewer: LoggedIn,
                                                      study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    page = viewer.client.get("/studies", params={"limit": 3})
    assert page.status_code == 200
    text = page.text
    assert f'href="/studies/{h.uids["D"]}"' in text and h.uids["A"] not in text  # A is on page 2
    assert "1 dead" in text and "1 queued" in text
    assert '<span class="badge status-receiving" title="stored state: receiving">receiving</span>' in text
    assert '<span class="badge status-failed" title="stored state: routed">failed</span>' in text
    assert f"job {h.job_ids['B']} chest-seg dead: VolumeError: series has a gap" in text
    older_link = re.search(r'href="(/studies\?[^"]*after=[^"]+)">Older</a>', text)
    assert older_link, "no link to the older page"  # by cursor (keyset), not by offset
    older = viewer.client.get(html.unescape(older_link.group(1))).text
    by_offset = viewer.client.get("/studies", params={"limit": 3, "offset": 3}).text  # older links still work
    assert older == by_offset.replace("1 of 4, from 4", "1 of 4")  # the same page
    assert h.uids["A"] in older and "1 succeeded" in older and "1 delivered" in older and "PACS_A" in older
    only_b = viewer.client.get("/studies", params={"source_ae": "PACS_B", "state": "", "jobs": ""}).text
    assert h.uids["B"] in only_b and h.uids["A"] not in only_b and 'value="PACS_B"' in only_b
    none = viewer.client.get("/studies", params={"patient_name": "nobody"}).text
    assert "No studies match these filters" in none


def test_pages_use_the_same_few_queries_whatever_the_page_size(web: WebEnv, viewer: LoggedIn,
                                                                study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    engine = web.sessions.kw["bind"]
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        sizes = {}
        for url in ("/studies?limit=1", "/studies?limit=4", "/api/v1/jobs?limit=1", "/api/v1/jobs?limit=3",
                    f"/studies/{h.uids['A']}", f"/studies/{h.uids['B']}"):
            statements.clear()
            assert viewer.client.get(url).status_code == 200
            sizes[url] = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert sizes["/studies?limit=1"] == sizes["/studies?limit=4"] <= 10, sizes
    assert sizes["/api/v1/jobs?limit=1"] == sizes["/api/v1/jobs?limit=3"] <= 8, sizes
    assert sizes[f"/studies/{h.uids['A']}"] <= 12, sizes


def test_empty_list_says_how_to_send_studies(web: WebEnv, viewer: LoggedIn) -> None:
    text = viewer.client.get("/studies").text
    assert "No studies received yet" in text and web.settings.dicom.ae_title in text


def test_hostile_strings_from_dicom_and_query_are_shown_escaped(web: WebEnv, viewer: LoggedIn,
                                                                 study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    listing = viewer.client.get("/studies").text
    page = viewer.client.get(f"/studies/{h.uids['B']}").text
    for text in (listing, page):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert HOSTILE not in text and "<b>" not in text
    echoed = viewer.client.get("/studies", params={"patient_name": '"><script>x</script>'}).text
    assert "<script>x" not in echoed and "&#34;&gt;&lt;script&gt;x" in echoed
    api = viewer.client.get(f"/api/v1/studies/{h.uids['B']}").json()
    assert api["study_description"] == HOSTILE  # stored and returned verbatim; escaping is the page's job


# --------------------------------------------------------------------------- the study page


def test_study_page_timeline_shows_stages_with_durations(web: WebEnv, viewer: LoggedIn,
                                                         study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    page = viewer.client.get(f"/studies/{h.uids['A']}")
    assert page.status_code == 200
    text = page.text
    assert f'data-refresh-url="/studies/{h.uids["A"]}/live"' in text
    assert "Doe Jane" in text and "ACC-A" in text and "2026-03-01" in text and "CHEST" in text
    for expected in ("Receiving", "Study complete", "Routed", f"Job {h.job_ids['A']} · chest-seg started",
                     "waited in the queue 9.0 s", "model load", "2.0 s", "inference", "1.5 s",
                     f"Job {h.job_ids['A']} · chest-seg succeeded", "took 4.3 s",
                     f"Delivery {h.delivery_ids['A']} to pacs delivered", "lung", "1234.5 ml"):
        assert expected in text, expected
    live = viewer.client.get(f"/studies/{h.uids['A']}/live")
    assert live.status_code == 200 and "<html" not in live.text and "inference" in live.text

    api = viewer.client.get(f"/api/v1/studies/{h.uids['A']}").json()
    kinds = [e["kind"] for e in api["timeline"]]
    assert kinds == ["received", "study.complete", "study.routed", "job.queued", "job.started", "job.succeeded",
                     "delivery.created", "delivery.delivered"]
    started = api["timeline"][4]
    assert started["duration_seconds"] == 9.0
    assert started["stages"][2] == {"stage": "inference", "seconds": 1.5}
    assert api["timeline"][5]["duration_seconds"] == pytest.approx(4.3)
    assert api["timeline"][1]["duration_seconds"] == 30.0  # complete 30 s after the last instance
    assert api["jobs"][0]["stage_seconds"]["model_load"] == 2.0
    assert api["findings"] == [{"job_id": h.job_ids["A"], "pipeline": "chest-seg", "kind": "segment", "label": "lung",
                                "volume_ml": 1234.5, "diameter_mm": None, "score": None, "centre_mm": None}]
    assert [s["modality"] for s in api["series"]] == ["CT"] and api["source_ae_titles"] == ["PACS_A"]
    assert viewer.client.get("/api/v1/studies/1.2.3.4.5").status_code == 404
    assert viewer.client.get("/studies/1.2.3.4.5").status_code == 404


def test_failed_job_and_delivery_show_errors_and_attempts(web: WebEnv, viewer: LoggedIn,
                                                          study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    dead = viewer.client.get(f"/studies/{h.uids['B']}").text
    assert "VolumeError: series has a gap; attempt 1 of 2, no retry" in dead
    assert f"Job {h.job_ids['B']} · chest-seg dead" in dead
    [delivery] = run_job(web.sessions, h.job_ids["D"], at=T0 + timedelta(minutes=20), stages={"inference": 1.0})
    assert fail_delivery(web.sessions, delivery, at=T0 + timedelta(minutes=21), error="C-STORE refused: 0xA700") == "dead"
    text = viewer.client.get(f"/studies/{h.uids['D']}/live").text
    assert f"Delivery {delivery} to pacs dead" in text and "C-STORE refused: 0xA700; attempt 1 of 2; no retry" in text
    assert "Re-send" not in text and "Retry" not in text  # a viewer sees no action buttons


# --------------------------------------------------------------------------- actions


def _audit(env: WebEnv, action: str) -> list[audit.AuditView]:
    return audit.list_entries(env.sessions, action=action)


def test_retry_cancel_resend_change_state_and_are_audited(web: WebEnv, operator: LoggedIn,
                                                         study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    page = operator.client.get(f"/studies/{h.uids['B']}").text
    assert f'action="/jobs/{h.job_ids["B"]}/retry"' in page and 'name="csrf_token"' in page

    retried = operator.post(f"/jobs/{h.job_ids['B']}/retry")
    assert retried.status_code == 303
    assert retried.headers["location"].startswith(f"/studies/{h.uids['B']}?notice=job.retry.done")
    shown = operator.client.get(retried.headers["location"]).text
    assert f"Job {h.job_ids['B']} will run again" in shown and "(it was dead)" in shown
    job = operator.client.get(f"/api/v1/jobs/{h.job_ids['B']}").json()
    assert job["state"] == "failed" and job["attempts"] == 0  # the next sweep queues it
    assert jobs.requeue_jobs(web.sessions, now=T0 + timedelta(hours=1)) == [h.job_ids["B"]]
    [entry] = _audit(web, "job.retry")
    assert entry.actor == "operator" and entry.target == str(h.job_ids["B"])
    assert entry.before["state"] == "dead" and entry.after == {"state": "failed", "attempts": 0, "max_attempts": 2,
                                                               "error": "VolumeError: series has a gap"}

    cancelled = operator.post(f"/jobs/{h.job_ids['D']}/cancel")
    assert cancelled.status_code == 303 and "notice=job.cancel.done" in cancelled.headers["location"]
    assert operator.client.get(f"/api/v1/jobs/{h.job_ids['D']}").json()["state"] == "cancelled"
    [entry] = _audit(web, "job.cancel")
    assert entry.before["state"] == "queued" and entry.after["state"] == "cancelled"

    refused = operator.post(f"/jobs/{h.job_ids['A']}/cancel")  # succeeded: cannot be cancelled
    assert refused.status_code == 303 and "notice=job.cancel.refused" in refused.headers["location"]
    assert "was not cancelled: it is succeeded" in operator.client.get(refused.headers["location"]).text
    assert len(_audit(web, "job.cancel")) == 1

    [delivery] = run_job(web.sessions, h.job_ids["B"], at=T0 + timedelta(hours=2), stages={"inference": 1.0})
    fail_delivery(web.sessions, delivery, at=T0 + timedelta(hours=2), error="connection refused")
    resent = operator.post(f"/deliveries/{delivery}/retry")
    assert resent.status_code == 303 and "notice=delivery.retry.done" in resent.headers["location"]
    found = operator.client.get(f"/api/v1/jobs/{h.job_ids['B']}").json()["deliveries"][0]
    assert found["state"] == "failed" and found["attempts"] == 0
    assert jobs.due_deliveries(web.sessions, now=datetime.now(timezone.utc) + timedelta(seconds=1)) == [delivery]
    [entry] = _audit(web, "delivery.retry")
    assert entry.before["state"] == "dead" and entry.after["state"] == "failed" and entry.target == str(delivery)

    assert operator.post("/jobs/999999/retry").status_code == 404
    no_csrf = operator.client.post(f"/jobs/{h.job_ids['B']}/cancel")
    assert no_csrf.status_code == 403


def test_api_actions_answer_409_and_404_and_viewers_get_403(web: WebEnv, viewer: LoggedIn,
                                                           study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    operator = {"Authorization": f"Bearer {web.token('operator')}"}
    client = web.client()
    retry = client.post(f"/api/v1/jobs/{h.job_ids['B']}/retry", headers=operator)
    assert retry.status_code == 200
    assert retry.json() == {"kind": "job", "id": h.job_ids["B"], "action": "retry", "before": "dead",
                            "after": "failed", "message": f"job {h.job_ids['B']} will run again (it was dead)"}
    again = client.post(f"/api/v1/jobs/{h.job_ids['A']}/retry", headers=operator)
    assert again.status_code == 409 and "is succeeded" in again.json()["detail"]
    assert client.post(f"/api/v1/jobs/{h.job_ids['D']}/cancel", headers=operator).json()["after"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{h.job_ids['D']}/cancel", headers=operator).status_code == 409
    assert client.post(f"/api/v1/deliveries/{h.delivery_ids['A']}/retry", headers=operator).status_code == 409
    assert client.post("/api/v1/deliveries/424242/retry", headers=operator).status_code == 404
    assert client.post("/api/v1/jobs/424242/cancel", headers=operator).status_code == 404
    entries = audit.list_entries(web.sessions)
    assert {(e.action, e.detail.endswith("(API token)")) for e in entries if e.action.startswith("job.")} == {
        ("job.retry", True), ("job.cancel", True)}

    state = client.get(f"/api/v1/jobs/{h.job_ids['B']}", headers=operator).json()["state"]
    for url in (f"/jobs/{h.job_ids['B']}/cancel", f"/deliveries/{h.delivery_ids['A']}/retry"):
        assert viewer.post(url).status_code == 403
    viewer_token = {"Authorization": f"Bearer {web.token('viewer')}"}
    for url in (f"/api/v1/jobs/{h.job_ids['B']}/cancel", f"/api/v1/jobs/{h.job_ids['B']}/retry",
                f"/api/v1/deliveries/{h.delivery_ids['A']}/retry"):
        answer = client.post(url, headers=viewer_token)
        assert answer.status_code == 403 and "operator role" in answer.json()["detail"]
    assert client.get(f"/api/v1/jobs/{h.job_ids['B']}", headers=operator).json()["state"] == state


def test_worker_cannot_overwrite_a_cancel(web: WebEnv, study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    sessions, job_id = web.sessions, h.job_ids["D"]
    assert jobs.claim_job(sessions, job_id, worker="gpu-1:7", now=T0, lease_seconds=60) is not None
    assert jobs.cancel_job(sessions, job_id, now=T0 + timedelta(seconds=1)) == "running"
    result = jobs.ResultSpec("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "2.25.1", "2.25.2", "job-x/seg.dcm")
    assert jobs.finish_job(sessions, job_id, now=T0 + timedelta(seconds=2), stage_seconds={"inference": 1.0},
                           summary={}, results=[result], destinations=["pacs"], delivery_max_attempts=3) is None
    assert jobs.fail_job(sessions, job_id, now=T0 + timedelta(seconds=2), error="boom", retryable=True) is None
    jobs.heartbeat_job(sessions, job_id, now=T0 + timedelta(seconds=3), lease_seconds=60)
    assert jobs.requeue_jobs(sessions, now=T0 + timedelta(hours=1)) == []
    assert jobs.claim_job(sessions, job_id, worker="gpu-2:8", now=T0 + timedelta(hours=1), lease_seconds=60) is None
    job = job_views.list_jobs(sessions, study_instance_uid=h.uids["D"]).items[0]
    assert job.state == "cancelled" and job.deliveries == [] and jobs.results_of_job(sessions, job_id) == []
    assert jobs.cancel_job(sessions, job_id, now=T0) is None  # already cancelled
    assert jobs.cancel_job(sessions, 987654, now=T0) is None


def test_jobs_api_filters(web: WebEnv, study_files: dict[str, list[Path]]) -> None:
    h = populate(web, study_files)
    client, headers = web.client(), {"Authorization": f"Bearer {web.token('viewer')}"}
    everything = client.get("/api/v1/jobs", headers=headers).json()
    assert everything["total"] == 3 and [j["id"] for j in everything["items"]] == sorted(h.job_ids.values(), reverse=True)
    dead = client.get("/api/v1/jobs", params={"state": "dead"}, headers=headers).json()
    assert [j["id"] for j in dead["items"]] == [h.job_ids["B"]] and dead["items"][0]["error"]
    seg = client.get("/api/v1/jobs", params={"pipeline": "chest-seg", "limit": 1}, headers=headers).json()
    assert seg["total"] == 2 and len(seg["items"]) == 1
    one = client.get(f"/api/v1/jobs/{h.job_ids['A']}", headers=headers).json()
    assert one["deliveries"][0]["state"] == "delivered" and one["study_instance_uid"] == h.uids["A"]
    assert client.get("/api/v1/jobs/55555", headers=headers).status_code == 404
    assert client.get("/api/v1/jobs", params={"state": "lost"}, headers=headers).status_code == 422
    assert client.get("/api/v1/jobs").status_code == 401
