"""HL7 v2 and FHIR notifications, sent by the node's own dispatcher to real servers: an MLLP listener (hl7apy's
``MLLPServer`` answering ACKs) and an HTTP FHIR endpoint (``tests/integration/notification_peers.py``).

A study is received through the node's ingest path, routed to a model with the default destinations (a PACS,
a RIS by HL7, an EHR by FHIR), and its job finished as the worker finishes it, with the findings the worker
codes (``workers.outputs.reported``). Then: no notification until the PACS has the results; one per job and
destination once it has; the messages parse back with the libraries (hl7apy strict, fhir.resources) and say
what was found; AE and HTTP 503 are retried, repeated failures end dead, a rejection at once; "not
performed" and "held" are said so, and a released job is reported again with its findings; the study page
and the API show every notification as a delivery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from dicom_node.app.cli import main
from dicom_node.contracts import CodedConcept, Detection, SegmentLabel
from dicom_node.db import config_repo, jobs
from dicom_node.db.models import Delivery
from dicom_node.destinations import DicomDestination, FhirDestination, HL7Destination
from dicom_node.dispatch import Dispatcher
from dicom_node.held_results import release_held
from dicom_node.settings import DeliverySettings
from notification_peers import FhirServer, MllpListener
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.studies_fixtures import T0, complete_and_route, finish_checked, ingest, write_study
from tests.web.test_held_results import applies, declined, implausible
from tests.web.test_rules import api, page
from workers.models.base import DetectionResult
from workers.outputs.reported import reported_findings

NODULE = SegmentLabel(value=1, name="nodule",
                      property_category=CodedConcept(value="49755003", scheme="SCT",
                                                     meaning="Morphologically Altered Structure"),
                      property_type=CodedConcept(value="27925004", scheme="SCT", meaning="Nodule"))
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.9.7307.1"


def detection_summary() -> dict[str, object]:
    """A detection job's summary as the worker writes it: two nodules, one under the display threshold."""
    result = DetectionResult((
        Detection(centre_mm=(10.0, 20.0, 30.0), size_mm=(14.0, 14.0, 14.0), diameter_mm=14.2, score=0.93, label=NODULE),
        Detection(centre_mm=(-40.0, 5.0, 60.0), size_mm=(6.0, 6.0, 6.0), diameter_mm=6.0, score=0.31, label=NODULE),
    ))
    return {"kind": "detection", "findings": 2, "display_threshold": 0.5,
            "reported": reported_findings(result, None, 0.5),
            "algorithm": {"name": "AI lung nodules", "version": "0.1.0"}}


@dataclass
class Node:
    """The web env with its dispatcher, a clock the test moves, and the two notified systems."""

    env: WebEnv
    dispatcher: Dispatcher
    now: list[datetime]
    ris: MllpListener
    ehr: FhirServer

    def at(self, seconds: float) -> datetime:
        self.now[0] = T0 + timedelta(seconds=seconds)
        return self.now[0]

    def sweep(self, seconds: float) -> list[int]:
        """The node's sweep at ``seconds`` (due deliveries become pending) and the io worker sending each pending
        notification; returns their ids. The PACS deliveries are left to :meth:`pacs_gets_it`."""
        pending = jobs.unfinished_deliveries(self.env.sessions, now=self.at(seconds))
        with self.env.sessions() as session:
            pacs = set(session.scalars(select(Delivery.id).where(Delivery.destination == "pacs")))
        sent = [delivery_id for delivery_id in pending if delivery_id not in pacs]
        for delivery_id in sent:
            self.dispatcher.deliver(delivery_id)
        return sent

    def deliveries(self, job_id: int) -> dict[str, Delivery]:
        with self.env.sessions() as session:
            rows = session.query(Delivery).filter(Delivery.job_id == job_id).all()
            session.expunge_all()
        return {d.destination: d for d in rows}

    def pacs_gets_it(self, job_id: int, seconds: float) -> list[int]:
        """The PACS delivery of ``job_id`` arrives (as the dispatcher records it); the notifications it made due."""
        pacs = self.deliveries(job_id)["pacs"]
        assert jobs.claim_delivery(self.env.sessions, pacs.id, now=self.at(seconds), lease_seconds=60) is not None
        return jobs.finish_delivery(self.env.sessions, pacs.id, now=self.at(seconds + 1), objects_sent=3,
                                    notify_max_attempts=3)


