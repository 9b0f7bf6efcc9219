"""Destinations in the web UI and the API: CRUD, secrets that never leave the server, delivery statistics,
and "Test connection" against real peers (DCMTK storescp, Orthanc with its DICOMweb plugin, a closed port)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from dicom_node.db import config_repo, jobs, repo
from dicom_node.destinations import BasicAuth, BearerAuth, DicomDestination, DicomWebDestination
from dicom_node.routing import evaluate
from dicom_node.study_facts import study_facts
from tests.integration.peers import Orthanc, free_port, peer_env, wait_for
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.test_rules import T0, api, audit_entries, ingest, page, rule_form, squash
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

SECRET = "s3cret-Pa55word"
TOKEN = "tok-4f9a2b-SECRET"
PACS = {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "default": True,
        "outputs": ["SEG", "SR"]}
ARCHIVE = {"type": "dicomweb", "name": "archive", "url": "https://archive.example/dicom-web",
           "auth": {"type": "basic", "username": "node", "password": SECRET}}


def all_audit_text(web: WebEnv) -> str:
    with web.sessions() as session:
        rows = session.execute(text("SELECT before, after, detail FROM audit_log")).all()
    return " ".join(str(v) for row in rows for v in row)


def destination_form(**fields: str | list[str] | None) -> dict[str, str | list[str]]:
    data: dict[str, str | list[str] | None] = {"type": "dicomweb", "name": "archive", "url": ARCHIVE["url"],
                                               "auth-type": "basic", "auth-username": "node", "auth-password": SECRET,
                                               "verify_tls": "on", "outputs": ["SEG", "SR", "GSPS"],
                                               "timeout_seconds": "30"}
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


# --------------------------------------------------------------------------- API and secrets


def test_api_crud_never_returns_a_secret(web: WebEnv) -> None:
    client, headers = web.client(), api(web)
    created = client.post("/api/v1/destinations", json=ARCHIVE, headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["auth"] == {"type": "basic", "username": "node", "password": "**********"}
    assert client.post("/api/v1/destinations", json=ARCHIVE, headers=headers).status_code == 409
    assert client.post("/api/v1/destinations", json=PACS, headers=headers).status_code == 201
    listed = client.get("/api/v1/destinations", headers=headers)
    assert [d["name"] for d in listed.json()] == ["archive", "pacs"] and SECRET not in listed.text
    assert SECRET not in client.get("/api/v1/destinations/archive", headers=headers).text

    # the masked value, or no password at all, keeps the stored one
    for auth in ({"type": "basic", "username": "node2", "password": "**********"},
                 {"type": "basic", "username": "node3"}):
        kept = client.put("/api/v1/destinations/archive", json={**ARCHIVE, "auth": auth}, headers=headers)
        assert kept.status_code == 200 and SECRET not in kept.text
        stored = config_repo.get_destination(web.sessions, "archive")
        assert isinstance(stored, DicomWebDestination) and isinstance(stored.auth, BasicAuth)
        assert stored.auth.password.get_secret_value() == SECRET and stored.auth.username == auth["username"]
    client.put("/api/v1/destinations/archive", json={**ARCHIVE, "auth": {"type": "bearer", "token": TOKEN}},
               headers=headers)
    stored = config_repo.get_destination(web.sessions, "archive")
    assert isinstance(stored, DicomWebDestination) and isinstance(stored.auth, BearerAuth)
    assert stored.auth.token.get_secret_value() == TOKEN

    renamed = client.put("/api/v1/destinations/archive", json={**ARCHIVE, "name": "other"}, headers=headers)
    assert renamed.status_code == 422 and renamed.json()["errors"][0]["field"] == "name"
    assert client.put("/api/v1/destinations/nope", json=PACS, headers=headers).status_code == 404
    assert client.delete("/api/v1/destinations/archive", headers=headers).status_code == 204
    assert client.get("/api/v1/destinations/archive", headers=headers).status_code == 404

    actions = [e.action for e in audit_entries(web, "destination.")]
    assert actions == ["destination.delete"] + ["destination.update"] * 3 + ["destination.create"] * 2
    update = audit_entries(web, "destination.update")[0]
    assert update.before["auth"]["type"] == "basic" and update.after["auth"] == {"type": "bearer", "token": "**********"}
    audit_text = all_audit_text(web)
    assert SECRET not in audit_text and TOKEN not in audit_text and "**********" in audit_text


def test_api_validation_errors_name_the_field(web: WebEnv) -> None:
    client, headers = web.client(), api(web)
    answer = client.post("/api/v1/destinations", json={**PACS, "port": 70000, "ae_title": "WAY_TOO_LONG_AE_TITLE",
                                                       "outputs": []}, headers=headers)
    assert answer.status_code == 422
    errors = {e["field"]: e["message"] for e in answer.json()["errors"]}
    assert errors["port"] == "Input should be less than or equal to 65535 (got 70000)"
    assert "WAY_TOO_LONG_AE_TITLE" in errors["ae_title"]
    assert errors["outputs"].startswith("outputs is empty")
    web_errors = client.post("/api/v1/destinations", json={**ARCHIVE, "url": "ftp://x", "auth": {"type": "basic",
                             "username": "a:b", "password": "p"}}, headers=headers).json()["errors"]
    assert {e["field"] for e in web_errors} == {"url", "auth.username"}
    untyped = client.post("/api/v1/destinations", json={"name": "x"}, headers=headers).json()["errors"]
    assert untyped == [{"field": "type", "message": "type must be one of dicom, dicomweb, hl7, fhir (got None)"}]
    odd_auth = client.post("/api/v1/destinations", json={**ARCHIVE, "auth": {"type": "kerberos"}},
                           headers=headers).json()["errors"]
    assert odd_auth[0]["field"] == "auth.type" and "'kerberos'" in odd_auth[0]["message"]
    assert config_repo.list_destinations(web.sessions) == []


def test_roles(web: WebEnv, viewer: LoggedIn, operator: LoggedIn) -> None:
    config_repo.create_destination(web.sessions, DicomDestination.model_validate(PACS), source="test", now=T0)
    for client in (viewer, operator):
        assert client.client.get("/destinations").status_code == 200
        shown = page(client.client.get("/destinations/pacs").text)
        assert "save-destination" not in shown and "delete-destination" not in shown
        assert client.client.get("/destinations/new").status_code == 403
        assert client.post("/destinations", destination_form()).status_code == 403
        assert client.post("/destinations/pacs", destination_form(name="pacs")).status_code == 403
        assert client.post("/destinations/pacs/delete").status_code == 403
    assert "test-connection" not in page(viewer.client.get("/destinations/pacs").text)
    assert "test-connection" in page(operator.client.get("/destinations/pacs").text)
    assert viewer.post("/destinations/pacs/test").status_code == 403
    token = api(web, "viewer")
    client = web.client()
    assert client.post("/api/v1/destinations/pacs/test", headers=token).status_code == 403
    assert client.post("/api/v1/destinations", json=ARCHIVE, headers=token).status_code == 403
    assert client.put("/api/v1/destinations/pacs", json=PACS, headers=token).status_code == 403
    assert client.delete("/api/v1/destinations/pacs", headers=token).status_code == 403
    assert client.delete("/api/v1/destinations/pacs", headers=api(web, "operator")).status_code == 403
    assert config_repo.get_destination(web.sessions, "pacs") is not None and audit_entries(web, "destination.") == []


# --------------------------------------------------------------------------- forms


def test_form_keeps_secrets_on_the_server(web: WebEnv, admin: LoggedIn) -> None:
    created = admin.post("/destinations", destination_form())
    assert created.status_code == 303 and created.headers["location"] == "/destinations?done=created&destination=archive"
    listing = admin.client.get(created.headers["location"])
    assert "Destination archive created." in listing.text and SECRET not in listing.text
    edit = admin.client.get("/destinations/archive")
    assert SECRET not in edit.text
    ids = page(edit.text)
    assert ids["auth-password"].attrs["value"] == "" and ids["auth-password"].attrs["placeholder"] == "(unchanged)"
    assert "(unchanged)" in ids["auth-password-help"].text and ids["auth-username"].attrs["value"] == "node"

    kept = admin.post("/destinations/archive", destination_form(**{"auth-password": "", "auth-username": "node2",
                                                                   "outputs": ["SR"]}))
    assert kept.status_code == 303
    stored = config_repo.get_destination(web.sessions, "archive")
    assert isinstance(stored, DicomWebDestination) and isinstance(stored.auth, BasicAuth)
    assert stored.auth.password.get_secret_value() == SECRET and stored.auth.username == "node2"
    assert stored.outputs == frozenset({"SR"})

    # an invalid save shows the errors, keeps what was typed, and still echoes no secret
    bad = admin.post("/destinations/archive", destination_form(url="not a url", **{"auth-password": "new-secret"}))
    assert bad.status_code == 422 and "new-secret" not in bad.text and SECRET not in bad.text
    ids = page(bad.text)
    assert "must be an http:// or https:// URL" in ids["url-error"].text and "invalid" in ids["url"].classes
    assert ids["url"].attrs["value"] == "not a url"
    assert SECRET not in all_audit_text(web)


def test_dicom_form_errors_are_placed_at_their_inputs(web: WebEnv, admin: LoggedIn) -> None:
    answer = admin.post("/destinations", {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "bad host!",
                                          "port": "abc", "outputs": ["SEG"], "tls": "on",
                                          "tls-certificate": "/etc/node.pem"})
    assert answer.status_code == 422
    ids = page(answer.text)
    assert squash(ids["port-error"].text) == "Input should be a valid integer, unable to parse string as an integer (got 'abc')"
    assert "host 'bad host!' is not a host name or IP address" in ids["host-error"].text
    assert "tls.private_key is not" in ids["tls-error"].text
    assert ids["host"].attrs["value"] == "bad host!" and "checked" in ids["tls"].attrs
    ok = admin.post("/destinations", {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "pacs.example",
                                      "port": "104", "outputs": ["SEG", "GSPS"], "default": "on", "max_pdu": "0"})
    assert ok.status_code == 303
    assert config_repo.get_destination(web.sessions, "pacs") == DicomDestination(
        name="pacs", ae_title="PACS", host="pacs.example", port=104, outputs=frozenset({"SEG", "GSPS"}), default=True,
        max_pdu=0)
    taken = admin.post("/destinations", {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "h", "port": "1",
                                         "outputs": ["SEG"]})
    assert taken.status_code == 409 and "already exists" in page(taken.text)["name-error"].text


def test_delete_is_refused_while_a_rule_sends_there(web: WebEnv, admin: LoggedIn) -> None:
    admin.send("POST", "/api/v1/destinations", json=PACS)
    assert admin.post("/rules", rule_form(**{"destinations-mode": "named", "destinations": ["pacs"]})).status_code == 303
    refused = admin.send("DELETE", "/api/v1/destinations/pacs")
    assert refused.status_code == 409 and "routing rule(s) chest" in refused.json()["detail"]
    assert admin.post("/destinations/pacs/delete").status_code == 409
    assert "disabled" in page(admin.client.get("/destinations/pacs").text)["delete-destination"].attrs
    admin.send("DELETE", "/api/v1/rules/chest")
    assert admin.post("/destinations/pacs/delete").status_code == 303
    assert config_repo.get_destination(web.sessions, "pacs") is None
    [deleted] = audit_entries(web, "destination.delete")
    assert deleted.before["host"] == "127.0.0.1" and deleted.after is None


def test_hostile_values_are_stored_verbatim_and_shown_escaped(web: WebEnv, admin: LoggedIn) -> None:
    username = "<script>alert(1)</script>'; DROP TABLE destinations; --"
    assert admin.post("/destinations", destination_form(**{"auth-username": username})).status_code == 303
    stored = config_repo.get_destination(web.sessions, "archive")
    assert isinstance(stored, DicomWebDestination) and stored.auth.username == username  # type: ignore[union-attr]
    shown = admin.client.get("/destinations/archive").text
    assert "<script>alert(1)" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    assert page(shown)["auth-username"].attrs["value"] == username
    bad_name = admin.post("/destinations", destination_form(name="<img src=x>"))
    assert bad_name.status_code == 422 and "<img src=x>" not in bad_name.text


# --------------------------------------------------------------------------- delivery statistics


def test_list_shows_delivery_statistics_from_the_deliveries_table(
    web: WebEnv, admin: LoggedIn, tmp_path: Path
) -> None:
    admin.send("POST", "/api/v1/destinations", json=PACS)
    admin.send("POST", "/api/v1/destinations", json={**ARCHIVE, "name": "quiet"})
    series = generate_ct_series(tmp_path / "ct", geometry=SeriesGeometry(rows=16, columns=16, slices=4), seed=5)
    ingest(web, series.paths)
    repo.complete_due_studies(web.sessions, now=T0 + timedelta(hours=1), quiet_seconds=1, max_wait_seconds=60)
    study_id = config_repo.study_id_for_uid(web.sessions, series.study_uid)
    assert study_id is not None
    facts = study_facts(web.sessions, web.settings.spool_dir, study_id)
    rule = admin.send("POST", "/api/v1/rules", json={"name": "all", "pipelines": ["chest-ct-segmentation",
                                                                                 "lung-nodule-detection"],
                                                     "series": {"prefer": "all"}, "destinations": ["pacs"]})
    assert rule.status_code == 201
    decision = evaluate(config_repo.list_rules(web.sessions), facts)
    job_ids = jobs.record_routing(web.sessions, study_id, decision, now=T0, max_attempts=3)
    assert len(job_ids) == 2
    delivery_ids = []
    for job_id in job_ids:
        assert jobs.claim_job(web.sessions, job_id, worker="w", now=T0, lease_seconds=60) is not None
        delivery_ids += jobs.finish_job(web.sessions, job_id, now=T0, stage_seconds={}, summary={}, results=[],
                                        destinations=["pacs"], delivery_max_attempts=1)
    delivered_at = T0 + timedelta(minutes=5)
    jobs.claim_delivery(web.sessions, delivery_ids[0], now=delivered_at, lease_seconds=60)
    jobs.finish_delivery(web.sessions, delivery_ids[0], now=delivered_at, objects_sent=2)
    jobs.claim_delivery(web.sessions, delivery_ids[1], now=delivered_at, lease_seconds=60)
    jobs.fail_delivery(web.sessions, delivery_ids[1], now=delivered_at + timedelta(seconds=1),
                       error="association rejected: <called AE title not recognised>", retryable=False,
                       backoff_initial_seconds=1, backoff_max_seconds=1)

    stats = config_repo.destination_delivery_stats(web.sessions)
    assert stats["pacs"].counts == {"delivered": 1, "dead": 1} and stats["pacs"].last_delivered_at == delivered_at
    assert "quiet" not in stats
    listing = admin.client.get("/destinations")
    row = next(e for e in page(listing.text).values() if e.attrs.get("data-destination") == "pacs")
    cells = squash(row.text)
    assert "PACS@127.0.0.1:11112" in cells and "default" in cells and "SEG, SR" in cells
    assert "2026-03-02 09:05:00" in cells and "association rejected: <called AE title not recognised>" in cells
    assert "&lt;called AE title" in listing.text
    detail = page(admin.client.get("/destinations/pacs").text)
    assert squash(detail["stat-delivered"].text) == "1" and squash(detail["stat-dead"].text) == "1"
    assert "called AE title not recognised" in detail["stat-last-error"].text
    assert "Nothing has been sent" in admin.client.get("/destinations/quiet").text


# --------------------------------------------------------------------------- Test connection, real peers


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """DCMTK's storescp (AE STORESCP) on a free port."""
    port = free_port()
    process = subprocess.Popen(["storescp", "--aetitle", "STORESCP", "--output-directory", str(tmp_path), str(port)],
                               env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("storescp to listen", lambda: subprocess.run(
            ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)], env=peer_env(), capture_output=True
        ).returncode == 0, timeout=10)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_dicom_connection_test_against_storescp_and_a_closed_port(
    web: WebEnv, admin: LoggedIn, operator: LoggedIn, storescp: int
) -> None:
    admin.send("POST", "/api/v1/destinations", json={**PACS, "ae_title": "STORESCP", "port": storescp})
    admin.send("POST", "/api/v1/destinations", json={**PACS, "name": "closed", "port": free_port(), "default": False})

    ok = operator.post("/destinations/pacs/test")
    assert ok.status_code == 200
    ids = page(ok.text)
    assert squash(ids["test-status"].text) == "ok" and "ok" in ids["test-outcome"].classes
    assert "C-ECHO succeeded (status 0x0000)" in ids["test-detail"].text
    assert "DICOM_NODE -> STORESCP@127.0.0.1" in ids["test-detail"].text
    assert squash(ids["test-ms"].text).endswith(" ms")

    failed = page(operator.post("/destinations/closed/test").text)
    assert squash(failed["test-status"].text) == "failed"
    assert "refused (nothing listening, or a firewall)" in failed["test-detail"].text

    answer = web.client().post("/api/v1/destinations/pacs/test", headers=api(web, "operator"))
    assert answer.status_code == 200
    result = answer.json()
    assert result["ok"] is True and result["method"] == "C-ECHO" and 0 < result["round_trip_ms"] < 5000

    tests = audit_entries(web, "destination.test")
    assert [(e.actor, e.target, e.after["ok"]) for e in tests] == [
        ("operator", "pacs", True), ("operator", "closed", False), ("operator", "pacs", True)]
    assert tests[0].detail is not None and tests[0].detail.endswith("(API token)")


