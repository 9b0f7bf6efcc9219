"""STOW-RS client: store a set of Part 10 files on a DICOMweb server with one request.

``POST {url}/studies`` with a ``multipart/related; type="application/dicom"`` body,
one part per file, the file bytes unchanged (PS3.18 Section 10.5). The body is
streamed from the files (Content-Length computed first), so a large set is not held
in memory. The standard library is enough (urllib + ssl), so no HTTP client is a
runtime dependency. Redirects are not followed: a POST redirected to a GET would look
like success; a 3xx is reported so the admin can configure the final URL.

The response (``application/dicom+json``) lists stored instances in
ReferencedSOPSequence (0008,1199), with an optional WarningReason (0008,1196), and
refused ones in FailedSOPSequence (0008,1198) with FailureReason (0008,1197); those
become per-file outcomes, judged like C-STORE statuses (see
:mod:`dicom_node.delivery_types`). HTTP 200 means every instance was stored, 202 some
were not, 409 none was. Other codes raise :class:`DeliveryError`: 5xx, 408, 429 and
network errors are retryable (with the ``Retry-After`` hint when given), other 4xx
and 3xx are not.
"""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.delivery_types import (
    DeliveryError,
    InstanceFile,
    InstanceOutcome,
    SendReport,
    Stopwatch,
    read_instance_files,
)
from dicom_node.destinations import DicomWebDestination
from dicom_node.http_exchange import RETRYABLE_HTTP, excerpt, exchange, retry_after, with_auth

__all__ = ["check_dicomweb", "multipart_body", "parse_stow_response", "send_dicomweb"]

logger = logging.getLogger(__name__)

