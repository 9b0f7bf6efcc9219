"""A stored DICOMweb secret never follows an edited URL to another server, and TLS files that are not what
their field says are refused with the field, the path and the reason (never an HTTP 500).

"Test connection" is run against real HTTP servers on this machine that record what
they receive, so the tests see which server got which credentials.
"""

from __future__ import annotations

import base64
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.db import config_repo
from dicom_node.destinations import BasicAuth, BearerAuth, DicomDestination, DicomTLS, DicomWebDestination
from dicom_node.ingest import utc_now
from dicom_node.scu import echo
from dicom_node.stow import check_dicomweb
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.test_destinations import ARCHIVE, SECRET, TOKEN, all_audit_text, destination_form
from tests.web.test_rules import api, audit_entries, page, squash

NEW_SECRET = "n3w-Pa55word-typed-again"


# --------------------------------------------------------------------------- HTTP servers that record credentials


@dataclass
class RecordingServer:
    """A real HTTP server answering every GET with an empty DICOM JSON list and keeping each Authorization header."""

    server: ThreadingHTTPServer
    authorizations: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def secrets_seen(self) -> list[str]:
        """The basic-auth passwords (or bearer tokens) this server received."""
        seen = []
        for header in self.authorizations:
            if header and header.startswith("Basic "):
                seen.append(base64.b64decode(header[6:]).decode().split(":", 1)[1])
            elif header and header.startswith("Bearer "):
                seen.append(header[7:])
        return seen


def _recording_server() -> RecordingServer:
    recorder = RecordingServer(server=None)  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            recorder.authorizations.append(self.headers.get("Authorization"))
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    recorder.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=recorder.server.serve_forever, daemon=True).start()
    return recorder


@pytest.fixture
def recording_servers() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    """Two servers: the one the secret was entered for, and another one an edited URL points to."""
    made = (_recording_server(), _recording_server())
    try:
        yield made
    finally:
        for recorder in made:
            recorder.server.shutdown()
            recorder.server.server_close()


# --------------------------------------------------------------------------- secrets and URLs


def test_an_edited_url_does_not_take_the_stored_password_along(
    web: WebEnv, admin: LoggedIn, operator: LoggedIn, recording_servers: tuple[RecordingServer, RecordingServer]
) -> None:
    entered_for, elsewhere = recording_servers
    assert admin.post("/destinations", destination_form(url=entered_for.url)).status_code == 303

    moved = admin.post("/destinations/archive", destination_form(url=elsewhere.url, **{"auth-password": ""}))
    assert moved.status_code == 422
    ids = page(moved.text)
    message = squash(ids["auth-password-error"].text)
    assert f"the URL now points to http://127.0.0.1:{elsewhere.server.server_address[1]}" in message
    assert "type the password again" in message and "auth-password-help" not in ids  # no "(unchanged)" offered
    assert ids["url"].attrs["value"] == elsewhere.url and SECRET not in moved.text

    tested = page(operator.post("/destinations/archive/test").text)
    assert squash(tested["test-status"].text) == "ok"
    assert entered_for.secrets_seen() == [SECRET] and elsewhere.authorizations == []

    retyped = admin.post("/destinations/archive", destination_form(url=elsewhere.url,
                                                                   **{"auth-password": NEW_SECRET}))
    assert retyped.status_code == 303
    operator.post("/destinations/archive/test")
    assert elsewhere.secrets_seen() == [NEW_SECRET], "the new server gets only the password typed for it"

    [refused] = audit_entries(web, "destination.secret_refused")
    assert refused.actor == "admin" and refused.target == "archive"
    assert refused.detail is not None and "without a new password" in refused.detail
    assert refused.after == {"url_origin": f"http://127.0.0.1:{elsewhere.server.server_address[1]}"}
    assert SECRET not in all_audit_text(web) and NEW_SECRET not in all_audit_text(web)