@pytest.fixture
def node(web: WebEnv) -> Node:
    now = [T0]
    with MllpListener() as ris, FhirServer() as ehr:
        for destination in (
            DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112, default=True,
                             not_performed="sr"),
            HL7Destination(name="ris", host="127.0.0.1", port=ris.port, default=True, sending_facility="RADIOLOGY",
                           receiving_application="RIS", receiving_facility="HOSPITAL", patient_id_authority="HOSP",
                           timeout_seconds=5),
            FhirDestination.model_validate({"name": "ehr", "url": ehr.url, "default": True, "timeout_seconds": 5,
                                            "auth": {"type": "bearer", "token": "s3cret-token"},
                                            "patient_id_system": PATIENT_SYSTEM}),
        ):
            config_repo.upsert_destination(web.sessions, destination, source="test", now=T0)
        dispatcher = Dispatcher(sessions=web.sessions, outbox_dir=web.settings.outbox_dir, calling_ae_title="NODE",
                                policy=DeliverySettings(max_attempts=3, backoff_initial_seconds=10,
                                                        backoff_max_seconds=60), clock=lambda: now[0])
        yield Node(web, dispatcher, now, ris, ehr)


def _study(node: Node, tmp_path: Path, seed: int, models: list[str]) -> tuple[str, list[int]]:
    files = write_study(tmp_path / f"study-{seed}", seed=seed, patient_id=f"PAT-{seed}", patient_name="Notify^Nora",
                        accession=f"ACC-{seed}", study_date="20260320", description="CT chest")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ingest(node.env, files, calling_ae="PACS", at=T0)
    job_ids = complete_and_route(node.env.sessions, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), models,
                                 at=T0 + timedelta(seconds=30))
    return str(ds.StudyInstanceUID), job_ids


def _oru(text: str):  # type: ignore[no-untyped-def]
    """An ORU^R01 parsed back with hl7apy, strictly validated."""
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    return message


def _obx(message) -> list[tuple[str, str, str, str, str]]:  # type: ignore[no-untyped-def]
    """(value type, code, sub-ID, value, unit code) of every OBX line."""
    order = message.oru_r01_patient_result.oru_r01_order_observation
    lines = []
    for group in order.oru_r01_observation:
        obx = group.obx
        lines.append((obx.obx_2.value, obx.obx_3.obx_3_1.value, obx.obx_4.value, obx.obx_5.to_er7(),
                      obx.obx_6.obx_6_1.value))
    return lines


def _bundle(body: bytes) -> tuple[DiagnosticReport, list[Observation], Bundle]:
    bundle = Bundle.model_validate_json(body)
    assert bundle.type == "transaction"
    reports = [e.resource for e in bundle.entry if isinstance(e.resource, DiagnosticReport)]
    observations = [e.resource for e in bundle.entry if isinstance(e.resource, Observation)]
    assert len(reports) == 1 and len(reports) + len(observations) == len(bundle.entry)
    return reports[0], observations, bundle


