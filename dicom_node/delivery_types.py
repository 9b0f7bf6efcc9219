"""What a send to a destination reports, shared by C-STORE (:mod:`dicom_node.scu`) and STOW-RS (:mod:`dicom_node.stow`).

Why: the delivery state machine must decide, the same way for both transports, whether
a delivery is done, should be tried again later, or is dead. Two outcomes exist:

* the transfer ran: :class:`SendReport` lists per file the SOP Instance UID, the
  DICOM status the peer gave it, whether that counts as stored (``ok``) and, if not,
  whether trying again could help (``retryable``);
* the transfer could not run or broke off (connection refused, association rejected
  or aborted, time-out, HTTP error): :class:`DeliveryError` with ``retryable`` and, when
  some files were already answered, the partial report.

Statuses (PS3.4 Annex B.2.3 for C-STORE, PS3.18 Section 10.5 for STOW-RS): 0x0000 is
success. **Warnings count as stored** (``ok``): 0xB000 coercion of data elements,
0xB007 data set does not match SOP class, 0xB006 elements discarded, and the other
warnings (0x0001, 0x0107, 0x0116, 0xBxxx): the peer kept the instance, perhaps
altered, and resending would change nothing; the status stays in the report so the
UI can show "delivered with warning". Failures are
retryable when they describe the peer's state rather than the instance: 0xA7xx out of
resources, 0x0110 processing failure, 0x0213 resource limitation. Every other failure
(0xA9xx data set does not match SOP class, 0xCxxx cannot understand, 0x0122 SOP class
not supported, 0x0124 not authorised, ...) happens again on a resend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

__all__ = [
    "DeliveryError",
    "InstanceFile",
    "InstanceOutcome",
    "SendReport",
    "Stopwatch",
    "describe_status",
    "read_instance_files",
    "status_category",
    "status_is_retryable",
]

StatusCategory = Literal["success", "warning", "failure"]

_STATUS_NAMES: dict[int, str] = {
    0x0000: "success",
    0x0001: "warning",
    0x0107: "attribute list error",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0116: "attribute value out of range",
    0x0117: "invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0xC122: "transfer syntax not supported",
}
_STATUS_RANGES: tuple[tuple[int, int, str], ...] = (  # (mask, value, meaning)
    (0xFF00, 0xA700, "refused: out of resources"),
    (0xFF00, 0xA900, "error: data set does not match SOP class"),
    (0xF000, 0xC000, "error: cannot understand"),
    (0xF000, 0xB000, "warning"),
)
_RETRYABLE_STATUSES = frozenset({0x0110, 0x0213})


def status_category(status: int) -> StatusCategory:
    """Success, warning (stored, perhaps altered) or failure; see the module docstring."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or status & 0xF000 == 0xB000:
        return "warning"
    return "failure"


def status_is_retryable(status: int) -> bool:
    """Whether a failure status describes the peer's state (out of resources, ...), not the instance."""
    return status & 0xFF00 == 0xA700 or status in _RETRYABLE_STATUSES


def describe_status(status: int) -> str:
    """``0xA700 (refused: out of resources)``: the status in hex with its meaning."""
    name = _STATUS_NAMES.get(status)
    if name is None:
        name = next((meaning for mask, value, meaning in _STATUS_RANGES if status & mask == value), "unknown status")
    return f"0x{status:04X} ({name})"


@dataclass(frozen=True)
class InstanceFile:
    """A Part 10 file to send and what its file meta says (read without the data set)."""

    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID

    @classmethod
    def read(cls, path: Path) -> InstanceFile:
        """Read the file meta of ``path``; ValueError naming the file and what is missing."""
        try:
            meta = read_file_meta_info(path)
        except (OSError, InvalidDicomError) as exc:
            raise ValueError(f"{path}: cannot read as a DICOM Part 10 file: {exc}") from exc
        missing = [
            keyword
            for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
            if not meta.get(keyword)
        ]
        if missing:
            raise ValueError(f"{path}: file meta lacks {', '.join(missing)}")
        return cls(
            path=Path(path),
            sop_class_uid=UID(str(meta.MediaStorageSOPClassUID)),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=UID(str(meta.TransferSyntaxUID)),
        )


