"""Send one notification: an HL7 ORU^R01 over MLLP, or a FHIR transaction Bundle over HTTP(S).

Why: the dispatcher treats a notification like any delivery (retries with backoff, a dead letter,
the UI's rows) and needs from here what it needs from C-STORE and STOW-RS: done, or a
:class:`~dicom_node.delivery_types.DeliveryError` that says what happened and whether a retry
can help.

* **HL7 (MLLP)**: one TCP connection (TLS when the destination has ``tls``) per message, framed
  ``<VT> message <FS><CR>``; the node waits ``timeout_seconds`` for the ACK. AA/CA: delivered.
  AE/CE: failed, retryable, with the ACK's text; AR/CR: failed for good. No answer, a refused
  or broken connection, an ACK for another control ID or no ACK at all: retryable. An untrusted
  certificate or a failed TLS handshake: not retryable (see :mod:`dicom_node.hl7_report`).
* **FHIR**: ``POST {url}`` of the Bundle (``application/fhir+json``) with the destination's
  credentials; 2xx delivered; 5xx, 408 and 429 retryable (with ``Retry-After``), other 4xx and
  3xx not; the OperationOutcome's diagnostics, if the server sent one, are the error's text
  (:mod:`dicom_node.http_exchange` judges the transport).

Patient identifiers appear in logs at DEBUG level only; messages and errors name the job, the
study's accession number is not logged either.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from datetime import datetime

from dicom_node.db.notifications import NotificationFacts
from dicom_node.delivery_types import DeliveryError, Stopwatch
from dicom_node.destinations import FhirDestination, HL7Destination, NotificationDestination
from dicom_node.http_exchange import RETRYABLE_HTTP, excerpt, exchange, retry_after, with_auth

__all__ = ["MLLP_END", "MLLP_START", "Notified", "check_notification_destination", "send_notification"]

logger = logging.getLogger(__name__)

#: MLLP framing (HL7 v2 Transport, Minimal Lower Layer Protocol): start block, end block + carriage return.
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\r"
_MAX_ACK_BYTES = 1 << 20
USER_AGENT = "dicom-node/0.1 (FHIR)"


@dataclass(frozen=True)
class Notified:
    """A notification that arrived: how many messages or resources, in how long, and what the peer said."""

    sent: int
    seconds: float
    detail: str


def send_notification(destination: NotificationDestination, facts: NotificationFacts, *, now: datetime) -> Notified:
    """Tell ``destination`` about the job of ``facts``; DeliveryError (retryable or not) when it did not arrive."""
    if isinstance(destination, HL7Destination):
        return _send_hl7(destination, facts, now)
    return _send_fhir(destination, facts, now)


def _failure(destination: NotificationDestination, problem: str, *, retryable: bool,
             retry_after_seconds: float | None = None) -> DeliveryError:
    message = f"destination {destination.name!r} ({destination.peer}): {problem} " \
              f"({'will retry' if retryable else 'permanent'})"
    return DeliveryError(destination.name, message, retryable=retryable, retry_after_seconds=retry_after_seconds)


# --------------------------------------------------------------------------- HL7 v2 over MLLP


def _hl7_ssl(destination: HL7Destination) -> ssl.SSLContext | None:
    if destination.tls is None:
        return None
    from dicom_node.scu import build_client_ssl_context

    try:
        return build_client_ssl_context(destination.tls)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise _failure(destination, f"cannot load the TLS files: {exc}", retryable=False) from exc


def _mllp_exchange(destination: HL7Destination, message: bytes) -> bytes:
    """Send one framed message and read one framed answer; the answer's bytes, unframed."""
    context = _hl7_ssl(destination)
    timeout = destination.timeout_seconds
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = context.wrap_socket(raw, server_hostname=destination.host) if context else raw
            with stream:
                stream.sendall(MLLP_START + message + MLLP_END)
                received = b""
                while MLLP_END not in received:
                    chunk = stream.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                    if len(received) > _MAX_ACK_BYTES:
                        raise _failure(destination, f"the answer exceeds {_MAX_ACK_BYTES} bytes without an MLLP end "
                                                    "block", retryable=True)
    except ssl.SSLCertVerificationError as exc:
        raise _failure(destination, f"the peer's TLS certificate is not trusted: {exc.verify_message}",
                       retryable=False) from exc
    except ssl.SSLError as exc:
        raise _failure(destination, f"TLS handshake failed: {exc.reason or exc}", retryable=False) from exc
    except ConnectionRefusedError as exc:
        raise _failure(destination, "connection refused (nothing listening, or a firewall)", retryable=True) from exc
    except TimeoutError as exc:
        raise _failure(destination, f"no ACK within {timeout:g} s", retryable=True) from exc
    except OSError as exc:
        raise _failure(destination, f"the connection failed: {exc}", retryable=True) from exc
    start = received.find(MLLP_START)
    end = received.find(MLLP_END)
    if start < 0 or end < start:
        shown = excerpt(received) if received else "nothing"
        raise _failure(destination, f"the peer closed the connection without an MLLP-framed ACK (got {shown})",
                       retryable=True)
    return received[start + 1:end]


