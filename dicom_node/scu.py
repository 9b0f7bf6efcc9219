"""C-STORE SCU: send a set of Part 10 files to a DICOM destination over one association.

Why one association: a PACS logs, authorises and often groups by association; opening
one per object is slow and noisy. What is proposed: for every SOP class among the
files, one presentation context per transfer syntax the files are stored in, and for
files stored little-endian uncompressed (Implicit/Explicit VR LE, Deflated) one more
context offering Explicit and Implicit VR Little Endian, so a peer that refuses the
stored syntax can still take the data (pynetdicom re-encodes those losslessly; Implicit
VR Little Endian is the DICOM default every SCP supports). Compressed files are sent
only in their own syntax: transcoding pixel data is not a transport's job. A file whose
syntax is accepted exactly is sent as its raw bytes, unparsed, so the peer receives the
data set exactly as stored.

Nagle's algorithm is turned off (``TCP_NODELAY``) on the socket as soon as it is
connected, before the association request: each C-STORE is a request, a data set and a
wait for the response, which Nagle plus delayed ACKs stall (measured 33 vs 155
images/s into Orthanc). pynetdicom has no socket-option setting, so an
``EVT_CONN_OPEN`` handler (its public event hook, fired after ``connect()`` and before
any PDU is sent) sets it; ``on_connect`` lets a caller observe the socket there.

Errors: see :mod:`dicom_node.delivery_types` for what counts as stored and retryable.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from dicom_node.delivery_types import (
    DeliveryError,
    InstanceFile,
    InstanceOutcome,
    SendReport,
    Stopwatch,
    read_instance_files,
)
from dicom_node.destinations import DicomDestination, DicomTLS
from dicom_node.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.tls_files import no_key_password

__all__ = ["SocketObserver", "build_client_ssl_context", "echo", "requested_contexts", "send_dicom"]

logger = logging.getLogger(__name__)

#: Called with the connected socket, after TCP_NODELAY is set and before any PDU is sent.
SocketObserver = Callable[[socket.socket], None]

#: PS3.8 Section 9.3.2.2: presentation context IDs are odd numbers 1-255.
MAX_PRESENTATION_CONTEXTS = 128

#: Stored encodings pynetdicom can re-encode losslessly into the fallback syntaxes.
_CONVERTIBLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})
_FALLBACK = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_REJECT_HINTS = {
    (1, 3): "the peer does not accept calling AE title {calling!r}; add it to the peer's known modalities",
    (1, 7): "the peer does not recognise called AE title {called!r}; check the destination's ae_title",
}


def requested_contexts(items: Sequence[InstanceFile]) -> list[PresentationContext]:
    """The presentation contexts to propose for ``items`` (see the module docstring).

    In order of first appearance: per SOP class, one context per stored transfer
    syntax, then one fallback context (Explicit, Implicit VR LE minus those already
    proposed) when some file of the class is stored in a convertible syntax.
    """
    stored: dict[UID, list[UID]] = {}
    for item in items:
        syntaxes = stored.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in stored.items():
        contexts.extend(build_context(sop_class, syntax) for syntax in syntaxes)
        if any(syntax in _CONVERTIBLE for syntax in syntaxes):
            fallback: list[str | UID] = [syntax for syntax in _FALLBACK if syntax not in syntaxes]
            if fallback:
                contexts.append(build_context(sop_class, fallback))
    return contexts


def build_client_ssl_context(tls: DicomTLS) -> ssl.SSLContext:
    """The client-side TLS context for ``tls`` (TLS 1.2 or later, peer certificate verified)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(tls.ca_certificates) if tls.ca_certificates is not None else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.certificate is not None and tls.private_key is not None:
        # never let OpenSSL prompt for a key password on the terminal (it would hang the sender)
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key), password=no_key_password)
    return context


@dataclass
class _Connection:
    """What the EVT_CONN_OPEN handler saw, for telling "never connected" from later failures."""

    opened: bool = False


def _on_connection_open(event: evt.Event, connection: _Connection, observer: SocketObserver | None) -> None:
    """Disable Nagle on the association's socket; pynetdicom calls this before the A-ASSOCIATE-RQ."""
    connection.opened = True
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        logger.warning("cannot set TCP_NODELAY on the connection to %s: %s", event.assoc.acceptor.address, exc)
    if observer is not None:
        observer(sock)