def test_results_are_notified_once_the_pacs_has_them_with_retries(node: Node, tmp_path: Path,
                                                                   viewer: LoggedIn) -> None:
    uid, [job_id] = _study(node, tmp_path, 61, ["lung-nodules"])
    node.ris.answers, node.ehr.statuses = ["AE"], [503]
    finish_checked(node.env.sessions, job_id, at=node.at(40), state="succeeded",
                   checks={"applicability": applies("lung-nodules")}, events=[],
                   deliveries=[jobs.DeliverySpec("pacs")], summary=detection_summary())
    assert set(node.deliveries(job_id)) == {"pacs"}, "nobody is told before the PACS has the results"
    assert node.sweep(45) == [] and node.ris.messages == [] and node.ehr.posted() == []

    due = node.pacs_gets_it(job_id, 50)
    told = node.deliveries(job_id)
    assert sorted(due) == sorted([told["ris"].id, told["ehr"].id])
    # A repeated "delivered" (a redelivered message) makes nothing due again.
    assert jobs.finish_delivery(node.env.sessions, told["pacs"].id, now=node.at(52), objects_sent=3,
                                notify_max_attempts=3) == []

    # First attempt: the RIS answers AE, the EHR 503; both are retried after the backoff.
    assert sorted(node.sweep(55)) == sorted(due)
    told = node.deliveries(job_id)
    assert told["ris"].state == "failed" and "answered AE: scripted error (will retry)" in told["ris"].error
    assert told["ehr"].state == "failed" and "HTTP 503: scripted HTTP 503 (will retry)" in told["ehr"].error
    assert node.sweep(60) == []  # backoff: not yet
    assert sorted(node.sweep(70)) == sorted(due)
    told = node.deliveries(job_id)
    assert {name: (d.state, d.attempts) for name, d in told.items()} == {
        "pacs": ("delivered", 1), "ris": ("delivered", 2), "ehr": ("delivered", 2)}
    assert told["ris"].objects_sent == 1 and told["ehr"].objects_sent == 3  # the report and two Observations

    # HL7: the same message twice (same control ID), valid ORU^R01 with the accession, the study and the findings.
    assert len(node.ris.messages) == 2 and node.ris.messages[0] == node.ris.messages[1].replace(
        _oru(node.ris.messages[1]).msh.msh_7.value, _oru(node.ris.messages[0]).msh.msh_7.value)
    message = _oru(node.ris.messages[-1])
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.value == "2.5"
    assert (message.msh.msh_4.to_er7(), message.msh.msh_5.to_er7(), message.msh.msh_6.to_er7()) == (
        "RADIOLOGY", "RIS", "HOSPITAL")
    assert message.msh.msh_10.value == f"DN{told['ris'].id}-F"
    result = message.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3.to_er7() == "PAT-61^^^HOSP^MR"
    assert result.oru_r01_patient.pid.pid_5.to_er7() == "Notify^Nora"
    obr = result.oru_r01_order_observation.obr
    assert (obr.obr_3.to_er7(), obr.obr_18.to_er7(), obr.obr_25.value) == ("ACC-61", "ACC-61", "F")
    assert obr.obr_4.to_er7() == "18748-4^Diagnostic imaging study^LN"
    lines = _obx(message)
    assert ("ST", "110180", "", uid, "") in lines
    assert ("ST", "111001", "", "AI lung nodules", "") in lines and ("ST", "111003", "", "0.1.0", "") in lines
    conclusion = next(value for kind, code, _, value, _ in lines if code == "121077")
    assert conclusion.startswith("AI results (AI lung nodules 0.1.0): Nodule 1: 14.2 mm, certainty 93 %")
    assert "(and 1 low-confidence finding)" in conclusion and "results sent to pacs" in conclusion
    assert [(kind, sub, value, unit) for kind, code, sub, value, unit in lines if code == "103339001"] == [
        ("NM", "1", "14.2", "mm"), ("NM", "2", "6", "mm")]
    assert [(sub, value, unit) for _, code, sub, value, unit in lines if code == "111012"] == [
        ("1", "93", "%"), ("2", "31", "%")]
    assert [(sub, value) for _, code, sub, value, _ in lines if code == "121071"] == [
        ("1", "27925004^Nodule^SCT"), ("2", "27925004^Nodule^SCT")]

    # FHIR: two posts of the same transaction; the report names the ImagingStudy, the patient, the findings.
    first, last = node.ehr.posted()
    assert [e["request"] for e in json.loads(first)["entry"]] == [e["request"] for e in json.loads(last)["entry"]]
    method, path, headers, _ = node.ehr.requests[-1]
    assert (method, path) == ("POST", "/fhir") and headers["Authorization"] == "Bearer s3cret-token"
    assert headers["Content-Type"].startswith("application/fhir+json")
    report, observations, bundle = _bundle(last)
    assert report.status == "final" and report.code.coding[0].code == "18748-4"
    [study] = report.imagingStudy
    assert study.type == "ImagingStudy" and study.identifier.value == f"urn:oid:{uid}"
    assert (report.subject.identifier.system, report.subject.identifier.value) == (PATIENT_SYSTEM, "PAT-61")
    assert "ACC-61" in [i.value for i in report.identifier] and str(report.effectiveDateTime) == "2026-03-20"
    assert report.conclusion == conclusion
    full_urls = {e.fullUrl: e for e in bundle.entry}
    assert [r.reference for r in report.result] == [f for f, e in full_urls.items()
                                                    if isinstance(e.resource, Observation)]
    assert all(e.request.method == "PUT" and e.request.url.startswith(f"{e.resource.get_resource_type()}?identifier=")
               for e in bundle.entry)
    nodule = observations[0]
    assert nodule.code.coding[0].code == "27925004" and nodule.derivedFrom[0].identifier.value == f"urn:oid:{uid}"
    measured = {c.code.coding[0].display: (float(c.valueQuantity.value), c.valueQuantity.code, c.valueQuantity.system)
                for c in nodule.component}
    assert measured == {"Long axis": (14.2, "mm", "http://unitsofmeasure.org"),
                        "Certainty of Finding": (93.0, "%", "http://unitsofmeasure.org")}
    assert nodule.device.display == "AI lung nodules 0.1.0"

    # Once per job and destination: a later sweep or a redelivered message sends nothing again.
    assert node.sweep(500) == [] and node.dispatcher.deliver(told["ris"].id) is None
    assert len(node.ris.messages) == 2 and len(node.ehr.posted()) == 2

    # The study page and the API show the notifications as deliveries, with their attempts.
    api = viewer.client.get(f"/api/v1/studies/{uid}").json()
    [job] = api["jobs"]
    assert {(d["destination"], d["state"], d["attempts"]) for d in job["deliveries"]} == {
        ("pacs", "delivered", 1), ("ris", "delivered", 2), ("ehr", "delivered", 2)}
    assert any(e["kind"] == "job.notification_due" for e in api["timeline"])
    page = viewer.client.get(f"/studies/{uid}/live").text
    assert f"Delivery {told['ris'].id} to ris delivered" in page and f"Delivery {told['ehr'].id} to ehr" in page


