"""The receive path of one instance, independent of the network library.

``IngestService.store`` turns the bytes of one C-STORE into a durable, indexed file and
the status to answer. It is what makes "success means on disk": the status is 0x0000
only after the file is fsync'd under its final name and its row is committed. Bad input
is answered with a precise failure status, kept in quarantine and recorded.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo
from dicom_node.header import STATUS_OUT_OF_RESOURCES, InvalidDataset, parse_header
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.spool import Spool, file_meta_bytes, free_bytes, uid_to_filename

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE request as the SCP received it."""

    body: bytes  # the encoded dataset, without file meta
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    association_id: int | None


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE status to answer and, for failures, why (sent as Error Comment)."""

    status: int
    reason: str | None = None
    late: bool = False
    duplicate: bool = False


class IngestService:
    """Files, indexes and acknowledges received instances; see the module docstring."""

    def __init__(
        self,
        *,
        spool: Spool,
        quarantine_dir: Path,
        sessions: sessionmaker[Session],
        indexer: InstanceIndexer,
        duplicate_policy: str,
        min_free_bytes: int,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._spool = spool
        self._quarantine_dir = quarantine_dir
        self._sessions = sessions
        self._indexer = indexer
        self._replace_duplicates = duplicate_policy == "replace"
        self._min_free_bytes = min_free_bytes
        self._clock = clock
        self._sop_locks = [threading.Lock() for _ in range(64)]
        quarantine_dir.mkdir(parents=True, exist_ok=True)

    def store(self, item: ReceivedInstance) -> StoreOutcome:
        """Store one instance; never raises for bad input, only answers a status."""
        free = free_bytes(self._spool.root)
        if free < self._min_free_bytes + len(item.body):
            reason = f"disk space low: {free // 1_048_576} MiB free, minimum {self._min_free_bytes // 1_048_576} MiB"
            self.record_failure(item, STATUS_OUT_OF_RESOURCES, reason, quarantine=False)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)
        try:
            header = parse_header(item.body, item.transfer_syntax_uid, item.sop_class_uid, item.sop_instance_uid)
        except InvalidDataset as exc:
            self.record_failure(item, exc.status, exc.reason, quarantine=True)
            return StoreOutcome(exc.status, exc.reason)

        lock = self._sop_locks[hash(header.sop_instance_uid) % len(self._sop_locks)]
        with lock:
            existing = repo.find_instance(self._sessions, header.sop_instance_uid)
            if existing is not None and not self._replace_duplicates:
                repo.count_duplicate(self._sessions, existing.id)
                logger.info(
                    "kept the first copy of SOP Instance %s; duplicate from %s discarded",
                    header.sop_instance_uid,
                    item.calling_ae_title,
                )
                return StoreOutcome(STATUS_SUCCESS, duplicate=True)
            relative = self._spool.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            meta = file_meta_bytes(
                header.sop_class_uid, header.sop_instance_uid, item.transfer_syntax_uid, item.calling_ae_title
            )
            try:
                stored = self._spool.write(relative, (meta, item.body))
            except OSError as exc:
                reason = f"cannot write {relative}: {exc.strerror or exc}"
                logger.error("%s", reason)
                self.record_failure(item, STATUS_OUT_OF_RESOURCES, reason, quarantine=False)
                return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)
            record = IndexRecord(
                header=header,
                transfer_syntax_uid=item.transfer_syntax_uid,
                relative_path=stored.relative,
                size_bytes=stored.size_bytes,
                received_at=self._clock(),
                association_id=item.association_id,
                replace_existing=existing is not None,
            )
            try:
                self._indexer.index(record)
            except Exception as exc:
                if existing is None or existing.path != relative:
                    self._spool.remove(relative)
                reason = f"index database error ({type(exc).__name__}); see the node log"
                self.record_failure(item, STATUS_OUT_OF_RESOURCES, reason, quarantine=False)
                return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)
            if existing is not None and existing.path != relative:
                self._spool.remove(existing.path)
        return StoreOutcome(STATUS_SUCCESS, late=record.late, duplicate=existing is not None)

    def association_finished(self, association_id: int) -> None:
        """Let go of what was cached for an association that has ended."""
        self._indexer.forget_association(association_id)

    def record_failure(self, item: ReceivedInstance, status: int, reason: str, *, quarantine: bool) -> None:
        """Keep the rejected bytes (when there is room) and a row the admin can read."""
        path: str | None = None
        if quarantine:
            name = f"{self._clock():%Y%m%dT%H%M%S}-{uid_to_filename(item.sop_instance_uid or 'unknown')}-{uuid.uuid4().hex[:8]}.dcm"
            target = self._quarantine_dir / name
            try:
                meta = file_meta_bytes(
                    item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid, item.calling_ae_title
                )
                target.write_bytes(meta + item.body)
                path = str(target)
            except OSError as exc:
                logger.error("cannot quarantine rejected instance to %s: %s", target, exc)
        logger.warning(
            "rejected SOP Instance %s from %s with status 0x%04X: %s",
            item.sop_instance_uid,
            item.calling_ae_title,
            status,
            reason,
        )
        try:
            repo.record_ingest_error(
                self._sessions,
                now=self._clock(),
                association_id=item.association_id,
                calling_ae_title=item.calling_ae_title,
                sop_class_uid=item.sop_class_uid,
                sop_instance_uid=item.sop_instance_uid,
                status=status,
                reason=reason,
                quarantine_path=path,
            )
        except Exception:
            logger.exception("cannot record the rejection of %s", item.sop_instance_uid)
