"""STOW-RS into the node (PS3.18 10.5): a study pushed over HTTP is received exactly as one sent by C-STORE.

The node's own STOW-RS client (:func:`dicom_node.stow.send_dicomweb`) pushes a generated CT series to the node
served by uvicorn; the instances land in the spool and the index through the same ingest path as the DICOM
listener's (byte for byte the data sets sent), the request is recorded like an association (the study page
names "STOW-RS by <account>", its completion waits for the request), and the study completes. Bad input is
answered part by part (FailedSOPSequence with the C-STORE status ingest would answer) or, for the request as a
whole, with 400 / 413 / 415; who may push is the ``sender`` role and operators, nobody else.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.db import repo, users
from dicom_node.db.models import AssociationRecord, IngestError, Instance, Role
from dicom_node.destinations import BearerAuth, DicomWebDestination
from dicom_node.ingest import utc_now
from dicom_node.spool import file_meta_bytes
from dicom_node.stow import multipart_body, send_dicomweb
from dicom_node.web.routes.dicomweb import BASE
from tests.web.conftest import WebEnv, make_web_env
from tests.web.live_server import live_server
from tests.web.studies_fixtures import _body, write_study

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def _series(tmp_path: Path, seed: int) -> list[Path]:
    return write_study(tmp_path / f"in-{seed}", seed=seed, patient_id=f"P{seed}", patient_name=f"DOE^{seed}",
                       accession=f"A{seed}", study_date="20260320", description="CT CHEST")


def _body_of(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    """A multipart/related body of ``parts`` (each already a whole part: Part 10 bytes or anything)."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def _part10(dataset: bytes, *, sop_class: bytes = CT.encode(), sop_instance: bytes, syntax: bytes = EXPLICIT.encode()) \
        -> bytes:
    """A Part 10 file whose File Meta Information holds these raw values (hostile ones included)."""
    def element(number: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HH2sH", 2, number, b"UI", len(value)) + value
    meta = element(0x0002, sop_class) + element(0x0003, sop_instance) + element(0x0010, syntax)
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)) + meta + dataset


def _uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def node(tmp_path: Path) -> WebEnv:
    web = make_web_env(tmp_path / "node")
    users.create_user(web.sessions, "pacs-push", "!", Role.SENDER, now=utc_now())
    users.create_user(web.sessions, "gpu-1", "!", Role.WORKER, now=utc_now())
    return web


def _post(web: WebEnv, body: bytes, *, token: str | None, study: str | None = None,
          content_type: str = STOW_TYPE) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{BASE}/studies" + (f"/{study}" if study else "")
    return web.client().post(url, content=body, headers=headers)


def _failed(answer: httpx.Response) -> dict[str | None, int]:
    """SOP Instance UID (None where the node could not name it) -> FailureReason, from the response."""
    items = answer.json().get("00081198", {}).get("Value", [])
    return {(item["00081155"].get("Value") or [None])[0]: item["00081197"]["Value"][0] for item in items}


def _referenced(answer: httpx.Response) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.json().get("00081199", {}).get("Value", [])]


def _errors(web: WebEnv) -> list[tuple[int, str, str | None]]:
    with web.sessions() as session:
        return [(e.status, e.reason, e.quarantine_path) for e in session.scalars(select(IngestError).order_by(IngestError.id))]