def test_failures_end_dead_and_a_rejection_at_once(node: Node, tmp_path: Path) -> None:
    uid, [job_id] = _study(node, tmp_path, 62, ["lung-nodules"])
    node.ris.answers, node.ehr.statuses = ["AE", "AE", "AE"], [400]
    finish_checked(node.env.sessions, job_id, at=node.at(40), state="succeeded", checks={}, events=[],
                   deliveries=[jobs.DeliverySpec("pacs")], summary=detection_summary())
    node.pacs_gets_it(job_id, 50)
    for seconds in (60, 100, 200):
        node.sweep(seconds)
    told = node.deliveries(job_id)
    assert (told["ris"].state, told["ris"].attempts) == ("dead", 3) and len(node.ris.messages) == 3
    assert "answered AE: scripted error" in told["ris"].error
    assert (told["ehr"].state, told["ehr"].attempts) == ("dead", 1)
    assert "HTTP 400: scripted HTTP 400 (permanent)" in told["ehr"].error

    # An admin's re-send (the study page's button) tries again; an AR is not retried.
    node.ris.answers = ["AR"]
    assert jobs.retry_delivery(node.env.sessions, told["ris"].id, now=node.at(300))
    node.sweep(301)
    ris = node.deliveries(job_id)["ris"]
    assert (ris.state, ris.attempts) == ("dead", 1) and "answered AR: scripted error (permanent)" in ris.error

    # Nothing listening: retryable, named.
    node.ris.__exit__()
    assert jobs.retry_delivery(node.env.sessions, ris.id, now=node.at(400))
    node.sweep(401)
    ris = node.deliveries(job_id)["ris"]
    assert ris.state == "failed" and "connection refused" in ris.error and uid not in ris.error


