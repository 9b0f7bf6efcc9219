"""HL7 v2.5 ORU^R01 "AI results" messages and the ACKs that answer them, built and read with hl7apy.

The message (built with strict validation, so a segment or field out of place fails here, not
at the RIS):

* MSH: the destination's sending/receiving application and facility, ``ORU^R01^ORU_R01``,
  a control ID that is the same on every retry of one notification (``DN<delivery>-<status>``,
  so a receiver can drop a repeat), processing ID, version 2.5, UTF-8 (MSH-18).
* PID: PID-3 the Patient ID (with the destination's assigning authority, type MR), PID-5 the
  name (DICOM PN components, prefix and suffix swapped into XPN order).
* ORC-1 ``RE``, ORC-3 and OBR-3 the accession number (filler order number), OBR-18 it again
  (IHE Radiology's place for it), OBR-4 LOINC 18748-4, OBR-7 when the job finished, OBR-22
  now, OBR-24 ``RAD``, OBR-25 the result status: ``F`` results delivered, ``I`` held for review
  (nothing sent yet), ``X`` AI not performed.
* OBX lines (OBX-11 ``F``): the Study Instance UID (DCM 110180), the algorithm's name and version
  (DCM 111001/111003), the conclusion in words (DCM 121077, TX); then per finding, grouped by
  OBX-4 sub-ID 1, 2, ...: what was found (DCM 121071 Finding = SCT code; a classification: its
  question = its answer), where (SCT 363698007 Finding Site), each measurement (NM with UCUM
  units: volume mL, long axis mm, certainty %) and the finding in words (DCM 121106 Comment).
  Long text is sent as repetitions of OBX-5 (one line each, split between words).

Text is escaped by hl7apy's own TX/ST encoding (``\\F\\``, ``\\S\\``, ...). An ACK's MSA-1 ``AA``/``CA``
means delivered; ``AE``/``CE`` (an error while processing: the receiver's state) is retryable;
``AR``/``CR`` (rejected: the message itself) is not; either way with MSA-3 or ERR's text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from hl7apy.v2_5 import ST, TX

from dicom_node.contracts import CodedConcept
from dicom_node.db.notifications import NotificationFacts
from dicom_node.destinations import HL7Destination
from dicom_node.report_codes import (
    ALGORITHM_NAME,
    ALGORITHM_VERSION,
    COMMENT,
    CONCLUSION,
    FINDING,
    FINDING_SITE,
    REPORT,
    STUDY_INSTANCE_UID,
)

__all__ = ["RESULT_STATUS", "Ack", "build_oru", "control_id", "read_ack"]

logger = logging.getLogger(__name__)

VERSION = "2.5"
_MAX_TEXT = 199  # characters of one OBX-5 repetition, escaped (see _text)
#: OBR-25 per event: final results, incomplete (held for review), no results (not performed).
RESULT_STATUS = {"results": "F", "held": "I", "not_performed": "X"}


def _text(value: str) -> list[str]:
    """``value`` as ER7 text (HL7 separators escaped by hl7apy), in repetitions of OBX-5 that hl7apy takes: a
    varies field's value is checked as ST, 199 characters at most, so a long conclusion is split between words
    (each repetition a line of the TX value)."""
    lines: list[str] = []
    current = ""
    for word in value.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(str(TX(candidate).to_er7())) > _MAX_TEXT:
            lines.append(current)
            candidate = word
        while len(str(TX(candidate).to_er7())) > _MAX_TEXT:  # one word longer than a line
            lines.append(candidate[:_MAX_TEXT // 4])
            candidate = candidate[_MAX_TEXT // 4:]
        current = candidate
    lines.append(current)
    return [str(TX(line).to_er7()) for line in lines]


def _st(value: str) -> str:
    return str(ST(value).to_er7())


def _coded(code: CodedConcept) -> str:
    """A CE/CWE value: identifier^text^coding system."""
    return "^".join(_st(part) for part in (code.value, code.meaning, code.scheme))


def _number(value: float) -> str:
    return f"{value:.6g}"


def _timestamp(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def _person_name(dicom_name: str) -> str:
    """A DICOM PN (family^given^middle^prefix^suffix, alphabetic group) as an XPN (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(_st(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def control_id(facts: NotificationFacts) -> str:
    """MSH-10: one per notification and result status, the same on every retry (a receiver can drop repeats)."""
    return f"DN{facts.delivery_id}-{RESULT_STATUS[facts.event]}"


def build_oru(destination: HL7Destination, facts: NotificationFacts, *, now: datetime) -> str:
    """The ORU^R01 telling ``destination`` what job ``facts.job_id`` did (see the module docstring), as ER7
    (segments separated by carriage returns). Raises ValueError naming the part hl7apy refused."""
    try:
        return _build(destination, facts, now)
    except HL7apyException as exc:
        said = str(exc)
        if any(part and part in said for part in (facts.patient_id, facts.patient_name)):
            logger.debug("job %d: ORU^R01 refused by hl7apy: %s", facts.job_id, said)
            said = "a patient identifier or name it cannot carry (details at DEBUG level)"
        raise ValueError(f"ORU^R01 for job {facts.job_id} cannot be built: {type(exc).__name__}: {said}") from exc


def _build(destination: HL7Destination, facts: NotificationFacts, now: datetime) -> str:
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    msh.msh_3 = _st(destination.sending_application)
    if destination.sending_facility:
        msh.msh_4 = _st(destination.sending_facility)
    if destination.receiving_application:
        msh.msh_5 = _st(destination.receiving_application)
    if destination.receiving_facility:
        msh.msh_6 = _st(destination.receiving_facility)
    msh.msh_7 = _timestamp(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(facts)
    msh.msh_11 = destination.processing_id
    msh.msh_12 = VERSION
    msh.msh_18 = "UNICODE UTF-8"

    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    pid = patient.pid
    if facts.patient_id:
        authority = _st(destination.patient_id_authority) if destination.patient_id_authority else ""
        pid.pid_3 = f"{_st(facts.patient_id)}^^^{authority}^MR"
    if facts.patient_name:
        pid.pid_5 = _person_name(facts.patient_name)

    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.orc.orc_1 = "RE"
    obr = order.obr
    obr.obr_1 = "1"
    if facts.accession_number:
        order.orc.orc_3 = _st(facts.accession_number)
        obr.obr_3 = _st(facts.accession_number)
        obr.obr_18 = _st(facts.accession_number)
    obr.obr_4 = _coded(REPORT)
    if facts.finished_at is not None:
        obr.obr_7 = _timestamp(facts.finished_at)
    obr.obr_22 = _timestamp(now)
    obr.obr_24 = "RAD"
    obr.obr_25 = RESULT_STATUS[facts.event]

    lines = _Lines(order, facts.finished_at)
    lines.add("ST", STUDY_INSTANCE_UID, _st(facts.study_instance_uid))
    lines.add("ST", ALGORITHM_NAME, _st(facts.algorithm_name))
    if facts.algorithm_version:
        lines.add("ST", ALGORITHM_VERSION, _st(facts.algorithm_version))
    lines.add("TX", CONCLUSION, _text(facts.conclusion))
    for number, finding in enumerate(facts.findings, start=1):
        group = str(number)
        if finding.value is not None:
            lines.add("CWE", finding.type, _coded(finding.value), group)
        else:
            lines.add("CWE", FINDING, _coded(finding.type), group)
        if finding.site is not None:
            lines.add("CWE", FINDING_SITE, _coded(finding.site), group)
        for measurement in finding.measurements:
            lines.add("NM", measurement.name, _number(measurement.value), group, unit=measurement.unit)
        lines.add("TX", COMMENT, _text(finding.text), group)
    message.validate()
    return str(message.to_er7())


@dataclass
class _Lines:
    """Appends OBX segments (numbered 1, 2, ...) to an ORDER_OBSERVATION group."""

    order: Group
    observed_at: datetime | None
    count: int = 0

    def add(self, value_type: str, code: CodedConcept, value: str | list[str], sub_id: str | None = None, *,
            unit: CodedConcept | None = None) -> None:
        """One OBX; ``value`` in ER7, a list for a value in repetitions (long text)."""
        self.count += 1
        obx = self.order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(self.count)
        obx.obx_2 = value_type
        obx.obx_3 = _coded(code)
        if sub_id is not None:
            obx.obx_4 = sub_id
        first, *more = [value] if isinstance(value, str) else value
        obx.obx_5 = first
        for repetition in more:
            obx.add_field("OBX_5").value = repetition
        if unit is not None:
            obx.obx_6 = _coded(unit)
        obx.obx_11 = "F"
        if self.observed_at is not None:
            obx.obx_14 = _timestamp(self.observed_at)


@dataclass(frozen=True)
class Ack:
    """What an ACK said: MSA-1 (AA, AE, AR or CA, CE, CR), MSA-2 the control ID it answers, and its text."""

    code: str
    control_id: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def retryable(self) -> bool:
        """An application error (AE/CE: the receiver's state) may pass; a reject (AR/CR: the message) will not."""
        return self.code in ("AE", "CE")


def read_ack(text: str) -> Ack:
    """The ACK in ER7 ``text``; ValueError naming what is wrong when it is not an ACK with an MSA segment."""
    try:
        message = parse_message(text.replace("\r\n", "\r").replace("\n", "\r").strip("\r"),
                                validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except HL7apyException as exc:
        raise ValueError(f"the answer is not an HL7 message: {exc}") from exc
    msa = next((segment for segment in message.children if segment.name == "MSA"), None)
    if msa is None:
        raise ValueError(f"the answer ({message.msh.msh_9.value or 'no message type'}) has no MSA segment")
    code = msa.msa_1.value.strip().upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError(f"the ACK's MSA-1 is {code!r}, not AA, AE, AR, CA, CE or CR")
    said = [msa.msa_3.value] if msa.msa_3.value else []
    for segment in message.children:
        if segment.name == "ERR":
            said += [field.value for field in segment.children if field.name in ("ERR_8", "ERR_7") and field.value]
    return Ack(code, msa.msa_2.value, "; ".join(said))