USER_AGENT = "dicom-node/0.1 (STOW-RS)"
_CHUNK = 1 << 20
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def multipart_body(paths: Sequence[Path], boundary: str) -> tuple[int, Iterator[bytes]]:
    """(Content-Length, chunks) of a multipart/related body with one application/dicom part per file."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    tail = f"--{boundary}--\r\n".encode("ascii")
    sizes = [Path(path).stat().st_size for path in paths]
    length = sum(len(head) + size + 2 for size in sizes) + len(tail)

    def chunks() -> Iterator[bytes]:
        for path in paths:
            yield head
            with open(path, "rb") as stream:
                while block := stream.read(_CHUNK):
                    yield block
            yield b"\r\n"
        yield tail

    return length, chunks()


def _request_headers(destination: DicomWebDestination, boundary: str, length: int) -> dict[str, str]:
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json, application/json;q=0.9",
        "User-Agent": USER_AGENT,
    }
    return with_auth(destination, headers)


def _values(dataset: Mapping[str, Any], tag: str) -> list[Any]:
    element = dataset.get(tag)
    if not isinstance(element, Mapping):
        return []
    values = element.get("Value")
    return list(values) if isinstance(values, list) else []


def _first_int(dataset: Mapping[str, Any], tag: str) -> int | None:
    for value in _values(dataset, tag):
        if isinstance(value, int):
            return value
    return None


def parse_stow_response(body: bytes) -> tuple[dict[str, int], dict[str, int]] | None:
    """({referenced SOP Instance UID: warning status or 0}, {failed UID: failure status}).

    ``None`` when the body holds neither sequence (empty, not JSON, another format):
    the HTTP status alone must then be believed.
    """
    if not body.strip():
        return None
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(document, list):  # some servers wrap the one response data set in an array
        document = document[0] if document else {}
    if not isinstance(document, Mapping) or not (
        _REFERENCED_SOP_SEQUENCE in document or _FAILED_SOP_SEQUENCE in document
    ):
        return None
    referenced: dict[str, int] = {}
    for item in _values(document, _REFERENCED_SOP_SEQUENCE):
        if isinstance(item, Mapping):
            for uid in _values(item, _REFERENCED_SOP_INSTANCE_UID):
                referenced[str(uid)] = _first_int(item, _WARNING_REASON) or 0
    failed: dict[str, int] = {}
    for item in _values(document, _FAILED_SOP_SEQUENCE):
        if isinstance(item, Mapping):
            reason = _first_int(item, _FAILURE_REASON)
            for uid in _values(item, _REFERENCED_SOP_INSTANCE_UID):
                failed[str(uid)] = 0x0110 if reason is None else reason  # no reason given: processing failure
    return referenced, failed


def send_dicomweb(destination: DicomWebDestination, files: Sequence[Path]) -> SendReport:
    """STOW-RS ``files`` to ``destination`` in one request; see the module docstring.

    Returns a :class:`SendReport` (one outcome per file, in order) when the server
    answered 200, 202 or 409; raises :class:`DeliveryError` otherwise.
    """
    stopwatch = Stopwatch()
    label = f"destination {destination.name!r} ({destination.url}/studies)"
    entries = read_instance_files(files)
    items = [entry for entry in entries if isinstance(entry, InstanceFile)]

    def report(outcomes: Sequence[InstanceOutcome], http_status: int | None) -> SendReport:
        return SendReport(
            destination=destination.name,
            peer=destination.peer,
            outcomes=tuple(outcomes),
            elapsed_seconds=stopwatch.seconds(),
            http_status=http_status,
        )

    if not items:
        return report([entry for entry in entries if isinstance(entry, InstanceOutcome)], None)

    def error(problem: str, *, retryable: bool, retry_after: float | None = None) -> DeliveryError:
        message = f"{label}: {problem} ({'will retry' if retryable else 'permanent'})"
        return DeliveryError(destination.name, message, retryable=retryable, retry_after_seconds=retry_after)

    boundary = f"dicom-node-{uuid.uuid4().hex}"
    try:
        length, body = multipart_body([item.path for item in items], boundary)
    except OSError as exc:
        raise error(f"cannot read a file to send: {exc}", retryable=False) from exc
    request = urllib.request.Request(
        f"{destination.url}/studies",
        data=body,
        headers=_request_headers(destination, boundary, length),
        method="POST",
    )
    logger.info("%s: posting %d instances (%d bytes)", label, len(items), length)
    status, headers, answer = exchange(destination, request, error)

    if status not in (200, 202, 409):
        problem = f"HTTP {status}"
        if 300 <= status < 400:
            problem += f" redirect to {headers.get('Location') if headers else None!r}; configure the final URL"
        elif status in (401, 403):
            problem += " (the credentials were refused)" if status == 401 else " (not allowed to store)"
        if answer:
            problem += f": {excerpt(answer)}"
        retryable = status >= 500 or status in RETRYABLE_HTTP
        raise error(problem, retryable=retryable, retry_after=retry_after(headers) if retryable else None)

    outcomes = _outcomes(entries, status, parse_stow_response(answer), label)
    result = report(outcomes, status)
    if result.ok:
        logger.info("%s", result.summary())
    else:
        logger.warning("%s (HTTP %d)", result.summary(), status)
    return result


def check_dicomweb(destination: DicomWebDestination, timeout: float | None = None) -> tuple[bool, str, float]:
    """Probe ``destination`` (the admin's "Test connection"): (ok, what happened, seconds taken).

    A QIDO-RS ``GET {url}/studies?limit=1`` with the destination's credentials and TLS
    settings: the cheapest request a DICOMweb server must answer, and one that proves
    the URL, the certificate and the credentials (a server that takes STOW-RS but not
    QIDO-RS is reported as such, not as a failure to reach it). Nothing is stored.
    ``timeout`` replaces the destination's ``timeout_seconds``. Never raises for
    network or HTTP trouble: the failure is the answer.
    """
    probe = destination.model_copy(update={"timeout_seconds": timeout}) if timeout is not None else destination
    url = f"{probe.url}/studies?limit=1"
    label = f"destination {probe.name!r} (GET {url})"
    stopwatch = Stopwatch()

    def error(problem: str, *, retryable: bool, retry_after: float | None = None) -> DeliveryError:
        return DeliveryError(probe.name, f"{label}: {problem}", retryable=retryable, retry_after_seconds=retry_after)

    request = urllib.request.Request(
        url, headers=with_auth(probe, {"Accept": "application/dicom+json, application/json;q=0.9",
                                        "User-Agent": USER_AGENT}), method="GET",
    )
    try:
        status, headers, body = exchange(probe, request, error)
    except DeliveryError as exc:
        logger.warning("DICOMweb test: %s", exc.message)
        return False, exc.message, stopwatch.seconds()
    seconds = stopwatch.seconds()
    if status in (200, 204):
        detail = f"{label}: HTTP {status} in {seconds * 1000:.0f} ms; the server answers QIDO-RS"
        if probe.auth.type != "none":
            detail += f" and accepted the {probe.auth.type} credentials"
        logger.info("DICOMweb test: %s", detail)
        return True, detail, seconds
    problem = f"HTTP {status}"
    if 300 <= status < 400:
        problem += f" redirect to {headers.get('Location') if headers else None!r}; configure the final URL"
    elif status == 401:
        problem += " (the credentials were refused)" if probe.auth.type != "none" else " (the server wants credentials)"
    elif status == 403:
        problem += " (not allowed)"
    elif status == 404:
        problem += " (no DICOMweb service at this URL: check the service root, e.g. http://host:8042/dicom-web)"
    if body:
        problem += f": {excerpt(body)}"
    logger.warning("DICOMweb test: %s: %s", label, problem)
    return False, f"{label}: {problem}", seconds


def _outcomes(
    entries: Sequence[InstanceFile | InstanceOutcome],
    http_status: int,
    parsed: tuple[dict[str, int], dict[str, int]] | None,
    label: str,
) -> list[InstanceOutcome]:
    """Per-file outcomes from the response lists, the HTTP status deciding for unlisted files."""
    referenced, failed = parsed if parsed is not None else ({}, {})
    if parsed is None and http_status != 200:
        logger.warning("%s: HTTP %d without a readable STOW-RS response body", label, http_status)
    outcomes: list[InstanceOutcome] = []
    for entry in entries:
        if isinstance(entry, InstanceOutcome):
            outcomes.append(entry)
        elif entry.sop_instance_uid in failed:
            outcomes.append(InstanceOutcome.from_status(entry, failed[entry.sop_instance_uid]))
        elif entry.sop_instance_uid in referenced:
            outcomes.append(InstanceOutcome.from_status(entry, referenced[entry.sop_instance_uid]))
        elif http_status == 200:  # "every instance was stored"
            outcomes.append(InstanceOutcome.from_status(entry, 0x0000))
        elif http_status == 409:  # "no instance was stored", and this one is not explained
            outcomes.append(InstanceOutcome.not_sent(entry, "refused (HTTP 409) without a reason", retryable=False))
        else:
            outcomes.append(
                InstanceOutcome.not_sent(
                    entry, f"not acknowledged in the STOW-RS response (HTTP {http_status})", retryable=True
                )
            )
    return outcomes
