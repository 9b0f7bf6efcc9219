"""STOW-RS intake (PS3.18 10.5): studies pushed to the node over HTTP, each instance stored as a C-STORE is.

Why here and not in the web route: a STOW-RS request must end where a DICOM association
ends - the same checks, the same durable spool and index, the same study grouping,
completion and routing - so every part goes through :class:`dicom_node.ingest.IngestService`
exactly as the SCP's data sets do, and the request is recorded like an association (a
row of ``associations`` with protocol ``stow-rs`` and the account that sent it; the
study's completion waits while it is open). The route only authenticates and streams.

The body (``multipart/related; type="application/dicom"``) is split as it streams in
(:func:`dicom_node.multipart_stream.split_multipart`); each part, a Part 10 file, goes
straight to a staging file: its File Meta Information (at most :data:`MAX_META_BYTES`)
names the SOP Class, SOP Instance and Transfer Syntax that a C-STORE request would
carry, then the data set streams into ingest, which bounds it by ``dicom.max_instance_mb``.
A part that cannot be stored is a failed instance with the status ingest would have
answered (or 0x0122 / 0xC122 for a SOP class / transfer syntax the listener would not
negotiate); it never fails the request. The whole body is bounded by
``web.stow_max_request_mb``: past it the request ends with :class:`StowBodyError` (413),
as does a malformed body (400); instances stored before that stay stored (a client that
sends again gets "stored" for them: duplicates are acknowledged).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo
from dicom_node.db.models import AssociationOutcome, AssociationProtocol
from dicom_node.header import STATUS_CANNOT_PARSE, uid_problem
from dicom_node.ingest import STATUS_SUCCESS, IncomingInstance, IngestService, StoreOutcome, StoreRequest
from dicom_node.multipart_stream import MultipartError, split_multipart
from dicom_node.storage_classes import SUPPORTED_TRANSFER_SYNTAXES, is_storage_sop_class

__all__ = ["MAX_META_BYTES", "STATUS_SOP_CLASS_NOT_SUPPORTED", "STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED",
           "StowBodyError", "StowBusy", "StowIntake", "StowMediaError", "StowResult", "StowSender",
           "stow_boundary"]

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom"
#: PS3.18 Table 10.5.3-2 failure reasons for what a DICOM listener would refuse at negotiation.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: The longest multipart boundary taken.
MAX_BOUNDARY = 200
#: A part's File Meta Information must end within this many bytes of its start (it is a few hundred).
MAX_META_BYTES = 64 * 1024
#: Explicit VR Little Endian VRs whose length field has 4 bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_META_SOURCE = "the STOW-RS part's Media Storage"


class StowMediaError(ValueError):
    """The request is not a STOW-RS body the node takes: ``status`` 415 (media type) or 400 (no boundary)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StowBodyError(RuntimeError):
    """The body broke off, was malformed (400) or too large (413); ``result``: what was stored before."""

    def __init__(self, status: int, message: str, result: "StowResult") -> None:
        super().__init__(message)
        self.status = status
        self.result = result


class StowBusy(RuntimeError):
    """``web.stow_max_requests`` requests are being received already."""


def stow_boundary(content_type: str) -> str:
    """The boundary of a STOW-RS request's Content-Type, which must be ``multipart/related;
    type="application/dicom"``; :class:`StowMediaError` otherwise (the parameters are parsed by
    :mod:`email`, quoted or not)."""
    header = Message()
    header["content-type"] = content_type or "text/plain"
    media = header.get_content_type()
    part_type = str(header.get_param("type") or "").strip().lower()
    if media != "multipart/related":
        raise StowMediaError(415, f"STOW-RS takes multipart/related; type=\"{MEDIA_TYPE}\", not {media}")
    if part_type != MEDIA_TYPE:
        raise StowMediaError(415, f"STOW-RS parts must be of type {MEDIA_TYPE} (the node takes Part 10 files "
                                  f"only), not {part_type or 'unnamed'}")
    boundary = header.get_param("boundary")
    # RFC 2046 allows 70 characters; Orthanc sends 73 (two UUIDs), so longer ones are taken, within reason.
    if not isinstance(boundary, str) or not boundary or len(boundary) > MAX_BOUNDARY:
        raise StowMediaError(400, f"the multipart/related Content-Type names no boundary (of 1-{MAX_BOUNDARY} "
                                  "characters)")
    return boundary


