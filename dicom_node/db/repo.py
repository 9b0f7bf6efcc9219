"""The queries and state changes the rest of the node makes; each is one short transaction.

Everything outside ``db/`` reaches the database through these functions (the receive
hot path goes through :mod:`dicom_node.indexer`), so state transitions live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import (
    AssociationOutcome,
    AssociationProtocol,
    AssociationRecord,
    AssociationStudy,
    IngestError,
    Instance,
    Series,
    Study,
    StudyEvent,
    StudyState,
)
from dicom_node.db.uid_reuse import SOP_INSTANCE_UID_REUSED, warn_on_both


@dataclass(frozen=True)
class ExistingInstance:
    id: int
    path: str


def open_association(
    sessions: sessionmaker[Session],
    *,
    calling_ae_title: str,
    called_ae_title: str,
    peer_address: str,
    peer_port: int,
    tls: bool,
    now: datetime,
    reject_reason: str | None = None,
    protocol: AssociationProtocol = AssociationProtocol.DICOM,
    username: str | None = None,
) -> int:
    """Record an association request (or a STOW-RS request, ``protocol``, by ``username``): open, or rejected
    with ``reject_reason``."""
    with sessions.begin() as session:
        record = AssociationRecord(
            protocol=protocol.value,
            username=username[:64] if username else None,
            calling_ae_title=calling_ae_title[:16],
            called_ae_title=called_ae_title[:16],
            peer_address=peer_address,
            peer_port=peer_port,
            tls=tls,
            started_at=now,
            ended_at=now if reject_reason else None,
            outcome=(AssociationOutcome.REJECTED if reject_reason else AssociationOutcome.OPEN).value,
            reject_reason=reject_reason,
            instances_stored=0,
            instances_failed=0,
            bytes_received=0,
        )
        session.add(record)
        session.flush()
        return record.id


def close_association(
    sessions: sessionmaker[Session],
    association_id: int,
    *,
    outcome: AssociationOutcome,
    now: datetime,
    instances_stored: int,
    instances_failed: int,
    bytes_received: int,
) -> None:
    """Record how an association ended; its studies' quiet period starts now."""
    with sessions.begin() as session:
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id == association_id, AssociationRecord.outcome == AssociationOutcome.OPEN.value)
            .values(
                outcome=outcome.value,
                ended_at=now,
                instances_stored=instances_stored,
                instances_failed=instances_failed,
                bytes_received=bytes_received,
            )
        )
        linked = select(AssociationStudy.study_id).where(AssociationStudy.association_id == association_id)
        session.execute(
            update(Study)
            .where(Study.id.in_(linked), Study.state == StudyState.RECEIVING.value)
            .values(last_activity_at=now)
        )


def interrupt_open_associations(sessions: sessionmaker[Session], now: datetime) -> int:
    """Close associations a stopped node left open; their studies get a fresh quiet period."""
    with sessions.begin() as session:
        open_ids = list(
            session.scalars(
                select(AssociationRecord.id).where(AssociationRecord.outcome == AssociationOutcome.OPEN.value)
            )
        )
        if not open_ids:
            return 0
        linked = select(AssociationStudy.study_id).where(AssociationStudy.association_id.in_(open_ids))
        session.execute(
            update(Study)
            .where(Study.id.in_(linked), Study.state == StudyState.RECEIVING.value)
            .values(last_activity_at=now)
        )
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id.in_(open_ids))
            .values(outcome=AssociationOutcome.INTERRUPTED.value, ended_at=now)
        )
        return len(open_ids)


def record_ingest_error(
    sessions: sessionmaker[Session],
    *,
    now: datetime,
    association_id: int | None,
    calling_ae_title: str | None,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    status: int,
    reason: str,
    quarantine_path: str | None,
) -> int:
    with sessions.begin() as session:
        error = IngestError(
            at=now,
            association_id=association_id,
            calling_ae_title=calling_ae_title,
            sop_class_uid=(sop_class_uid or "")[:64] or None,
            sop_instance_uid=(sop_instance_uid or "")[:64] or None,
            status=status,
            reason=reason,
            quarantine_path=quarantine_path,
        )
        session.add(error)
        session.flush()
        return error.id


# Built once: this runs for every received instance.
_FIND_INSTANCE = select(Instance.id, Instance.path).where(Instance.sop_instance_uid == bindparam("uid"))


def find_instance(sessions: sessionmaker[Session], sop_instance_uid: str) -> ExistingInstance | None:
    """The indexed instance with this SOP Instance UID, if any (on the receive hot path)."""
    engine = sessions.kw["bind"]
    with engine.connect() as connection:
        row = connection.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()
    return None if row is None else ExistingInstance(*row)


