"""The DICOM listener (pynetdicom): C-ECHO and C-STORE for every storage SOP class.

Handlers are thin: the access decision comes from :mod:`dicom_node.access`, each
instance goes to :class:`dicom_node.ingest.IngestService`, and every association is
recorded with who sent what and how it ended. Handlers return statuses and never raise.

By default only pynetdicom's public API is used: AE settings, event handlers, a
``server_class`` whose sockets bound what a peer can make the node hold
(:mod:`dicom_node.scp_transport`), and the node's own reaper for associations that end
without telling. ``dicom.accelerate: true`` installs :mod:`dicom_node.scp_accel` on every
accepted association instead (faster, pinned to one pynetdicom version; see
docs/receive-acceleration.md); on any other pynetdicom version the node says so and
uses the public-API path.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.access import AccessPolicy
from dicom_node.association_server import serve_in_thread
from dicom_node.db import repo
from dicom_node.db.models import AssociationOutcome
from dicom_node.header import uid_problem
from dicom_node.ingest import STATUS_SUCCESS, IncomingInstance, IngestService, StoreOutcome, StoreRequest, utc_now
from dicom_node.scp_transport import ANSWERED_OVERSHOOT, GuardedAssociationServer, GuardedSSLSocket
from dicom_node.settings import DicomSettings
from dicom_node.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.storage_classes import STORAGE_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES
from dicom_node.tls_files import ca_bundle_problem, client_certificate_problems, no_key_password

logger = logging.getLogger(__name__)


def build_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The server-side TLS context for DICOM TLS, or None when TLS is off.

    Raises :class:`RuntimeError` naming each file that cannot be used (and an encrypted
    key is one: OpenSSL would otherwise ask for its password on the terminal and the
    node would never start).
    """
    tls = settings.tls
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None  # the settings require both
    problems = [message for _, message in client_certificate_problems(tls.certificate, tls.private_key,
                                                                      prefix="dicom.tls.")]
    if tls.ca_certificates is not None:
        problem = ca_bundle_problem(tls.ca_certificates)
        if problem is not None:
            problems.append(f"dicom.tls.ca_certificates {tls.ca_certificates} {problem}")
    if problems:
        raise RuntimeError("; ".join(problems))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.sslsocket_class = GuardedSSLSocket  # bounded reads on the public-API path (scp_transport)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key), password=no_key_password)
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


#: How often the association reaper looks for associations that ended without telling.
REAP_INTERVAL_SECONDS = 0.5
#: A new connection has this long to send its A-ASSOCIATE-RQ before it can be closed to make room.
PENDING_GRACE_SECONDS = 1.0
#: The longest Error Comment (LO, PS3.5 6.2); the whole reason stays in the node's records.
ERROR_COMMENT_LENGTH = 64
#: A data set reassembled in memory by pynetdicom goes to the staging file in slices of this size.
_WRITE_SLICE = 4 * 1_048_576


def error_comment(reason: str) -> str:
    """``reason`` as a C-STORE Error Comment: at most 64 characters, cut between words, no backslash."""
    text = " ".join(reason.replace("\\", "/").split())
    if len(text) <= ERROR_COMMENT_LENGTH:
        return text
    cut = text[: ERROR_COMMENT_LENGTH - 3]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(",;: ") + "..."


@dataclass
class _Connection:
    """What the node tracks about one open connection."""

    assoc: Association
    peer_address: str
    peer_port: int
    opened_at: float
    association_id: int | None = None
    calling_ae_title: str = ""
    rejected: bool = False
    evicted: bool = False
    stored: int = 0
    failed: int = 0
    bytes_received: int = 0
    incoming: list[IncomingInstance] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """Connected but no association requested yet."""
        return self.association_id is None and not self.rejected

    @property
    def negotiated(self) -> bool:
        """An association was requested and accepted."""
        return self.association_id is not None and not self.rejected

    @property
    def holds_slot(self) -> bool:
        """Accepted and its threads still run: an association whose threads ended holds no slot, even before
        the reaper records its end (a peer's garbage ends pynetdicom's DUL thread without closing the socket)."""
        return self.negotiated and self.assoc.is_alive()


@dataclass(frozen=True)
class _AssociationEnd:
    """The end of an association, to be written to its row (kept and retried while the DB refuses)."""

    association_id: int
    outcome: AssociationOutcome
    at: datetime
    stored: int
    failed: int
    bytes_received: int
    calling_ae_title: str