def _send_hl7(destination: HL7Destination, facts: NotificationFacts, now: datetime) -> Notified:
    from dicom_node.hl7_report import build_oru, control_id, read_ack

    stopwatch = Stopwatch()
    try:
        message = build_oru(destination, facts, now=now)
    except ValueError as exc:
        raise _failure(destination, str(exc), retryable=False) from exc
    logger.info("job %d: ORU^R01 %s (%s) to %s", facts.job_id, control_id(facts), facts.event, destination.peer)
    logger.debug("job %d: ORU^R01 for patient %r, accession %r", facts.job_id, facts.patient_id,
                 facts.accession_number)
    answer = _mllp_exchange(destination, message.encode("utf-8"))
    try:
        ack = read_ack(answer.decode("utf-8", "replace"))
    except ValueError as exc:
        raise _failure(destination, str(exc), retryable=True) from exc
    if ack.control_id != control_id(facts):
        raise _failure(destination, f"the ACK answers message {ack.control_id!r}, not {control_id(facts)!r}",
                       retryable=True)
    said = f": {ack.text}" if ack.text else ""
    if not ack.accepted:
        raise _failure(destination, f"the peer answered {ack.code}{said}", retryable=ack.retryable)
    return Notified(1, stopwatch.seconds(), f"ORU^R01 {ack.control_id} acknowledged {ack.code}{said}")


# --------------------------------------------------------------------------- FHIR


def _outcome_text(body: bytes) -> str:
    """The diagnostics of an OperationOutcome answer, else the body's start."""
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    try:
        outcome = OperationOutcome.model_validate_json(body)
    except ValueError:
        return excerpt(body)
    said = [issue.diagnostics or (issue.details.text if issue.details else None) or issue.code
            for issue in outcome.issue or []]
    return "; ".join(str(s) for s in said if s) or excerpt(body)


def _send_fhir(destination: FhirDestination, facts: NotificationFacts, now: datetime) -> Notified:
    from dicom_node.fhir_report import build_bundle

    stopwatch = Stopwatch()
    try:
        bundle = build_bundle(destination, facts, now=now)
    except ValueError as exc:
        raise _failure(destination, str(exc), retryable=False) from exc
    body = bundle.model_dump_json().encode("utf-8")
    resources = len(bundle.entry or [])
    request = urllib.request.Request(destination.url, data=body, method="POST", headers=with_auth(destination, {
        "Content-Type": "application/fhir+json; charset=utf-8", "Accept": "application/fhir+json",
        "User-Agent": USER_AGENT}))
    logger.info("job %d: FHIR transaction (%s, %d resources) to %s", facts.job_id, facts.event, resources,
                destination.url)
    logger.debug("job %d: FHIR report for patient %r", facts.job_id, facts.patient_id)

    def error(problem: str, *, retryable: bool, retry_after: float | None = None) -> DeliveryError:
        return _failure(destination, problem, retryable=retryable, retry_after_seconds=retry_after)

    status, headers, answer = exchange(destination, request, error)
    if not 200 <= status < 300:
        problem = f"HTTP {status}"
        if 300 <= status < 400:
            problem += f" redirect to {headers.get('Location') if headers else None!r}; configure the final URL"
        if answer:
            problem += f": {_outcome_text(answer)}"
        retryable = status >= 500 or status in RETRYABLE_HTTP
        raise error(problem, retryable=retryable, retry_after=retry_after(headers) if retryable else None)
    return Notified(resources, stopwatch.seconds(), f"HTTP {status}: {resources} resources")


# --------------------------------------------------------------------------- connection test


def check_notification_destination(destination: NotificationDestination, timeout: float) -> tuple[bool, str, float]:
    """The admin's "Test connection": (ok, what happened, seconds). HL7: open (and with TLS, handshake) the MLLP
    connection and close it, sending nothing; FHIR: ``GET {url}/metadata`` (the CapabilityStatement every server
    answers) with the destination's credentials. Never raises for network trouble."""
    stopwatch = Stopwatch()
    probe = destination.model_copy(update={"timeout_seconds": timeout})
    if isinstance(probe, HL7Destination):
        context = None
        try:
            context = _hl7_ssl(probe)
            with socket.create_connection((probe.host, probe.port), timeout=timeout) as raw:
                if context is not None:
                    with context.wrap_socket(raw, server_hostname=probe.host):
                        pass
        except DeliveryError as exc:
            return False, exc.message, stopwatch.seconds()
        except (OSError, ssl.SSLError) as exc:
            return False, f"destination {probe.name!r} ({probe.peer}): cannot connect: {exc}", stopwatch.seconds()
        what = "TLS handshake succeeded" if context is not None else "TCP connection accepted"
        return True, f"destination {probe.name!r} ({probe.peer}): {what}; no message sent", stopwatch.seconds()
    url = f"{probe.url}/metadata"
    request = urllib.request.Request(url, method="GET", headers=with_auth(probe, {
        "Accept": "application/fhir+json", "User-Agent": USER_AGENT}))

    def error(problem: str, *, retryable: bool, retry_after: float | None = None) -> DeliveryError:
        return _failure(probe, problem, retryable=retryable)

    try:
        status, _, body = exchange(probe, request, error)
    except DeliveryError as exc:
        return False, exc.message, stopwatch.seconds()
    if status == 200:
        try:
            version = json.loads(body).get("fhirVersion", "unknown")
        except (ValueError, AttributeError):
            version = "unknown"
        return True, f"destination {probe.name!r} (GET {url}): HTTP 200, FHIR version {version}", stopwatch.seconds()
    return False, f"destination {probe.name!r} (GET {url}): HTTP {status}: {_outcome_text(body)}", stopwatch.seconds()