@dataclass(frozen=True)
class StowSender:
    """Who sends a STOW-RS request: the account, and the connection (recorded like an association's peer)."""

    username: str
    address: str
    port: int
    tls: bool


@dataclass(frozen=True)
class PartResult:
    """One part of the request: the instance it named (None where unreadable) and what became of it."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    outcome: StoreOutcome
    received_bytes: int = 0

    @property
    def stored(self) -> bool:
        return self.outcome.status == STATUS_SUCCESS


@dataclass
class StowResult:
    """The parts of one request, in order, and the DICOM JSON response (PS3.18 10.5.3) they make."""

    parts: list[PartResult] = field(default_factory=list)

    @property
    def stored(self) -> list[PartResult]:
        return [part for part in self.parts if part.stored]

    @property
    def failed(self) -> list[PartResult]:
        return [part for part in self.parts if not part.stored]

    @property
    def http_status(self) -> int:
        """200 every instance stored, 409 none, 202 some."""
        if not self.failed:
            return 200
        return 409 if not self.stored else 202

    def response(self, root: str, study_instance_uid: str | None) -> dict[str, Any]:
        """The Store Instances Response data set as DICOM JSON; ``root`` is the DICOMweb base URL (WADO-RS
        links); ``study_instance_uid``: the request's study, if its URL named one."""
        studies = {part.outcome.study_instance_uid for part in self.stored}
        study = study_instance_uid or (studies.pop() if len(studies) == 1 else None)
        dataset: dict[str, Any] = {}
        if study is not None:
            dataset["00081190"] = _value("UR", f"{root}/studies/{study}")
        if self.failed:
            dataset["00081198"] = {"vr": "SQ", "Value": [{
                "00081150": _value("UI", _echoable(part.sop_class_uid)),
                "00081155": _value("UI", _echoable(part.sop_instance_uid)),
                "00081197": _value("US", part.outcome.status),
            } for part in self.failed]}
        if self.stored:
            dataset["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": _value("UI", part.sop_class_uid),
                "00081155": _value("UI", part.sop_instance_uid),
                "00081190": _value("UR", f"{root}/studies/{part.outcome.study_instance_uid}/series/"
                                         f"{part.outcome.series_instance_uid}/instances/{part.sop_instance_uid}"),
            } for part in self.stored]}
        return dataset


def _value(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr} if value is None or value == "" else {"vr": vr, "Value": [value]}


def _echoable(uid: str | None) -> str | None:
    """A UID fit to be sent back (a hostile one is left out of the response; the node's records keep it)."""
    return uid if uid is not None and uid_problem(uid) is None else None


class _NotPart10(ValueError):
    pass


def parse_file_meta(data: bytes | bytearray) -> tuple[int, dict[int, str]] | None:
    """(where the data set starts, {element of group 0002: its text}) of the Part 10 file starting ``data``;
    None while ``data`` ends inside the File Meta Information. Raises :class:`_NotPart10` for what is no
    Part 10 file (no ``DICM`` prefix, an undefined length)."""
    if len(data) < 132:
        return None
    if data[128:132] != b"DICM":
        raise _NotPart10("not a DICOM Part 10 file (no DICM prefix at byte 128)")
    at, values = 132, {}
    while True:
        if len(data) < at + 8:
            return None
        group, element = struct.unpack_from("<HH", data, at)
        if group != 0x0002:
            return at, values
        vr = bytes(data[at + 4:at + 6])
        if vr in _LONG_VRS:
            if len(data) < at + 12:
                return None
            length, header = struct.unpack_from("<I", data, at + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, at + 6)[0], 8
        if length == 0xFFFFFFFF:
            raise _NotPart10(f"File Meta Information element (0002,{element:04X}) has an undefined length")
        end = at + header + length
        if len(data) < end:
            return None
        values[element] = bytes(data[at + header:end]).decode("ascii", "replace").strip("\0 ")
        at = end


