"""A real PACS pushes a study into the node by STOW-RS: Orthanc's DICOMweb plugin, with the node configured as
one of its DICOMweb servers (``DicomWeb.Servers``) and a ``sender`` account's token, runs
``POST /dicom-web/servers/node/stow``; the node (``dicom-node serve`` as a process) stores every instance
through its ingest path, completes the study and routes it as one received over DICOM (the built-in rule
makes jobs for a CT series of 10 slices or more), and records the push as a STOW-RS session of the account.
Once over plain HTTP, once over HTTPS served by the node itself (``web.tls``), Orthanc verifying its certificate.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from peers import NODE_COMMAND, NodeProcess, Orthanc, dataset_bytes
from tests.integration.conftest import NodeProcessFactory
from training.phantoms.ct_series import GeneratedSeries

pytestmark = pytest.mark.slow


def _cli(node: NodeProcess, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([NODE_COMMAND, *args, "--config", str(node.config_path), "--data-dir",
                             str(node.data_dir)], input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"dicom-node {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_orthanc_pushes_a_study_by_stow_rs(node_process: NodeProcessFactory, small_series: GeneratedSeries,
                                           tmp_path: Path, tls_files: dict[str, Path], scheme: str) -> None:
    """Over plain HTTP, and over HTTPS served by the node itself (``web.tls``), Orthanc trusting the node's CA."""
    tls = {"web.tls.certificate": str(tls_files["server.pem"]), "web.tls.private_key": str(tls_files["server.key"])}
    node = node_process(tls if scheme == "https" else None)
    _cli(node, "users", "create", "pacs-push", "--role", "sender", "--password-stdin", stdin="unused-password-42\n")
    token = _cli(node, "tokens", "create", "pacs-push", "--name", "orthanc").strip()
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", plugins=["libOrthancDicomWeb.so"], label="orthanc-stow",
                      extra_config={"HttpsVerifyPeers": True, "HttpsCACertificates": str(tls_files["ca.pem"]),
                                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"node": {
                                        "Url": f"{scheme}://127.0.0.1:{node.web_port}/api/v1/dicomweb/",
                                        "HttpHeaders": {"Authorization": f"Bearer {token}"}}}}})
    orthanc.start()
    try:
        uploaded = orthanc.upload_files(small_series.paths)
        study_id = uploaded[0]["ParentStudy"]
        answer = orthanc.http.post(f"{orthanc.url}/dicom-web/servers/node/stow",
                                   json={"Resources": [study_id], "Synchronous": True}, timeout=120)
        assert answer.ok, f"Orthanc's STOW-RS to the node failed: {answer.status_code} {answer.text}"
    finally:
        orthanc.stop()

    study_uid = str(pydicom.dcmread(small_series.paths[0], stop_before_pixels=True).StudyInstanceUID)
    study = node.wait_for_study(study_uid, state="routed", instances=len(small_series.paths), timeout=30)
    assert study["series"] == 1
    sessions = node.query("SELECT protocol, username, outcome, instances_stored, instances_failed, tls"
                          " FROM associations WHERE calling_ae_title != 'ECHOSCU'")  # the start-up check's C-ECHO
    assert sessions == [("stow-rs", "pacs-push", "released", len(small_series.paths), 0, int(scheme == "https"))]
    jobs = node.query("SELECT pipeline FROM jobs ORDER BY pipeline")
    assert len(jobs) == 2, f"the built-in rule should run both demo models: {jobs}"
    stored = {row["sop_instance_uid"]: row for row in node.instances()}
    for path in small_series.paths:  # the data sets as Orthanc received them from the generator, unchanged
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(node.spool_file(stored[uid]["path"])) == dataset_bytes(path)