def test_a_study_pushed_by_our_stow_client_is_received_like_a_c_store(database_url: str, tmp_path: Path) -> None:
    """Our STOW-RS client into the node over real HTTP (SQLite and PostgreSQL): every instance stored byte for
    byte, indexed as one study, the request recorded as a sending session of the account; the study completes
    once it has been quiet after the request, as after an association."""
    web = make_web_env(tmp_path / "node", database_url=database_url)
    users.create_user(web.sessions, "pacs-push", "!", Role.SENDER, now=utc_now())
    paths = _series(tmp_path, 1)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    with live_server(web.app) as url:
        destination = DicomWebDestination(name="node", url=f"{url}{BASE}",
                                          auth=BearerAuth(token=web.token("pacs-push")))
        report = send_dicomweb(destination, paths)
        assert report.ok and report.http_status == 200, report.summary()
        assert [o.status for o in report.outcomes] == [0, 0, 0, 0]
        again = send_dicomweb(destination, paths[:2])  # a re-send: duplicates are acknowledged as stored
        assert again.ok and again.http_status == 200

    with web.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path, Instance.association_id)
                               .order_by(Instance.id)).all()
        record = session.scalars(select(AssociationRecord).order_by(AssociationRecord.id)).all()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(_uid_of(p) for p in paths)
    for path in paths:  # the data set as sent, behind the node's own file meta (as for C-STORE)
        stored = next(r for r in rows if r.sop_instance_uid == _uid_of(path))
        stored_body, syntax, sop_class, _ = _body(web.settings.spool_dir / stored.path)
        assert stored_body == _body(path)[0] and syntax == _body(path)[1] and sop_class == CT
    assert [(a.protocol, a.username, a.outcome, a.instances_stored, a.calling_ae_title) for a in record] == [
        ("stow-rs", "pacs-push", "released", 4, ""), ("stow-rs", "pacs-push", "released", 2, "")]
    assert {r.association_id for r in rows} == {record[0].id}

    viewer = {"Authorization": f"Bearer {web.token('viewer')}"}
    detail = web.client().get(f"/api/v1/studies/{study}", headers=viewer).json()
    assert detail["sources"] == ["STOW-RS by pacs-push"] and detail["source_ae_titles"] == []
    assert [s["series_instance_uid"] for s in detail["series"]] == [series] and detail["instance_count"] == 4
    assert detail["associations"][0]["protocol"] == "stow-rs" and detail["associations"][0]["username"] == "pacs-push"
    listed = web.client().get("/api/v1/studies", headers=viewer).json()["items"]
    assert [s["sources"] for s in listed] == [["STOW-RS by pacs-push"]]
    viewer_page = web.login("viewer").client.get(f"/studies/{study}")
    assert "STOW-RS by pacs-push" in viewer_page.text
    metrics = web.client().get("/metrics").text
    assert 'dicom_node_stow_requests_total{outcome="released"} 2.0' in metrics
    assert "dicom_node_instances_received_total 6.0" in metrics
    # completion as for an association: quiet for quiet_seconds after the request ended
    last = record[-1].ended_at
    assert last is not None
    assert repo.complete_due_studies(web.sessions, now=last + timedelta(seconds=1), quiet_seconds=5,
                                     max_wait_seconds=3600) == []
    assert repo.complete_due_studies(web.sessions, now=last + timedelta(seconds=6), quiet_seconds=5,
                                     max_wait_seconds=3600) == [study]


