"""Jobs the worker's checks stopped: not applicable (the model was not made for the series) and held (its
result judged implausible). The study page shows the checks and reasons; operators release or discard held
results over the page, the API and the CLI (roles, CSRF, 409, audit, deliveries, outbox files); the study
list, dashboard, metrics and ``dicom-node studies`` count them; destinations carry ``not_performed``.

Studies are received through the node's ingest path and jobs finished with ``jobs.finish_job`` as the
worker finishes them (see ``studies_fixtures``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.app.cli import main
from dicom_node.db import audit, config_repo, job_views, jobs, monitoring
from dicom_node.destinations import DicomDestination
from dicom_node.model_domain import Applicability, Check
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.studies_fixtures import T0, complete_and_route, deliver, finish_checked, ingest, write_study

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
HELD_REASONS = ["lung volume 250 mL is outside 1000-9000 mL",
                "heart does not touch lung on both sides within 10 mm"]
DECLINED = ("body region: the image shows head, the model is made for chest "
            "(the header says chest; the image wins)")


# --------------------------------------------------------------------------- a study with held and declined jobs


def applies(model_id: str) -> dict[str, object]:
    return Applicability(
        model_id=model_id, applies=True, header_regions=("chest",), image_regions=("chest", "abdomen"),
        checks=(Check(name="modality", passed=True, detail="CT is CT"),
                Check(name="slices", passed=True, detail="4 within >= 4"),
                Check(name="body region", passed=True, detail="the image shows chest")),
        seconds=0.12).as_record()


def declined(model_id: str) -> dict[str, object]:
    return Applicability(
        model_id=model_id, applies=False, reason_code="body-region", reason=DECLINED, header_regions=("chest",),
        image_regions=("head",),
        checks=(Check(name="modality", passed=True, detail="CT is CT"),
                Check(name="orientation", passed=None, detail="unknown; model needs axial"),
                Check(name="body region", passed=False, detail=DECLINED.removeprefix("body region: "))),
        seconds=0.25).as_record()


def implausible(model_id: str) -> dict[str, object]:
    """The record of ``dicom_node.plausibility_rules.Plausibility.as_record()`` for a held result."""
    return {"model_id": model_id, "plausible": False, "reasons": HELD_REASONS, "seconds": 0.034, "checks": [
        {"name": "volume lung", "passed": False, "detail": "250 mL outside 1000-9000 mL"},
        {"name": "volume heart", "passed": True, "detail": "640 mL within 150-1500 mL"},
        {"name": "heart next to lung", "passed": False, "detail": "lung found on the left only"},
    ]}


@dataclass
class Ward:
    """One study: job ``held`` (results kept, a notice sent), ``held2`` (held, no notice) and ``declined``
    (not applicable, a notice delivery); the results' outbox paths by job."""

    uid: str
    held: int
    held2: int
    declined: int
    notice_delivery: int
    paths: dict[int, list[str]]


@pytest.fixture(scope="module")
def ward_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(tmp_path_factory.mktemp("held"), seed=41, patient_id="PAT-H", patient_name="Held^Hanna",
                       accession="ACC-H", study_date="20260320", description="CT chest")


def _results(env: WebEnv, job_id: int, kinds: tuple[str, ...]) -> list[jobs.ResultSpec]:
    """Result objects of ``kinds`` with a file each in the outbox, as the worker writes them."""
    specs = []
    for n, kind in enumerate(kinds):
        path = f"job-{job_id}/{kind.lower()}-2.25.{job_id}{n}.dcm"
        target = env.settings.outbox_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"DICM result " + kind.encode())
        specs.append(jobs.ResultSpec(kind, SEG_CLASS if kind == "SEG" else SR_CLASS, f"2.25.{job_id}{n}",
                                     f"2.25.{job_id}9", path))
    return specs