def count_duplicate(
    sessions: sessionmaker[Session], instance_id: int, *, study_instance_uid: str, now: datetime
) -> None:
    """Count a discarded copy of the indexed instance ``instance_id`` (``dicom.duplicate_policy: keep_first``).

    ``study_instance_uid`` is the study the discarded copy claimed. When that is not the
    study holding the instance, the sender reuses a SOP Instance UID across studies:
    nothing is misfiled (the first study keeps its instance, the copy is not filed into
    it), and both timelines get a warning naming the other study (the second study's
    only when it has been received).
    """
    with sessions.begin() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(duplicates_received=Instance.duplicates_received + 1)
        )
        held = session.execute(
            select(Study.id, Study.study_instance_uid, Instance.sop_instance_uid)
            .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
            .where(Instance.id == instance_id)
        ).first()
        if held is None or held.study_instance_uid == study_instance_uid:
            return
        sop, first = held.sop_instance_uid, held.study_instance_uid
        warnings = [(held.id, first, study_instance_uid,
                     f"SOP Instance UID {sop} of this study was sent again for study {study_instance_uid}; that "
                     "copy was discarded and this study's instance kept (dicom.duplicate_policy keep_first)")]
        claimed = session.scalar(select(Study.id).where(Study.study_instance_uid == study_instance_uid))
        if claimed is not None:
            warnings.append((claimed, study_instance_uid, first,
                             f"SOP Instance UID {sop} sent for this study is already held by study {first}; "
                             "the copy sent for this study was discarded (dicom.duplicate_policy keep_first)"))
        warn_on_both(session.connection(), kind=SOP_INSTANCE_UID_REUSED, at=now, warnings=warnings)


def complete_due_studies(
    sessions: sessionmaker[Session], *, now: datetime, quiet_seconds: float, max_wait_seconds: float
) -> list[str]:
    """Mark complete every receiving study that is quiet, or has waited too long.

    Quiet: nothing arrived for ``quiet_seconds`` and no association that sent to it is
    still open. Too long: ``max_wait_seconds`` since it started receiving. Returns the
    Study Instance UIDs that became complete.
    """
    quiet_before = now - timedelta(seconds=quiet_seconds)
    wait_before = now - timedelta(seconds=max_wait_seconds)
    open_sender = exists().where(
        AssociationStudy.study_id == Study.id,
        AssociationStudy.association_id == AssociationRecord.id,
        AssociationRecord.outcome == AssociationOutcome.OPEN.value,
    )
    with sessions.begin() as session:
        due = session.execute(
            select(Study.id, Study.study_instance_uid, Study.receiving_since <= wait_before)
            .where(Study.state == StudyState.RECEIVING.value)
            .where(((Study.last_activity_at <= quiet_before) & ~open_sender) | (Study.receiving_since <= wait_before))
            .with_for_update(skip_locked=True)
        ).all()
        for study_id, _, waited_too_long in due:
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(state=StudyState.COMPLETE.value, completed_at=now, state_changed_at=now)
            )
            reason = (
                f"max_wait_seconds={max_wait_seconds:g} reached"
                if waited_too_long
                else f"quiet for {quiet_seconds:g} s after the last instance"
            )
            session.add(StudyEvent(study_id=study_id, at=now, kind="complete", detail=reason))
    return [uid for _, uid, _ in due]


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    modalities: str
    state: str
    series_count: int
    instance_count: int
    late_instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


def list_studies(sessions: sessionmaker[Session], limit: int = 500) -> list[StudySummary]:
    """The most recently active studies first.

    The newest ``limit`` studies are picked first (by the ``(last_received_at, id)`` index), then joined
    to their series: grouping before the limit read every study and series (0.3 s for 100,000 studies)."""
    modalities = func.group_concat(Series.modality.distinct())
    with sessions() as session:
        bind = session.get_bind()
        if bind.dialect.name == "postgresql":
            modalities = func.string_agg(Series.modality.distinct(), ",")
        newest = (select(Study.id).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
                  .scalar_subquery())
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Study.patient_id,
                Study.accession_number,
                Study.study_date,
                modalities,
                Study.state,
                func.count(Series.id.distinct()),
                Study.instance_count,
                Study.late_instance_count,
                Study.first_received_at,
                Study.last_received_at,
                Study.completed_at,
            )
            .outerjoin(Series, Series.study_id == Study.id)
            .where(Study.id.in_(newest))
            .group_by(Study.id)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
        ).all()
    return [StudySummary(*(row[:4]), row[4] or "", *(row[5:])) for row in rows]


def study_events(sessions: sessionmaker[Session], study_instance_uid: str) -> list[tuple[datetime, str, str | None]]:
    with sessions() as session:
        rows = session.execute(
            select(StudyEvent.at, StudyEvent.kind, StudyEvent.detail)
            .join(Study, StudyEvent.study_id == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
            .order_by(StudyEvent.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]