class _ReactorCheckpoint(threading.Event):
    """A stand-in for pynetdicom's ``Association._reactor_checkpoint`` that closes a race.

    Before each request, pynetdicom 3.0.4 pauses the association's reactor thread
    (``checkpoint.clear()``, then it polls ``_is_paused``) so that the reactor does not
    take the response off the DIMSE queue. But ``_is_paused`` is still True from the
    previous pause when the reactor has been woken (``set()`` after the last response)
    and not yet run: the sender goes ahead, the reactor wakes, takes the next C-STORE
    response as an "unexpected C-STORE service message" and the sender waits out the
    DIMSE timeout (seen here about once in 4,000 stores). Here ``clear()`` returns only
    once the reactor is really parked in ``wait()``, all under one condition lock.
    """

    def __init__(self, reactor: threading.Thread, timeout: float = 1.0) -> None:
        super().__init__()
        self._condition = threading.Condition()
        self._open = True
        self._parked = False
        self._reactor = reactor
        self._timeout = timeout

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()

    def clear(self) -> None:
        with self._condition:
            self._open = False
            if threading.current_thread() is self._reactor:
                return  # the reactor pausing itself (network timeout handling)
            # Bounded: a reactor that has ended never parks again.
            self._condition.wait_for(lambda: self._parked or not self._reactor.is_alive(), self._timeout)

    def wait(self, timeout: float | None = None) -> bool:
        with self._condition:
            self._parked = True
            self._condition.notify_all()
            try:
                return self._condition.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


class _Sender:
    """One call of :func:`send_dicom`: the destination, the AE titles, how to word reports and errors."""

    def __init__(self, destination: DicomDestination, calling_ae_title: str) -> None:
        self.destination = destination
        self.calling = destination.calling_ae_title or calling_ae_title
        self.label = (
            f"destination {destination.name!r} ({self.calling} -> {destination.ae_title}"
            f"@{destination.host}:{destination.port}{', TLS' if destination.tls else ''})"
        )
        self.stopwatch = Stopwatch()

    def report(self, outcomes: Sequence[InstanceOutcome]) -> SendReport:
        return SendReport(
            destination=self.destination.name,
            peer=self.destination.peer,
            outcomes=tuple(outcomes),
            elapsed_seconds=self.stopwatch.seconds(),
        )

    def error(self, problem: str, *, retryable: bool, report: SendReport | None = None) -> DeliveryError:
        message = f"{self.label}: {problem} ({'will retry' if retryable else 'permanent'})"
        return DeliveryError(self.destination.name, message, retryable=retryable, report=report)