class InstanceOutcome(BaseModel):
    """What happened to one file.

    ``status`` is the DICOM status the peer gave (C-STORE response, or STOW-RS
    WarningReason/FailureReason), ``None`` when the file never reached the peer or
    got no answer. ``ok`` means stored (success or warning). ``error`` is the peer's
    error comment or our explanation; ``retryable`` says whether a resend could succeed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    sop_instance_uid: str | None
    status: int | None
    ok: bool
    retryable: bool = False
    error: str | None = None

    @property
    def warning(self) -> bool:
        """Stored, but the peer answered a warning status."""
        return self.ok and self.status not in (None, 0x0000)

    @classmethod
    def from_status(cls, item: InstanceFile, status: int, comment: str | None = None) -> InstanceOutcome:
        """The outcome the peer's ``status`` means (see the module docstring)."""
        category = status_category(status)
        if category == "success":
            return cls(path=item.path, sop_instance_uid=item.sop_instance_uid, status=status, ok=True)
        detail = describe_status(status) + (f": {comment}" if comment else "")
        return cls(
            path=item.path,
            sop_instance_uid=item.sop_instance_uid,
            status=status,
            ok=category == "warning",
            retryable=category == "failure" and status_is_retryable(status),
            error=detail,
        )

    @classmethod
    def not_sent(cls, item: InstanceFile, error: str, *, retryable: bool) -> InstanceOutcome:
        """A file the peer never answered for (no presentation context, no acknowledgement, ...)."""
        return cls(
            path=item.path,
            sop_instance_uid=item.sop_instance_uid,
            status=None,
            ok=False,
            retryable=retryable,
            error=error,
        )

    @classmethod
    def unreadable(cls, path: Path, error: str) -> InstanceOutcome:
        """A file that could not be read here, so was never offered."""
        return cls(path=path, sop_instance_uid=None, status=None, ok=False, retryable=False, error=error)


class SendReport(BaseModel):
    """The result of sending a set of files to one destination; see the module docstring.

    ``outcomes`` are in the order the files were given. ``peer`` is ``AE@host:port`` or
    the DICOMweb URL; ``http_status`` the STOW-RS response code (None for C-STORE).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    destination: str
    peer: str
    outcomes: tuple[InstanceOutcome, ...]
    elapsed_seconds: float
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        """True only when every file was stored (success or warning status)."""
        return all(outcome.ok for outcome in self.outcomes)

    @property
    def stored(self) -> tuple[InstanceOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.ok)

    @property
    def failed(self) -> tuple[InstanceOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.ok)

    @property
    def warnings(self) -> tuple[InstanceOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.warning)

    @property
    def retryable(self) -> bool:
        """Some file failed in a way a later resend could fix (resending all is harmless)."""
        return any(outcome.retryable for outcome in self.failed)

    def summary(self, max_listed: int = 3) -> str:
        """One line for logs and the delivery's error column: counts and the failures, grouped by error."""
        text = (
            f"destination {self.destination!r} ({self.peer}): {len(self.stored)} of "
            f"{len(self.outcomes)} instances stored"
        )
        if self.warnings:
            text += f", {len(self.warnings)} with a warning"
        failed = self.failed
        if not failed:
            return text
        groups: dict[str, list[InstanceOutcome]] = {}
        for outcome in failed:
            groups.setdefault(outcome.error or "failed", []).append(outcome)
        listed = "; ".join(
            f"{error} ({len(members)} instance{'s' if len(members) > 1 else ''}, first "
            f"{members[0].sop_instance_uid or members[0].path})"
            for error, members in list(groups.items())[:max_listed]
        )
        more = f"; and {len(groups) - max_listed} other errors" if len(groups) > max_listed else ""
        kind = "retryable" if self.retryable else "permanent"
        return f"{text}; {len(failed)} failed ({kind}): {listed}{more}"


class DeliveryError(Exception):
    """A send that could not run or broke off; ``str()`` names destination, peer and cause.

    ``retryable``: whether trying again later can help (refused/aborted connection,
    time-out, transient rejection, HTTP 5xx/408/429) or not (called AE title not
    recognised, TLS certificate rejected, HTTP 401/403/404, ...). ``report`` holds the
    files answered before the break, if any; ``retry_after_seconds`` the server's
    ``Retry-After`` hint. Picklable with all of them (Celery moves exceptions between
    processes).
    """

    def __init__(
        self,
        destination: str,
        message: str,
        *,
        retryable: bool,
        report: SendReport | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(destination, message)
        self.destination = destination
        self.message = message
        self.retryable = retryable
        self.report = report
        self.retry_after_seconds = retry_after_seconds

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_delivery_error,
            (self.destination, self.message, self.retryable, self.report, self.retry_after_seconds),
        )


def _rebuild_delivery_error(
    destination: str,
    message: str,
    retryable: bool,
    report: SendReport | None,
    retry_after_seconds: float | None,
) -> DeliveryError:
    return DeliveryError(
        destination, message, retryable=retryable, report=report, retry_after_seconds=retry_after_seconds
    )


class Stopwatch:
    """Seconds since construction (monotonic), for ``SendReport.elapsed_seconds``."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def seconds(self) -> float:
        return round(time.monotonic() - self._start, 6)


def read_instance_files(paths: Sequence[Path]) -> list[InstanceFile | InstanceOutcome]:
    """Each path's :class:`InstanceFile`, or an ``unreadable`` outcome in its place (same order).

    A file that cannot be read is reported rather than raised so that one bad file
    does not hold back the others.
    """
    entries: list[InstanceFile | InstanceOutcome] = []
    for path in paths:
        try:
            entries.append(InstanceFile.read(Path(path)))
        except ValueError as exc:
            entries.append(InstanceOutcome.unreadable(Path(path), str(exc)))
    return entries