def test_bad_parts_fail_one_by_one_with_the_status_ingest_answers(node: WebEnv, tmp_path: Path) -> None:
    """Each unusable part is a failed instance (FailedSOPSequence, FailureReason = the C-STORE status the
    listener would answer), recorded and quarantined as a C-STORE's would be; the good part is stored (202)."""
    good, other, mismatched = _series(tmp_path, 2)[:3]
    good_uid = _uid_of(good)
    dataset, _, _, sop = _body(other)
    token = node.token("pacs-push")
    parts = [
        good.read_bytes(),
        b"this is not DICOM at all" * 10,  # no DICM prefix
        _part10(dataset, sop_instance=b"1.2.3\\4"),  # a backslash: no UID can hold it
        _part10(dataset, sop_instance=b"1.2.\xff\xfe.5"),  # not ASCII
        _part10(dataset, sop_instance=b"1." + b"2" * 70),  # longer than 64 characters
        _part10(dataset, sop_instance=sop.encode(), sop_class=b"1.2.840.10008.5.1.4.1.1.9999"),  # no storage class
        _part10(dataset, sop_instance=sop.encode(), syntax=b"1.2.840.10008.1.2.4.999"),  # no transfer syntax we take
        _part10(dataset, sop_instance=b"1.2.826.0.1.3680043.99.1"),  # the data set holds another SOP Instance UID
        _part10(dataset[: len(dataset) // 2], sop_instance=sop.encode()),  # the data set is cut short
        b"",  # an empty part
    ]
    answer = _post(node, _body_of(parts), token=token)
    assert answer.status_code == 202 and answer.headers["content-type"] == "application/dicom+json", answer.text
    assert _referenced(answer) == [good_uid]
    failed = answer.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [
        0xC210, 0xC222, 0xC222, 0xC222, 0x0122, 0xC122, 0xC221, 0xC230, 0xC210]
    named = [(item["00081155"].get("Value") or [None])[0] for item in failed]
    assert named == [None, None, None, None, sop, sop, "1.2.826.0.1.3680043.99.1", sop, None]  # hostile UIDs not echoed
    errors = _errors(node)
    assert [status for status, _, _ in errors] == [0xC210, 0xC222, 0xC222, 0xC222, 0x0122, 0xC122, 0xC221, 0xC230,
                                                   0xC210]
    assert "no DICM prefix" in errors[0][1] and "holds characters that no UID can" in errors[1][1]
    assert "longer than 64 characters" in errors[3][1] and "part is empty" in errors[8][1]
    quarantined = [path for _, _, path in errors if path]
    assert len(quarantined) == 2 and all(Path(p).is_file() for p in quarantined)  # the data sets ingest read
    with node.sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [good_uid]
        record = session.scalars(select(AssociationRecord)).one()
    assert (record.instances_stored, record.instances_failed, record.outcome) == (1, 9, "released")

    # a part of another study than the URL names: 0xA900, not stored; none stored at all -> 409
    study = str(pydicom.dcmread(good, stop_before_pixels=True).StudyInstanceUID)
    answer = _post(node, _body_of([mismatched.read_bytes()]), token=token, study="1.2.826.0.1.3680043.99.77")
    assert answer.status_code == 409 and _failed(answer) == {_uid_of(mismatched): 0xA900}
    assert answer.json()["00081190"]["Value"] == [f"http://testserver{BASE}/studies/1.2.826.0.1.3680043.99.77"]
    answer = _post(node, _body_of([mismatched.read_bytes()]), token=token, study=study)
    assert answer.status_code == 200 and _referenced(answer) == [_uid_of(mismatched)]
    answer = _post(node, _body_of([mismatched.read_bytes()]), token=token, study="1.2.3%01")  # a hostile URL
    assert answer.status_code == 400 and "Study Instance UID in the URL holds characters" in answer.json()["detail"]


def test_size_limits_fail_the_part_or_the_request(tmp_path: Path) -> None:
    """A part over dicom.max_instance_mb is a failed instance (0xA701) and the rest of the request goes on; a
    body over web.stow_max_request_mb is refused with 413, by its Content-Length or once it streams past it."""
    web = make_web_env(tmp_path / "node", **{"dicom.max_instance_mb": 1, "web.stow_max_request_mb": 2})
    users.create_user(web.sessions, "pacs-push", "!", Role.SENDER, now=utc_now())
    token = web.token("pacs-push")
    small = _series(tmp_path, 3)
    dataset, _, _, sop = _body(small[1])
    huge = _part10(dataset + b"\0" * (1_100_000 - len(dataset)), sop_instance=sop.encode())
    answer = _post(web, _body_of([huge, small[0].read_bytes()]), token=token)
    assert answer.status_code == 202, answer.text
    assert _failed(answer) == {sop: 0xA701} and _referenced(answer) == [_uid_of(small[0])]
    assert "larger than the limit of 1 MiB" in _errors(web)[0][1]

    too_big = _body_of([huge, huge])
    answer = _post(web, too_big, token=token)
    assert answer.status_code == 413 and "web.stow_max_request_mb" in answer.json()["detail"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused once it streams past the limit
        for start in range(0, len(too_big), 65536):
            yield too_big[start:start + 65536]

    with live_server(web.app) as url:
        answer = httpx.post(f"{url}{BASE}/studies", content=chunked(), timeout=60,
                            headers={"Content-Type": STOW_TYPE, "Authorization": f"Bearer {token}"})
    assert answer.status_code == 413 and "web.stow_max_request_mb" in answer.json()["detail"], answer.text
    with web.sessions() as session:
        outcomes = session.scalars(select(AssociationRecord.outcome).order_by(AssociationRecord.id)).all()
    assert outcomes == ["released", "aborted"]  # the 413 by Content-Length never opened a session


@pytest.mark.parametrize(("content_type", "body", "status", "message"), [
    ("application/dicom", b"DICM", 415, "not application/dicom"),
    ('multipart/related; type="application/dicom+xml"; boundary=b0undary', b"", 415, "parts must be of type"),
    ("multipart/related; boundary=b0undary", b"", 415, "not unnamed"),
    ('multipart/related; type="application/dicom"', b"", 400, "names no boundary"),
    (STOW_TYPE, b"garbage without any delimiter" * 100, 400, "before its closing boundary"),
    (STOW_TYPE, b"--b0undary--\r\n", 400, "holds no part"),
    (STOW_TYPE, b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nDICM", 400, "before its closing boundary"),
])
def test_malformed_requests_are_refused_whole(node: WebEnv, content_type: str, body: bytes, status: int,
                                              message: str) -> None:
    answer = _post(node, body, token=node.token("pacs-push"), content_type=content_type)
    assert answer.status_code == status and message in answer.json()["detail"], answer.text
    with node.sessions() as session:
        assert session.scalars(select(Instance)).all() == []


def test_a_body_cut_off_keeps_what_was_stored_before(node: WebEnv, tmp_path: Path) -> None:
    paths = _series(tmp_path, 4)
    whole = _body_of([p.read_bytes() for p in paths[:2]])
    cut = whole[: len(whole) - 200]  # inside the second part
    answer = _post(node, cut, token=node.token("pacs-push"))
    assert answer.status_code == 400 and "1 instance(s) stored before" in answer.json()["detail"]
    with node.sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [_uid_of(paths[0])]
        assert session.scalars(select(AssociationRecord.outcome)).all() == ["aborted"]
    assert not list((node.settings.spool_dir / ".incoming").glob("*.part"))  # the unfinished part is gone


def test_who_may_push(node: WebEnv, tmp_path: Path) -> None:
    """Senders and operators (and admins) push; anonymous callers get 401; viewers and workers 403; a sender's
    token reads nothing else of the node (and a sender account cannot log in)."""
    paths = _series(tmp_path, 5)
    body = _body_of([paths[0].read_bytes()])
    assert _post(node, body, token=None).status_code == 401
    assert _post(node, body, token="dnt_wrong").status_code == 401
    for refused in ("viewer", "gpu-1"):
        answer = _post(node, body, token=node.token(refused))
        assert answer.status_code == 403 and "sender role" in answer.json()["detail"], refused
    assert _post(node, body, token=node.token("operator")).status_code == 200
    assert _post(node, _body_of([paths[1].read_bytes()]), token=node.token("admin")).status_code == 200
    sender: dict[str, Any] = {"Authorization": f"Bearer {node.token('pacs-push')}"}
    client = node.client()
    assert client.get(f"{BASE}/studies", headers=sender).status_code == 403
    assert client.get("/api/v1/studies", headers=sender).status_code == 403
    assert client.get("/api/v1/me", headers=sender).json()["role"] == "sender"
    with node.sessions() as session:
        assert sorted(session.scalars(select(AssociationRecord.username)).all()) == ["admin", "operator"]


def test_concurrent_requests_past_the_limit_get_503(tmp_path: Path) -> None:
    """web.stow_max_requests bounds the requests received at once (each holds a thread while it streams)."""
    web = make_web_env(tmp_path / "node", **{"web.stow_max_requests": 1})
    users.create_user(web.sessions, "pacs-push", "!", Role.SENDER, now=utc_now())
    token = web.token("pacs-push")
    paths = _series(tmp_path, 6)
    length, chunks = multipart_body(paths, "slow")
    body = b"".join(chunks)
    release = threading.Event()

    def slow() -> Iterator[bytes]:
        yield body[:1000]
        release.wait(30)
        yield body[1000:]

    with live_server(web.app) as url:
        headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=slow',
                   "Authorization": f"Bearer {token}"}
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(
            httpx.post(f"{url}{BASE}/studies", content=slow(), headers=headers, timeout=60)))
        first.start()
        try:
            for _ in range(100):  # until the first request holds its slot
                with web.sessions() as session:
                    if session.scalars(select(AssociationRecord)).first() is not None:
                        break
                release.wait(0.05)
            busy = httpx.post(f"{url}{BASE}/studies", content=body, headers=headers, timeout=60)
        finally:
            release.set()
            first.join(60)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert "web.stow_max_requests" in busy.json()["detail"]
    assert [r.status_code for r in results] == [200]
