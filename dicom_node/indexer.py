"""Group-commit indexing of received instances.

Every C-STORE must be indexed before it is acknowledged, but one transaction per
instance would make the database the bottleneck when several associations send at
once. The first receiver thread to arrive commits its own instance and everything that
queued up while the previous commit ran, in one transaction (the classic group commit);
the others wait for it. With one association this is one short transaction per
instance and no thread hand-over; with many, the commits are shared.

A series is found by its study and its Series Instance UID: a sender that reuses a
series UID in another study (another patient) gets a second series row, and both
studies' timelines say so (:mod:`dicom_node.db.uid_reuse`), as they do when
``duplicate_policy: replace`` moves a SOP Instance UID from one study to another.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.engine import Connection

from dicom_node.db.models import AssociationStudy, Instance, Series, Study, StudyEvent, StudyState
from dicom_node.db.uid_reuse import SERIES_UID_REUSED, SOP_INSTANCE_UID_REUSED, warn_on_both
from dicom_node.header import InstanceHeader

logger = logging.getLogger(__name__)

_STUDIES = Study.__table__
_SERIES = Series.__table__
_INSTANCES = Instance.__table__
_LINKS = AssociationStudy.__table__
_EVENTS = StudyEvent.__table__

# Statements built once; the writer runs them for every received instance.
_STUDY_BY_UID = select(_STUDIES.c.id, _STUDIES.c.state).where(_STUDIES.c.study_instance_uid == bindparam("uid"))
_SERIES_IN_STUDY = select(_SERIES.c.id).where(
    _SERIES.c.study_id == bindparam("study"), _SERIES.c.series_instance_uid == bindparam("uid")
)
_SERIES_ELSEWHERE = (  # other studies holding a series UID (run only when a study gets a new series)
    select(_STUDIES.c.id, _STUDIES.c.study_instance_uid)
    .join(_SERIES, _SERIES.c.study_id == _STUDIES.c.id)
    .where(_SERIES.c.series_instance_uid == bindparam("uid"), _SERIES.c.study_id != bindparam("study"))
    .order_by(_STUDIES.c.id)
)
_STUDY_OF_SERIES = (
    select(_STUDIES.c.id, _STUDIES.c.study_instance_uid)
    .join(_SERIES, _SERIES.c.study_id == _STUDIES.c.id)
    .where(_SERIES.c.id == bindparam("sid"))
)
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
    study_id: int | None = None  # set by the indexer


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
        # (study id, Series Instance UID) -> id of a series this process created or saw.
        self._series_ids: dict[tuple[int, str], int] = {}

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
            if record.series_id is not None and record.study_id is not None:
                self._series_ids[(record.study_id, record.header.series_instance_uid)] = record.series_id
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

        key = (study_id, header.series_instance_uid)
        series_id = self._series_ids.get(key)
        if series_id is None:
            series_id = connection.execute(_SERIES_IN_STUDY, {"study": study_id, "uid": key[1]}).scalar()
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
            self._warn_if_series_uid_reused(connection, header, study_id, now)

        record.series_id, record.study_id = series_id, study_id
        late = state != StudyState.RECEIVING.value
        counted = True
        if record.replace_existing:
            previous = connection.execute(_INSTANCE_BY_UID, {"uid": header.sop_instance_uid}).first()
            if previous is not None:
                counted = previous.series_id != series_id
                if counted:
                    self._warn_if_moved_from_another_study(connection, header, previous.series_id, study_id, now)
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

    @staticmethod
    def _warn_if_series_uid_reused(connection: Connection, header: InstanceHeader, study_id: int,
                                   now: datetime) -> None:
        """A new series whose UID another study already has: warn on both timelines (the rows stay apart)."""
        uid = header.series_instance_uid
        for other_id, other_uid in connection.execute(_SERIES_ELSEWHERE, {"uid": uid, "study": study_id}).all():
            logger.debug("series %s reused: study %s is of patient %r", uid, header.study_instance_uid,
                         header.patient_id)
            keep = "each study keeps its own series and instances (the sender reuses UIDs across studies)"
            warn_on_both(connection, kind=SERIES_UID_REUSED, at=now, warnings=[
                (study_id, header.study_instance_uid, other_uid,
                 f"Series Instance UID {uid} of this study is also used by study {other_uid}; {keep}"),
                (other_id, other_uid, header.study_instance_uid,
                 f"Series Instance UID {uid} of this study is also used by study {header.study_instance_uid}; {keep}"),
            ])

    @staticmethod
    def _warn_if_moved_from_another_study(connection: Connection, header: InstanceHeader, previous_series_id: int,
                                          study_id: int, now: datetime) -> None:
        """duplicate_policy replace took an instance from another study: say so on both timelines."""
        other_id, other_uid = connection.execute(_STUDY_OF_SERIES, {"sid": previous_series_id}).one()
        if other_id == study_id:
            return
        sop, here = header.sop_instance_uid, header.study_instance_uid
        warn_on_both(connection, kind=SOP_INSTANCE_UID_REUSED, at=now, warnings=[
            (other_id, other_uid, here, f"SOP Instance UID {sop} of this study was sent again for study {here} "
                                        "and moved there (dicom.duplicate_policy replace)"),
            (study_id, here, other_uid, f"SOP Instance UID {sop} was held by study {other_uid} and moved here "
                                        "(dicom.duplicate_policy replace)"),
        ])

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