def make_ward(env: WebEnv, files: list[Path]) -> Ward:
    sessions = env.sessions
    config_repo.upsert_destination(sessions, DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                                              port=11112, default=True, not_performed="sr"),
                                   source="test", now=T0)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    uid, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    ingest(env, files, calling_ae="PACS_H", at=T0)
    held, held2, declined_job = complete_and_route(sessions, uid, series, ["chest-seg", "heart-seg", "lung-nodules"],
                                                   at=T0 + timedelta(seconds=30))
    paths: dict[int, list[str]] = {}
    at = T0 + timedelta(seconds=40)
    for job_id, model, noticed in ((held, "chest-seg", True), (held2, "heart-seg", False)):
        results = _results(env, job_id, ("SEG", "SR") + (("NOTICE",) if noticed else ()))
        paths[job_id] = [r.path for r in results]
        finish_checked(sessions, job_id, at=at, state="held",
                       checks={"applicability": applies(model), "plausibility": implausible(model)},
                       events=[("job_checked", f"job {job_id}: {model} applies (header: chest; image: chest; 0.12 s)"),
                               ("job_held", f"job {job_id} ({model}): results held, not sent: {'; '.join(HELD_REASONS)}")],
                       results=results, deliveries=[jobs.DeliverySpec("pacs", (jobs.NOTICE_KIND,))] if noticed else [],
                       summary={"kind": "segmentation", "volumes_ml": {"lung": 250.0}},
                       stages={"load": 0.5, "applicability": 0.12, "inference": 1.5, "plausibility": 0.034})
    notice = _results(env, declined_job, ("NOTICE",))
    paths[declined_job] = [r.path for r in notice]
    [notice_delivery] = finish_checked(
        sessions, declined_job, at=at, state="not_applicable", checks={"applicability": declined("lung-nodules")},
        events=[("job_checked", f"job {declined_job}: lung-nodules not applicable: {DECLINED} (header: chest; "
                                f"image: head; 0.25 s)"),
                ("job_not_applicable", f"job {declined_job}: lung-nodules not applicable: {DECLINED}")],
        results=notice, deliveries=[jobs.DeliverySpec("pacs", (jobs.NOTICE_KIND,))])
    deliver(sessions, notice_delivery, at=at + timedelta(seconds=5))
    return Ward(uid, held, held2, declined_job, notice_delivery, paths)


@pytest.fixture
def ward(web: WebEnv, ward_files: list[Path]) -> Ward:
    return make_ward(web, ward_files)


def _audit(env: WebEnv, action: str) -> list[audit.AuditView]:
    return audit.list_entries(env.sessions, action=action)


def _squash(html: str) -> str:
    return re.sub(r"\s+", " ", html)


# --------------------------------------------------------------------------- the study page and API


