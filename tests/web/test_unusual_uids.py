"""Studies and series whose UIDs hold characters that are special in URLs or headers open from every link.

UIDs should be digits and dots, but the node keeps what modalities send, and the header
parser shows bytes it cannot decode as U+FFFD. The studies here are received through the
node's ingest path and then given such UIDs in the database (the web pages must cope with
whatever the database holds, whatever the receive path accepts): ``/``, ``?``, ``#``,
``%``, a space and non-Latin-1 characters; and one UID that ends in ``/live``, which must
open its own page and not the live fragment of the study whose UID is its prefix.
"""

from __future__ import annotations

import dataclasses
import io
import re
from datetime import timedelta
from html import unescape
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pydicom
import pytest
from PIL import Image
from sqlalchemy import text

from dicom_node.spool import Spool
from dicom_node.web.urls import path_segment
from tests.unit.workers.outputs_fixtures import ALGORITHM
from tests.web.conftest import PASSWORD, LoggedIn, WebEnv
from tests.web.studies_fixtures import T0, complete_and_route, fail_job_dead, ingest, run_job, write_study
from workers.models.base import DetectionResult
from workers.outputs.preview import render_preview
from workers.volume import load_series

ODD = "1.2.826/5?x=1#frag%41 \ufffdä"  # what a broken modality and the lossy header decoding can leave
ODD_SERIES = "1.2.826.5.\ufffd\ufffd.Ω"
PLAIN = "1.2.826.7"
ENDS_IN_LIVE = "1.2.826.7/live"
ASCII_STUDY = "1.2.826.8"  # an ordinary study UID whose series UID is not Latin-1
SERIES = {ODD: ODD_SERIES, PLAIN: f"{PLAIN}.1", ENDS_IN_LIVE: f"{ENDS_IN_LIVE}.1", ASCII_STUDY: "1.2.826.8.\ufffd.1"}
_LINK = re.compile(r'(?:href|src|data-refresh-url)="(/studies/[^"#]+)')


def _receive_as(env: WebEnv, paths: list[Path], study_uid: str, series_uid: str) -> None:
    """Receive ``paths`` through the ingest path, then give the study and its series the UIDs under test."""
    ingest(env, paths, calling_ae="MODALITY", at=T0)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    with env.sessions.begin() as session:
        session.execute(text("UPDATE studies SET study_instance_uid = :new WHERE study_instance_uid = :old"),
                        {"new": study_uid, "old": str(first.StudyInstanceUID)})
        session.execute(text("UPDATE series SET series_instance_uid = :new WHERE series_instance_uid = :old"),
                        {"new": series_uid, "old": str(first.SeriesInstanceUID)})


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("unusual")
    return {uid: write_study(root / str(n), seed=60 + n, patient_id=f"UU-{n}", patient_name="Odd^Uid",
                             accession=f"UU{n}", study_date="20260401", description=f"CT chest {n}")
            for n, uid in enumerate(SERIES)}


@pytest.fixture
def odd_studies(web: WebEnv, series_files: dict[str, list[Path]]) -> dict[str, int]:
    """The studies received and routed; each has one dead job (so the dashboard lists it), whose ids by UID are
    returned, and one finished detection job with the preview its worker drew."""
    job_ids = {}
    for uid, paths in series_files.items():
        series_uid = SERIES[uid]
        _receive_as(web, paths, uid, series_uid)
        [job_ids[uid], detection] = complete_and_route(web.sessions, uid, series_uid, ["chest-seg", "nodules"],
                                                       at=T0 + timedelta(minutes=1))
        fail_job_dead(web.sessions, job_ids[uid], at=T0 + timedelta(minutes=2), error="model crashed")
        _finish_with_preview(web, detection, paths, series_uid)
    return job_ids


def _finish_with_preview(env: WebEnv, job_id: int, paths: list[Path], series_uid: str) -> None:
    """Finish a detection job that found nothing, with the preview the worker draws for it in the outbox."""
    volume = dataclasses.replace(load_series(paths), series_instance_uid=series_uid)
    outbox = Spool(env.settings.outbox_dir, fsync=False)
    files = {role: outbox.write(f"job-{job_id}/{name}", [data]).relative
             for role, (name, data) in render_preview(volume, DetectionResult(()), ALGORITHM).files().items()}
    run_job(env.sessions, job_id, at=T0 + timedelta(minutes=3), stages={"inference": 1.0}, destinations=(),
            summary={"kind": "detection", "findings": 0, "detections": [], "preview": files})


