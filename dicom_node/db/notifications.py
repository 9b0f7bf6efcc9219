"""Notifications (HL7 v2, FHIR): when a job's news is due to the systems its rule names, and what they are told.

Why: a RIS or an EHR should hear of a job's results only once the PACS has them, so a
notification is a delivery (the same row, states, retries, dead letter and UI as every other
delivery: one per job and destination, the table's unique index keeping it so) that is created
only when every other delivery of the job is ``delivered``:

* a job that succeeded: when its results reached every result destination (``results``);
* a model that declined the study (``not_performed``) or a result held as implausible (``held``):
  when its "not performed" notices (if any) were delivered - at once when there are none;
* a held result an operator released: the notification that said "held" is sent again (the same
  row, due again) once the released results are delivered, and now reports them.

A notification destination that does not list the event (``notify``) is not told. The check runs
where a job finishes (:func:`dicom_node.db.jobs.finish_job`), where a delivery is delivered
(:class:`dicom_node.dispatch.Dispatcher`) and where a held job is released; it locks the job's row,
so two deliveries finishing at once on PostgreSQL cannot both miss (or both create) it. A new or
repeated notification is due now (``failed``, no attempt made): the node's next sweep sends it.

:func:`notification_facts` reads what a message says: the study's identification, the job's
state and reason, and its coded findings (``summary["reported"]``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.contracts import ReportedFinding
from dicom_node.db.config_repo import notification_destinations
from dicom_node.db.job_checks import outcome_reason
from dicom_node.db.job_reruns import job_destinations, make_due
from dicom_node.db.models import Delivery, DeliveryState, DestinationRow, Job, JobState, Study, StudyEvent, json_object
from dicom_node.destinations import NOTIFICATION_KINDS

__all__ = ["EVENT_OF_STATE", "NotificationFacts", "notification_facts", "notify_when_delivered"]

logger = logging.getLogger(__name__)

Event = Literal["results", "not_performed", "held"]
#: The event a job in each state is notified as (other states are never notified).
EVENT_OF_STATE: dict[str, Event] = {
    JobState.SUCCEEDED.value: "results",
    JobState.RELEASED.value: "results",
    JobState.NOT_APPLICABLE.value: "not_performed",
    JobState.HELD.value: "held",
}


def notify_when_delivered(session: Session, job_id: int, *, now: datetime, max_attempts: int) -> list[int]:
    """Make job ``job_id``'s notifications due if its other deliveries are all delivered (see the module
    docstring), inside the caller's transaction; returns the ids of the deliveries made due (new or again)."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.superseded_at is not None:
        return []
    event = EVENT_OF_STATE.get(job.state)
    if event is None:
        return []
    told = [d for d in notification_destinations(session, job_destinations(job)) if event in d.notify]
    if not told:
        return []
    notifying = set(session.scalars(select(DestinationRow.name)
                                    .where(DestinationRow.kind.in_(sorted(NOTIFICATION_KINDS)))))
    deliveries = list(session.scalars(select(Delivery).where(Delivery.job_id == job_id)))
    waiting = [d for d in deliveries if d.destination not in notifying and d.state != DeliveryState.DELIVERED.value]
    if waiting:
        return []
    existing = {d.destination: d for d in deliveries}
    due: list[Delivery] = []
    for destination in told:
        delivery = existing.get(destination.name)
        if delivery is None:
            delivery = Delivery(job_id=job_id, destination=destination.name, max_attempts=max_attempts,
                                created_at=now, objects_sent=0)
            session.add(delivery)
        elif not (job.state == JobState.RELEASED.value
                  and delivery.state in (DeliveryState.DELIVERED.value, DeliveryState.DEAD.value)
                  and delivery.state_changed_at < job.state_changed_at):
            continue  # told already, or being told (it reads the job's state when it is sent)
        make_due(delivery, now)
        due.append(delivery)
    if not due:
        return []
    session.flush()
    names = ", ".join(f"{d.destination} (delivery {d.id})" for d in due)
    session.add(StudyEvent(study_id=job.study_id, at=now, kind="notification_due",
                           detail=f"job {job_id} ({job.pipeline}): {event.replace('_', ' ')}: notifying {names}"))
    logger.info("job %d: %s notification due to %s", job_id, event, names)
    return [d.id for d in due]