def test_study_page_shows_the_checks_and_reasons_of_held_and_declined_jobs(web: WebEnv, viewer: LoggedIn,
                                                                          ward: Ward) -> None:
    page = viewer.client.get(f"/studies/{ward.uid}")
    assert page.status_code == 200
    text = _squash(page.text)
    assert "Held - not sent" in text and text.count('class="badge held">Held - not sent') == 2
    for reason in HELD_REASONS:
        assert f"<li>{reason}</li>" in text, reason
    assert '<span class="badge not_applicable">Not applicable</span>' in text
    assert ("The series does not show the body region the model was made for: the image shows head, the model is "
            "made for chest (the header says chest; the image wins)") in text
    # the checks, each with its result and detail, and what each signal said about the body region
    assert "Before the model:" in text and "After the model:" in text and "checked in 120 ms" in text
    assert "Body region - header: chest · image: head" in text and "header: chest · image: chest, abdomen" in text
    assert re.search(r'data-check="body region"><td>body region</td><td><span class="badge check-failed">failed', text)
    assert re.search(r'data-check="orientation"><td>orientation</td><td><span class="badge check-unknown">unknown'
                     r'</span></td><td>unknown; model needs axial', text)
    assert re.search(r'data-check="volume heart"><td>volume heart</td><td><span class="badge check-passed">passed', text)
    assert "'not performed' notice" in text  # the notice-only delivery says so
    assert 'class="error">' not in text  # a declined model is an outcome, not an error
    assert "/release" not in text and "/discard" not in text  # a viewer gets no buttons
    timeline = _squash(viewer.client.get(f"/studies/{ward.uid}/live").text)
    assert f"Job {ward.held} · chest-seg: checked before the model" in timeline
    assert f"Job {ward.held} · chest-seg held: results not sent" in timeline
    assert f"Job {ward.declined} · lung-nodules not applicable" in timeline
    assert f"Delivery {ward.notice_delivery} to pacs (&#39;not performed&#39; notice) delivered" in timeline

    api = viewer.client.get(f"/api/v1/studies/{ward.uid}").json()
    by_id = {j["id"]: j for j in api["jobs"]}
    held = by_id[ward.held]
    assert held["state"] == "held" and held["outcome_reason"] == "; ".join(HELD_REASONS)
    assert held["checks"]["plausibility"]["reasons"] == HELD_REASONS
    assert held["checks"]["applicability"]["applies"] is True and held["deliveries"][0]["kinds"] == ["NOTICE"]
    declined_job = by_id[ward.declined]
    assert declined_job["checks"]["applicability"]["reason_code"] == "body-region"
    assert declined_job["outcome_reason"].startswith("The series does not show the body region")
    kinds = [(e["kind"], e["job_id"]) for e in api["timeline"]]
    assert ("job.checked", ward.held) in kinds and ("job.held", ward.held) in kinds
    assert ("job.not_applicable", ward.declined) in kinds
    assert not [k for k, _ in kinds if k.startswith("study.job_")]  # every job event is shown as the job's
    assert api["findings"] == []  # held results are no findings until they are released
    one = viewer.client.get(f"/api/v1/jobs/{ward.declined}").json()
    assert one["checks"]["applicability"]["image_regions"] == ["head"]
    listed = viewer.client.get("/api/v1/jobs", params={"state": "held"}).json()
    assert sorted(j["id"] for j in listed["items"]) == sorted([ward.held, ward.held2])


def test_study_list_filters_and_counts_held_as_needing_attention(web: WebEnv, viewer: LoggedIn, ward: Ward) -> None:
    def found(outcome: str) -> list[str]:
        answer = viewer.client.get("/api/v1/studies", params={"jobs": outcome})
        assert answer.status_code == 200, answer.text
        return [s["study_instance_uid"] for s in answer.json()["items"]]

    assert found("held") == [ward.uid] and found("done") == [] and found("failed") == []
    [item] = viewer.client.get("/api/v1/studies").json()["items"]
    assert item["job_counts"] == {"held": 2, "not_applicable": 1}
    listing = viewer.client.get("/studies").text
    assert '<span class="badge held">2 held</span>' in listing and "1 not applicable" in listing
    assert 'value="held" selected' in viewer.client.get("/studies", params={"status": "held"}).text
    counts = monitoring.study_counts(web.sessions, now=T0 + timedelta(hours=1), windows={"hour": timedelta(hours=1)})
    assert counts["hour"].held == 1 and counts["hour"].done == 0 and counts["hour"].received == 1

    # once both held jobs are released and everything arrived, not applicable counts as a normal outcome: done
    for job_id in (ward.held, ward.held2):
        assert jobs.release_job(web.sessions, job_id, now=T0 + timedelta(minutes=5), destinations=["pacs"],
                                delivery_max_attempts=2, by="test") is not None
    jobs.due_deliveries(web.sessions, now=T0 + timedelta(minutes=6))  # the node's sweep: due -> pending
    for job in job_views.list_jobs(web.sessions, study_instance_uid=ward.uid).items:
        for d in job.deliveries:
            if d.state != "delivered":
                deliver(web.sessions, d.id, at=T0 + timedelta(minutes=6))
    assert found("done") == [ward.uid] and found("held") == []
    counts = monitoring.study_counts(web.sessions, now=T0 + timedelta(hours=1), windows={"hour": timedelta(hours=1)})
    assert counts["hour"].done == 1 and counts["hour"].held == 0


