"""Honest study states: the studies list, the study page, the API, ``dicom-node studies`` and the dashboard
show each study in the same state with the failing stage named; the SQL the list filters and the dashboard
counts with agrees with the reasoned state; a preview that cannot be shown says why instead of breaking.

Every study is received through the node's ingest path and moved through its states with the functions the
router and the workers use (``studies_fixtures``); one job is superseded by hand, as a re-process does.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from sqlalchemy import select, update

from dicom_node.app.cli import main
from dicom_node.db import jobs, repo
from dicom_node.db.models import Job, JobState, Study
from dicom_node.db.study_states import shown_state_sql, state_condition, study_statuses
from dicom_node.ingest import utc_now
from dicom_node.study_status import SHOWN_STATES
from tests.web.conftest import LoggedIn, WebEnv, make_web_env
from tests.web.studies_fixtures import (
    T0,
    complete_and_route,
    deliver,
    fail_delivery,
    fail_job_dead,
    finish_checked,
    ingest,
    run_job,
    write_study,
)

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Study role -> the state it must be shown in.
EXPECTED = {
    "waiting_route": "waiting", "queued": "waiting", "dead_job": "failed", "dead_delivery": "failed",
    "held": "held", "no_destination": "held", "sending": "in_progress", "done": "done", "declined": "done",
    "ignored": "ignored", "superseded": "done", "receiving": "receiving",
}
HELD_REASON = "lung volume 250 mL is outside 1000-9000 mL"


@dataclass
class Clinic:
    uids: dict[str, str]
    job_ids: dict[str, int]
    delivery_ids: dict[str, int]


@pytest.fixture(scope="module")
def clinic_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("clinic")
    return {role: write_study(root / role, seed=700 + n, patient_id=f"PAT-{n}", patient_name=f"Role^{role}",
                              accession=f"ACC-{n}", study_date="20260320", description=f"CT {role}")
            for n, role in enumerate(EXPECTED)}


def _results(env: WebEnv, job_id: int, count: int = 1) -> list[jobs.ResultSpec]:
    """Result objects with a file each in the outbox, as the worker writes them."""
    specs = []
    for n in range(count):
        path = f"job-{job_id}/seg-{n}.dcm"
        (env.settings.outbox_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (env.settings.outbox_dir / path).write_bytes(b"DICM result")
        specs.append(jobs.ResultSpec("SEG", SEG_CLASS, f"2.25.{job_id}{n}", f"2.25.{job_id}9", path))
    return specs


def _preview(env: WebEnv, job_id: int) -> dict[str, object]:
    """A preview as the worker leaves it in the outbox (a small PNG and its facts) and names it in the summary."""
    folder = env.settings.outbox_dir / f"job-{job_id}"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 0)).save(buffer, format="PNG")
    (folder / "preview.png").write_bytes(buffer.getvalue())
    (folder / "preview.json").write_text(json.dumps({"slice_index": 1, "slice_count": 4, "overlay": True}))
    return {"kind": "segmentation", "volumes_ml": {"lung": 1200.0},
            "preview": {"png": f"job-{job_id}/preview.png", "facts": f"job-{job_id}/preview.json"}}


def build_clinic(env: WebEnv, files: dict[str, list[Path]], start: datetime = T0) -> Clinic:
    """One study per role of EXPECTED, each moved to its state, the first received a minute after ``start``."""
    sessions = env.sessions
    uids, job_ids, delivery_ids = {}, {}, {}
    at = start
    for role, paths in files.items():
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        uids[role] = str(ds.StudyInstanceUID)
        at += timedelta(minutes=1)
        ingest(env, paths, calling_ae="PACS", at=at)
        if role == "receiving":
            continue  # received last: nothing completes it
        if role == "waiting_route":
            assert uids[role] in repo.complete_due_studies(sessions, now=at, quiet_seconds=0, max_wait_seconds=3600)
            continue
        pipelines = [] if role == "ignored" else ["chest-seg"]
        if role == "superseded":
            pipelines = ["chest-seg", "lung-nodules"]
        routed = complete_and_route(sessions, uids[role], str(ds.SeriesInstanceUID), pipelines, at=at)
        step = at + timedelta(seconds=10)
        if role == "ignored" or role == "queued":
            continue
        job_ids[role] = job = routed[0]
        if role == "dead_job":
            fail_job_dead(sessions, job, at=step, error="VolumeError: the series has 57 of 96 slices")
        elif role == "dead_delivery":
            [delivery_ids[role]] = run_job(sessions, job, at=step, stages={"load": 1.0}, results=_results(env, job),
                                           summary=_preview(env, job))
            assert fail_delivery(sessions, delivery_ids[role], at=step + timedelta(seconds=5),
                                 error="C-STORE to pacs: association rejected (called AE title not recognised)") == "dead"
        elif role == "held":
            finish_checked(sessions, job, at=step, state="held", results=_results(env, job, 2),
                           checks={"plausibility": {"plausible": False, "reasons": [HELD_REASON], "checks": []}},
                           events=[("job_held", f"job {job} (chest-seg): results held, not sent: {HELD_REASON}")],
                           summary=_preview(env, job))
        elif role == "no_destination":
            assert run_job(sessions, job, at=step, stages={"load": 1.0}, results=_results(env, job, 3),
                           summary=_preview(env, job), destinations=()) == []
        elif role == "sending":
            [delivery_ids[role]] = run_job(sessions, job, at=step, stages={"load": 1.0}, results=_results(env, job))
        elif role == "done":
            [delivery_ids[role]] = run_job(sessions, job, at=step, stages={"load": 1.0}, results=_results(env, job),
                                           summary=_preview(env, job))
            deliver(sessions, delivery_ids[role], at=step + timedelta(seconds=5))
        elif role == "declined":
            finish_checked(sessions, job, at=step, state="not_applicable", checks={}, events=[])
        elif role == "superseded":
            # generation 1 of chest-seg died; a re-process ran it again (generation 2) and succeeded; the
            # second job, lung-nodules, declined the series
            fail_job_dead(sessions, job, at=step, error="CUDA out of memory")
            finish_checked(sessions, routed[1], at=step, state="not_applicable", checks={}, events=[])
            with sessions.begin() as session:
                old = session.get(Job, job)
                assert old is not None
                rerun = Job(study_id=old.study_id, series_instance_uid=old.series_instance_uid, pipeline=old.pipeline,
                            rule=old.rule, destinations=old.destinations, priority=0, state=JobState.QUEUED.value,
                            attempts=0, max_attempts=2, created_at=step, queued_at=step, state_changed_at=step,
                            generation=2, supersedes_job_id=job)
                session.add(rerun)
                session.flush()
                job_ids["superseded_rerun"] = rerun.id
            [delivery] = run_job(sessions, job_ids["superseded_rerun"], at=step + timedelta(seconds=20),
                                 stages={"load": 1.0}, results=_results(env, job_ids["superseded_rerun"]))
            deliver(sessions, delivery, at=step + timedelta(seconds=30))
            with sessions.begin() as session:
                session.execute(update(Job).where(Job.id == job).values(superseded_at=step + timedelta(seconds=30)))
    return Clinic(uids, job_ids, delivery_ids)


@pytest.fixture
def clinic(web: WebEnv, clinic_files: dict[str, list[Path]]) -> Clinic:
    """The clinic received in the last hour (the dashboard counts the last hour and day before now)."""
    return build_clinic(web, clinic_files, utc_now() - timedelta(hours=1))


def _row(html: str, uid: str) -> str:
    found = re.search(rf'<tr data-study="{re.escape(uid)}"[^>]*>(.*?)</tr>', html, re.S)
    assert found, f"no row for {uid}"
    return found.group(1)


# --------------------------------------------------------------------------- the SQL and the reasons agree


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_the_sql_state_and_the_reasoned_state_agree_on_every_state(
        tmp_path: Path, database_url: str, clinic_files: dict[str, list[Path]]) -> None:
    env = make_web_env(tmp_path, database_url)
    clinic = build_clinic(env, clinic_files)
    with env.sessions() as session:
        rows = session.execute(select(Study.id, Study.study_instance_uid, Study.state, shown_state_sql())).all()
        reasoned = study_statuses(session, {i: state for i, _, state, _ in rows})
        selected = {state: set(session.scalars(select(Study.study_instance_uid).where(state_condition(state))))
                    for state in SHOWN_STATES}
    by_uid = {uid: (sql_state, reasoned[i].state) for i, uid, _, sql_state in rows}
    for role, expected in EXPECTED.items():
        assert by_uid[clinic.uids[role]] == (expected, expected), role
    # the list's filter selects each study in exactly the state the CASE gives it
    assert selected == {state: {uid for uid, (shown, _) in by_uid.items() if shown == state} for state in SHOWN_STATES}


# --------------------------------------------------------------------------- every view says the same


def test_list_page_api_and_dashboard_show_the_same_states_and_name_the_stage(
        web: WebEnv, viewer: LoggedIn, clinic: Clinic) -> None:
    dead_job, dead_delivery = clinic.job_ids["dead_job"], clinic.delivery_ids["dead_delivery"]
    reasons = {
        "dead_job": f"job {dead_job} chest-seg dead: VolumeError: the series has 57 of 96 slices",
        "dead_delivery": f"delivery {dead_delivery} to pacs dead: C-STORE to pacs: association rejected "
                         "(called AE title not recognised)",
        "held": f"job {clinic.job_ids['held']} chest-seg results held as implausible (release or discard): "
                f"{HELD_REASON}",
        "no_destination": f"results not sent: no destination (job {clinic.job_ids['no_destination']} chest-seg, "
                          "3 object(s))",
    }
    items = {i["study_instance_uid"]: i for i in viewer.client.get("/api/v1/studies", params={"limit": 50})
             .json()["items"]}
    listing = viewer.client.get("/studies", params={"limit": 50}).text
    for role, expected in EXPECTED.items():
        uid = clinic.uids[role]
        status = items[uid]["status"]
        assert status["state"] == expected, (role, status)
        detail = viewer.client.get(f"/api/v1/studies/{uid}").json()
        assert detail["status"] == status, role
        assert f'class="badge status-{expected}"' in _row(listing, uid), role
        page = viewer.client.get(f"/studies/{uid}").text
        assert f'data-study-status="{expected}"' in page and status["reason"].replace("'", "&#39;") in page, role
        if role in reasons:
            assert status["reason"] == reasons[role]
            assert reasons[role] in _row(listing, uid)
    assert items[clinic.uids["dead_job"]]["state"] == "routed"  # the stored state is still there, for old clients
    assert items[clinic.uids["superseded"]]["job_counts"] == {"succeeded": 1, "not_applicable": 1}
    assert items[clinic.uids["ignored"]]["status"]["reason"] == "no routing rule matched: no routing rule is enabled"

    # the dashboard's counts are the numbers of studies the list shows in each state
    day = viewer.client.get("/api/v1/dashboard").json()["studies"]["day"]
    for state in ("receiving", "waiting", "in_progress", "done", "held", "failed", "ignored"):
        listed = viewer.client.get("/api/v1/studies", params={"status": state}).json()["total"]
        assert day[state] == listed == list(EXPECTED.values()).count(state), state
    assert day["received"] == len(EXPECTED)


def test_studies_cli_shows_the_state_the_reason_and_the_stored_state(web: WebEnv, clinic: Clinic, capsys) -> None:  # type: ignore[no-untyped-def]
    data = ["--data-dir", str(web.data_dir)]
    assert main(["studies", "--json", *data]) == 0
    rows = {r["study_instance_uid"]: r for r in json.loads(capsys.readouterr().out)}
    for role, expected in EXPECTED.items():
        assert rows[clinic.uids[role]]["state"] == expected, role
    dead = rows[clinic.uids["dead_job"]]
    assert dead["stored_state"] == "routed" and dead["reason"].startswith(f"job {clinic.job_ids['dead_job']} chest-seg dead")
    assert rows[clinic.uids["dead_delivery"]]["deliveries"] == {"dead": 1}
    assert main(["studies", "list", *data]) == 0
    table = capsys.readouterr().out.splitlines()
    [line] = [n for n, text in enumerate(table) if clinic.uids["dead_delivery"] in text]
    assert table[line].startswith("FAILED ") and "delivery" in table[line + 1] and "dead: C-STORE" in table[line + 1]
    assert any(text.startswith("2 study(ies) FAILED") for text in table)
    assert any(text.startswith("1 study(ies) have results that were never sent") for text in table)


# --------------------------------------------------------------------------- previews that cannot be shown


def test_a_preview_that_cannot_be_shown_says_why_instead_of_breaking(
        web: WebEnv, viewer: LoggedIn, clinic: Clinic) -> None:
    uid, job = clinic.uids["done"], clinic.job_ids["done"]
    page = viewer.client.get(f"/studies/{uid}").text
    assert f'<img class="preview" src="/studies/{uid}/preview.png"' in page
    assert f'href="/jobs/{job}/preview.png"' in page
    assert viewer.client.get(f"/studies/{uid}/preview.png").headers["content-type"] == "image/png"

    (web.settings.outbox_dir / f"job-{job}" / "preview.png").unlink()  # the outbox lost it
    page = viewer.client.get(f"/studies/{uid}").text
    missing = f"job {job} (chest-seg): its preview is missing from the outbox"
    assert "<img" not in page and 'class="muted preview-missing"' in page and missing in page
    assert f'data-preview-missing="{job}"' in page and f'href="/jobs/{job}/preview.png"' not in page
    for url in (f"/studies/{uid}/preview.png", f"/api/v1/studies/{uid}/preview.png", f"/jobs/{job}/preview.png",
                f"/api/v1/jobs/{job}/preview.png"):
        answer = viewer.client.get(url)
        assert answer.status_code == 404 and missing in answer.text, url

    # retention removed the study's files: the reason says so
    purged = utc_now()
    with web.sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(purged_at=purged))
    page = viewer.client.get(f"/studies/{uid}").text
    assert f"its preview was removed with the study&#39;s files by retention on {purged:%Y-%m-%d %H:%M} UTC" in page
    assert "files removed by retention" in page and "<img" not in page
    assert "by retention" in viewer.client.get(f"/api/v1/jobs/{job}/preview.png").json()["detail"]

    # the worker could not draw one: its error, not a broken image
    other = clinic.job_ids["sending"]
    with web.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == other).values(
            summary=json.dumps({"kind": "segmentation", "preview": {"error": "preview not drawn: MemoryError"}})))
    page = viewer.client.get(f"/studies/{clinic.uids['sending']}").text
    assert "<img" not in page and "preview not drawn: MemoryError" in page
    assert f'data-preview-missing="{other}"' in page
