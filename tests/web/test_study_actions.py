"""Re-send and re-process from the study page and ``/api/v1``: roles, CSRF, refusals with reasons, audit.

The study is received through the node's ingest path; its job finishes as the worker finishes it
(``studies_fixtures``); re-processing evaluates the rules stored in the database, as the router does.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.app.cli import main
from dicom_node.db import audit, config_repo, jobs
from dicom_node.db.models import Delivery, DeliveryState, Job, JobState, Study
from dicom_node.destinations import DicomDestination
from dicom_node.routing import Rule
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.studies_fixtures import T0, complete_and_route, ingest, run_job, write_study

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def processed_without_destination(env: WebEnv, tmp_path: Path) -> tuple[str, str, int]:
    """A study processed before any destination existed: results in the outbox, no delivery."""
    files = write_study(tmp_path / "in", seed=4, patient_id="P-RS", patient_name="Resend^Rita", accession="A-RS",
                        study_date="20260320", description="CT CHEST")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    uid, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    ingest(env, files, calling_ae="PACS_H", at=T0)
    [job_id] = complete_and_route(env.sessions, uid, series, ["chest-seg"], at=T0 + timedelta(seconds=30))
    assert run_job(env.sessions, job_id, at=T0 + timedelta(minutes=1), stages={"inference": 3.0}, destinations=(),
                   results=[jobs.ResultSpec("SEG", SEG_CLASS, "2.25.71", "2.25.72", f"job-{job_id}/seg.dcm")]) == []
    return uid, series, job_id


def add_pacs(env: WebEnv) -> None:
    config_repo.upsert_destination(env.sessions, DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                                                  port=11112, default=True), source="test", now=T0)


def deliveries_of(env: WebEnv, job_id: int) -> dict[str, Delivery]:
    with env.sessions() as session:
        return {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))}


def test_resend_to_a_destination_added_later_over_the_api(web: WebEnv, operator: LoggedIn, viewer: LoggedIn,
                                                           tmp_path: Path) -> None:
    uid, _, job_id = processed_without_destination(web, tmp_path)

    refused = operator.send("POST", f"/api/v1/studies/{uid}/resend", json={})
    assert refused.status_code == 409
    assert f"job {job_id} (chest-seg): its rule names 'default' and no such destination exists" in refused.json()["detail"]

    add_pacs(web)
    assert viewer.send("POST", f"/api/v1/studies/{uid}/resend", json={}).status_code == 403
    assert operator.client.post(f"/api/v1/studies/{uid}/resend", json={}).status_code == 403  # no CSRF token
    answer = operator.send("POST", f"/api/v1/studies/{uid}/resend", json={})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["deliveries"] == [{"job_id": job_id, "pipeline": "chest-seg", "destination": "pacs",
                                   "delivery_id": body["deliveries"][0]["delivery_id"], "created": True}]
    pacs = deliveries_of(web, job_id)["pacs"]
    assert (pacs.state, pacs.attempts) == (DeliveryState.FAILED.value, 0)  # due: the next sweep sends it
    assert pacs.next_attempt_at is not None and pacs.id in jobs.due_deliveries(web.sessions, now=pacs.next_attempt_at)

    [entry] = audit.list_entries(web.sessions, action="study.resend")
    assert (entry.actor, entry.target) == ("operator", uid)
    assert entry.after["deliveries"][0]["destination"] == "pacs"

    unknown = operator.send("POST", f"/api/v1/studies/{uid}/resend", json={"destination": "nowhere"})
    assert unknown.status_code == 404 and "destination 'nowhere' does not exist (destinations: pacs)" in unknown.text
    assert operator.send("POST", "/api/v1/studies/1.2.3.999/resend", json={}).status_code == 404


def test_resend_from_the_study_page(web: WebEnv, operator: LoggedIn, viewer: LoggedIn, tmp_path: Path) -> None:
    uid, _, job_id = processed_without_destination(web, tmp_path)
    add_pacs(web)
    page = operator.client.get(f"/studies/{uid}")
    assert f'href="/studies/{uid}/resend"' in page.text and f'action="/studies/{uid}/reprocess"' in page.text
    assert "Re-send results" not in viewer.client.get(f"/studies/{uid}").text

    form = operator.client.get(f"/studies/{uid}/resend")
    assert form.status_code == 200 and "chest-seg" in form.text and "<td>pacs</td>" in form.text
    bad = operator.post(f"/studies/{uid}/resend", {"destination": "archive", "job_id": ""})
    assert bad.status_code == 404 and "destination &#39;archive&#39; does not exist" in bad.text

    done = operator.post(f"/studies/{uid}/resend", {"destination": "pacs", "job_id": str(job_id)})
    assert done.status_code == 303 and "notice=study.resend.done&id=1" in done.headers["location"]
    shown = operator.client.get(done.headers["location"])
    assert "Results will be sent again: 1 delivery(ies) are due now" in shown.text
    assert deliveries_of(web, job_id)["pacs"].state == DeliveryState.FAILED.value


def test_reprocess_over_the_api_runs_what_the_rules_ask_for_now(web: WebEnv, operator: LoggedIn,
                                                                 tmp_path: Path) -> None:
    uid, series, job_id = processed_without_destination(web, tmp_path)
    config_repo.upsert_rules(web.sessions, [Rule(name="everything-ct", pipelines=["chest-seg"])], source="test",
                             now=T0)

    answer = operator.send("POST", f"/api/v1/studies/{uid}/reprocess", json={})
    assert answer.status_code == 200, answer.text
    [rerun] = answer.json()["jobs"]
    assert (rerun["model"], rerun["series_instance_uid"], rerun["supersedes_job_id"]) == ("chest-seg", series, job_id)
    with web.sessions() as session:
        new = session.get(Job, rerun["job_id"])
        assert new is not None and (new.generation, new.state) == (2, JobState.FAILED.value)
    again = operator.send("POST", f"/api/v1/studies/{uid}/reprocess", json={"models": ["chest-seg"]})
    assert again.status_code == 200 and f"job {rerun['job_id']} is still failed" in again.json()["jobs"][0]["skipped"]
    other = operator.send("POST", f"/api/v1/studies/{uid}/reprocess", json={"models": ["lung-nodules"]})
    assert other.status_code == 409 and "the rules do not ask for lung-nodules now" in other.text
    assert [e.actor for e in audit.list_entries(web.sessions, action="study.reprocess")] == \
        ["operator", "operator"]

    page = operator.post(f"/studies/{uid}/reprocess")
    assert page.status_code == 303 and "notice=study.reprocess.done&id=0" in page.headers["location"]


def test_a_superseded_job_is_history_and_retry_says_what_to_do(web: WebEnv, operator: LoggedIn, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    uid, _, job_id = processed_without_destination(web, tmp_path)
    assert main(["jobs", "retry", str(job_id), "--data-dir", str(web.data_dir)]) == 1
    said = capsys.readouterr().err
    assert f"job {job_id} succeeded; nothing to retry" in said and f"dicom-node studies resend {uid}" in said

    config_repo.upsert_rules(web.sessions, [Rule(name="everything-ct", pipelines=["chest-seg"])], source="test",
                             now=T0)
    [rerun] = operator.send("POST", f"/api/v1/studies/{uid}/reprocess", json={}).json()["jobs"]
    assert rerun["supersedes_job_id"] == job_id
    jobs.requeue_jobs(web.sessions, now=T0)
    run_job(web.sessions, rerun["job_id"], at=T0 + timedelta(hours=1), stages={"inference": 2.0}, destinations=(),
            results=[jobs.ResultSpec("SEG", SEG_CLASS, "2.25.81", "2.25.82", "seg.dcm")])
    with web.sessions() as session:
        assert session.get(Job, job_id).superseded_at is not None  # type: ignore[union-attr]
    refused = operator.send("POST", f"/api/v1/jobs/{job_id}/retry")
    assert refused.status_code == 409 and "superseded by a later run of chest-seg" in refused.text
    assert main(["jobs", "retry", str(job_id), "--data-dir", str(web.data_dir)]) == 1
    assert f"dicom-node studies reprocess {uid}" in capsys.readouterr().err
    page = operator.client.get(f"/studies/{uid}")
    assert "Re-process requested" in page.text and "its results replace the earlier ones" in page.text
    assert 'class="badge superseded"' in page.text and "run 2</div>" in page.text
    api = {j["id"]: j for j in operator.client.get(f"/api/v1/studies/{uid}").json()["jobs"]}
    assert api[job_id]["superseded_at"] is not None and api[rerun["job_id"]]["supersedes_job_id"] == job_id
    assert (api[job_id]["generation"], api[rerun["job_id"]]["generation"]) == (1, 2)


def test_a_destination_added_later_gets_the_recent_results_it_never_had(
        web: WebEnv, operator: LoggedIn, viewer: LoggedIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uid, _, job_id = processed_without_destination(web, tmp_path)
    add_pacs(web)
    assert viewer.send("POST", "/api/v1/destinations/pacs/send-recent", json={"hours": 24}).status_code == 403
    assert operator.send("POST", "/api/v1/destinations/pacs/send-recent", json={"hours": 0}).status_code == 422
    assert operator.send("POST", "/api/v1/destinations/nowhere/send-recent", json={}).status_code == 404

    with web.sessions.begin() as session:  # the job finished two days ago (the web app's clock is the real one)
        session.get(Job, job_id).finished_at = datetime.now(timezone.utc) - timedelta(days=2)  # type: ignore[union-attr]
    page = operator.post("/destinations/pacs/send-recent", {"hours": "24"})
    assert page.status_code == 200 and "Nothing to send: no result of the last 24 hours that pacs did not have" in page.text
    answer = operator.send("POST", "/api/v1/destinations/pacs/send-recent", json={"hours": 72})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["jobs"] == [job_id] and len(body["deliveries"]) == 1
    assert deliveries_of(web, job_id)["pacs"].state == DeliveryState.FAILED.value
    # Asked again, nothing more: it has a delivery of that job now.
    assert operator.send("POST", "/api/v1/destinations/pacs/send-recent", json={"hours": 24 * 90}).json()["jobs"] == []
    assert main(["destinations", "send-recent", "pacs", "--hours", "2160", "--data-dir", str(web.data_dir)]) == 0
    assert "nothing to send" in capsys.readouterr().out
    [entry, *_] = audit.list_entries(web.sessions, action="destination.send_recent")
    assert entry.target == "pacs"
    assert uid


def test_nothing_of_a_purged_study_is_retried_or_resent(web: WebEnv, operator: LoggedIn, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    uid, _, job_id = processed_without_destination(web, tmp_path)
    add_pacs(web)
    [target] = operator.send("POST", f"/api/v1/studies/{uid}/resend", json={}).json()["deliveries"]
    with web.sessions.begin() as session:  # the delivery died; the job died on a second run; retention came by
        session.get(Delivery, target["delivery_id"]).state = DeliveryState.DEAD.value  # type: ignore[union-attr]
        session.get(Job, job_id).state = JobState.DEAD.value  # type: ignore[union-attr]
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.purged_at = T0 + timedelta(days=30)
    job_refused = operator.send("POST", f"/api/v1/jobs/{job_id}/retry")
    assert job_refused.status_code == 409 and "retention deleted its study's instances" in job_refused.text
    delivery_refused = operator.send("POST", f"/api/v1/deliveries/{target['delivery_id']}/retry")
    assert delivery_refused.status_code == 409 and "retention deleted its results" in delivery_refused.text
    assert main(["jobs", "retry-delivery", str(target["delivery_id"]), "--data-dir", str(web.data_dir)]) == 1
    assert "retention deleted its results" in capsys.readouterr().err
    resend = operator.send("POST", f"/api/v1/studies/{uid}/resend", json={})
    assert resend.status_code == 409 and "its results were deleted by retention" in resend.text
    reprocess = operator.send("POST", f"/api/v1/studies/{uid}/reprocess", json={})
    assert reprocess.status_code == 409 and "its instances were deleted by retention" in reprocess.text