def test_dashboard_and_metrics_count_the_new_states(web: WebEnv, viewer: LoggedIn, ward: Ward) -> None:
    dashboard = viewer.client.get("/api/v1/dashboard").json()
    held = [e for e in dashboard["errors"] if e["state"] == "held"]
    assert sorted(e["job_id"] for e in held) == sorted([ward.held, ward.held2])
    assert held[0]["error"] == "; ".join(HELD_REASONS) and "release or discard" in held[0]["what"]
    assert "held" in dashboard["studies"]["hour"]
    html = viewer.client.get("/dashboard/live").text
    assert 'data-count="held"' in html and "job held" in html

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(web.client().get("/metrics").text)
               for s in family.samples}
    assert samples[("dicom_node_jobs", (("pipeline", "chest-seg"), ("state", "held")))] == 1
    assert samples[("dicom_node_jobs", (("pipeline", "lung-nodules"), ("state", "not_applicable")))] == 1
    assert samples[("dicom_node_jobs", (("pipeline", "chest-seg"), ("state", "released")))] == 0
    # the checks' own stage times are measured too, for every job whose run ended
    assert samples[("dicom_node_job_stage_seconds_count", (("pipeline", "lung-nodules"), ("stage", "applicability")))] == 1
    assert samples[("dicom_node_job_stage_seconds_count", (("pipeline", "chest-seg"), ("stage", "plausibility")))] == 1


# --------------------------------------------------------------------------- release and discard: page


def test_release_and_discard_from_the_study_page(web: WebEnv, operator: LoggedIn, viewer: LoggedIn,
                                                 ward: Ward) -> None:
    page = _squash(operator.client.get(f"/studies/{ward.uid}").text)
    assert f'action="/jobs/{ward.held}/release"' in page and f'action="/jobs/{ward.held}/discard"' in page
    assert f'action="/jobs/{ward.declined}/release"' not in page  # only held jobs have the buttons

    assert operator.client.post(f"/jobs/{ward.held}/release").status_code == 403  # no CSRF token
    assert viewer.post(f"/jobs/{ward.held}/release").status_code == 403  # viewers cannot act
    assert viewer.post(f"/jobs/{ward.held}/discard").status_code == 403
    assert operator.client.get(f"/api/v1/jobs/{ward.held}").json()["state"] == "held"

    released = operator.post(f"/jobs/{ward.held}/release")
    assert released.status_code == 303
    assert released.headers["location"].startswith(f"/studies/{ward.uid}?notice=job.release.done")
    shown = operator.client.get(released.headers["location"]).text
    assert f"Job {ward.held}: its held results were released" in shown and "(it was held)" in shown
    job = operator.client.get(f"/api/v1/jobs/{ward.held}").json()
    assert job["state"] == "released"
    [delivery] = job["deliveries"]  # the notice's delivery now carries the results too, due now
    assert (delivery["destination"], delivery["kinds"], delivery["state"], delivery["attempts"]) == \
        ("pacs", None, "failed", 0)
    assert delivery["id"] in jobs.due_deliveries(web.sessions, now=T0 + timedelta(days=365 * 5))
    [entry] = _audit(web, "job.release")
    assert entry.actor == "operator" and entry.target == str(ward.held)
    assert entry.before["state"] == "held" and entry.before["reasons"] == "; ".join(HELD_REASONS)
    assert entry.after["state"] == "released" and entry.after["destinations"] == ["pacs"]
    assert entry.after["deliveries"] == [delivery["id"]] and "released to pacs" in entry.detail
    live = _squash(operator.client.get(f"/studies/{ward.uid}/live").text)
    assert f"Job {ward.held} · chest-seg: held results released" in live and "released by operator" in live
    assert f"Job {ward.held} · chest-seg held: results not sent" in live  # how its run ended stays visible

    again = operator.post(f"/jobs/{ward.held}/discard")  # released: no longer held
    assert again.status_code == 303 and "notice=job.discard.refused" in again.headers["location"]
    assert "was not discarded: it is released" in operator.client.get(again.headers["location"]).text
    assert _audit(web, "job.discard") == []

    discarded = operator.post(f"/jobs/{ward.held2}/discard")
    assert discarded.status_code == 303 and "notice=job.discard.done" in discarded.headers["location"]
    assert "nothing will be sent" in operator.client.get(discarded.headers["location"]).text
    assert operator.client.get(f"/api/v1/jobs/{ward.held2}").json()["state"] == "discarded"
    assert not any((web.settings.outbox_dir / p).exists() for p in ward.paths[ward.held2])
    [entry] = _audit(web, "job.discard")
    assert entry.before["results"] == ["SEG", "SR"] and entry.after["results"] == []
    assert operator.post("/jobs/424242/release").status_code == 404


