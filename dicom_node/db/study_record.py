"""One study's complete record as a JSON document, for incident reports (``dicom-node studies export``,
``GET /api/v1/studies/{uid}/record``).

Why a module of its own: an incident report must show exactly what the node shows - the
study page's timeline, jobs and deliveries - plus who did what to it (the audit log), in a
versioned format that can be read back years later. The document is built from the views
the page uses (:func:`dicom_node.db.study_views.study_detail`,
:func:`dicom_node.db.study_timeline.timeline`, the shown state of
:func:`dicom_node.db.study_states.study_statuses_by_uid`), a few columns those views do not carry
(job generations, ``purged_at``), and the audit entries whose target is the study, one of
its jobs or one of its deliveries (as the actions name them: ``study``/UID, ``job``/id,
``delivery``/id). Both front ends audit the export themselves (``study.export``).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.audit import AuditView
from dicom_node.db.models import AuditEntry, Job, Study
from dicom_node.db.study_states import study_statuses_by_uid
from dicom_node.db.study_timeline import timeline
from dicom_node.db.study_views import study_detail

__all__ = ["FORMAT", "record_json", "study_record"]

#: The format's name and version: readers check it; a change that removes or renames a field bumps the version.
FORMAT = "dicom-node.study-record/1"


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and datetimes as JSON values (datetimes in ISO 8601 with their UTC offset)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _audit_entries(session: Session, study_uid: str, job_ids: list[int], delivery_ids: list[int]) -> list[AuditView]:
    """Audit entries about the study, its jobs or its deliveries, oldest first."""
    targets = [and_(AuditEntry.target_kind == "study", AuditEntry.target == study_uid)]
    if job_ids:
        targets.append(and_(AuditEntry.target_kind == "job", AuditEntry.target.in_([str(i) for i in job_ids])))
    if delivery_ids:
        targets.append(and_(AuditEntry.target_kind == "delivery",
                            AuditEntry.target.in_([str(i) for i in delivery_ids])))
    rows = session.execute(select(AuditEntry).where(or_(*targets)).order_by(AuditEntry.id)).scalars()
    return [AuditView(id=e.id, at=e.at, actor=e.actor, action=e.action, target_kind=e.target_kind, target=e.target,
                      before=None if e.before is None else json.loads(e.before),
                      after=None if e.after is None else json.loads(e.after), remote_addr=e.remote_addr,
                      detail=e.detail) for e in rows]


def study_record(sessions: sessionmaker[Session], study_instance_uid: str, *, now: datetime,
                 exported_by: str) -> dict[str, Any] | None:
    """The record of the study (None if unknown) as JSON-ready data; ``now`` dates it and ends running spans."""
    detail = study_detail(sessions, study_instance_uid)
    if detail is None:
        return None
    with sessions() as session:
        study_id, purged_at = session.execute(select(Study.id, Study.purged_at).where(
            Study.study_instance_uid == study_instance_uid)).one()
        generations = {int(r[0]): r[1:] for r in session.execute(
            select(Job.id, Job.generation, Job.supersedes_job_id, Job.superseded_at, Job.input_instances)
            .where(Job.study_id == study_id))}
        deliveries = [d for job in detail.jobs for d in job.deliveries]
        entries = _audit_entries(session, study_instance_uid, [j.id for j in detail.jobs], [d.id for d in deliveries])
    jobs = []
    for job in detail.jobs:
        generation, supersedes, superseded_at, input_instances = generations.get(job.id, (1, None, None, None))
        fields = {name: value for name, value in _plain(job).items() if name != "deliveries"}
        for result in fields["results"]:
            result.pop("job_id", None)
        jobs.append({**fields, "generation": generation, "supersedes_job_id": supersedes,
                     "superseded_at": _plain(superseded_at), "input_instances": input_instances,
                     "outcome_reason": job.outcome_reason, "run_seconds": job.run_seconds,
                     "delivery_ids": [d.id for d in job.deliveries]})
    header = {name: _plain(getattr(detail, name)) for name in (
        "study_instance_uid", "patient_id", "patient_name", "accession_number", "study_date", "study_description",
        "state", "instance_count", "late_instance_count", "first_received_at", "last_received_at",
        "receiving_since", "completed_at", "state_changed_at", "modalities", "source_ae_titles", "sources")}
    status = study_statuses_by_uid(sessions, [study_instance_uid])[study_instance_uid]
    return {
        "format": FORMAT,
        "exported_at": now.isoformat(),
        "exported_by": exported_by,
        "study": {**header, "purged_at": _plain(purged_at),
                  "status": {"state": status.state, "label": status.label, "reason": status.reason}},
        "series": _plain(detail.series),
        "associations": _plain(detail.associations),
        "events": _plain(detail.events),
        "timeline": _plain(timeline(detail, now=now)),
        "jobs": jobs,
        "deliveries": _plain(deliveries),
        "audit": _plain(entries),
    }


def record_json(record: dict[str, Any]) -> str:
    """The document as text: indented, keys in a stable order, non-ASCII kept (patient names)."""
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"