@pytest.fixture(scope="module")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc with its DICOMweb plugin, HTTP basic authentication on (user node / SECRET)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc_dicomweb"), plugins=["libOrthancDicomWeb.so"],
                     label="orthanc-dicomweb", extra_config={
                         "AuthenticationEnabled": True, "RegisteredUsers": {"node": SECRET},
                         "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    server.http.auth = ("node", SECRET)
    server.start()
    yield server
    server.stop()


def test_dicomweb_connection_test_against_orthanc(web: WebEnv, operator: LoggedIn, orthanc_web: Orthanc) -> None:
    headers = api(web)
    client = web.client()
    url = f"{orthanc_web.url}/dicom-web"
    client.post("/api/v1/destinations", json={**ARCHIVE, "url": url}, headers=headers)
    client.post("/api/v1/destinations", json={**ARCHIVE, "name": "wrong", "url": url,
                                              "auth": {"type": "basic", "username": "node", "password": "nope"}},
                headers=headers)
    client.post("/api/v1/destinations", json={**ARCHIVE, "name": "path", "url": f"{orthanc_web.url}/no-dicom-web"},
                headers=headers)

    ok = page(operator.post("/destinations/archive/test").text)
    assert squash(ok["test-status"].text) == "ok"
    assert "HTTP 200" in ok["test-detail"].text and "accepted the basic credentials" in ok["test-detail"].text

    refused = client.post("/api/v1/destinations/wrong/test", headers=api(web, "operator")).json()
    assert refused["ok"] is False and "HTTP 401 (the credentials were refused)" in refused["detail"]
    assert refused["method"].startswith("QIDO-RS")
    missing = client.post("/api/v1/destinations/path/test", headers=api(web, "operator")).json()
    assert missing["ok"] is False and "HTTP 404" in missing["detail"]
    tests = audit_entries(web, "destination.test")
    assert [(e.target, e.after["ok"]) for e in tests] == [("path", False), ("wrong", False), ("archive", True)]
    assert SECRET not in all_audit_text(web)
