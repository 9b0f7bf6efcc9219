"""Bounds on what a peer can make the public-API receive path hold in memory, enforced on the socket.

Stock pynetdicom reads whatever length a PDU header claims (a peer that really sends a
4 GiB PDU gets 4 GiB of memory) and reassembles each DIMSE message in memory however
long it grows. It offers no setting for either, and its ``EVT_PDU_RECV`` / ``EVT_DATA_RECV``
events come after a whole PDU has been read. The node therefore watches the byte stream
itself, on the socket it hands to pynetdicom (``AE.make_server(server_class=...)``):
:class:`PduGuard` follows the PDU framing and the presentation data value items in it
and closes the connection, with an A-ABORT, as soon as a header claims

* a P-DATA-TF PDU longer than the maximum PDU length this node advertised
  (``dicom.max_pdu_size``), or any other PDU longer than :data:`MAX_CONTROL_PDU`;
* a command set longer than :data:`MAX_COMMAND_SET`;
* a data set longer than ``dataset_limit`` (``dicom.max_instance_mb`` plus
  :data:`ANSWERED_OVERSHOOT`: an instance up to that size is received and answered
  with 0xA701, a larger one costs the sender its association).

pynetdicom then sees the connection end (event 17) and ends the association the usual
way. With ``dicom.accelerate`` the accelerated DUL enforces its own bounds and streams data
sets to disk, and no guard is installed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Any

from dicom_node.association_server import BoundedAssociationServer

logger = logging.getLogger(__name__)

#: A-ASSOCIATE, A-RELEASE and A-ABORT PDUs are a few KiB in practice.
MAX_CONTROL_PDU = 1 << 20
#: A command set is a few hundred bytes; one longer than this is not a command set.
MAX_COMMAND_SET = 64 * 1024
#: How far past ``dicom.max_instance_mb`` a data set is still read to its end and answered 0xA701.
ANSWERED_OVERSHOOT = 64 * 1_048_576

_PDU_HEADER = struct.Struct(">BxL")
_ITEM_HEADER = struct.Struct(">LBB")
_P_DATA_TF = 0x04
#: An item length too short to hold its own header: the rest of the PDU is pynetdicom's to refuse.
_MALFORMED = 1 << 62
#: A-ABORT-RQ, source: service provider (2); reason 0 (not specified) or 6 (invalid PDU parameter value).
_A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02%c"


class PduGuard:
    """Follows one connection's inbound PDUs and says when the peer went past a bound; see the module docstring."""

    def __init__(self, peer: str, max_pdata_length: int, dataset_limit: int) -> None:
        self.peer = peer
        self.max_pdata_length = max_pdata_length
        self.dataset_limit = dataset_limit
        self.violation: str | None = None
        self._header = bytearray()
        self._pdu_type = 0
        self._pdu_left = 0
        self._item_header = bytearray()
        self._item_left = 0
        self._command_bytes = 0
        self._dataset_bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[str, int] | None:
        """Account for ``data`` read from the peer; ``(reason, A-ABORT reason code)`` once a bound is passed."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._pdu_left == 0:
                take = min(6 - len(self._header), end - pos)
                self._header += view[pos:pos + take]
                pos += take
                if len(self._header) < 6:
                    break
                pdu_type, length = _PDU_HEADER.unpack(self._header)
                self._header.clear()
                limit = self.max_pdata_length if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
                if length > limit:
                    return f"PDU of type 0x{pdu_type:02X} claims {length} bytes, more than {limit} allowed", 6
                self._pdu_type, self._pdu_left = pdu_type, length
                self._item_header.clear()
                self._item_left = 0
                continue
            n = min(self._pdu_left, end - pos)
            if self._pdu_type == _P_DATA_TF:
                problem = self._feed_items(view[pos:pos + n])
                if problem is not None:
                    return problem
            pos += n
            self._pdu_left -= n
        return None

    def _feed_items(self, chunk: memoryview) -> tuple[str, int] | None:
        """Follow the presentation data value items of a P-DATA-TF body (``chunk`` is part of one PDU)."""
        pos, end = 0, len(chunk)
        while pos < end:
            if self._item_left:
                n = min(self._item_left, end - pos)
                pos += n
                self._item_left -= n
                continue
            take = min(6 - len(self._item_header), end - pos)
            self._item_header += chunk[pos:pos + take]
            pos += take
            if len(self._item_header) < 6:
                break
            length, _context_id, control = _ITEM_HEADER.unpack(self._item_header)
            self._item_header.clear()
            if length < 2:
                self._item_left = _MALFORMED
                continue
            size = length - 2
            if control & 0x01:
                self._command_bytes += size
                if self._command_bytes > MAX_COMMAND_SET:
                    return f"command set longer than {MAX_COMMAND_SET} bytes", 0
                if control & 0x02:
                    self._command_bytes = self._dataset_bytes = 0
            else:
                self._dataset_bytes += size
                if self._dataset_bytes > self.dataset_limit:
                    return (f"data set longer than {self.dataset_limit} bytes (dicom.max_instance_mb plus "
                            f"{ANSWERED_OVERSHOOT // 1_048_576} MiB)"), 0
                if control & 0x02:
                    self._dataset_bytes = 0
            self._item_left = size
        return None

    def check(self, sock: socket.socket, data: bytes) -> bytes:
        """``data`` as read, or ``b""`` (end of stream) once the peer went past a bound, the connection then closed."""
        if self.violation is not None:
            return b""
        problem = self.feed(data) if data else None
        if problem is None:
            return data
        self.violation, abort_reason = problem
        logger.error("closing the connection from %s: %s", self.peer, self.violation)
        try:
            sock.sendall(_A_ABORT % abort_reason)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            logger.debug("the A-ABORT to %s could not be sent: %s", self.peer, exc)
        return b""


class GuardedSocket(socket.socket):
    """A TCP socket whose ``recv`` goes through a :class:`PduGuard` (pynetdicom reads with ``recv`` only)."""

    guard: PduGuard | None = None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        return data if self.guard is None else self.guard.check(self, data)


class GuardedSSLSocket(ssl.SSLSocket):
    """The TLS counterpart of :class:`GuardedSocket`, made by a context whose ``sslsocket_class`` it is."""

    guard: PduGuard | None = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        data = super().recv(buflen, flags)
        return data if self.guard is None else self.guard.check(self, data)


class GuardedAssociationServer(BoundedAssociationServer):
    """:class:`BoundedAssociationServer` that hands pynetdicom guarded sockets when ``guard_limits`` is set.

    Build the TLS context with ``sslsocket_class = GuardedSSLSocket`` (see
    :func:`dicom_node.scp.build_ssl_context`) so TLS connections are guarded too.
    """

    #: ``(max P-DATA-TF length, data set limit)``; None: sockets are handed over unguarded.
    guard_limits: tuple[int, int] | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.guard_limits is not None:
            request = self._guarded(request, client_address)
        super().finish_request(request, client_address)

    def _guarded(self, request: Any, client_address: Any) -> Any:
        assert self.guard_limits is not None
        peer = f"{client_address[0]}:{client_address[1]}" if isinstance(client_address, tuple) else str(client_address)
        guard = PduGuard(peer, *self.guard_limits)
        if isinstance(request, GuardedSSLSocket):
            request.guard = guard
            return request
        if isinstance(request, ssl.SSLSocket):
            logger.warning("the TLS context does not make guarded sockets; the connection from %s is unguarded", peer)
            return request
        timeout = request.gettimeout()
        guarded = GuardedSocket(request.family, request.type, request.proto, fileno=request.detach())
        guarded.settimeout(timeout)
        guarded.guard = guard
        return guarded
