"""Notifications through the whole product: a PACS (real Orthanc) auto-routes a small chest CT to the node, the
real nodule detector runs, its results reach Orthanc, and only then a RIS (a real MLLP listener) receives an
HL7 ORU^R01 and an EHR (a real HTTP FHIR endpoint) a DiagnosticReport with Observations (issue 27).

The rule names the three destinations. The listener first answers AE and the FHIR endpoint HTTP 503: the node
retries both. The ORU^R01 parses back with hl7apy under strict validation and carries the study's accession
number, its Study Instance UID and one OBX group per nodule the detector reported; the Bundle validates with
fhir.resources and references the ImagingStudy; the REST API lists the notifications as the job's deliveries.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from auto_routing import pacs_routing_to_node
from notification_peers import FhirServer, MllpListener
from peers import NODE_COMMAND, wait_for
from test_clinical_safety_e2e import _chest, _in_pacs

MODEL = "lung-nodule-detection"


def _api_token(node) -> str:  # type: ignore[no-untyped-def]
    where = ["--config", str(node.config_path), "--data-dir", str(node.data_dir)]
    created = subprocess.run([NODE_COMMAND, "users", "create", "ops", "--role", "viewer", "--password-stdin", *where],
                             input="a long enough password\n", capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    return subprocess.run([NODE_COMMAND, "tokens", "create", "ops", "--name", "test", *where],
                          capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.slow
def test_the_ris_and_the_ehr_hear_of_the_results_after_the_pacs_has_them(tmp_path: Path) -> None:
    files = _chest(tmp_path, "chest", 21, {"AccessionNumber": "ACC-E2E-27", "PatientID": "PAT-27"})
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(source.StudyInstanceUID)
    models = tmp_path / "models.yaml"  # the demo detector, declared for this small (4.4 mm) phantom too
    models.write_text(yaml.safe_dump({"models": [{
        "id": MODEL, "kind": "detection", "format": "monai_bundle", "version": "0.1.0",
        "path": "package://workers/bundles/lung_nodule_detection", "title": "AI lung nodules",
        "input_domain": {"modalities": ["CT"], "body_regions": ["chest"], "slices": {"min": 10},
                         "orientations": ["axial"]}}]}))
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "ct", "pipelines": [MODEL], "destinations": ["pacs", "ris", "ehr"],
        "conditions": [{"attribute": "modality", "in": ["CT"]}, {"attribute": "slice_count", "min": 10}]}]}))
    with MllpListener(["AE"], text="RIS database busy") as ris, FhirServer([503]) as ehr, pacs_routing_to_node(
            tmp_path, "notify", destination={"default": False}, more_destinations=[
                {"type": "hl7", "name": "ris", "host": "127.0.0.1", "port": ris.port, "receiving_application": "RIS",
                 "patient_id_authority": "HOSP"},
                {"type": "fhir", "name": "ehr", "url": ehr.url, "patient_id_system": "urn:oid:1.2.3.4"}],
            overrides={"routing.rules_file": str(rules), "routing.models_file": str(models),
                       "delivery.backoff_initial_seconds": 0.5}) as (orthanc, node):
        orthanc.upload_files(files)

        def told() -> list[tuple[str, str, int, str]] | None:
            rows = node.query("SELECT d.destination, d.state, d.attempts, d.created_at FROM deliveries d "
                              "ORDER BY d.id")
            done = {name: state for name, state, _, _ in rows}
            return rows if done.get("ris") == "delivered" and done.get("ehr") == "delivered" else None

        rows = wait_for("the RIS and the EHR told of the results", told, timeout=240, interval=0.5)
        by_name = {name: (state, attempts, created) for name, state, attempts, created in rows}
        assert node.query("SELECT pipeline, state FROM jobs") == [(MODEL, "succeeded")], node.query(
            "SELECT state, error, checks FROM jobs")
        assert by_name["pacs"][0] == "delivered"
        assert by_name["ris"][1] == 2 and by_name["ehr"][1] == 2, "AE and HTTP 503 were retried once"
        [(pacs_done,)] = node.query("SELECT delivered_at FROM deliveries WHERE destination = 'pacs'")
        assert by_name["ris"][2] >= pacs_done and by_name["ehr"][2] >= pacs_done, "told only after the PACS had it"
        in_pacs = _in_pacs(orthanc, study_uid)
        assert "1.2.840.10008.5.1.4.1.1.88.34" in {ds.SOPClassUID for ds in in_pacs}  # the detector's SR is there

        [(summary_text,)] = node.query("SELECT summary FROM jobs")
        summary = json.loads(summary_text)
        nodules = len(summary["reported"])
        assert nodules == summary["findings"] >= 1

        # HL7: the same ORU^R01 twice (AE, then AA), valid, with the accession number, the study and the nodules.
        assert len(ris.messages) == 2
        first = parse_message(ris.messages[0], validation_level=VALIDATION_LEVEL.STRICT)
        message = parse_message(ris.messages[-1], validation_level=VALIDATION_LEVEL.STRICT)
        message.validate()
        assert first.msh.msh_10.value == message.msh.msh_10.value  # a retry is the same message
        order = message.oru_r01_patient_result.oru_r01_order_observation
        assert (order.obr.obr_3.to_er7(), order.obr.obr_18.to_er7(), order.obr.obr_25.value) == (
            "ACC-E2E-27", "ACC-E2E-27", "F")
        assert message.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7() == "PAT-27^^^HOSP^MR"
        lines = [(g.obx.obx_3.obx_3_1.value, g.obx.obx_4.value, g.obx.obx_5.to_er7(), g.obx.obx_6.obx_6_1.value)
                 for g in order.oru_r01_observation]
        assert ("110180", "", study_uid, "") in lines
        diameters = [(sub, float(value)) for code, sub, value, unit in lines if code == "103339001" and unit == "mm"]
        assert [sub for sub, _ in diameters] == [str(n) for n in range(1, nodules + 1)]
        assert [d for _, d in diameters] == [round(r["measurements"][0]["value"], 1) for r in summary["reported"]]

        # FHIR: the same transaction twice (503, then 200); it validates and names the ImagingStudy.
        assert len(ehr.posted()) == 2
        bundle = Bundle.model_validate_json(ehr.posted()[-1])
        report = next(e.resource for e in bundle.entry if isinstance(e.resource, DiagnosticReport))
        observations = [e.resource for e in bundle.entry if isinstance(e.resource, Observation)]
        assert report.status == "final" and report.imagingStudy[0].identifier.value == f"urn:oid:{study_uid}"
        assert len(observations) == nodules == len(report.result)
        assert all(o.derivedFrom[0].identifier.value == f"urn:oid:{study_uid}" for o in observations)

        # The REST API lists them as the job's deliveries.
        token = _api_token(node)
        study = requests.get(f"http://127.0.0.1:{node.web_port}/api/v1/studies/{study_uid}",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        [job] = study["jobs"]
        assert {(d["destination"], d["state"]) for d in job["deliveries"]} == {
            ("pacs", "delivered"), ("ris", "delivered"), ("ehr", "delivered")}
