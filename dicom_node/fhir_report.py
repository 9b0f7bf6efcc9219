"""FHIR R4 "AI results": a transaction Bundle of one DiagnosticReport and one Observation per finding.

Built with ``fhir.resources`` (its R4B models: DiagnosticReport, Observation and Bundle are the same
in R4 4.0.1 and R4B 4.3.0), which validates every element and type as the resources are made, so a
malformed report fails here, naming the element, and never reaches the server.

* Every resource has an identifier (``urn:ietf:rfc:3986`` | ``urn:uuid:`` of a UUID derived from the
  study, the job and the finding) and is written with a conditional update (``PUT
  Type?identifier=...``): a retry after a lost answer, a re-send, or the "held" report followed by
  the released one update the same resources instead of adding copies.
* DiagnosticReport: status ``final`` (results delivered), ``registered`` (held for review: nothing
  available yet) or ``cancelled`` (AI not performed); category RAD (v2-0074); code LOINC 18748-4;
  subject the Patient by identifier (the destination's ``patient_id_system`` and the DICOM Patient
  ID); the accession number as an identifier of type ACSN; ``imagingStudy`` the ImagingStudy by
  its identifier (``urn:dicom:uid`` | ``urn:oid:<Study Instance UID>``); ``effectiveDateTime`` the
  study date; ``issued`` now; ``conclusion`` the text of the HL7 message's conclusion; ``result``
  the Observations.
* Observation (status ``final``, category ``imaging``): ``code`` what was found (SNOMED CT; a
  classification's question, with the class as ``valueCodeableConcept``), ``bodySite`` where,
  one ``component`` per measurement with a UCUM ``valueQuantity`` (volume mL, long axis mm,
  certainty %), ``derivedFrom`` the ImagingStudy, ``device`` the model by name and version,
  ``note`` the finding in words.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from dicom_node.contracts import CodedConcept, ReportedFinding
from dicom_node.db.notifications import NotificationFacts
from dicom_node.destinations import FhirDestination
from dicom_node.report_codes import FHIR_SYSTEMS, REPORT

__all__ = ["REPORT_STATUS", "build_bundle", "resource_identifier"]

#: DiagnosticReport.status per event.
REPORT_STATUS = {"results": "final", "held": "registered", "not_performed": "cancelled"}
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
DICOM_UID_SYSTEM = "urn:dicom:uid"
_NAMESPACE = uuid.UUID("6f1f5a52-4ad4-4d0c-9d0b-3c7c4f1e2a10")  # this node's report identifiers


def resource_identifier(facts: NotificationFacts, part: str) -> str:
    """``urn:uuid:...`` of one resource of the report of ``facts``' job (``part``: "report", "finding-1", ...),
    the same every time the job is reported."""
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{facts.study_instance_uid}/job-{facts.job_id}/{part}')}"


def _coding(code: CodedConcept) -> dict[str, str]:
    return {"system": FHIR_SYSTEMS.get(code.scheme, f"urn:dicom-node:scheme:{code.scheme}"), "code": code.value,
            "display": code.meaning}


def _concept(code: CodedConcept, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [_coding(code)]}
    if text:
        concept["text"] = text
    return concept


def _quantity(value: float, unit: CodedConcept) -> dict[str, Any]:
    return {"value": value, "unit": unit.value, "system": FHIR_SYSTEMS["UCUM"], "code": unit.value}


def _date(dicom_date: str | None) -> str | None:
    """DICOM DA (YYYYMMDD) as a FHIR date; None when it is not one."""
    if not dicom_date or len(dicom_date) != 8 or not dicom_date.isdigit():
        return None
    return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"


def _instant(when: datetime) -> str:
    return when.isoformat(timespec="seconds")


def _entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that creates the resource or updates the one with its identifier."""
    return {"fullUrl": full_url, "resource": resource, "request": {
        "method": "PUT", "url": f"{resource['resourceType']}?identifier={IDENTIFIER_SYSTEM}|{full_url}"}}


def _observation(facts: NotificationFacts, finding: ReportedFinding, subject: dict[str, Any],
                 study: dict[str, Any], full_url: str) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": full_url}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": _concept(finding.type),
        "subject": subject,
        "derivedFrom": [study],
        "device": {"display": _model(facts)},
        "note": [{"text": finding.text}],
    }
    if facts.finished_at is not None:
        observation["effectiveDateTime"] = _instant(facts.finished_at)
    if finding.value is not None:
        observation["valueCodeableConcept"] = _concept(finding.value)
    if finding.site is not None:
        observation["bodySite"] = _concept(finding.site)
    if finding.measurements:
        observation["component"] = [{"code": _concept(m.name), "valueQuantity": _quantity(m.value, m.unit)}
                                    for m in finding.measurements]
    return observation


def _model(facts: NotificationFacts) -> str:
    return facts.algorithm_name + (f" {facts.algorithm_version}" if facts.algorithm_version else "")


def build_bundle(destination: FhirDestination, facts: NotificationFacts, *, now: datetime) -> Bundle:
    """The transaction Bundle telling ``destination`` what job ``facts.job_id`` did (see the module docstring),
    validated by fhir.resources; ValueError naming the element it refused."""
    patient: dict[str, Any] = {"value": facts.patient_id or "unknown"}
    if destination.patient_id_system:
        patient["system"] = destination.patient_id_system
    subject = {"type": "Patient", "identifier": patient}
    study = {"type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM,
                                                    "value": f"urn:oid:{facts.study_instance_uid}"}}
    entries = []
    results = []
    for number, finding in enumerate(facts.findings, start=1):
        full_url = resource_identifier(facts, f"finding-{number}")
        entries.append(_entry(full_url, _observation(facts, finding, subject, study, full_url)))
        results.append({"reference": full_url, "display": finding.text})
    report_url = resource_identifier(facts, "report")
    identifiers: list[dict[str, Any]] = [{"system": IDENTIFIER_SYSTEM, "value": report_url}]
    if facts.accession_number:
        identifiers.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "ACSN", "display": "Accession ID"}]},
                            "value": facts.accession_number})
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": identifiers,
        "status": REPORT_STATUS[facts.event],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": _concept(REPORT, "AI analysis"),
        "subject": subject,
        "issued": _instant(now),
        "imagingStudy": [study],
        "conclusion": facts.conclusion,
    }
    effective = _date(facts.study_date)
    if effective is not None:
        report["effectiveDateTime"] = effective
    if results:
        report["result"] = results
    entries.append(_entry(report_url, report))
    try:
        return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    except ValidationError as exc:
        raise ValueError(f"FHIR report of job {facts.job_id} does not validate: {exc}") from exc