class _Part:
    """One part being received: its file meta first, then its data set streamed into ingest."""

    def __init__(self, intake: "StowIntake", headers: dict[str, str], association_id: int,
                 expected_study: str | None) -> None:
        self._intake = intake
        self._association_id = association_id
        self._expected_study = expected_study
        self._head = bytearray()
        self._incoming: IncomingInstance | None = None
        self.request = StoreRequest("", "", "", "", association_id)
        self.received = 0
        self.outcome: StoreOutcome | None = None
        declared = Message()
        declared["content-type"] = headers.get("content-type", MEDIA_TYPE)
        if declared.get_content_type() != MEDIA_TYPE:
            self._refuse(STATUS_CANNOT_PARSE, f"a part of type {declared.get_content_type()}, not {MEDIA_TYPE}")

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.outcome is not None:
            return  # refused: the rest of the part is read and dropped
        if self._incoming is not None:
            self._incoming.write(data)
            return
        self._head += data
        try:
            meta = parse_file_meta(self._head)
        except _NotPart10 as exc:
            self._refuse(STATUS_CANNOT_PARSE, str(exc))
            return
        if meta is None:
            if len(self._head) > MAX_META_BYTES:
                self._refuse(STATUS_CANNOT_PARSE, f"no end of the File Meta Information within {MAX_META_BYTES} "
                                                  "bytes")
            return
        start, values = meta
        self._begin(values, memoryview(self._head)[start:])

    def _begin(self, meta: dict[int, str], rest: memoryview) -> None:
        """Check what the file meta names, as a listener checks a C-STORE request, then stream into ingest."""
        ingest = self._intake.ingest
        syntax = meta.get(0x0010, "")
        self.request = StoreRequest(sop_class_uid=meta.get(0x0002, ""), sop_instance_uid=meta.get(0x0003, ""),
                                    transfer_syntax_uid=syntax, calling_ae_title="",
                                    association_id=self._association_id)
        refusal = ingest.refuse_unusable_uids(self.request, _META_SOURCE)
        if refusal is not None:
            self.outcome = refusal
        elif not syntax:
            self._refuse(STATUS_CANNOT_PARSE, "no Transfer Syntax UID in the File Meta Information")
        elif syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            shown = syntax if uid_problem(syntax) is None else "(unreadable)"
            self._refuse(STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {shown} is not one the node stores")
        elif not is_storage_sop_class(self.request.sop_class_uid):
            self._refuse(STATUS_SOP_CLASS_NOT_SUPPORTED,
                         f"SOP Class {self.request.sop_class_uid} is not a storage SOP class the node stores")
        else:
            self._incoming = ingest.begin(self.request)
            self._incoming.write(rest)
        self._head = bytearray()

    def _refuse(self, status: int, reason: str) -> None:
        self._intake.ingest.record_failure(self.request, status, reason)
        self.outcome = StoreOutcome(status, reason)

    def close(self) -> None:
        """The part is complete: ingest checks and keeps it (or refuses it); never raises for bad input."""
        if self.outcome is not None:
            return
        if self._incoming is None:
            what = "is empty" if not self.received else f"ends ({self.received} bytes) inside its File Meta Information"
            self._refuse(STATUS_CANNOT_PARSE, f"the part {what}")
            return
        try:
            self.outcome = self._intake.ingest.finish(self._incoming, expected_study=self._expected_study)
        except Exception as exc:  # as the listener does: a failure status, never a broken request
            self._incoming.discard()
            logger.exception("storing SOP Instance %s (STOW-RS) failed", self.request.sop_instance_uid)
            self._refuse(0xC211, f"unexpected error: {type(exc).__name__}: {exc}")

    def discard(self) -> None:
        """The body ended inside this part: forget what was staged."""
        if self._incoming is not None:
            self._incoming.discard()

    def result(self) -> PartResult:
        assert self.outcome is not None
        dataset_bytes = self._incoming.received_bytes if self._incoming is not None else 0
        return PartResult(self.request.sop_class_uid or None, self.request.sop_instance_uid or None, self.outcome,
                          dataset_bytes)


class StowIntake:
    """Receives STOW-RS requests into ``ingest``; see the module docstring."""

    def __init__(self, ingest: IngestService, sessions: sessionmaker[Session], clock: Callable[[], datetime], *,
                 max_request_bytes: int, max_requests: int) -> None:
        self.ingest = ingest
        self._sessions = sessions
        self._clock = clock
        self.max_request_bytes = max_request_bytes
        self._slots = threading.BoundedSemaphore(max_requests)
        self.max_requests = max_requests

    def receive(self, chunks: Iterable[bytes], boundary: str, sender: StowSender, *,
                study_instance_uid: str | None = None) -> StowResult:
        """Store every part of the body in ``chunks``; returns what became of each.

        Raises :class:`StowBusy` when ``max_requests`` are being received, :class:`StowBodyError` for a
        malformed or too large body (what was stored is in its ``result``); an error of ``chunks`` itself
        (the client went away) passes through. The request is recorded like an association either way.
        """
        if not self._slots.acquire(blocking=False):
            raise StowBusy(f"{self.max_requests} STOW-RS requests are being received (web.stow_max_requests)")
        try:
            return self._receive(chunks, boundary, sender, study_instance_uid)
        finally:
            self._slots.release()

    def _receive(self, chunks: Iterable[bytes], boundary: str, sender: StowSender,
                 study_instance_uid: str | None) -> StowResult:
        association_id = repo.open_association(
            self._sessions, calling_ae_title="", called_ae_title="", peer_address=sender.address[:64],
            peer_port=sender.port, tls=sender.tls, now=self._clock(), protocol=AssociationProtocol.STOW_RS,
            username=sender.username)
        result = StowResult()
        current: list[_Part] = []

        def open_part(headers: dict[str, str]) -> _Part:
            if current:
                result.parts.append(current.pop().result())
            part = _Part(self, headers, association_id, study_instance_uid)
            current.append(part)
            return part

        outcome = AssociationOutcome.ABORTED
        try:
            try:
                count = split_multipart(self._bounded(chunks), boundary, open_part)
            except MultipartError as exc:
                raise StowBodyError(400, f"malformed multipart body: {exc}", result) from exc
            except _TooLarge as exc:
                raise StowBodyError(413, str(exc), result) from exc
            finally:
                for part in current:
                    if part.outcome is None:
                        part.discard()  # the body ended inside it
                    else:
                        result.parts.append(part.result())
            if count == 0:
                raise StowBodyError(400, "the multipart body holds no part (no instance to store)", result)
            outcome = AssociationOutcome.RELEASED
            return result
        finally:
            self._close(association_id, outcome, result, sender)

    def _bounded(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_request_bytes:
                raise _TooLarge(f"the request body is larger than {self.max_request_bytes // 1_048_576} MiB "
                                "(web.stow_max_request_mb); send the instances in several requests")
            yield chunk

    def _close(self, association_id: int, outcome: AssociationOutcome, result: StowResult,
               sender: StowSender) -> None:
        stored, failed = result.stored, result.failed
        try:
            repo.close_association(self._sessions, association_id, outcome=outcome, now=self._clock(),
                                   instances_stored=len(stored), instances_failed=len(failed),
                                   bytes_received=sum(part.received_bytes for part in stored))
        except Exception:
            logger.exception("cannot record the end of STOW-RS request %d", association_id)
        self.ingest.association_finished(association_id)
        logger.info("STOW-RS from %s (%s) %s: %d stored, %d failed", sender.username, sender.address,
                    "answered" if outcome is AssociationOutcome.RELEASED else "cut off", len(stored), len(failed))


class _TooLarge(RuntimeError):
    pass