@pytest.mark.parametrize(("url", "refused"), [
    ("https://archive.example/other-root", False),  # same server, another path: the secret stays
    ("HTTPS://ARCHIVE.example:443/dicom-web", False),  # the same origin written differently
    ("https://archive.example:8443/dicom-web", True),  # another port
    ("http://archive.example/dicom-web", True),  # another scheme
    ("https://archive.example.evil.test/dicom-web", True),  # another host
])
def test_api_refuses_to_keep_a_secret_for_another_server(web: WebEnv, url: str, refused: bool) -> None:
    client, headers = web.client(), api(web)
    assert client.post("/api/v1/destinations", json=ARCHIVE, headers=headers).status_code == 201
    for auth in ({"type": "basic", "username": "node", "password": "**********"}, {"type": "basic", "username": "node"},
                 {"type": "basic", "username": "node", "password": ""}):
        answer = client.put("/api/v1/destinations/archive", json={**ARCHIVE, "url": url, "auth": auth},
                            headers=headers)
        stored = config_repo.get_destination(web.sessions, "archive")
        assert isinstance(stored, DicomWebDestination) and isinstance(stored.auth, BasicAuth)
        assert stored.auth.password.get_secret_value() == SECRET
        if refused:
            assert answer.status_code == 422, answer.text
            [error] = answer.json()["errors"]
            assert error["field"] == "auth.password" and "type the password again" in error["message"]
            assert stored.url == ARCHIVE["url"]
        else:
            assert answer.status_code == 200, answer.text
            assert stored.url == url.rstrip("/")
    if refused:  # with the secret typed again, the move is fine
        answer = client.put("/api/v1/destinations/archive", json={**ARCHIVE, "url": url, "auth": {
            "type": "basic", "username": "node", "password": NEW_SECRET}}, headers=headers)
        assert answer.status_code == 200
        assert len(audit_entries(web, "destination.secret_refused")) == 3


def test_a_bearer_token_does_not_follow_the_url_either(web: WebEnv) -> None:
    client, headers = web.client(), api(web)
    bearer = {**ARCHIVE, "auth": {"type": "bearer", "token": TOKEN}}
    assert client.post("/api/v1/destinations", json=bearer, headers=headers).status_code == 201
    moved = client.put("/api/v1/destinations/archive", headers=headers, json={
        **bearer, "url": "https://elsewhere.example/dicom-web", "auth": {"type": "bearer", "token": "**********"}})
    assert moved.status_code == 422 and moved.json()["errors"][0]["field"] == "auth.token"
    without = client.put("/api/v1/destinations/archive", headers=headers, json={
        **bearer, "url": "https://elsewhere.example/dicom-web", "auth": {"type": "none"}})
    assert without.status_code == 200, "moving without credentials needs no secret"
    stored = config_repo.get_destination(web.sessions, "archive")
    assert isinstance(stored, DicomWebDestination) and not isinstance(stored.auth, BearerAuth)


# --------------------------------------------------------------------------- TLS files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA certificate, a client certificate with its key, an unrelated key, an encrypted key, a text file."""
    root = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA")
    openssl("req", "-x509", *ec, "-keyout", "client.key", "-out", "client.pem", "-subj", "/CN=node")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key")
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    (root / "notes.txt").write_text("not a certificate\n")
    return {name: root / name for name in ("ca.pem", "client.pem", "client.key", "other.key", "encrypted.key",
                                           "notes.txt")} | {"dir": root, "missing": root / "missing.pem"}


def test_a_ca_bundle_that_is_no_certificate_is_refused_at_save_naming_the_path(
    web: WebEnv, pki: dict[str, Path]
) -> None:
    client, headers = web.client(), api(web)
    https = {**ARCHIVE, "url": "https://archive.example/dicom-web"}
    for path, reason in ((pki["notes.txt"], "is not a PEM certificate bundle"),
                         (pki["client.key"], "is not a PEM certificate bundle"),
                         (pki["dir"], "is not a regular file"), (pki["missing"], "does not exist on the node")):
        answer = client.post("/api/v1/destinations", json={**https, "ca_certificates": str(path)}, headers=headers)
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["errors"]
        assert error["field"] == "ca_certificates" and error["message"].startswith(f"ca_certificates {path} {reason}")
    assert config_repo.get_destination(web.sessions, "archive") is None
    good = client.post("/api/v1/destinations", json={**https, "ca_certificates": str(pki["ca.pem"])}, headers=headers)
    assert good.status_code == 201, good.text


