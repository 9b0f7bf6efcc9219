"""The DICOM listener (pynetdicom): C-ECHO and C-STORE for every storage SOP class.

Handlers are thin: the access decision comes from :mod:`dicom_node.access`, each
instance goes to :class:`dicom_node.ingest.IngestService`, and every association is
recorded with who sent what and how it ended. Handlers return statuses and never raise.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import scp_fastpath
from dicom_node.access import AccessPolicy
from dicom_node.db import repo
from dicom_node.db.models import AssociationOutcome
from dicom_node.ingest import STATUS_SUCCESS, IngestService, ReceivedInstance, utc_now
from dicom_node.settings import DicomSettings
from dicom_node.spool import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

logger = logging.getLogger(__name__)

# Accepted as sent and stored unchanged (PS3.5 Section 10 and Annex A), in order of
# preference when a sender offers several for one SOP class: lossless compression first
# (the sender keeps its encoding and the link carries less), then uncompressed, and lossy
# compression last, so the node never asks a sender to compress lossily images it holds
# uncompressed, which would degrade what the models see.
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
)


def build_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The server-side TLS context for DICOM TLS, or None when TLS is off."""
    tls = settings.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class _Connection:
    """What the node tracks about one open connection."""

    peer_address: str
    peer_port: int
    association_id: int | None = None
    calling_ae_title: str = ""
    rejected: bool = False
    stored: int = 0
    failed: int = 0
    bytes_received: int = 0


class StorageSCP:
    """Owns the pynetdicom AE and server; start with :meth:`start`, stop with :meth:`stop`."""

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
        self._server: AssociationServer | None = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self._settings.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = self._settings.max_pdu_size
        ae.acse_timeout = self._settings.acse_timeout_seconds
        ae.dimse_timeout = self._settings.dimse_timeout_seconds
        ae.network_timeout = self._settings.network_timeout_seconds
        # Access control is ours (it records reasons); pynetdicom's own checks stay open.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = self._settings.max_associations + 64
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(SUPPORTED_TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
        ]
        self._server = self.ae.start_server(
            (self._settings.bind_address, self._settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=build_ssl_context(self._settings),
        )
        scp_fastpath.install(self._server)  # cheaper association set-up and C-STORE path
        if self._policy.open_to_any_caller:
            logger.warning("dicom.allowed_callers is empty: any calling AE title may store to this node")
        logger.info(
            "DICOM listener %s on %s:%d%s",
            self._settings.ae_title,
            self._settings.bind_address,
            self.port,
            " (TLS)" if self._tls else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self.ae.shutdown()  # also aborts associations still open
            self._server = None

    # -- handlers (pynetdicom calls these on its threads; they must not raise) --

    def _on_connection_open(self, event: evt.Event) -> None:
        address, port = event.address[0], event.address[1]
        with self._lock:
            self._connections[id(event.assoc)] = _Connection(str(address), int(port))

    def _on_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        request = assoc.requestor.primitive
        calling = _ae_text(request.calling_ae_title)
        called = _ae_text(request.called_ae_title)
        with self._lock:
            connection = self._connections.setdefault(
                id(assoc), _Connection(str(assoc.requestor.address), int(assoc.requestor.port))
            )
            connection.calling_ae_title = calling
            open_now = sum(
                1 for other in self._connections.values() if other.association_id is not None and not other.rejected
            )
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

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        connection = self._connections.get(id(event.assoc))
        request = event.request
        association_id = connection.association_id if connection else None
        item = ReceivedInstance(
            body=request.DataSet.getvalue() if request.DataSet is not None else b"",
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=connection.calling_ae_title if connection else "",
            association_id=association_id if association_id and association_id > 0 else None,
        )
        try:
            outcome = self._ingest.store(item)
        except Exception as exc:
            logger.exception("storing SOP Instance %s failed", item.sop_instance_uid)
            if connection:
                connection.failed += 1
            reason = f"unexpected error: {type(exc).__name__}: {exc}"
            self._ingest.record_failure(item, 0xC211, reason, quarantine=False)
            return 0xC211
        if connection:
            if outcome.status == STATUS_SUCCESS:
                connection.stored += 1
                connection.bytes_received += len(item.body)
            else:
                connection.failed += 1
        if outcome.status == STATUS_SUCCESS:
            return STATUS_SUCCESS
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = (outcome.reason or "")[:64]
        return status

    def _on_connection_close(self, event: evt.Event) -> None:
        # Called on the DUL thread, possibly a moment before the association thread has
        # set is_released/is_aborted; record the outcome once that thread has finished.
        threading.Thread(
            target=self._record_end, args=(event.assoc,), name="association-end", daemon=True
        ).start()

    def _record_end(self, assoc: Association) -> None:
        connection = self._connections.get(id(assoc))
        negotiated = connection is not None and connection.association_id is not None
        if negotiated and assoc.is_alive():
            assoc.join(timeout=self._settings.network_timeout_seconds)
        with self._lock:
            connection = self._connections.pop(id(assoc), None)
        if connection is None or connection.rejected:
            return
        now = self._clock()
        try:
            if connection.association_id is None:
                self._record_association(
                    connection, "", "", "connection closed without a valid association request"
                )
                logger.warning(
                    "connection from %s:%d closed without a valid association request",
                    connection.peer_address,
                    connection.peer_port,
                )
                return
            outcome = AssociationOutcome.RELEASED if assoc.is_released else AssociationOutcome.ABORTED
            repo.close_association(
                self._sessions,
                connection.association_id,
                outcome=outcome,
                now=now,
                instances_stored=connection.stored,
                instances_failed=connection.failed,
                bytes_received=connection.bytes_received,
            )
            self._ingest.association_finished(connection.association_id)
            logger.info(
                "association from %s %s: %d stored, %d failed",
                connection.calling_ae_title,
                outcome.value,
                connection.stored,
                connection.failed,
            )
        except Exception:
            logger.exception("cannot record the end of association %s", connection.association_id)


def _ae_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()
