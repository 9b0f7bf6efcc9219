"""The HL7 ORU^R01 and the FHIR Bundle a notification sends, read back with the libraries that check them.

The transport is tested against real servers (``tests/web/test_notifications.py``); here the content at its
edges: many findings (a conclusion longer than one OBX-5 line), HL7 separators and non-ASCII letters in the
study's texts, each event's status, and ACKs of every kind.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.v2_5 import TX

from dicom_node.contracts import CodedConcept, ReportedFinding, ReportedMeasurement
from dicom_node.db.notifications import NotificationFacts
from dicom_node.destinations import FhirDestination, HL7Destination
from dicom_node.fhir_report import build_bundle, resource_identifier
from dicom_node.hl7_report import build_oru, read_ack

NOW = datetime(2026, 3, 20, 10, 0, tzinfo=timezone.utc)
NODULE = CodedConcept(value="27925004", scheme="SCT", meaning="Nodule")
LONG_AXIS = CodedConcept(value="103339001", scheme="SCT", meaning="Long axis")
MM = CodedConcept(value="mm", scheme="UCUM", meaning="millimeter")


def facts(event: str = "results", count: int = 12, **changes: object) -> NotificationFacts:
    findings = tuple(ReportedFinding(text=f"Nodule {n}: {3.5 + n:.1f} mm, certainty {90 - n} % & more", type=NODULE,
                                     measurements=(ReportedMeasurement(name=LONG_AXIS, value=3.5 + n, unit=MM),))
                     for n in range(1, count + 1))
    values: dict[str, object] = dict(
        job_id=7, delivery_id=21, pipeline="lung-nodule-detection", state="succeeded", event=event,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1", accession_number="A|1^2", patient_id="PAT~7",
        patient_name="Müller^Jürgen^^Dr.^", study_date="20260320", study_description="CT Thorax",
        finished_at=datetime(2026, 3, 20, 9, 58, tzinfo=timezone.utc), algorithm_name="AI lung nodules",
        algorithm_version="0.1.0", reason="body region: the image shows head & neck",
        findings=findings if event == "results" else (), delivered_to=("pacs",))
    values.update(changes)
    return NotificationFacts(**values)  # type: ignore[arg-type]


RIS = HL7Destination(name="ris", host="ris.example", port=2575, receiving_application="RIS")


def test_a_long_report_with_separators_and_umlauts_is_a_strictly_valid_oru() -> None:
    told = facts()
    text = build_oru(RIS, told, now=NOW)
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == "A\\F\\1\\S\\2"  # the accession number, its separators escaped
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "PAT\\R\\7^^^^MR" and pid.pid_5.to_er7() == "Müller^Jürgen^^^Dr."
    [conclusion] = [g.obx for g in order.oru_r01_observation if g.obx.obx_3.obx_3_1.value == "121077"]
    lines = [repetition.to_er7() for repetition in conclusion.obx_5]
    assert len(lines) > 1 and all(len(line) <= 199 for line in lines)
    assert " ".join(lines) == TX(told.conclusion).to_er7()
    assert len(told.conclusion) > 400 and "Nodule 12: 15.5 mm" in told.conclusion
    subs = [g.obx.obx_4.value for g in order.oru_r01_observation if g.obx.obx_3.obx_3_1.value == "103339001"]
    assert subs == [str(n) for n in range(1, 13)]


@pytest.mark.parametrize(("event", "status", "report_status"), [
    ("results", "F", "final"), ("held", "I", "registered"), ("not_performed", "X", "cancelled")])
def test_each_event_has_its_status(event: str, status: str, report_status: str) -> None:
    told = facts(event, count=2)
    message = parse_message(build_oru(RIS, told, now=NOW), validation_level=VALIDATION_LEVEL.STRICT)
    assert message.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.value == status
    assert message.msh.msh_10.value == f"DN21-{status}"
    bundle = build_bundle(FhirDestination(name="ehr", url="https://ehr.example/fhir"), told, now=NOW)
    again = Bundle.model_validate_json(bundle.model_dump_json())
    [report] = [e.resource for e in again.entry if e.resource.get_resource_type() == "DiagnosticReport"]
    assert report.status == report_status and report.conclusion == told.conclusion
    assert len(again.entry) == 1 + len(told.findings)
    if event == "not_performed":
        assert told.conclusion == ("AI analysis not performed (AI lung nodules 0.1.0): body region: the image shows "
                                   "head & neck")


def test_fhir_identifiers_are_stable_per_job_and_finding() -> None:
    told = facts(count=2)
    bundle = build_bundle(FhirDestination(name="ehr", url="https://ehr.example/fhir"), told, now=NOW)
    urls = [e.fullUrl for e in bundle.entry]
    assert urls == [resource_identifier(told, "finding-1"), resource_identifier(told, "finding-2"),
                    resource_identifier(told, "report")]
    assert urls == [e.fullUrl for e in build_bundle(FhirDestination(name="other", url="https://x.example/fhir"),
                                                    told, now=NOW).entry]
    assert resource_identifier(facts(job_id=8), "report") != urls[-1]
    [report] = [e.resource for e in bundle.entry if e.resource.get_resource_type() == "DiagnosticReport"]
    assert report.subject.identifier.value == "PAT~7" and report.subject.identifier.system is None


def test_acks_of_every_kind() -> None:
    head = "MSH|^~\\&|RIS||DICOM_NODE||20260320||ACK^R01^ACK|9|P|2.5\r"
    accepted = read_ack(head + "MSA|AA|DN21-F\r")
    assert accepted.accepted and accepted.control_id == "DN21-F" and accepted.text == ""
    error = read_ack(head + "MSA|AE|DN21-F|busy\rERR||||E|||database locked\r")
    assert not error.accepted and error.retryable and error.text == "busy; database locked"
    rejected = read_ack(head + "MSA|AR|DN21-F|unknown patient\r")
    assert not rejected.accepted and not rejected.retryable
    with pytest.raises(ValueError, match="no MSA segment"):
        read_ack(head)
    with pytest.raises(ValueError, match="MSA-1 is 'XX'"):
        read_ack(head + "MSA|XX|DN21-F\r")
    with pytest.raises(ValueError, match="not an HL7 message"):
        read_ack("HTTP/1.1 400 Bad Request")


def test_a_message_that_cannot_be_built_says_why_without_the_patient() -> None:
    with pytest.raises(ValueError, match="MaxLengthReached: a patient identifier or name") as refused:
        build_oru(RIS, facts(patient_id="P" * 300), now=NOW)
    assert "PPPP" not in str(refused.value)