def _links(html: str) -> set[str]:
    return {unescape(link) for link in _LINK.findall(html)}


def _study_uid_of(link: str) -> str:
    """The UID a /studies/<segment>[/...] link names, decoded as the server decodes it."""
    return unquote(urlsplit(link).path.split("/")[2])


def test_every_link_to_a_study_with_an_unusual_uid_opens_it(viewer: LoggedIn, odd_studies: dict[str, int]) -> None:
    client = viewer.client
    listed = client.get("/studies")
    dashboard = client.get("/dashboard/live")
    assert listed.status_code == dashboard.status_code == 200
    pages = {link for link in _links(listed.text) | _links(dashboard.text) if link.count("/") == 2}
    assert {_study_uid_of(link) for link in pages} == set(odd_studies), pages
    assert f"/studies/{path_segment(ODD)}" in pages and "%2F" in path_segment(ODD)

    for link in sorted(pages):
        uid = _study_uid_of(link)
        study = client.get(link)
        assert study.status_code == 200, f"{link}: {study.status_code}"
        assert uid in unescape(study.text) and "<title>" in study.text  # the whole page, not a fragment
        inner = _links(study.text) - {link}
        assert {urlsplit(x).path.removeprefix(link) for x in inner} == {"/preview.png", "/live"}, inner
        for sub in sorted(inner):
            answer = client.get(sub)
            assert answer.status_code == 200, f"{sub}: {answer.status_code} {answer.text[:200]}"
            if sub.endswith("/preview.png"):
                assert Image.open(io.BytesIO(answer.content)).format == "PNG"
            else:
                assert "<title>" not in answer.text and "model crashed" in answer.text
    # /studies/1.2.826.7/live is the live part of 1.2.826.7; /studies/1.2.826.7%2Flive the page of the other study
    assert "<title>" not in client.get(f"/studies/{PLAIN}/live").text
    assert ENDS_IN_LIVE in unescape(client.get(f"/studies/{path_segment(ENDS_IN_LIVE)}").text)


def test_preview_of_a_series_with_a_non_latin_1_uid_is_an_image_with_an_ascii_header(
    viewer: LoggedIn, odd_studies: dict[str, int]
) -> None:
    for uid in (ASCII_STUDY, ODD):
        preview = viewer.client.get(f"/studies/{path_segment(uid)}/preview.png")
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
        assert unquote(preview.headers["x-preview-series"]) == SERIES[uid]
    study = viewer.client.get(f"/api/v1/studies/{path_segment(ODD)}")
    assert study.status_code == 200 and study.json()["study_instance_uid"] == ODD
    assert [s["series_instance_uid"] for s in study.json()["series"]] == [ODD_SERIES]
    preview = viewer.client.get(study.json()["preview_url"])
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    header = preview.headers["x-preview-series"]
    assert header.isascii() and unquote(header) == ODD_SERIES  # percent-encoded UTF-8
    plain = viewer.client.get(f"/api/v1/studies/{PLAIN}/preview.png")
    assert plain.headers["x-preview-series"] == f"{PLAIN}.1", "ASCII UIDs stay as they are"
    assert viewer.client.get(f"/api/v1/studies/{path_segment(ODD + 'x')}/preview.png").status_code == 404


def test_actions_and_login_come_back_to_the_study_with_the_unusual_uid(
    web: WebEnv, operator: LoggedIn, odd_studies: dict[str, int]
) -> None:
    retried = operator.post(f"/jobs/{odd_studies[ODD]}/retry")
    assert retried.status_code == 303
    back = operator.client.get(retried.headers["location"])
    assert back.status_code == 200 and ODD in unescape(back.text)
    assert f"Job {odd_studies[ODD]} will run again" in back.text

    anonymous = web.client()
    link = f"/studies/{path_segment(ODD)}"
    to_login = anonymous.get(link)
    assert to_login.status_code == 303
    next_url = unquote(to_login.headers["location"].split("next=", 1)[1])
    assert next_url == link
    form = anonymous.get(to_login.headers["location"])
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    logged_in = anonymous.post("/login", data={"username": "viewer", "password": PASSWORD,
                                               "csrf_token": token.group(1), "next": next_url})
    assert logged_in.status_code == 303 and logged_in.headers["location"] == link
    assert ODD in unescape(anonymous.get(link).text)
