"""One study's record for an incident report: ``GET /api/v1/studies/{uid}/record`` and ``dicom-node studies
export``, on studies received through the node's ingest path with real jobs, deliveries and audited actions."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.db.models import AuditEntry
from dicom_node.db.study_record import FORMAT
from dicom_node.housekeeping_cli import export
from dicom_node.retention import Retention, RetentionPolicy, disk_usage
from dicom_node.web.urls import api_study_path
from tests.db.retention_scenario import NOW, build
from tests.web.conftest import LoggedIn, WebEnv


def _exports(web: WebEnv) -> list[AuditEntry]:
    with web.sessions() as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action == "study.export")
                                    .order_by(AuditEntry.id)))


def _record(admin: LoggedIn, uid: str) -> dict[str, Any]:
    answer = admin.client.get(api_study_path(uid, "/record"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["content-disposition"] == f'attachment; filename="study-record-{uid}.json"'
    record: dict[str, Any] = answer.json()
    return record


def test_the_record_holds_the_studys_timeline_jobs_deliveries_and_audit(web: WebEnv, admin: LoggedIn,
                                                                        operator: LoggedIn, tmp_path: Path) -> None:
    scenario = build(web, tmp_path / "studies", only=("done", "dead", "retrying"))  # type: ignore[arg-type]
    dead_job = scenario.jobs["dead"][0]
    other_delivery = scenario.deliveries["retrying"][0]
    assert operator.send("POST", f"/api/v1/jobs/{dead_job}/retry").status_code == 200
    assert operator.send("POST", f"/api/v1/deliveries/{other_delivery}/retry").status_code == 200

    record = _record(admin, scenario.uids["done"])
    assert record["format"] == FORMAT == "dicom-node.study-record/1"
    assert record["exported_by"] == "admin"
    study = record["study"]
    assert (study["study_instance_uid"], study["patient_id"], study["state"], study["purged_at"]) == (
        scenario.uids["done"], "P-done", "routed", None)
    assert [(s["series_instance_uid"], s["instance_count"]) for s in record["series"]] == [(scenario.series["done"], 4)]
    assert study["status"]["state"] == "done"  # the shown state, as the study page says it
    assert [(a["calling_ae_title"], a["outcome"], a["instances_stored"]) for a in record["associations"]] == [
        ("PACS_A", "released", 4)]
    kinds = [entry["kind"] for entry in record["timeline"]]
    for kind in ("received", "study.complete", "study.routed", "job.queued", "job.started", "job.succeeded",
                 "delivery.created", "delivery.delivered"):
        assert kind in kinds
    [job] = record["jobs"]
    assert (job["id"], job["pipeline"], job["state"], job["generation"], job["supersedes_job_id"]) == (
        scenario.jobs["done"][0], "seg", "succeeded", 1, None)
    assert job["stage_seconds"] == {"load": 0.5, "inference": 2.0}
    assert [(r["kind"], r["path"]) for r in job["results"]] == [("SEG", scenario.outbox["done"][0])]
    assert job["results"][0]["sop_instance_uid"].startswith("2.25.")
    assert job["delivery_ids"] == scenario.deliveries["done"]
    [delivery] = record["deliveries"]
    assert (delivery["id"], delivery["destination"], delivery["state"], delivery["attempts"]) == (
        scenario.deliveries["done"][0], "pacs", "delivered", 1)
    assert delivery["delivered_at"] is not None and delivery["error"] is None
    assert record["audit"] == []  # nobody acted on this study: the other studies' entries are not its own

    dead = _record(admin, scenario.uids["dead"])
    [dead_job_record] = dead["jobs"]
    assert dead_job_record["state"] == "failed" and dead_job_record["attempts"] == 0  # due for its retry
    actions = [(e["actor"], e["action"], e["target_kind"], e["target"]) for e in dead["audit"]]
    assert ("operator", "job.retry", "job", str(dead_job)) in actions
    assert ("admin", "study.export", "study", scenario.uids["done"]) not in actions
    assert not any(e["target_kind"] == "delivery" for e in dead["audit"])  # the other study's delivery.retry
    retrying = _record(admin, scenario.uids["retrying"])
    assert [(e["action"], e["target"]) for e in retrying["audit"]] == [("delivery.retry", str(other_delivery))]
    assert retrying["deliveries"][0]["state"] == "failed" and retrying["deliveries"][0]["attempts"] == 0
    assert retrying["study"]["status"]["state"] == "in_progress" and "pacs" in retrying["study"]["status"]["reason"]

    exported = _exports(web)
    assert [(e.actor, e.target, e.target_kind) for e in exported] == [
        ("admin", scenario.uids[name], "study") for name in ("done", "dead", "retrying")]
    assert exported[0].remote_addr == "testclient" and FORMAT in (exported[0].detail or "")
    again = _record(admin, scenario.uids["done"])  # an earlier export is part of the study's record
    assert [(e["actor"], e["action"]) for e in again["audit"]] == [("admin", "study.export")]


def test_only_admins_export_and_an_unknown_study_is_404_unaudited(web: WebEnv, admin: LoggedIn, viewer: LoggedIn,
                                                                  operator: LoggedIn, tmp_path: Path) -> None:
    scenario = build(web, tmp_path / "studies", only=("done",))  # type: ignore[arg-type]
    url = api_study_path(scenario.uids["done"], "/record")
    assert viewer.client.get(url).status_code == 403
    assert operator.client.get(url).status_code == 403
    token = web.token("admin")
    assert web.client().get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert admin.client.get(api_study_path("1.2.3.404", "/record")).status_code == 404
    assert [(e.actor, e.detail) for e in _exports(web)] == [("admin", f"record ({FORMAT}) over the API (API token)")]


def test_cli_export_writes_the_same_record_and_is_audited(web: WebEnv, admin: LoggedIn, tmp_path: Path) -> None:
    scenario = build(web, tmp_path / "studies", only=("done", "held"))  # type: ignore[arg-type]
    uid = scenario.uids["done"]
    output = tmp_path / "incident" / "record.json"
    output.parent.mkdir()
    out = io.StringIO()
    assert export(web.sessions, uid, output=output, clock=lambda: NOW, out=out) == 0
    assert f"record written to {output} (1 job(s), 1 delivery(ies), 0 audit entry(ies))" in out.getvalue()
    from_cli = json.loads(output.read_text(encoding="utf-8"))
    assert (from_cli["exported_at"], from_cli["exported_by"]) == (NOW.isoformat(), "cli")
    from_api = _record(admin, uid)
    for part in ("format", "study", "series", "associations", "events", "jobs", "deliveries"):
        assert from_cli[part] == from_api[part], part
    assert [(e["actor"], e["action"]) for e in from_api["audit"]] == [("cli", "study.export")]
    assert list(output.parent.iterdir()) == [output]  # no temporary file left

    assert export(web.sessions, "1.2.3.404", output=tmp_path / "none.json", clock=lambda: NOW, out=out) == 1
    assert not (tmp_path / "none.json").exists()
    assert export(web.sessions, uid, output=tmp_path / "missing-folder" / "r.json", clock=lambda: NOW, out=out) == 1
    stdout = io.StringIO()
    assert export(web.sessions, uid, clock=lambda: NOW, out=stdout) == 0
    assert json.loads(stdout.getvalue())["study"]["study_instance_uid"] == uid
    exported = [(e.actor, e.detail) for e in _exports(web)]
    assert [actor for actor, _ in exported] == ["cli", "admin", "cli"]  # a failed write leaves no entry
    assert f"to {output}; os user " in (exported[0][1] or "") and "to standard output" in (exported[2][1] or "")


def test_a_purged_studys_record_says_so(web: WebEnv, admin: LoggedIn, tmp_path: Path) -> None:
    scenario = build(web, tmp_path / "studies", only=("done",))  # type: ignore[arg-type]
    retention = Retention(web.sessions, spool_dir=web.settings.spool_dir, outbox_dir=web.settings.outbox_dir,
                          policy=RetentionPolicy(keep_days=30), clock=lambda: NOW, read_disk=disk_usage, fsync=False)
    assert len(retention.run(actor="cli").purged) == 1
    record = _record(admin, scenario.uids["done"])
    assert record["study"]["purged_at"] == NOW.isoformat()
    assert record["series"][0]["instance_count"] == 4  # what was received stays in the record
    purged = [e for e in record["timeline"] if e["kind"] == "study.purged"]
    assert len(purged) == 1 and "4 instance(s) and 3 result/preview file(s) deleted" in purged[0]["detail"]
    assert [(e["actor"], e["action"]) for e in record["audit"]] == [("cli", "study.purge")]
    assert record["jobs"][0]["results"][0]["sop_instance_uid"]  # the UIDs of the results stay known
