"""The node's DICOMweb reads and outbox uploads, used over real HTTP the way a GPU worker without a shared
filesystem uses them: :class:`HttpStudyStore` fetches a received series into its own cache (byte for byte the
stored files), :class:`HttpOutbox` uploads results into the node's outbox (idempotently), and the node refuses
what a worker token may not do."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node.db import jobs, users
from dicom_node.db.models import Role
from dicom_node.http_study_store import HttpStudyStore, SeriesFetchError
from dicom_node.ingest import utc_now
from dicom_node.node_client import NodeClient, NodeHttpError
from dicom_node.remote_outbox import HttpOutbox
from dicom_node.settings import load_settings
from dicom_node.study_store import FileStudyStore, SeriesNotFound
from tests.web.conftest import WebEnv, make_web_env
from tests.web.live_server import live_server
from tests.web.studies_fixtures import T0, complete_and_route, ingest, write_study


def _received(web: WebEnv, tmp_path: Path, seed: int) -> tuple[str, str]:
    paths = write_study(tmp_path / f"in-{seed}", seed=seed, patient_id=f"P{seed}", patient_name=f"DOE^{seed}",
                        accession=f"A{seed}", study_date="20260320", description="CT CHEST")
    ingest(web, paths, calling_ae="PACS", at=T0)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


@pytest.fixture
def node(tmp_path: Path) -> WebEnv:
    web = make_web_env(tmp_path / "node")
    users.create_user(web.sessions, "gpu-1", "!", Role.WORKER, now=utc_now())
    return web


def test_a_worker_fetches_series_and_uploads_results_over_http(node: WebEnv, tmp_path: Path) -> None:
    study, series = _received(node, tmp_path, 1)
    study2, series2 = _received(node, tmp_path, 2)
    token = node.token("gpu-1")
    shared = FileStudyStore(node.sessions, node.settings.spool_dir)
    with live_server(node.app) as url:
        client = NodeClient(url, token, timeout_seconds=30)
        # QIDO-RS: the study, its series, the instances
        found = client.get_json("/api/v1/dicomweb/studies", {"StudyInstanceUID": study})
        assert [s["0020000D"]["Value"] for s in found] == [[study]]
        assert found[0]["00100010"]["Value"] == [{"Alphabetic": "DOE^1"}]
        assert client.get_json("/api/v1/dicomweb/studies", {"PatientID": "nobody"}) == []
        listed = client.get_json(f"/api/v1/dicomweb/studies/{study}/series")
        assert [(s["0020000E"]["Value"][0], s["00201209"]["Value"][0]) for s in listed] == [(series, 4)]

        # WADO-RS through the store: byte for byte the node's files, in a cache of the worker's own
        store = HttpStudyStore(client, tmp_path / "worker" / "series-cache", max_bytes=10**9)
        fetched = store.series_files(series, study_instance_uid=study)
        originals = shared.series_files(series, study_instance_uid=study)
        assert sorted(p.read_bytes() for p in fetched) == sorted(p.read_bytes() for p in originals)
        assert all(str(tmp_path / "worker") in str(p) for p in fetched) and len(fetched) == 4
        inodes = [p.stat().st_ino for p in fetched]
        assert [p.stat().st_ino for p in store.series_files(series)] == inodes  # cached; study found by QIDO
        with pytest.raises(SeriesNotFound):
            store.series_files("1.2.3.404", study_instance_uid=study)

        # a bounded cache: the least recently used series goes when the next does not fit beside it
        small = HttpStudyStore(client, tmp_path / "small-cache", max_bytes=sum(p.stat().st_size for p in fetched) + 1)
        kept = small.series_files(series, study_instance_uid=study)
        other = small.series_files(series2, study_instance_uid=study2)
        assert all(p.exists() for p in other) and not any(p.exists() for p in kept)

        # a file gone from the node's spool: the fetch fails whole, nothing half-fetched is left
        originals2 = shared.series_files(series2, study_instance_uid=study2)
        originals2[1].unlink()
        fresh = HttpStudyStore(client, tmp_path / "fresh-cache", max_bytes=10**9)
        with pytest.raises(SeriesFetchError, match="gone from the spool"):
            fresh.series_files(series2, study_instance_uid=study2)
        assert [p for p in (tmp_path / "fresh-cache").rglob("*") if p.is_file()] == []

        # results: a running job's files land in the node's outbox at the same paths; uploads are idempotent
        job_id = complete_and_route(node.sessions, study, series, ["lung-segmentation"], at=T0)[0]
        outbox = HttpOutbox(client)
        with pytest.raises(NodeHttpError, match="not running") as refused:
            outbox.write(f"job-{job_id}/sr-1.2.3.dcm", [b"DICM"])
        assert refused.value.status == 409 and not refused.value.retryable
        assert jobs.claim_job(node.sessions, job_id, worker="gpu-1:1", now=T0 + timedelta(seconds=5),
                              lease_seconds=60) is not None
        outbox.write(f"job-{job_id}/sr-1.2.3.dcm", [b"first", b" try"])
        outbox.write(f"job-{job_id}/sr-1.2.3.dcm", [b"second ", b"try"])  # a retried job writes the same path
        outbox.write(f"job-{job_id}/gsps+low-1.2.4.dcm", [b"variant"])
        written = node.settings.outbox_dir / f"job-{job_id}"
        assert (written / "sr-1.2.3.dcm").read_bytes() == b"second try"
        assert (written / "gsps+low-1.2.4.dcm").read_bytes() == b"variant"
        outbox.remove(f"job-{job_id}/gsps+low-1.2.4.dcm")
        outbox.remove(f"job-{job_id}/gsps+low-1.2.4.dcm")  # gone already: fine
        assert sorted(p.name for p in written.iterdir()) == ["sr-1.2.3.dcm"]
        with pytest.raises(NodeHttpError, match="is not job-<id>/<file name>"):
            outbox.write(f"job-{job_id}/../escape.dcm", [b"x"])
        with pytest.raises(NodeHttpError, match="does not exist"):
            outbox.write("job-999999/sr.dcm", [b"x"])

        # who may: no token 401, a viewer reads but never writes results, a wrong token 401
        assert httpx.get(f"{url}/api/v1/dicomweb/studies").status_code == 401
        viewer = NodeClient(url, node.token("viewer"))
        assert viewer.get_json("/api/v1/dicomweb/series", {"SeriesInstanceUID": series})
        with pytest.raises(NodeHttpError, match="needs the worker role itself") as forbidden:
            HttpOutbox(viewer).write(f"job-{job_id}/sr-1.2.3.dcm", [b"forged"])
        assert forbidden.value.status == 403
        assert (written / "sr-1.2.3.dcm").read_bytes() == b"second try"
        with pytest.raises(NodeHttpError) as unknown:
            NodeClient(url, "dnt_wrong").get_json("/api/v1/dicomweb/studies")
        assert unknown.value.status == 401
        # a worker token reads DICOMweb and uploads, and nothing of the admin app
        answer = httpx.get(f"{url}/api/v1/studies", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 403


def test_worker_settings_choose_the_http_store_and_outbox(node: WebEnv, tmp_path: Path) -> None:
    """``worker.node_access: http`` builds the HTTP store and outbox from the settings alone (the token from a
    file), caching in the worker's own data_dir; the default reads the node's spool and writes its outbox."""
    from workers.context import node_access

    study, series = _received(node, tmp_path, 3)
    token_file = tmp_path / "worker-token"
    token_file.write_text(node.token("gpu-1") + "\n")
    default_store, default_outbox = node_access(node.settings, node.sessions)
    assert isinstance(default_store, FileStudyStore) and not isinstance(default_outbox, HttpOutbox)
    with live_server(node.app) as url:
        settings = load_settings(None, {"data_dir": str(tmp_path / "worker"), "worker.node_access": "http",
                                        "worker.node_url": url, "worker.token_file": str(token_file)})
        store, outbox = node_access(settings, node.sessions)
        assert isinstance(store, HttpStudyStore) and isinstance(outbox, HttpOutbox)
        files = store.series_files(series, study_instance_uid=study)
    assert len(files) == 4 and all(p.is_relative_to(settings.series_cache_dir) for p in files)


def test_a_fetch_that_is_not_the_series_qido_named_keeps_nothing(node: WebEnv, tmp_path: Path) -> None:
    """A server whose WADO-RS answer is not the instances its QIDO-RS named (one missing, one extra), or
    breaks off before its closing boundary: the fetch fails naming what is wrong, and the cache stays empty."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from dicom_node.stow import multipart_body

    study, series = _received(node, tmp_path, 4)
    files = FileStudyStore(node.sessions, node.settings.spool_dir).series_files(series, study_instance_uid=study)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    other = _received(node, tmp_path, 5)
    stranger = FileStudyStore(node.sessions, node.settings.spool_dir).series_files(other[1])[0]
    length, chunks = multipart_body([*files[:3], stranger], "cut")
    body = b"".join(chunks)
    answers = {"mismatch": body, "truncated": body[:length // 2]}
    app = FastAPI()
    mode = {"now": "mismatch"}

    @app.get("/api/v1/dicomweb/studies/{st}/series/{se}/instances")
    def instances(st: str, se: str) -> Response:
        return JSONResponse([{"00080018": {"vr": "UI", "Value": [uid]}} for uid in uids])

    @app.get("/api/v1/dicomweb/studies/{st}/series/{se}")
    def retrieve(st: str, se: str) -> Response:
        return Response(answers[mode["now"]], media_type='multipart/related; type="application/dicom"; boundary=cut')

    cache = tmp_path / "cache"
    with live_server(app) as url:
        store = HttpStudyStore(NodeClient(url, "dnt_any"), cache, max_bytes=10**9)
        with pytest.raises(SeriesFetchError, match=f"sent 4 instance.* names 4; missing {uids[3]}; not asked for"):
            store.series_files(series, study_instance_uid=study)
        mode["now"] = "truncated"
        with pytest.raises(SeriesFetchError, match="before its closing boundary"):
            store.series_files(series, study_instance_uid=study)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