@dataclass(frozen=True)
class NotificationFacts:
    """What a notification of one job says (read at send time, so a released job reports its results)."""

    job_id: int
    delivery_id: int
    pipeline: str
    state: str
    event: Event
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    study_description: str | None
    finished_at: datetime | None
    algorithm_name: str
    algorithm_version: str | None
    reason: str | None = None
    findings: tuple[ReportedFinding, ...] = ()
    #: The result destinations that have the job's objects (for the report's text).
    delivered_to: tuple[str, ...] = field(default_factory=tuple)

    @property
    def conclusion(self) -> str:
        """One paragraph for people: what the AI did and found (the OBX/DiagnosticReport conclusion)."""
        model = f"{self.algorithm_name}" + (f" {self.algorithm_version}" if self.algorithm_version else "")
        if self.event == "not_performed":
            return f"AI analysis not performed ({model}): {self.reason or 'the model does not apply to this study'}"
        if self.event == "held":
            return (f"AI results held for review, not sent ({model}): "
                    f"{self.reason or 'the result was judged implausible'}")
        shown = [f.text for f in self.findings if not f.low_confidence]
        found = "; ".join(shown) if shown else "no finding"
        low = sum(f.low_confidence for f in self.findings)
        extra = f" (and {low} low-confidence finding{'s' if low > 1 else ''})" if low else ""
        where = f"; results sent to {', '.join(self.delivered_to)}" if self.delivered_to else ""
        return f"AI results ({model}): {found}{extra}{where}"


def _findings(summary: dict[str, Any], job_id: int) -> tuple[ReportedFinding, ...]:
    found = []
    for record in summary.get("reported") or []:
        try:
            found.append(ReportedFinding.model_validate(record))
        except ValueError as exc:  # a damaged record costs its line, never the notification
            logger.warning("job %d: a reported finding cannot be read (%s); it is left out", job_id, exc)
    return tuple(found)


def notification_facts(sessions: sessionmaker[Session], delivery_id: int) -> NotificationFacts | None:
    """What delivery ``delivery_id``'s notification says now; None when its job is in no notified state."""
    with sessions() as session:
        row = session.execute(
            select(Delivery.job_id, Job, Study).join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id).where(Delivery.id == delivery_id)
        ).one_or_none()
        if row is None:
            return None
        job_id, job, study = row
        event = EVENT_OF_STATE.get(job.state)
        if event is None:
            return None
        summary = json_object(job.summary, f"summary of job {job_id}")
        checks = json_object(job.checks, f"checks of job {job_id}")
        notifying = set(session.scalars(select(DestinationRow.name)
                                        .where(DestinationRow.kind.in_(sorted(NOTIFICATION_KINDS)))))
        delivered = sorted(str(name) for name in session.scalars(
            select(Delivery.destination).where(Delivery.job_id == job_id,
                                               Delivery.state == DeliveryState.DELIVERED.value))
            if name not in notifying)
        algorithm = summary.get("algorithm") if isinstance(summary.get("algorithm"), dict) else {}
        return NotificationFacts(
            job_id=int(job_id), delivery_id=delivery_id, pipeline=job.pipeline, state=job.state, event=event,
            study_instance_uid=study.study_instance_uid, accession_number=study.accession_number or None,
            patient_id=study.patient_id or None, patient_name=study.patient_name or None,
            study_date=study.study_date or None, study_description=study.study_description or None,
            finished_at=job.finished_at, algorithm_name=str(algorithm.get("name") or job.pipeline),
            algorithm_version=str(algorithm["version"]) if algorithm.get("version") else None,
            reason=outcome_reason(job.state, checks) or job.error,
            findings=_findings(summary, int(job_id)) if event == "results" else (),
            delivered_to=tuple(delivered),
        )
