"""Group-commit indexing of received instances.

Every C-STORE must be indexed before it is acknowledged, but one transaction per
instance would make the database the bottleneck when several associations send at
once. The first receiver thread to arrive commits its own instance and everything that
queued up while the previous commit ran, in one transaction (the classic group commit);
the others wait for it. With one association this is one short transaction per
instance and no thread hand-over; with many, the commits are shared.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.engine import Connection

from dicom_node.db.models import AssociationStudy, Instance, Series, Study, StudyEvent, StudyState
from dicom_node.header import InstanceHeader

logger = logging.getLogger(__name__)

_STUDIES = Study.__table__
_SERIES = Series.__table__
_INSTANCES = Instance.__table__
_LINKS = AssociationStudy.__table__
_EVENTS = StudyEvent.__table__

# Statements built once; the writer runs them for every received instance.
_STUDY_BY_UID = select(_STUDIES.c.id, _STUDIES.c.state).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
_SERIES_BY_UID = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("uid"))
_INSTANCE_BY_UID = select(_INSTANCES.c.id, _INSTANCES.c.series_id).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid")
)
_COUNT_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("sid"))
    .values(instance_count=_SERIES.c.instance_count + 1, last_received_at=bindparam("now"))
)
_COUNT_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("sid"))
    .values(
        instance_count=_STUDIES.c.instance_count + bindparam("n"),
        last_received_at=bindparam("now"),
        last_activity_at=bindparam("now"),
    )
)
_INSERT_INSTANCE = insert(_INSTANCES)
_LINK_EXISTS = select(_LINKS.c.study_id).where(
    _LINKS.c.association_id == bindparam("aid"), _LINKS.c.study_id == bindparam("sid")
)


@dataclass
class IndexRecord:
    """One stored instance waiting to be indexed."""

    header: InstanceHeader
    transfer_syntax_uid: str
    relative_path: str
    size_bytes: int
    received_at: datetime
    association_id: int | None
    replace_existing: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    late: bool = False
    series_id: int | None = None  # set by the indexer


class IndexerStopped(RuntimeError):
    """The indexer was stopped; the instance was not indexed."""


class InstanceIndexer:
    """The only writer of instance rows; see the module docstring."""

    def __init__(self, engine: Engine, reopen_on_late_instances: bool, max_batch: int = 256) -> None:
        self._engine = engine
        self._reopen = reopen_on_late_instances
        self._max_batch = max_batch
        self._condition = threading.Condition()
        self._pending: list[IndexRecord] = []
        self._committing = False
        self._stopped = False
        self._linked: set[tuple[int, int]] = set()
        # Series UID -> id of series this process created or saw; a series never changes study.
        self._series_ids: dict[str, int] = {}

    def stop(self) -> None:
        """Refuse new records; the ones already committing finish."""
        with self._condition:
            self._stopped = True

    def index(self, record: IndexRecord) -> IndexRecord:
        """Index ``record``; returns once it is committed, raises what the commit raised."""
        with self._condition:
            if self._stopped:
                raise IndexerStopped("the node is shutting down")
            self._pending.append(record)
            while not record.done.is_set() and self._committing:
                self._condition.wait()
            if record.done.is_set():
                batch: list[IndexRecord] = []
            else:
                self._committing = True
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        if batch:
            try:
                self._commit(batch)
            finally:
                with self._condition:
                    self._committing = False
                    self._condition.notify_all()
        if record.error is not None:
            raise record.error
        return record

    def _commit(self, batch: list[IndexRecord]) -> None:
        try:
            with self._engine.begin() as connection:
                for record in batch:
                    self._write(connection, record)
        except Exception:
            if len(batch) == 1:
                logger.exception("indexing %s failed", batch[0].header.sop_instance_uid)
                batch[0].error = _failure()
                batch[0].done.set()
                return
            # One bad record must not fail the others: retry one transaction each.
            self._linked.clear()
            for record in batch:
                record.late = False
                self._commit([record])
            return
        if len(self._series_ids) > 10_000:
            self._series_ids.clear()
        for record in batch:
            if record.series_id is not None:
                self._series_ids[record.header.series_instance_uid] = record.series_id
            record.done.set()

    def _write(self, connection: Connection, record: IndexRecord) -> None:
        header, now = record.header, record.received_at
        study = connection.execute(_STUDY_BY_UID, {"uid": header.study_instance_uid}).first()
        if study is None:
            study_id = connection.execute(
                insert(_STUDIES).values(
                    study_instance_uid=header.study_instance_uid,
                    patient_id=header.patient_id,
                    patient_name=header.patient_name,
                    accession_number=header.accession_number,
                    study_date=header.study_date,
                    study_description=header.study_description,
                    state=StudyState.RECEIVING.value,
                    instance_count=0,
                    late_instance_count=0,
                    first_received_at=now,
                    last_received_at=now,
                    receiving_since=now,
                    last_activity_at=now,
                    state_changed_at=now,
                )
            ).inserted_primary_key[0]
            connection.execute(insert(_EVENTS).values(study_id=study_id, at=now, kind="first_instance", detail=None))
            state = StudyState.RECEIVING.value
        else:
            study_id, state = study

        series_id = self._series_ids.get(header.series_instance_uid)
        if series_id is None:
            series_id = connection.execute(_SERIES_BY_UID, {"uid": header.series_instance_uid}).scalar()
        if series_id is None:
            series_id = connection.execute(
                insert(_SERIES).values(
                    study_id=study_id,
                    series_instance_uid=header.series_instance_uid,
                    modality=header.modality,
                    series_number=header.series_number,
                    series_description=header.series_description,
                    body_part_examined=header.body_part_examined,
                    instance_count=0,
                    first_received_at=now,
                    last_received_at=now,
                )
            ).inserted_primary_key[0]

        record.series_id = series_id
        late = state != StudyState.RECEIVING.value
        counted = True
        if record.replace_existing:
            previous = connection.execute(_INSTANCE_BY_UID, {"uid": header.sop_instance_uid}).first()
            if previous is not None:
                counted = previous.series_id != series_id
                if counted:
                    self._uncount(connection, previous.series_id)
                connection.execute(
                    update(_INSTANCES)
                    .where(_INSTANCES.c.id == previous.id)
                    .values(
                        series_id=series_id,
                        sop_class_uid=header.sop_class_uid,
                        transfer_syntax_uid=record.transfer_syntax_uid,
                        instance_number=header.instance_number,
                        path=record.relative_path,
                        size_bytes=record.size_bytes,
                        received_at=now,
                        association_id=record.association_id,
                        late=late,
                        duplicates_received=_INSTANCES.c.duplicates_received + 1,
                    )
                )
        if not record.replace_existing or previous is None:
            connection.execute(
                _INSERT_INSTANCE,
                {
                    "series_id": series_id,
                    "sop_instance_uid": header.sop_instance_uid,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": record.transfer_syntax_uid,
                    "instance_number": header.instance_number,
                    "path": record.relative_path,
                    "size_bytes": record.size_bytes,
                    "received_at": now,
                    "association_id": record.association_id,
                    "late": late,
                    "duplicates_received": 0,
                },
            )

        if counted:
            connection.execute(_COUNT_SERIES, {"sid": series_id, "now": now})
        if not late:
            connection.execute(_COUNT_STUDY, {"sid": study_id, "now": now, "n": 1 if counted else 0})
            self._link(connection, record.association_id, study_id)
            return
        # A late instance: the study was already complete (or further along).
        record.late = True
        study_values: dict[str, object] = {
            "last_received_at": now,
            "last_activity_at": now,
            "late_instance_count": _STUDIES.c.late_instance_count + 1,
        }
        if counted:
            study_values["instance_count"] = _STUDIES.c.instance_count + 1
        detail = f"SOP Instance {header.sop_instance_uid} arrived while the study was {state}"
        connection.execute(insert(_EVENTS).values(study_id=study_id, at=now, kind="late_instance", detail=detail))
        if self._reopen:
            study_values.update(
                state=StudyState.RECEIVING.value, state_changed_at=now, receiving_since=now, completed_at=None
            )
            connection.execute(
                insert(_EVENTS).values(study_id=study_id, at=now, kind="reopened", detail=f"late instance while {state}")
            )
        connection.execute(update(_STUDIES).where(_STUDIES.c.id == study_id).values(**study_values))
        self._link(connection, record.association_id, study_id)

    def _link(self, connection: Connection, association_id: int | None, study_id: int) -> None:
        """Remember that the association sent to the study (its completion waits for it)."""
        if association_id is None or (association_id, study_id) in self._linked:
            return
        exists = connection.execute(_LINK_EXISTS, {"aid": association_id, "sid": study_id}).first()
        if exists is None:
            connection.execute(insert(_LINKS).values(association_id=association_id, study_id=study_id))
        self._linked.add((association_id, study_id))

    @staticmethod
    def _uncount(connection: Connection, series_id: int) -> None:
        study_id = connection.execute(select(_SERIES.c.study_id).where(_SERIES.c.id == series_id)).scalar_one()
        connection.execute(
            update(_SERIES).where(_SERIES.c.id == series_id).values(instance_count=_SERIES.c.instance_count - 1)
        )
        connection.execute(
            update(_STUDIES).where(_STUDIES.c.id == study_id).values(instance_count=_STUDIES.c.instance_count - 1)
        )

    def forget_association(self, association_id: int) -> None:
        """Drop the cached links of a finished association."""
        self._linked = {pair for pair in self._linked if pair[0] != association_id}


def _failure() -> RuntimeError:
    return RuntimeError("database error while indexing")
