"""The receive path of one instance, independent of the network library.

An instance arrives as a stream of data set fragments. :meth:`IngestService.begin`
opens an :class:`IncomingInstance` that writes them straight to a staging file in the
spool (file meta first), never holding the instance in memory and never past the
configured size limit; :meth:`IngestService.finish` checks the complete file and either
renames it into place and indexes it, or quarantines it, and returns the status to
answer. This is what makes "success means on disk": the status is 0x0000 only after the
file is fsync'd under its final name and its row is committed. Bad input is answered
with a precise failure status, kept in quarantine (while the quarantine has room) and
recorded for the admin.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo
from dicom_node.header import (
    STATUS_INVALID_UID,
    STATUS_MISSING_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_TOO_LARGE,
    InstanceHeader,
    InvalidDataset,
    parse_header_file,
    uid_problem,
)
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.settings import Settings
from dicom_node.spool import Spool, StagingFile, file_meta_bytes, free_bytes, uid_to_filename

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
#: While an instance streams in, free disk space is checked again after this many bytes.
_SPACE_CHECK_BYTES = 16 << 20


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE request says about the instance it carries (the data set comes separately)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    association_id: int | None


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE status to answer and, for failures, why (sent as Error Comment).

    A stored instance names its study and series (a STOW-RS response links each one).
    """

    status: int
    reason: str | None = None
    late: bool = False
    duplicate: bool = False
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class IngestLimits:
    """How large one instance may be, how much disk must stay free, how much the quarantine may keep."""

    max_instance_bytes: int
    min_free_bytes: int
    quarantine_max_bytes: int