def send_dicom(
    destination: DicomDestination,
    files: Sequence[Path],
    *,
    calling_ae_title: str,
    on_connect: SocketObserver | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``destination`` over one association; see the module docstring.

    ``calling_ae_title`` is the node's AE title, used unless the destination sets its
    own. Returns a :class:`SendReport` (one outcome per file, in order) when the
    association ran to its end; raises :class:`DeliveryError` when it could not be
    set up or broke off (with the files answered so far in ``error.report``).
    """
    sender = _Sender(destination, calling_ae_title)
    entries = read_instance_files(files)
    items = [entry for entry in entries if isinstance(entry, InstanceFile)]
    if not items:
        return sender.report([entry for entry in entries if isinstance(entry, InstanceOutcome)])
    contexts = requested_contexts(items)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise sender.error(
            f"the {len(items)} files need {len(contexts)} presentation contexts, more than the "
            f"{MAX_PRESENTATION_CONTEXTS} one association can carry; send them in smaller sets",
            retryable=False,
        )

    ae = AE(ae_title=sender.calling)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, destination.timeout_seconds)
    ssl_context = _ssl_context(sender)
    connection = _Connection()
    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts,
            ae_title=destination.ae_title,
            max_pdu=destination.max_pdu,
            tls_args=(ssl_context, destination.host) if ssl_context is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, _on_connection_open, [connection, on_connect])],
        )
    except socket.gaierror as exc:  # pynetdicom resolves the host itself, before connecting
        raise sender.error(f"cannot resolve host {destination.host!r}: {exc.strerror or exc}", retryable=True) from exc
    if not assoc.is_established:
        return _not_established(sender, assoc, connection, ssl_context, entries, time.monotonic() - started)
    logger.info("%s: association established, sending %d instances", sender.label, len(items))
    assoc._reactor_checkpoint = _ReactorCheckpoint(assoc)  # see _ReactorCheckpoint
    try:
        outcomes = _store_all(sender, assoc, entries)
    except BaseException:
        assoc.abort()
        raise
    unanswered = [outcome for outcome in outcomes if outcome.status is None and outcome.retryable]
    if unanswered:
        assoc.abort()  # whatever is left of it cannot be trusted
        answered = sum(1 for outcome in outcomes if outcome.status is not None)
        raise sender.error(
            f"the association broke off (aborted, or no response within "
            f"{destination.timeout_seconds:g} s): {answered} of {len(outcomes)} instances answered, "
            f"{len(unanswered)} not",
            retryable=True,
            report=sender.report(outcomes),
        )
    assoc.release()
    report = sender.report(outcomes)
    if report.ok:
        logger.info("%s", report.summary())
    else:
        logger.warning("%s", report.summary())
    return report


class _EchoSender(_Sender):
    """A :class:`_Sender` whose errors read as a connection test: the problem, without "will retry"."""

    def error(self, problem: str, *, retryable: bool, report: SendReport | None = None) -> DeliveryError:
        return DeliveryError(self.destination.name, f"{self.label}: {problem}", retryable=retryable, report=report)


def echo(destination: DicomDestination, calling_ae_title: str, timeout: float) -> tuple[bool, str, float]:
    """C-ECHO ``destination`` (the admin's "Test connection"): (ok, what happened, seconds taken).

    Uses the same AE titles, TLS settings and socket options as :func:`send_dicom`, and
    explains a failure the same way (refused connection, rejected association with the
    reason, TLS trouble, time-out), so a passing test means deliveries can get through.
    ``timeout`` replaces the destination's ``timeout_seconds`` for this one test. Never
    raises for network trouble: the failure is the answer.
    """
    probe = destination.model_copy(update={"timeout_seconds": timeout})
    sender = _EchoSender(probe, calling_ae_title)
    started = time.monotonic()

    def answer(ok: bool, detail: str) -> tuple[bool, str, float]:
        seconds = time.monotonic() - started
        (logger.info if ok else logger.warning)("connection test: %s", detail)
        return ok, detail, seconds

    try:
        ssl_context = _ssl_context(sender)
    except DeliveryError as exc:
        return answer(False, exc.message)
    ae = AE(ae_title=sender.calling)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, timeout)
    connection = _Connection()
    try:
        assoc = ae.associate(
            probe.host,
            probe.port,
            [build_context(Verification)],
            ae_title=probe.ae_title,
            max_pdu=probe.max_pdu,
            tls_args=(ssl_context, probe.host) if ssl_context is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, _on_connection_open, [connection, None])],
        )
    except socket.gaierror as exc:  # pynetdicom resolves the host itself, before connecting
        return answer(False, f"{sender.label}: cannot resolve host {probe.host!r}: {exc.strerror or exc}")
    except OSError as exc:
        return answer(False, f"{sender.label}: cannot connect: {exc.strerror or exc}")
    if not assoc.is_established:
        try:
            _not_established(sender, assoc, connection, ssl_context, [], time.monotonic() - started)
        except DeliveryError as exc:
            return answer(False, exc.message)
        return answer(False, f"{sender.label}: the peer accepted the association but refused the Verification "
                             "SOP class (C-ECHO); it may still accept C-STORE")
    try:
        status = assoc.send_c_echo()
    except (RuntimeError, OSError, ValueError) as exc:
        assoc.abort()
        return answer(False, f"{sender.label}: C-ECHO failed: {exc}")
    if "Status" not in status:
        assoc.abort()
        return answer(False, f"{sender.label}: no C-ECHO response within {timeout:g} s (the association broke off)")
    code = int(status.Status)
    assoc.release()
    if code != 0x0000:
        return answer(False, f"{sender.label}: C-ECHO answered with status 0x{code:04X}")
    return answer(True, f"{sender.label}: C-ECHO succeeded (status 0x0000)")


def _ssl_context(sender: _Sender) -> ssl.SSLContext | None:
    tls = sender.destination.tls
    if tls is None:
        return None
    try:
        return build_client_ssl_context(tls)
    except (OSError, ssl.SSLError, ValueError) as exc:  # ValueError: an encrypted private key
        raise sender.error(
            f"cannot load the TLS files (ca_certificates={tls.ca_certificates}, certificate={tls.certificate}, "
            f"private_key={tls.private_key}): {exc}",
            retryable=False,
        ) from exc


def _store_all(
    sender: _Sender, assoc: Association, entries: Sequence[InstanceFile | InstanceOutcome]
) -> list[InstanceOutcome]:
    """C-STORE every readable entry in order; once the association is gone the rest are "not sent"."""
    # With a file path, send the data set bytes as stored instead of decoding and
    # re-encoding them (pynetdicom's documented switch; it only changes what
    # send_c_store does with a path, and this module is the only caller passing paths).
    _config.STORE_SEND_CHUNKED_DATASET = True
    accepted = {
        (UID(cx.abstract_syntax), UID(cx.transfer_syntax[0]))
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax and cx.transfer_syntax
    }
    outcomes: list[InstanceOutcome] = []
    ended = False
    for index, entry in enumerate(entries):
        if isinstance(entry, InstanceOutcome):
            outcomes.append(entry)
        elif ended:
            outcomes.append(InstanceOutcome.not_sent(entry, "not sent: the association had ended", retryable=True))
        elif (mode := _send_mode(entry, accepted)) is None:
            outcomes.append(InstanceOutcome.not_sent(entry, _no_context_reason(sender, assoc, entry), retryable=False))
        else:
            outcome = _store_one(sender, assoc, entry, mode, message_id=index % 0xFFFF + 1)
            outcomes.append(outcome)
            # No response means the association is gone, even if pynetdicom's reactor
            # has not marked it so yet: do not wait out the DIMSE timeout once per file.
            ended = (outcome.status is None and outcome.retryable) or not assoc.is_established
    return outcomes


def _send_mode(item: InstanceFile, accepted: set[tuple[UID, UID]]) -> Literal["raw", "convert"] | None:
    if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
        return "raw"
    if item.transfer_syntax_uid in _CONVERTIBLE and any(
        sop_class == item.sop_class_uid and syntax in _CONVERTIBLE for sop_class, syntax in accepted
    ):
        return "convert"
    return None


def _no_context_reason(sender: _Sender, assoc: Association, item: InstanceFile) -> str:
    """Why ``item`` cannot go: what was proposed for its SOP class and what the peer answered."""
    refusals = {cx.context_id: cx.status for cx in assoc.rejected_contexts}
    answers = [
        f"{' / '.join(UID(ts).name for ts in cx.transfer_syntax)}: {refusals[cx.context_id]}"
        for cx in assoc.requestor.requested_contexts
        if cx.abstract_syntax == item.sop_class_uid and cx.context_id in refusals
    ]
    text = (
        f"no accepted presentation context for {item.sop_class_uid.name} ({item.sop_class_uid}) "
        f"in {item.transfer_syntax_uid.name} ({item.transfer_syntax_uid})"
    )
    if answers:
        text += f"; the peer refused {'; '.join(answers)}"
    if item.transfer_syntax_uid not in _CONVERTIBLE:
        text += "; compressed data is sent only in its stored transfer syntax"
    return text


def _store_one(
    sender: _Sender, assoc: Association, item: InstanceFile, mode: Literal["raw", "convert"], *, message_id: int
) -> InstanceOutcome:
    try:
        dataset: Path | Dataset = item.path if mode == "raw" else dcmread(item.path)
        status = assoc.send_c_store(dataset, msg_id=message_id)
    except (OSError, ValueError, AttributeError) as exc:
        # A file that changed or broke after its meta was read, or could not be encoded.
        logger.warning("%s: cannot send %s: %s", sender.label, item.path, exc)
        return InstanceOutcome.not_sent(item, f"cannot send {item.path}: {exc}", retryable=False)
    except RuntimeError as exc:  # pynetdicom: the association is no longer established
        return InstanceOutcome.not_sent(item, f"not sent: the association had ended ({exc})", retryable=True)
    if "Status" not in status:
        return InstanceOutcome.not_sent(item, "no C-STORE response: the association broke off", retryable=True)
    comment = str(status.get("ErrorComment", "") or "").strip() or None
    outcome = InstanceOutcome.from_status(item, int(status.Status), comment)
    if not outcome.ok:
        logger.warning("%s: %s was refused: %s", sender.label, item.sop_instance_uid, outcome.error)
    elif outcome.warning:
        logger.info("%s: %s stored with warning %s", sender.label, item.sop_instance_uid, outcome.error)
    return outcome


def _not_established(
    sender: _Sender,
    assoc: Association,
    connection: _Connection,
    ssl_context: ssl.SSLContext | None,
    entries: Sequence[InstanceFile | InstanceOutcome],
    waited: float,
) -> SendReport:
    """Explain why the association did not come up: raise DeliveryError, or report unsendable files."""
    destination = sender.destination
    if not connection.opened:
        problem, retryable = _probe_connection(destination, ssl_context, read_after_handshake=False) or (
            f"cannot connect to {destination.host}:{destination.port} (a second attempt worked: intermittent)",
            True,
        )
        raise sender.error(problem, retryable=retryable)
    response = assoc.acceptor.primitive or _unread_rejection(assoc)
    if response is not None and response.result in (0x01, 0x02):
        result, source, reason = response.result, response.result_source, response.diagnostic
        hint = _REJECT_HINTS.get((int(source or 0), int(reason or 0)), "")
        problem = (
            f"association rejected: {response.result_str} (result 0x{result or 0:02X}), source "
            f"{response.source_str} (0x{source or 0:02X}), reason {response.reason_str} (0x{reason or 0:02X})"
        )
        if hint:
            problem += "; " + hint.format(calling=sender.calling, called=destination.ae_title)
        # Transient rejections and the presentation provider's (congestion, local
        # limit exceeded) may pass; a permanent one from the service user stays.
        raise sender.error(problem, retryable=result == 0x02 or source == 0x03)
    if response is not None and response.result == 0x00 and not assoc.accepted_contexts:
        # Accepted, but not one presentation context: nothing of this set can go there.
        outcomes = [
            entry
            if isinstance(entry, InstanceOutcome)
            else InstanceOutcome.not_sent(entry, _no_context_reason(sender, assoc, entry), retryable=False)
            for entry in entries
        ]
        report = sender.report(outcomes)
        logger.warning("%s", report.summary())
        return report
    if waited >= destination.timeout_seconds * 0.95:
        raise sender.error(
            f"no answer to the association request within {destination.timeout_seconds:g} s", retryable=True
        )
    if ssl_context is not None:
        refusal = _probe_connection(destination, ssl_context, read_after_handshake=True)
        if refusal is not None:
            problem, retryable = refusal
            raise sender.error(problem, retryable=retryable)
    raise sender.error("the connection was aborted or closed during association negotiation", retryable=True)


def _unread_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ when pynetdicom gave up before reading it.

    pynetdicom's requestor checks that the socket is still connected before it reads
    the answer; a peer that rejects and closes at once (Orthanc does) can win that race,
    and the rejection then waits unread in the DUL's queue (seen about once in 120 tries).
    """
    while (primitive := assoc.dul.receive_pdu(wait=False)) is not None:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


def _probe_connection(
    destination: DicomDestination, ssl_context: ssl.SSLContext | None, *, read_after_handshake: bool
) -> tuple[str, bool] | None:
    """Why connections to the peer fail, from a second attempt: (problem, retryable), or None.

    pynetdicom logs the socket error but does not return it; the probe recovers the
    cause, so the message says "refused" or "certificate verify failed" and a TLS
    certificate problem is not retried forever. It runs only after a failure. With
    ``read_after_handshake`` it also reads once after the TLS handshake: TLS 1.3
    completes the client's handshake before the server checks the client certificate,
    whose refusal then arrives as an alert. None: the probe found nothing wrong.
    """
    where = f"{destination.host}:{destination.port}"
    try:
        with socket.create_connection((destination.host, destination.port), timeout=destination.timeout_seconds) as raw:
            if ssl_context is not None:
                with ssl_context.wrap_socket(raw, server_hostname=destination.host) as session:
                    if read_after_handshake:
                        session.settimeout(min(destination.timeout_seconds, 5.0))
                        session.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: {where} presented a certificate this node does not trust: {exc.verify_message}", False
    except ssl.SSLError as exc:
        return f"TLS with {where} failed: {exc.reason or exc} (is this node's client certificate accepted?)", False
    except OSError as exc:
        if read_after_handshake:
            return None
        if isinstance(exc, ConnectionRefusedError):
            return f"connection to {where} refused (nothing listening, or a firewall)", True
        if isinstance(exc, TimeoutError):
            return f"no TCP connection to {where} within {destination.timeout_seconds:g} s", True
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve host {destination.host!r}: {exc.strerror or exc}", True
        return f"cannot connect to {where}: {exc.strerror or exc}", True
    return None