class StorageSCP:
    """Owns the pynetdicom AE and server; start with :meth:`start`, stop with :meth:`stop`.

    Slots are the node's to count: an association holds one from its accepted
    A-ASSOCIATE-RQ until its thread has ended, however it ended. A reaper thread
    finds associations whose thread ended without pynetdicom reporting the closed
    connection (a DIMSE decoding error, for example), closes their sockets and
    records their end; ends the database could not record (disk full) are retried
    until it can.
    """

    def __init__(
        self,
        settings: DicomSettings,
        ingest: IngestService,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._settings = settings
        self._ingest = ingest
        self._sessions = sessions
        self._clock = clock
        self._policy = AccessPolicy(settings)
        self._tls = settings.tls.enabled
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._unrecorded: list[_AssociationEnd] = []
        self._server: GuardedAssociationServer | None = None
        self._accel: ModuleType | None = None  # dicom_node.scp_accel when dicom.accelerate is in effect
        self._server_thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self._settings.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = self._settings.max_pdu_size
        ae.acse_timeout = self._settings.acse_timeout_seconds
        ae.dimse_timeout = self._settings.dimse_timeout_seconds
        ae.network_timeout = self._settings.network_timeout_seconds
        # Access control and association limits are ours (they record reasons and count
        # only negotiated associations); pynetdicom's own checks stay open. Its limit
        # counts silent connections too, so it is set above anything ours allows.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = self._settings.max_associations + self._settings.max_pending_connections + 64
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(SUPPORTED_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def open_associations(self) -> int:
        """Associations holding a slot now (accepted, their threads not yet ended)."""
        with self._lock:
            return sum(1 for connection in self._connections.values() if connection.holds_slot)

    def listener_status(self) -> tuple[bool, str]:
        """Whether new associations can be accepted now, and a sentence saying why (for /readyz)."""
        if self._server is None or self._server_thread is None or not self._server_thread.is_alive():
            return False, "the DICOM listener is not running"
        open_now, maximum = self.open_associations(), self._settings.max_associations
        if open_now >= maximum:
            return False, f"all {maximum} association slots in use on port {self.port}"
        return True, f"accepting associations on port {self.port} ({open_now} of {maximum} open)"

    def start(self) -> None:
        self._accel = self._acceleration()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
        ]
        if self._accel is None:  # the accelerated DIMSE answers these requests itself
            handlers.append((evt.EVT_DIMSE_RECV, self._on_dimse_received))
        server = cast(GuardedAssociationServer, self.ae.make_server(
            (self._settings.bind_address, self._settings.port),
            evt_handlers=handlers,
            ssl_context=build_ssl_context(self._settings),
            server_class=GuardedAssociationServer,
        ))
        server.configure(
            handshake_timeout=self._settings.acse_timeout_seconds,
            io_timeout=self._settings.network_timeout_seconds,
            on_handshake_failed=self._record_failed_handshake,
        )
        if self._accel is not None:
            server.contexts = self._accel.cheap_copy_contexts(server.contexts)
        else:
            server.guard_limits = (self._settings.max_pdu_size,
                                   self._settings.max_instance_mb * 1_048_576 + ANSWERED_OVERSHOOT)
        self._server = server
        self._stopping.clear()
        self._server_thread = serve_in_thread(server, f"dicom-listener-{self.port}")
        self._reaper = threading.Thread(target=self._reap_forever, name="association-reaper", daemon=True)
        self._reaper.start()
        if self._policy.open_to_any_caller:
            logger.warning("dicom.allowed_callers is empty: any calling AE title may store to this node")
        logger.info(
            "DICOM listener %s on %s:%d%s%s",
            self._settings.ae_title,
            self._settings.bind_address,
            self.port,
            " (TLS)" if self._tls else "",
            " (accelerated)" if self._accel is not None else "",
        )

    def _acceleration(self) -> ModuleType | None:
        """:mod:`dicom_node.scp_accel` if ``dicom.accelerate`` is set and supports this pynetdicom (a warning if not)."""
        if not self._settings.accelerate:
            return None
        from dicom_node import scp_accel  # only then: the default path never loads pynetdicom internals

        reason = scp_accel.unsupported_reason()
        if reason is not None:
            logger.warning("dicom.accelerate is true but %s: receiving through pynetdicom's public API instead",
                           reason)
            return None
        return scp_accel

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop listening; give open associations up to ``drain_seconds`` to end, abort the rest, record their ends.

        Connections that have not requested an association are closed at once.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with self._lock:
            silent = [connection.assoc for connection in self._connections.values() if connection.pending]
        for assoc in silent:
            _shut_transport(assoc)
        deadline = time.monotonic() + drain_seconds
        while self.open_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            alive = [connection.assoc for connection in self._connections.values()]
        if any(assoc.is_alive() for assoc in alive):
            logger.warning("aborting %d association(s) still open as the node stops", len(alive))
        for assoc in alive:
            if assoc.is_alive():
                assoc.abort()
        self._stopping.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self._reap()

    # -- handlers (pynetdicom calls these on its threads; they must not raise) --

    def _on_connection_open(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        address, port = event.address[0], event.address[1]
        if self._accel is not None:
            self._accel.accelerate(assoc, open_dataset=self._open_dataset)
        now = time.monotonic()
        with self._lock:
            new = self._connections[id(assoc)] = _Connection(assoc, str(address), int(port), now)
            evicted = self._evict_pending(new, now)
        if evicted is not None:
            logger.warning("closing the connection from %s:%d: more than %d connections have not requested an "
                           "association (dicom.max_pending_connections)", evicted.peer_address, evicted.peer_port,
                           self._settings.max_pending_connections)
            _shut_transport(evicted.assoc)

    def _evict_pending(self, new: _Connection, now: float) -> _Connection | None:
        """Keep connections without an association request within the limit (call with the lock held).

        Past the limit, the one silent for longest goes - but only if it has had
        :data:`PENDING_GRACE_SECONDS` to speak; otherwise the new connection goes, so a
        flood of fresh sockets can never push out a peer whose request is on its way.
        """
        pending = [c for c in self._connections.values() if c.pending and not c.evicted]
        if len(pending) <= self._settings.max_pending_connections:
            return None
        oldest = min(pending, key=lambda c: c.opened_at)
        victim = oldest if now - oldest.opened_at >= PENDING_GRACE_SECONDS else new
        victim.evicted = True
        return victim

    def _on_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        request = assoc.requestor.primitive
        calling = _ae_text(request.calling_ae_title)
        called = _ae_text(request.called_ae_title)
        with self._lock:
            connection = self._connections.setdefault(
                id(assoc),
                _Connection(assoc, str(assoc.requestor.address), int(assoc.requestor.port), time.monotonic()),
            )
            connection.calling_ae_title = calling
            open_now = sum(1 for other in self._connections.values() if other is not connection and other.holds_slot)
            decision = self._policy.decide(calling, called, connection.peer_address, open_now)
            connection.rejected = decision.rejection is not None
            if not connection.rejected:
                connection.association_id = -1  # counted as open until the row exists
        try:
            connection.association_id = self._record_association(connection, calling, called, decision.reason)
        except Exception:
            logger.exception("cannot record the association from %s", calling)
        if decision.rejection is not None:
            logger.warning(
                "rejected association from %s (%s:%d) to %s: %s",
                calling,
                connection.peer_address,
                connection.peer_port,
                called,
                decision.reason,
            )
            assoc.acse.send_reject(*decision.rejection.result_source_reason)
            # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out and
            # the peer has closed (or the ARTIM timer fired) before the socket is shut.
            assoc.kill()
        else:
            logger.info("association from %s (%s:%d)", calling, connection.peer_address, connection.peer_port)

    def _record_association(self, connection: _Connection, calling: str, called: str, rejection: str | None) -> int:
        return repo.open_association(
            self._sessions,
            calling_ae_title=calling,
            called_ae_title=called,
            peer_address=connection.peer_address,
            peer_port=connection.peer_port,
            tls=self._tls,
            now=self._clock(),
            reject_reason=rejection,
        )

    def _record_failed_handshake(self, address: str, port: int, reason: str) -> None:
        """A TLS handshake that failed or timed out: one row, like a connection without an association."""
        try:
            repo.open_association(self._sessions, calling_ae_title="", called_ae_title="", peer_address=address,
                                  peer_port=port, tls=True, now=self._clock(), reject_reason=reason)
        except Exception:
            logger.exception("cannot record the failed TLS handshake from %s:%d", address, port)

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _open_dataset(self, assoc: Association, context_id: int, sop_class_uid: str,
                      sop_instance_uid: str) -> IncomingInstance:
        """Where the data set of a C-STORE streams to: a staging file of the ingest service."""
        connection = self._connections.get(id(assoc))
        context = next((cx for cx in assoc.accepted_contexts if cx.context_id == context_id), None)
        syntax = str(context.transfer_syntax[0]) if context is not None and context.transfer_syntax else ""
        association_id = connection.association_id if connection else None
        incoming = self._ingest.begin(StoreRequest(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=syntax,
            calling_ae_title=connection.calling_ae_title if connection else "",
            association_id=association_id if association_id and association_id > 0 else None,
        ))
        if connection is not None:
            connection.incoming.append(incoming)
        return incoming

    def _on_store(self, event: evt.Event) -> int | Dataset:
        connection = self._connections.get(id(event.assoc))
        incoming: IncomingInstance | None = getattr(event, "dataset_sink", None)
        if incoming is None:  # reassembled in memory by pynetdicom (the public-API path)
            incoming = self._open_dataset(event.assoc, event.context.context_id,
                                          str(event.request.AffectedSOPClassUID or ""),
                                          str(event.request.AffectedSOPInstanceUID or ""))
            if event.request.DataSet is not None:
                with event.request.DataSet.getbuffer() as received:
                    for start in range(0, len(received), _WRITE_SLICE):
                        incoming.write(received[start:start + _WRITE_SLICE])
        if connection is not None and incoming in connection.incoming:
            connection.incoming.remove(incoming)
        try:
            outcome = self._finish(incoming)
        except Exception as exc:
            incoming.discard()
            logger.exception("storing SOP Instance %s failed", incoming.request.sop_instance_uid)
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
            self._ingest.record_failure(incoming.request, 0xC211, reason)
            outcome = StoreOutcome(0xC211, reason)
        if connection:
            if outcome.status == STATUS_SUCCESS:
                connection.stored += 1
                connection.bytes_received += incoming.received_bytes
            else:
                connection.failed += 1
        if outcome.status == STATUS_SUCCESS:
            return STATUS_SUCCESS
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = error_comment(outcome.reason or "")
        return status

    def _finish(self, incoming: IncomingInstance) -> StoreOutcome:
        """Refuse a request without usable UIDs before its data set is looked at; else let ingest decide."""
        refusal = self._ingest.refuse_unusable_uids(incoming.request, "the C-STORE request's Affected")
        if refusal is not None:
            incoming.discard()
            return refusal
        return self._ingest.finish(incoming)

    def _on_dimse_received(self, event: evt.Event) -> None:
        """Answer a C-STORE request with an unusable UID that pynetdicom would drop (public-API path only).

        pynetdicom ignores a request whose Affected SOP Instance UID is empty (the sender
        waits for a response until its own timeout) and aborts on one longer than 64
        characters. This runs on the DUL thread before pynetdicom turns the message into a
        request: the failure status goes out now, and the unusable UIDs are set to None so
        pynetdicom drops the request without aborting the association.
        """
        command = event.message.command_set
        if command.get("CommandField") != 0x0001:  # C-STORE-RQ
            return
        class_uid = _ae_text(command.get("AffectedSOPClassUID") or "")
        instance_uid = _ae_text(command.get("AffectedSOPInstanceUID") or "")
        if uid_problem(class_uid) is None and uid_problem(instance_uid) is None:
            return
        connection = self._connections.get(id(event.assoc))
        association_id = connection.association_id if connection else None
        request = StoreRequest(sop_class_uid=class_uid, sop_instance_uid=instance_uid, transfer_syntax_uid="",
                               calling_ae_title=connection.calling_ae_title if connection else "",
                               association_id=association_id if association_id and association_id > 0 else None)
        outcome = self._ingest.refuse_unusable_uids(request, "the C-STORE request's Affected")
        assert outcome is not None
        if connection is not None:
            connection.failed += 1
        response = C_STORE()
        response.MessageIDBeingRespondedTo = command.MessageID
        if uid_problem(class_uid) is None:
            response.AffectedSOPClassUID = class_uid
        response.Status = outcome.status
        response.ErrorComment = error_comment(outcome.reason or "")
        for keyword, uid in (("AffectedSOPClassUID", class_uid), ("AffectedSOPInstanceUID", instance_uid)):
            if uid_problem(uid) is not None:
                setattr(command, keyword, None)
        event.assoc.dimse.send_msg(response, event.message.context_id)

    def _on_connection_close(self, event: evt.Event) -> None:
        # Called on the DUL thread, possibly a moment before the association thread has
        # set is_released/is_aborted; record the outcome once that thread has finished.
        assoc: Association = event.assoc
        if self._accel is None and assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            # Closed before an A-ASSOCIATE-RQ: pynetdicom's acceptor thread would wait the
            # whole ACSE timeout for one, holding a place in its own association count.
            # ``None`` is what that wait returns when it times out, so the thread ends now.
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
        threading.Thread(
            target=self._record_end, args=(event.assoc,), name="association-end", daemon=True
        ).start()

    def _record_end(self, assoc: Association) -> None:
        connection = self._connections.get(id(assoc))
        if connection is not None and connection.negotiated and assoc.is_alive():
            assoc.join(timeout=self._settings.network_timeout_seconds)
        with self._lock:
            connection = self._connections.pop(id(assoc), None)
        if connection is None:
            return  # already recorded (the reaper and the close event can both get here)
        for incoming in connection.incoming:
            incoming.discard()  # data sets the association did not finish sending
        if connection.rejected:
            return
        if connection.association_id is None:
            reason = "connection closed without a valid association request"
            if connection.evicted:
                reason = "closed: too many connections without an association request"
            try:
                self._record_association(connection, "", "", reason)
            except Exception:
                logger.exception("cannot record the connection from %s:%d", connection.peer_address,
                                 connection.peer_port)
            logger.warning("connection from %s:%d %s", connection.peer_address, connection.peer_port,
                           reason.removeprefix("connection "))
            return
        if connection.association_id < 0:
            return  # its row could not be written when it opened; nothing to close
        outcome = AssociationOutcome.RELEASED if assoc.is_released else AssociationOutcome.ABORTED
        end = _AssociationEnd(connection.association_id, outcome, self._clock(), connection.stored,
                              connection.failed, connection.bytes_received, connection.calling_ae_title)
        if not self._write_end(end):
            with self._lock:
                self._unrecorded.append(end)

    def _write_end(self, end: _AssociationEnd, retry: bool = False) -> bool:
        """Record ``end``; False (logged once) when the database refuses, so it is retried."""
        try:
            repo.close_association(
                self._sessions,
                end.association_id,
                outcome=end.outcome,
                now=end.at,
                instances_stored=end.stored,
                instances_failed=end.failed,
                bytes_received=end.bytes_received,
            )
        except Exception as exc:
            logger.log(logging.DEBUG if retry else logging.ERROR,
                       "cannot record the end of association %s yet (%s); will retry", end.association_id, exc)
            return False
        self._ingest.association_finished(end.association_id)
        logger.info("association from %s %s: %d stored, %d failed", end.calling_ae_title, end.outcome.value,
                    end.stored, end.failed)
        return True

    # -- the reaper --

    def _reap_forever(self) -> None:
        while not self._stopping.wait(REAP_INTERVAL_SECONDS):
            try:
                self._reap()
            except Exception:
                logger.exception("association reaper failed; trying again")

    def _reap(self) -> None:
        """End associations whose threads ended silently; retry ends the database refused."""
        with self._lock:
            finished = [c.assoc for c in self._connections.values() if c.assoc.ident is not None
                        and not c.assoc.is_alive()]
            retry, self._unrecorded = self._unrecorded, []
        for assoc in finished:
            _shut_transport(assoc)
            self._record_end(assoc)
        still = [end for end in retry if not self._write_end(end, retry=True)]
        if still:
            with self._lock:
                self._unrecorded[:0] = still


def _shut_transport(assoc: Association) -> None:
    """Close an association's connection from outside its threads; pynetdicom sees the peer go."""
    transport = getattr(assoc.dul, "socket", None)
    raw = getattr(transport, "socket", None)
    if raw is None:
        return
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more: nothing left to shut
    if not assoc.is_alive():
        raw.close()


def _ae_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()
