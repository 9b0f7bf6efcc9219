"""The listening socket of the DICOM SCP: an accept loop that no peer can hold up.

pynetdicom's ``ThreadedAssociationServer`` does two things on its single accept thread
that a silent or slow peer can turn into a denial of service, and leaves a third to the
peer's good will:

* with TLS, it runs the TLS handshake inside ``accept`` with no time limit, so one TCP
  connection that says nothing stops every later TLS association;
* accepted sockets are blocking without a timeout, so a peer that stops in the middle
  of a PDU (a header announcing 1,000 bytes, then 10 bytes, then nothing) holds its
  reader thread - and its association slot - for as long as it keeps the socket open;
* every accepted connection costs two threads before the peer has said anything.

:class:`BoundedAssociationServer` is a ``server_class`` for pynetdicom's public
``AE.make_server``: the accept thread only accepts; the TLS handshake runs on the
connection's own thread, bounded by ``handshake_timeout``; every socket gets
``io_timeout`` so a read or write that stalls mid-PDU fails (pynetdicom then closes the
transport, event 17); and connections that have not yet been handed to pynetdicom are
counted so the caller can keep their number bounded.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)

#: Called with ``(peer_address, peer_port, reason)`` when a TLS handshake fails or times out.
HandshakeFailed = Callable[[str, int, str], None]


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose accept loop never waits on a peer; see the module docstring.

    Configure with :meth:`configure` right after ``AE.make_server(...,
    server_class=BoundedAssociationServer)`` and before ``serve_forever``.
    """

    handshake_timeout: float = 10.0
    io_timeout: float = 60.0
    on_handshake_failed: HandshakeFailed | None = None

    def configure(self, *, handshake_timeout: float, io_timeout: float,
                  on_handshake_failed: HandshakeFailed | None = None) -> None:
        """Set the time limits (seconds) and who hears of failed TLS handshakes."""
        if handshake_timeout <= 0 or io_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got handshake {handshake_timeout}, io {io_timeout}")
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.on_handshake_failed = on_handshake_failed
        self.daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake, if any, happens on the connection's thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Wrap the socket for TLS within ``handshake_timeout``, set ``io_timeout``, hand it to pynetdicom."""
        try:
            request.settimeout(self.handshake_timeout)
            if self.ssl_context is not None:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            request.settimeout(self.io_timeout)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = "no TLS handshake within %.0f s" % self.handshake_timeout if isinstance(
                exc, TimeoutError) else f"TLS handshake failed: {exc}"
            address, port = _address(client_address)
            logger.warning("connection from %s:%d closed: %s", address, port, reason)
            _close(request)
            if self.on_handshake_failed is not None:
                self.on_handshake_failed(address, port, reason)
            return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket.

        pynetdicom's own ``shutdown`` also removes the server from the AE's private
        list of servers that ``AE.start_server`` keeps; a server built with
        ``AE.make_server`` was never in it.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def serve_in_thread(server: BoundedAssociationServer, name: str) -> threading.Thread:
    """Run ``server.serve_forever`` on a daemon thread named ``name``."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def _address(client_address: Any) -> tuple[str, int]:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return str(client_address[0]), int(client_address[1])
    return str(client_address), 0


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already disconnected by the peer; closing below is all that is left
    sock.close()