def test_not_performed_and_held_are_said_so_and_a_release_is_reported(node: Node, tmp_path: Path) -> None:
    uid, [declined_job, held_job] = _study(node, tmp_path, 63, ["lung-nodules", "chest-seg"])
    sessions = node.env.sessions
    ehr = config_repo.get_destination(sessions, "ehr")
    assert isinstance(ehr, FhirDestination)
    config_repo.upsert_destination(sessions, ehr.model_copy(update={"notify": frozenset({"results", "held"})}),
                                   source="test", now=T0)  # the EHR does not want to hear of declined studies
    # Declined: the PACS gets its "not performed" SR first, then the RIS and the EHR hear of it.
    finish_checked(sessions, declined_job, at=node.at(40), state="not_applicable",
                   checks={"applicability": declined("lung-nodules")}, events=[],
                   deliveries=[jobs.DeliverySpec("pacs", (jobs.NOTICE_KIND,))])
    assert set(node.deliveries(declined_job)) == {"pacs"}
    node.pacs_gets_it(declined_job, 45)
    # Held without a notice: told at once.
    held_summary = {"kind": "segmentation", "volumes_ml": {"lung": 250.0}, "algorithm": {"name": "AI chest anatomy",
                                                                                        "version": "0.1.0"},
                    "reported": [{"text": "Lung: 250.0 mL", "type": {"value": "39607008", "scheme": "SCT",
                                                                      "meaning": "Lung"},
                                  "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
                                  "measurements": [{"name": {"value": "118565006", "scheme": "SCT",
                                                             "meaning": "Volume"}, "value": 250.0,
                                                    "unit": {"value": "mL", "scheme": "UCUM",
                                                             "meaning": "milliliter"}}]}]}
    finish_checked(sessions, held_job, at=node.at(46), state="held",
                   checks={"applicability": applies("chest-seg"), "plausibility": implausible("chest-seg")},
                   events=[], deliveries=[], summary=held_summary)
    assert set(node.deliveries(held_job)) == {"ris", "ehr"}
    node.sweep(50)
    assert set(node.deliveries(declined_job)) == {"pacs", "ris"}
    assert len(node.ris.messages) == 2 and len(node.ehr.posted()) == 1

    by_job = {int(_oru(m).msh.msh_10.value.split("-")[0][2:]): _oru(m) for m in node.ris.messages}
    declined_ris = by_job[node.deliveries(declined_job)["ris"].id]
    obr = declined_ris.oru_r01_patient_result.oru_r01_order_observation.obr
    assert obr.obr_25.value == "X" and obr.obr_3.to_er7() == "ACC-63"
    [(kind, value)] = [(k, v) for k, code, _, v, _ in _obx(declined_ris) if code == "121077"]
    assert value.startswith("AI analysis not performed (lung-nodules): The series does not show the body region")
    held_ris = by_job[node.deliveries(held_job)["ris"].id]
    assert held_ris.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.value == "I"
    held_text = next(v for _, code, _, v, _ in _obx(held_ris) if code == "121077")
    assert held_text.startswith("AI results held for review, not sent (AI chest anatomy 0.1.0): lung volume 250 mL")
    assert not [line for line in _obx(held_ris) if line[2]], "a held result's findings are not reported"
    [held_bundle] = node.ehr.posted()
    held_report = _bundle(held_bundle)[0]
    assert held_report.status == "registered" and held_report.conclusion == held_text and not held_report.result

    # Released: its results go to the PACS, then the same notifications are sent again, now with the findings.
    released = release_held(sessions, held_job, now=node.at(100), by="alice", delivery_max_attempts=3)
    assert released is not None and released.destinations == ["pacs"]
    assert node.sweep(101) == [] and len(node.ris.messages) == 2, "not before the PACS has the released results"
    ris_before = node.deliveries(held_job)["ris"]
    node.pacs_gets_it(held_job, 110)
    node.sweep(111)
    after = node.deliveries(held_job)
    assert after["ris"].id == ris_before.id and after["ris"].state == "delivered" and after["ehr"].state == "delivered"
    assert len(node.ris.messages) == 3 and len(node.ehr.posted()) == 2
    final = _oru(node.ris.messages[-1])
    assert final.msh.msh_10.value == f"DN{after['ris'].id}-F"
    assert final.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.value == "F"
    assert ("NM", "118565006", "1", "250", "mL") in _obx(final)
    report, observations, _ = _bundle(node.ehr.posted()[-1])
    assert report.status == "final" and len(observations) == 1 and len(report.result) == 1
    assert observations[0].bodySite.coding[0].display == "Lung"
    assert report.identifier[0].value == held_report.identifier[0].value, "the release updates the held report"


# --------------------------------------------------------------------------- managing notification destinations