# --------------------------------------------------------------------------- release and discard: API


def test_release_and_discard_over_the_api(web: WebEnv, ward: Ward) -> None:
    client = web.client()
    operator = {"Authorization": f"Bearer {web.token('operator')}"}
    viewer = {"Authorization": f"Bearer {web.token('viewer')}"}
    for action in ("release", "discard"):
        refused = client.post(f"/api/v1/jobs/{ward.held}/{action}", headers=viewer)
        assert refused.status_code == 403 and "operator role" in refused.json()["detail"]
    not_held = client.post(f"/api/v1/jobs/{ward.declined}/release", headers=operator)
    assert not_held.status_code == 409
    assert not_held.json()["detail"] == f"job {ward.declined} is not_applicable; only held jobs can be released"
    assert client.post("/api/v1/jobs/424242/discard", headers=operator).status_code == 404

    discard = client.post(f"/api/v1/jobs/{ward.held}/discard", headers=operator)
    assert discard.status_code == 200, discard.text
    assert discard.json() == {"kind": "job", "id": ward.held, "action": "discard", "before": "held",
                              "after": "discarded", "message": f"job {ward.held}: held results discarded, nothing "
                                                               "will be sent (it was held)"}
    seg, sr, notice = (web.settings.outbox_dir / p for p in ward.paths[ward.held])
    assert not seg.exists() and not sr.exists() and notice.is_file()  # the notice already said AI declined
    assert [r.kind for r in jobs.results_of_job(web.sessions, ward.held)] == ["NOTICE"]
    twice = client.post(f"/api/v1/jobs/{ward.held}/discard", headers=operator)
    assert twice.status_code == 409 and "is discarded" in twice.json()["detail"]
    assert client.post(f"/api/v1/jobs/{ward.held}/release", headers=operator).status_code == 409

    release = client.post(f"/api/v1/jobs/{ward.held2}/release", headers=operator)
    assert release.status_code == 200 and release.json()["after"] == "released"
    assert "released to pacs" in release.json()["message"]
    [delivery] = client.get(f"/api/v1/jobs/{ward.held2}", headers=operator).json()["deliveries"]
    assert delivery["kinds"] is None and delivery["state"] == "failed" and delivery["attempts"] == 0
    entries = {e.action: e for e in audit.list_entries(web.sessions) if e.action.startswith("job.")}
    assert set(entries) == {"job.release", "job.discard"}
    assert all(e.detail.endswith("(API token)") and e.actor == "operator" for e in entries.values())
    timeline = [e["kind"] for e in client.get(f"/api/v1/studies/{ward.uid}", headers=operator).json()["timeline"]]
    assert "job.discarded" in timeline and "job.released" in timeline


# --------------------------------------------------------------------------- CLI