def test_dicom_tls_files_are_checked_at_save_each_at_its_input(
    web: WebEnv, admin: LoggedIn, pki: dict[str, Path]
) -> None:
    def save(**tls: Path) -> dict[str, object]:
        answer = admin.post("/destinations", {"type": "dicom", "name": "pacs", "ae_title": "PACS",
                                              "host": "pacs.example", "port": "2762", "outputs": ["SEG"],
                                              "tls": "on", **{f"tls-{k}": str(v) for k, v in tls.items()}})
        assert answer.status_code == 422, answer.status_code
        return page(answer.text)  # type: ignore[return-value]

    ids = save(ca_certificates=pki["notes.txt"])
    assert squash(ids["tls-ca_certificates-error"].text).startswith(
        f"tls.ca_certificates {pki['notes.txt']} is not a PEM certificate bundle")
    ids = save(ca_certificates=pki["ca.pem"], certificate=pki["client.pem"], private_key=pki["other.key"])
    assert "cannot be used together" in ids["tls-private_key-error"].text
    ids = save(certificate=pki["client.pem"], private_key=pki["encrypted.key"])
    assert f"tls.private_key {pki['encrypted.key']} is encrypted" in squash(ids["tls-private_key-error"].text)
    ids = save(certificate=pki["client.key"], private_key=pki["client.pem"])
    assert "is not a PEM certificate" in ids["tls-certificate-error"].text
    assert "holds no PEM private key" in ids["tls-private_key-error"].text
    ok = admin.post("/destinations", {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "pacs.example",
                                      "port": "2762", "outputs": ["SEG"], "tls": "on",
                                      "tls-ca_certificates": str(pki["ca.pem"]),
                                      "tls-certificate": str(pki["client.pem"]),
                                      "tls-private_key": str(pki["client.key"])})
    assert ok.status_code == 303


def test_connection_test_with_a_broken_ca_bundle_answers_422_naming_it(
    web: WebEnv, operator: LoggedIn, pki: dict[str, Path]
) -> None:
    # Saved when the file was right (or imported from YAML), broken since: stored as it is.
    broken = DicomWebDestination(name="archive", url="https://127.0.0.1:9/dicom-web",
                                 ca_certificates=pki["notes.txt"])
    config_repo.upsert_destination(web.sessions, broken, source="test", now=utc_now())

    answer = web.client().post("/api/v1/destinations/archive/test", headers=api(web, "operator"))
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["errors"]
    assert error["field"] == "ca_certificates" and str(pki["notes.txt"]) in error["message"]
    assert "not a PEM certificate bundle" in error["message"]

    shown = operator.post("/destinations/archive/test")
    assert shown.status_code == 422
    ids = page(shown.text)
    assert squash(ids["test-status"].text) == "failed" and str(pki["notes.txt"]) in ids["test-detail"].text
    assert "not a PEM certificate bundle" in ids["ca_certificates-error"].text
    assert [e.after["ok"] for e in audit_entries(web, "destination.test")] == [False, False]

    # The sender itself (deliveries and the probe) fails permanently with the path, never with a raw ssl error.
    ok, detail, _ = check_dicomweb(broken, timeout=2)
    assert not ok and f"cannot load ca_certificates {pki['notes.txt']}" in detail


def test_an_encrypted_client_key_fails_the_echo_with_a_reason_instead_of_prompting(pki: dict[str, Path]) -> None:
    destination = DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9, tls=DicomTLS(
        ca_certificates=pki["ca.pem"], certificate=pki["client.pem"], private_key=pki["encrypted.key"]))
    ok, detail, _ = echo(destination, "DICOM_NODE", 2)
    assert not ok and "the private key is encrypted" in detail and str(pki["encrypted.key"]) in detail