def test_hl7_and_fhir_destinations_in_the_form_the_api_and_the_cli(web: WebEnv, admin: LoggedIn, operator: LoggedIn,
                                                                    tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with MllpListener() as ris, FhirServer() as ehr:
        blank = admin.client.get("/destinations/new?type=hl7")
        assert blank.status_code == 200 and "HL7 peer (MLLP)" in blank.text and 'name="outputs"' not in blank.text
        created = admin.post("/destinations", {"type": "hl7", "name": "ris", "host": "127.0.0.1", "port": str(ris.port),
                                               "sending_application": "DICOM_NODE", "receiving_application": "RIS",
                                               "processing_id": "P", "notify": ["results", "held"],
                                               "timeout_seconds": "5"})
        assert created.status_code == 303, created.text
        stored = config_repo.get_destination(web.sessions, "ris")
        assert isinstance(stored, HL7Destination) and stored.notify == {"results", "held"}
        assert stored.receiving_application == "RIS" and stored.sending_facility is None
        ids = page(admin.client.get("/destinations/ris").text)
        assert "checked" in ids["notify-held"].attrs and "checked" not in ids["notify-not_performed"].attrs
        bad = admin.post("/destinations/ris", {"type": "hl7", "host": "127.0.0.1", "port": str(ris.port),
                                               "receiving_facility": "A|B", "notify": []})
        assert bad.status_code == 422
        ids = page(bad.text)
        assert "'A|B'" in ids["receiving_facility-error"].text and "notify is empty" in ids["notify-error"].text

        headers = api(web)
        fhir = {"type": "fhir", "name": "ehr", "url": ehr.url, "auth": {"type": "bearer", "token": "tok-SECRET"},
                "patient_id_system": "urn:oid:1.2.3"}
        answer = web.client().post("/api/v1/destinations", json=fhir, headers=headers)
        assert answer.status_code == 201 and answer.json()["auth"]["token"] == "**********"
        assert "tok-SECRET" not in admin.client.get("/destinations/ehr").text
        listing = admin.client.get("/destinations").text
        assert "report (ORU^R01)" in listing and "report (DiagnosticReport)" in listing
        assert "mllp://127.0.0.1" in listing and "bearer auth" in listing

        tested = operator.post("/destinations/ris/test")
        assert "TCP connection accepted; no message sent" in tested.text and ris.messages == []
        probe = web.client().post("/api/v1/destinations/ehr/test", headers=headers).json()
        assert probe["ok"] and probe["kind"] == "fhir" and "FHIR version 4.0.1" in probe["detail"]
        assert ehr.requests[-1][1] == "/fhir/metadata" and ehr.requests[-1][2]["Authorization"] == "Bearer tok-SECRET"

    data = ["--data-dir", str(tmp_path / "cli")]
    assert main(["db", "upgrade", *data]) == 0
    assert main(["destinations", "add", "ris", "--type", "hl7", "--host", "10.0.0.9", "--port", "2575",
                 "--receiving-application", "RIS", "--notify", "results", *data]) == 0
    assert main(["destinations", "add", "ehr", "--type", "fhir", "--url", "https://ehr.example/fhir", "--default",
                 *data]) == 0
    assert main(["destinations", "add", "bad", "--type", "fhir", *data]) == 2
    capsys.readouterr()
    assert main(["destinations", "list", *data]) == 0
    listed = capsys.readouterr().out
    assert "mllp://10.0.0.9:2575" in listed and "https://ehr.example/fhir" in listed and "report" in listed


def test_the_last_two_deliveries_finishing_at_once_make_the_notifications_due_once(
        database_url: str, tmp_path: Path) -> None:
    """Two result deliveries of a job end at the same moment in two processes' transactions (threads here): on
    PostgreSQL under READ COMMITTED neither may miss the other (no notification) nor both create them."""
    import threading

    from tests.web.conftest import make_web_env

    env = make_web_env(tmp_path / "env", database_url)
    for destination in (
        DicomDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112, default=True),
        DicomDestination(name="archive", ae_title="ARCH", host="127.0.0.1", port=11113, default=True),
        HL7Destination(name="ris", host="127.0.0.1", port=9, default=True),
        FhirDestination(name="ehr", url="http://127.0.0.1:9/fhir", default=True),
    ):
        config_repo.upsert_destination(env.sessions, destination, source="test", now=T0)
    files = write_study(tmp_path / "study", seed=64, patient_id="PAT-64", patient_name="Race^Rita", accession="ACC-64",
                        study_date="20260320", description="CT chest")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ingest(env, files, calling_ae="PACS", at=T0)
    job_ids = complete_and_route(env.sessions, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                 [f"model-{n}" for n in range(6)], at=T0 + timedelta(seconds=30))
    for job_id in job_ids:
        created = finish_checked(env.sessions, job_id, at=T0 + timedelta(seconds=40), state="succeeded", checks={},
                                 events=[], deliveries=[jobs.DeliverySpec("pacs"), jobs.DeliverySpec("archive")],
                                 summary=detection_summary())
        for delivery_id in created:
            assert jobs.claim_delivery(env.sessions, delivery_id, now=T0 + timedelta(seconds=50), lease_seconds=60)
        barrier, due = threading.Barrier(2), []

        def finish(delivery_id: int) -> None:
            barrier.wait()
            due.append(jobs.finish_delivery(env.sessions, delivery_id, now=T0 + timedelta(seconds=51), objects_sent=1,
                                            notify_max_attempts=3))

        threads = [threading.Thread(target=finish, args=(delivery_id,)) for delivery_id in created]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        with env.sessions() as session:
            rows = session.execute(select(Delivery.destination, Delivery.id, Delivery.state)
                                   .where(Delivery.job_id == job_id)).all()
        notified = {name: delivery_id for name, delivery_id, _ in rows if name in ("ris", "ehr")}
        assert set(notified) == {"ris", "ehr"}, rows
        assert sorted(map(sorted, due)) == [[], sorted(notified.values())], due