def test_cli_lists_reasons_and_releases_and_discards_held_jobs(web: WebEnv, ward: Ward, capsys) -> None:  # type: ignore[no-untyped-def]
    data = ["--data-dir", str(web.data_dir)]
    assert main(["jobs", "list", *data]) == 0
    listing = capsys.readouterr().out
    assert f"HELD, not sent: {'; '.join(HELD_REASONS)}" in listing
    assert f"dicom-node jobs release {ward.held}" in listing
    assert "not applicable: The series does not show the body region the model was made for" in listing
    assert main(["jobs", "list", "--json", "--state", "held", *data]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["id"] for r in rows) == sorted([ward.held, ward.held2])
    assert rows[0]["checks"]["plausibility"]["reasons"] == HELD_REASONS
    assert main(["studies", *data]) == 0
    studies = capsys.readouterr().out
    assert "2 HELD, 1 not applicable" in studies and "1 study(ies) have results HELD" in studies

    assert main(["jobs", "release", str(ward.held), *data]) == 0
    assert f"job {ward.held}: held results released to pacs" in capsys.readouterr().out
    assert main(["jobs", "discard", str(ward.held2), *data]) == 0
    assert "held results discarded (SEG, SR)" in capsys.readouterr().out
    assert not any((web.settings.outbox_dir / p).exists() for p in ward.paths[ward.held2])
    assert main(["jobs", "release", str(ward.held2), *data]) == 1
    assert f"job {ward.held2} is discarded; only held jobs can be released" in capsys.readouterr().err
    assert main(["jobs", "discard", "424242", *data]) == 1
    assert "does not exist" in capsys.readouterr().err

    [release] = _audit(web, "job.release")
    [discard] = _audit(web, "job.discard")
    assert (release.actor, release.target, release.after["destinations"]) == ("cli", str(ward.held), ["pacs"])
    assert (discard.actor, discard.before["results"], discard.after["state"]) == ("cli", ["SEG", "SR"], "discarded")
    assert job_views.get_job(web.sessions, ward.held).state == "released"  # type: ignore[union-attr]
    assert main(["jobs", "list", "--state", "released", *data]) == 0
    assert "released by an operator; it had been held for: lung volume" in capsys.readouterr().out


# --------------------------------------------------------------------------- destinations: not_performed


def test_destination_form_and_api_round_trip_not_performed(web: WebEnv, admin: LoggedIn) -> None:
    form = {"type": "dicom", "name": "pacs2", "ae_title": "PACS2", "host": "pacs.example", "port": "104",
            "outputs": ["SEG", "SR"], "not_performed": "sr"}
    assert admin.post("/destinations", form).status_code == 303
    assert config_repo.get_destination(web.sessions, "pacs2").not_performed == "sr"  # type: ignore[union-attr]
    shown = _squash(admin.client.get("/destinations/pacs2").text)
    assert '<option value="sr" selected>' in shown and "AI was not performed and why" in shown
    listing = admin.client.get("/destinations").text
    assert 'data-not-performed="sr"' in listing

    assert admin.post("/destinations/pacs2", {**form, "not_performed": "none"}).status_code == 303
    assert config_repo.get_destination(web.sessions, "pacs2").not_performed == "none"  # type: ignore[union-attr]
    bad = admin.post("/destinations/pacs2", {**form, "not_performed": "email"})
    assert bad.status_code == 422 and 'id="not_performed-error"' in bad.text
    blank = admin.client.get("/destinations/new", params={"type": "dicom"}).text
    assert '<option value="none" selected>' in _squash(blank)

    headers = {"Authorization": f"Bearer {web.token('admin')}"}
    client = web.client()
    answer = client.put("/api/v1/destinations/pacs2", headers=headers,
                        json={"type": "dicom", "name": "pacs2", "ae_title": "PACS2", "host": "pacs.example",
                              "port": 104, "not_performed": "sr"})
    assert answer.status_code == 200, answer.text
    assert client.get("/api/v1/destinations/pacs2", headers=headers).json()["not_performed"] == "sr"
    refused = client.put("/api/v1/destinations/pacs2", headers=headers,
                         json={"type": "dicom", "name": "pacs2", "ae_title": "PACS2", "host": "pacs.example",
                               "port": 104, "not_performed": "fax"})
    assert refused.status_code == 422
