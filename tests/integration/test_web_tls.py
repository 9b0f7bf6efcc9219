"""HTTPS on the node's web app (``web.tls``): a network worker and a STOW-RS client reach it encrypted, trusting
it through the CA they are given, and refuse a node whose certificate they do not trust.

Real pieces: the node's app served by its own ``WebServer`` (uvicorn with TLS) on a throw-away CA's server
certificate (openssl), the worker's store and outbox built from worker settings alone
(``workers.context.node_access``: ``worker.node_url`` https, ``worker.ca_certificates``), and the node's
STOW-RS client pushing a series over the same port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.db import users
from dicom_node.db.models import AssociationRecord, Role
from dicom_node.destinations import BearerAuth, DicomWebDestination
from dicom_node.http_study_store import HttpStudyStore
from dicom_node.ingest import utc_now
from dicom_node.node_client import NodeHttpError
from dicom_node.settings import load_settings
from dicom_node.stow import send_dicomweb
from dicom_node.study_store import FileStudyStore
from dicom_node.web.server import WebServer
from tests.integration.peers import free_port
from tests.web.conftest import make_web_env
from tests.web.live_server import live_server
from tests.web.studies_fixtures import T0, ingest, write_study


def _other_ca(folder: Path) -> Path:
    """A CA of its own (a certificate nobody here signed the node's with)."""
    folder.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out",
                    "other.pem", "-days", "2", "-subj", "/CN=Other CA"], cwd=folder, check=True, capture_output=True)
    return folder / "other.pem"


def test_workers_and_stow_clients_reach_the_node_over_https(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    from workers.context import node_access

    node = make_web_env(tmp_path / "node", **{"web.tls.certificate": str(tls_files["server.pem"]),
                                              "web.tls.private_key": str(tls_files["server.key"])})
    assert node.settings.web.cookies_secure  # HTTPS served by the app itself: cookies are Secure
    users.create_user(node.sessions, "gpu-1", "!", Role.WORKER, now=utc_now())
    users.create_user(node.sessions, "pacs-push", "!", Role.SENDER, now=utc_now())
    paths = write_study(tmp_path / "in", seed=7, patient_id="P7", patient_name="DOE^7", accession="A7",
                        study_date="20260320", description="CT CHEST")
    ingest(node, paths, calling_ae="PACS", at=T0)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    token_file = tmp_path / "worker-token"
    token_file.write_text(node.token("gpu-1"))
    pushed = write_study(tmp_path / "pushed", seed=8, patient_id="P8", patient_name="DOE^8", accession="A8",
                         study_date="20260320", description="CT CHEST")

    def worker(name: str, **settings: object) -> HttpStudyStore:
        values = {"data_dir": str(tmp_path / name), "worker.node_access": "http", "worker.node_url": url,
                  "worker.token_file": str(token_file), **settings}
        store, _ = node_access(load_settings(None, values), node.sessions)
        assert isinstance(store, HttpStudyStore)
        return store

    with live_server(node.app, tls=node.settings.web.tls) as url:
        assert url.startswith("https://127.0.0.1:")
        trusting = worker("trusting", **{"worker.ca_certificates": str(tls_files["ca.pem"])})
        files = trusting.series_files(series, study_instance_uid=study)
        originals = FileStudyStore(node.sessions, node.settings.spool_dir).series_files(series)
        assert sorted(p.read_bytes() for p in files) == sorted(p.read_bytes() for p in originals)

        for name, ca in (("system-cas", None), ("other-ca", _other_ca(tmp_path / "other"))):
            doubting = worker(name, **({"worker.ca_certificates": str(ca)} if ca else {}))
            with pytest.raises(NodeHttpError, match="the node's TLS certificate is not trusted") as refused:
                doubting.series_files(series, study_instance_uid=study)
            assert refused.value.retryable is False and not list((tmp_path / name).rglob("*.dcm"))

        destination = DicomWebDestination(name="node", url=f"{url}/api/v1/dicomweb", ca_certificates=tls_files["ca.pem"],
                                          auth=BearerAuth(token=node.token("pacs-push")))
        report = send_dicomweb(destination, pushed)
        assert report.ok and report.http_status == 200, report.summary()
        untrusted = destination.model_copy(update={"ca_certificates": None})
        assert "not trusted" in str(pytest.raises(Exception, send_dicomweb, untrusted, pushed).value)
    with node.sessions() as session:
        stow = session.scalars(select(AssociationRecord).where(AssociationRecord.protocol == "stow-rs")).all()
    assert [(a.tls, a.username, a.instances_stored) for a in stow] == [(True, "pacs-push", 4)]


def test_unusable_tls_files_stop_the_start_naming_them(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(tls_files["server.key"]), "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True)
    app = make_web_env(tmp_path / "node").app
    for certificate, key, message in (
            (tls_files["server.pem"], tmp_path / "missing.key", "web.tls.private_key"),
            (tls_files["server.pem"], encrypted, "is encrypted"),
            (tls_files["server.key"], tls_files["server.key"], "web.tls.certificate")):
        tls = load_settings(None, {"data_dir": str(tmp_path), "web.tls.certificate": str(certificate),
                                   "web.tls.private_key": str(key)}).web.tls
        with pytest.raises(RuntimeError, match=message):
            WebServer(app, "127.0.0.1", free_port(), tls=tls)
    with pytest.raises(ValueError, match="web.tls needs both certificate and private_key"):
        load_settings(None, {"data_dir": str(tmp_path), "web.tls.certificate": str(tls_files["server.pem"])})