class IncomingInstance:
    """The data set of one C-STORE being received; see the module docstring.

    :meth:`write` never raises: once the instance is refused (too large, disk low or
    failing) further fragments are read and dropped, so the sender still gets its
    response with the precise status instead of a broken association.
    """

    def __init__(self, request: StoreRequest, staging: StagingFile | None, meta_length: int,
                 limits: IngestLimits, spool_root: Path, refusal: StoreOutcome | None = None) -> None:
        self.request = request
        self.meta_length = meta_length
        self._staging = staging
        self._limits = limits
        self._spool_root = spool_root
        self._received = 0
        self._next_space_check = _SPACE_CHECK_BYTES
        self.refusal = refusal

    @property
    def received_bytes(self) -> int:
        """Data set bytes received so far (including any dropped after a refusal)."""
        return self._received

    @property
    def staging(self) -> StagingFile | None:
        return self._staging

    def write(self, fragment: bytes | memoryview) -> None:
        """Append one data set fragment (or drop it, once the instance is refused)."""
        self._received += len(fragment)
        if self.refusal is not None or self._staging is None:
            return
        if self._received > self._limits.max_instance_bytes:
            limit_mib = self._limits.max_instance_bytes // 1_048_576
            self._refuse(STATUS_TOO_LARGE, f"instance larger than the limit of {limit_mib} MiB (dicom.max_instance_mb)")
            return
        if self._received >= self._next_space_check:
            self._next_space_check += _SPACE_CHECK_BYTES
            free = free_bytes(self._spool_root)
            if free < self._limits.min_free_bytes:
                self._refuse(STATUS_OUT_OF_RESOURCES, _low_disk_reason(free, self._limits.min_free_bytes))
                return
        try:
            self._staging.append(fragment)
        except OSError as exc:
            self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror or exc}")

    def _refuse(self, status: int, reason: str) -> None:
        self.refusal = StoreOutcome(status, reason)
        if self._staging is not None:
            self._staging.discard()  # frees the disk now; later fragments are dropped
            self._staging = None

    def discard(self) -> None:
        """Forget the instance (the association ended before it was complete)."""
        if self._staging is not None:
            self._staging.discard()
            self._staging = None


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
        max_instance_bytes: int = 2048 * 1_048_576,
        quarantine_max_bytes: int = 2048 * 1_048_576,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._spool = spool
        self._quarantine_dir = quarantine_dir
        self._sessions = sessions
        self._indexer = indexer
        self._replace_duplicates = duplicate_policy == "replace"
        self._limits = IngestLimits(max_instance_bytes, min_free_bytes, quarantine_max_bytes)
        self._clock = clock
        self._sop_locks = [threading.Lock() for _ in range(64)]
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._quarantine_lock = threading.Lock()
        self._quarantine_bytes = sum(entry.stat().st_size for entry in os.scandir(quarantine_dir) if entry.is_file())

    @classmethod
    def from_settings(cls, settings: Settings, sessions: sessionmaker[Session], indexer: InstanceIndexer,
                      clock: Callable[[], datetime] = utc_now) -> "IngestService":
        """The node's ingest service as its settings describe it (the listener and STOW-RS share one)."""
        return cls(
            spool=Spool(settings.spool_dir, fsync=settings.storage.fsync),
            quarantine_dir=settings.quarantine_dir,
            sessions=sessions,
            indexer=indexer,
            duplicate_policy=settings.dicom.duplicate_policy,
            min_free_bytes=settings.storage.min_free_mb * 1_048_576,
            max_instance_bytes=settings.dicom.max_instance_mb * 1_048_576,
            quarantine_max_bytes=settings.storage.quarantine_max_mb * 1_048_576,
            clock=clock,
        )

    @property
    def spool(self) -> Spool:
        return self._spool

    def begin(self, request: StoreRequest) -> IncomingInstance:
        """Open the staging file for an instance about to arrive (refused at once when the disk is low)."""
        meta = file_meta_bytes(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax_uid,
                               request.calling_ae_title)
        free = free_bytes(self._spool.root)
        if free < self._limits.min_free_bytes:
            refusal = StoreOutcome(STATUS_OUT_OF_RESOURCES, _low_disk_reason(free, self._limits.min_free_bytes))
            return IncomingInstance(request, None, len(meta), self._limits, self._spool.root, refusal)
        try:
            staging = self._spool.stage()
            staging.append(meta)
        except OSError as exc:
            refusal = StoreOutcome(STATUS_OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror or exc}")
            return IncomingInstance(request, None, len(meta), self._limits, self._spool.root, refusal)
        return IncomingInstance(request, staging, len(meta), self._limits, self._spool.root)

    def store(self, request: StoreRequest, body: bytes) -> StoreOutcome:
        """Store one instance whose whole data set ``body`` is in memory; never raises for bad input."""
        incoming = self.begin(request)
        incoming.write(body)
        return self.finish(incoming)

    def refuse_unusable_uids(self, request: StoreRequest, source: str) -> StoreOutcome | None:
        """The failure (recorded) for a request whose SOP Class or SOP Instance UID is unusable, else None.

        Checked before the data set is looked at, whichever way the instance came:
        ``source`` names where the UIDs were read ("the C-STORE request's Affected",
        "the STOW-RS part's Media Storage").
        """
        for uid, what in ((request.sop_class_uid, "SOP Class"), (request.sop_instance_uid, "SOP Instance")):
            problem = uid_problem(uid)
            if problem is not None:
                status = STATUS_MISSING_UID if not uid.strip("\0 ") else STATUS_INVALID_UID
                reason = f"{source} {what} UID {problem}"
                self.record_failure(request, status, reason)
                return StoreOutcome(status, reason)
        return None

    def finish(self, incoming: IncomingInstance, *, expected_study: str | None = None) -> StoreOutcome:
        """Check the complete instance and keep it (success), or quarantine it; never raises for bad input.

        ``expected_study``: the instance must belong to this study (a STOW-RS request to
        ``/studies/{study}``), else it fails with 0xA900 and is not stored.
        """
        request = incoming.request
        if incoming.refusal is not None:
            incoming.discard()
            reason = incoming.refusal.reason or "refused"
            self.record_failure(request, incoming.refusal.status, reason)
            return incoming.refusal
        staging = incoming.staging
        assert staging is not None
        try:
            header = parse_header_file(
                staging.path, incoming.meta_length, request.transfer_syntax_uid, request.sop_class_uid,
                request.sop_instance_uid, max_inflated_bytes=self._limits.max_instance_bytes,
            )
        except InvalidDataset as exc:
            self.record_failure(request, exc.status, exc.reason, rejected=staging)
            return StoreOutcome(exc.status, exc.reason)
        except OSError as exc:
            incoming.discard()
            reason = f"cannot read the received instance back: {exc.strerror or exc}"
            self.record_failure(request, STATUS_OUT_OF_RESOURCES, reason)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)
        if expected_study is not None and header.study_instance_uid != expected_study:
            reason = (f"Study Instance UID {header.study_instance_uid} is not the study {expected_study} "
                      "the request was sent to")
            self.record_failure(request, STATUS_SOP_CLASS_MISMATCH, reason, rejected=staging)
            return StoreOutcome(STATUS_SOP_CLASS_MISMATCH, reason)
        return self._keep(incoming, staging, header)

    def _keep(self, incoming: IncomingInstance, staging: StagingFile, header: InstanceHeader) -> StoreOutcome:
        """Rename a checked instance into place and index it (or count it as a duplicate)."""
        request = incoming.request
        lock = self._sop_locks[hash(header.sop_instance_uid) % len(self._sop_locks)]
        with lock:
            try:
                existing = repo.find_instance(self._sessions, header.sop_instance_uid)
                if existing is not None and not self._spool.absolute(existing.path).is_file():
                    logger.warning("the index holds SOP Instance %s but its file %s is missing; the new copy "
                                   "replaces it", header.sop_instance_uid, existing.path)
                elif existing is not None and not self._replace_duplicates:
                    incoming.discard()
                    repo.count_duplicate(self._sessions, existing.id, study_instance_uid=header.study_instance_uid,
                                         now=self._clock())
                    logger.info(
                        "kept the first copy of SOP Instance %s; duplicate from %s discarded",
                        header.sop_instance_uid,
                        request.calling_ae_title,
                    )
                    return StoreOutcome(STATUS_SUCCESS, duplicate=True, study_instance_uid=header.study_instance_uid,
                                        series_instance_uid=header.series_instance_uid)
            except Exception as exc:
                incoming.discard()
                return self._database_failure(request, exc)
            relative = self._spool.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            try:
                stored = self._spool.commit(staging, relative)
            except OSError as exc:
                incoming.discard()
                reason = f"cannot write {relative}: {exc.strerror or exc}"
                logger.error("%s", reason)
                self.record_failure(request, STATUS_OUT_OF_RESOURCES, reason)
                return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)
            record = IndexRecord(
                header=header,
                transfer_syntax_uid=request.transfer_syntax_uid,
                relative_path=stored.relative,
                size_bytes=stored.size_bytes,
                received_at=self._clock(),
                association_id=request.association_id,
                replace_existing=existing is not None,
            )
            try:
                self._indexer.index(record)
            except Exception as exc:
                return self._index_failed(request, header, relative, existing, exc)
            if existing is not None and existing.path != relative:
                self._spool.remove(existing.path)
        return StoreOutcome(STATUS_SUCCESS, late=record.late, duplicate=existing is not None,
                            study_instance_uid=header.study_instance_uid, series_instance_uid=header.series_instance_uid)

    def _index_failed(self, request: StoreRequest, header: InstanceHeader, relative: str,
                      existing: repo.ExistingInstance | None, error: Exception) -> StoreOutcome:
        """The commit of the index row failed - or seemed to: a connection lost after the server
        committed looks the same. The row is looked up again before the file is let go: if it
        is there, the instance is stored; if the database cannot say, the file stays (an
        unindexed file is recovered or replaced later; a row without its file would answer
        the sender's re-send with "duplicate, success" and lose the instance)."""
        try:
            indexed = repo.find_instance(self._sessions, header.sop_instance_uid)
        except Exception:
            return self._database_failure(request, error)
        if indexed is not None and indexed.path == relative and (existing is None or existing.path != relative):
            logger.warning("indexing SOP Instance %s reported %s but its row was committed", header.sop_instance_uid,
                           type(error).__name__)
            return StoreOutcome(STATUS_SUCCESS, study_instance_uid=header.study_instance_uid,
                                series_instance_uid=header.series_instance_uid)
        if existing is None or existing.path != relative:
            self._spool.remove(relative)
        return self._database_failure(request, error)

    def _database_failure(self, request: StoreRequest, error: Exception) -> StoreOutcome:
        logger.error("index database error while storing SOP Instance %s: %s", request.sop_instance_uid, error)
        reason = f"index database unavailable ({type(error).__name__}); see the node log"
        self.record_failure(request, STATUS_OUT_OF_RESOURCES, reason)
        return StoreOutcome(STATUS_OUT_OF_RESOURCES, reason)

    def association_finished(self, association_id: int) -> None:
        """Let go of what was cached for an association that has ended."""
        self._indexer.forget_association(association_id)

    def record_failure(self, request: StoreRequest, status: int, reason: str,
                       *, rejected: StagingFile | None = None) -> None:
        """Keep the rejected file in quarantine (while it has room) and a row the admin can read."""
        path = self._quarantine(request, rejected) if rejected is not None else None
        logger.warning(
            "rejected SOP Instance %s from %s with status 0x%04X: %s",
            request.sop_instance_uid,
            request.calling_ae_title,
            status,
            reason,
        )
        try:
            repo.record_ingest_error(
                self._sessions,
                now=self._clock(),
                association_id=request.association_id,
                calling_ae_title=request.calling_ae_title,
                sop_class_uid=request.sop_class_uid,
                sop_instance_uid=request.sop_instance_uid,
                status=status,
                reason=reason,
                quarantine_path=path,
            )
        except Exception:
            logger.exception("cannot record the rejection of %s", request.sop_instance_uid)

    def _quarantine(self, request: StoreRequest, rejected: StagingFile) -> str | None:
        """Move a rejected file into the quarantine; None (and the file deleted) when it has no room."""
        rejected.close()
        size = rejected.size
        with self._quarantine_lock:
            room = self._quarantine_bytes + size <= self._limits.quarantine_max_bytes
            if room:
                self._quarantine_bytes += size
        if not room:
            logger.warning("quarantine %s is full (storage.quarantine_max_mb); rejected instance %s not kept",
                           self._quarantine_dir, request.sop_instance_uid)
            rejected.discard()
            return None
        name = f"{self._clock():%Y%m%dT%H%M%S}-{uid_to_filename(request.sop_instance_uid or 'unknown')}-{rejected.path.stem[:8]}.dcm"
        target = self._quarantine_dir / name
        try:
            shutil.move(rejected.path, target)
        except OSError as exc:
            logger.error("cannot quarantine rejected instance to %s: %s", target, exc)
            rejected.discard()
            with self._quarantine_lock:
                self._quarantine_bytes -= size
            return None
        return str(target)


def _low_disk_reason(free: int, minimum: int) -> str:
    return f"disk space low: {free // 1_048_576} MiB free, minimum {minimum // 1_048_576} MiB"
