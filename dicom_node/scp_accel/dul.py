"""The accelerated DUL reactor: waits in ``select()`` instead of sleeping 1 ms, reads PDUs in large bounded reads.

It blocks on the peer socket and on a wake-up socket pair written by ``send_pdu`` and
``kill_dul``; reads each PDU with a few large ``recv_into`` calls, never allocating more
than the advertised maximum PDU length; decodes P-DATA-TF PDUs with a small parser and, in
state Sta6 with an empty event queue, hands them straight to DIMSE (exactly what the state
machine's DT-2 action does). When the connection ends before an A-ASSOCIATE-RQ it wakes
the acceptor thread, which stock pynetdicom leaves waiting for the whole ACSE timeout.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.scp_accel.commands import _unpack_from_I_be
from dicom_node.scp_accel.dimse import _as_bytes_pdvs, _FastDIMSE

LOGGER = logging.getLogger(__name__)

#: Upper bound (seconds) on how long either reactor blocks before re-checking its timers
#: (ARTIM, network idle timeout) and kill flags. Wake-ups for socket data, locally queued
#: primitives and DUL events are immediate; this only bounds the latency of timer expiry.
MAX_IDLE_WAIT = 0.05

#: Largest single ``recv_into`` request when reading a PDU body.
_RECV_CHUNK = 4 * 1024 * 1024


class _FastPDataTF:
    """Minimal stand-in for a decoded P-DATA-TF PDU (only ``to_primitive``)."""

    __slots__ = ("pdvs",)

    def __init__(self, pdvs: list[Any]) -> None:
        self.pdvs = pdvs

    def to_primitive(self) -> P_DATA:
        p = P_DATA()
        # pynetdicom's own P_DATA_TF.to_primitive() also fills the list directly
        p._presentation_data_value_list = self.pdvs
        return p


_MAX_CONTROL_PDU = 1 << 20  # A-ASSOCIATE and friends: a few KiB in practice


def _max_pdu_body(pdu_type: int, maximum_length: int) -> int:
    """The largest PDU body accepted: the advertised maximum for P-DATA, 1 MiB otherwise."""
    if pdu_type != 0x04:
        return _MAX_CONTROL_PDU
    return maximum_length if maximum_length else 0xFFFFFFFF


def _parse_p_data_tf(body: bytearray) -> list[Any] | None:
    """Split a P-DATA-TF body into ``[context ID, PDV data]`` items.

    The PDV data are zero-copy ``memoryview`` slices of `body` (message
    control header byte included, as in pynetdicom's P-DATA primitive).

    Returns ``None`` if the body is malformed so that pynetdicom's decoder
    produces its usual error handling.
    """
    n = len(body)
    if n < 6:
        return None
    mv = memoryview(body)
    off = 0
    out: list[Any] = []
    while off < n:
        if n - off < 6:
            return None
        (ilen,) = _unpack_from_I_be(body, off)
        end = off + 4 + ilen
        if ilen < 2 or end > n:
            return None
        out.append([body[off + 4], mv[off + 5 : end]])
        off = end
    return out


class _FastDUL(DULServiceProvider):
    """Event-driven DUL reactor (select on socket + wake-up pair, no fixed sleeps)."""

    # Set by accelerate()
    _fp_rsock: socket.socket
    _fp_wsock: socket.socket
    _fp_lock: threading.Lock
    _fp_closed: bool
    _fp_wake_assoc: threading.Event

    # -- wake-up plumbing -------------------------------------------------
    def _fp_signal(self) -> None:
        with self._fp_lock:
            if self._fp_closed:
                return
            try:
                self._fp_wsock.send(b"\x00")
            except BlockingIOError:
                pass  # the pair's buffer is full: a wake-up is already pending
            except OSError as exc:
                LOGGER.debug("cannot wake the DUL reactor of %s: %s", self.assoc, exc)

    def _fp_close(self) -> None:
        with self._fp_lock:
            if self._fp_closed:
                return
            self._fp_closed = True
            for end in (self._fp_rsock, self._fp_wsock):
                try:
                    end.close()
                except OSError as exc:
                    LOGGER.debug("closing the wake-up socket pair failed: %s", exc)

    def _fp_wait(self, timeout: float) -> None:
        """Block until socket data, a local primitive/kill, or `timeout`."""
        fds: list[Any] = [self._fp_rsock]
        asock = self.socket
        raw = getattr(asock, "socket", None) if asock is not None else None
        if raw is not None and getattr(asock, "_is_connected", False):
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return
            if raw.fileno() >= 0:
                fds.append(raw)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError) as exc:
            # The peer socket was closed under us: the reactor's next read reports it (Evt17).
            LOGGER.debug("select on the connection failed (%s); the reactor goes on", exc)
            return
        if self._fp_rsock in ready:
            try:
                while self._fp_rsock.recv(4096):
                    pass
            except BlockingIOError:
                pass  # drained: the usual end of the loop
            except OSError as exc:
                LOGGER.debug("draining the wake-up socket failed: %s", exc)

    def send_pdu(self, primitive: Any) -> None:  # noqa: D102
        super().send_pdu(primitive)
        self._fp_signal()

    def kill_dul(self) -> None:  # noqa: D102
        super().kill_dul()
        self._fp_signal()

    # -- receive ------------------------------------------------------------
    def _fp_recv_exact(self, raw: socket.socket, buf: bytearray) -> int:
        """Fill `buf` from `raw`; return the number of bytes read (short on EOF)."""
        view = memoryview(buf)
        n = len(buf)
        got = 0
        while got < n:
            r = raw.recv_into(view[got:], min(n - got, _RECV_CHUNK))
            if not r:
                break
            got += r
        return got

    def _fp_read(self, raw: socket.socket, buf: bytearray) -> int | None:
        """:meth:`_fp_recv_exact`, or None (Evt17 queued) when the connection failed."""
        try:
            return self._fp_recv_exact(raw, buf)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return None

    def _read_pdu_data(self) -> None:  # noqa: D102
        asock = self.socket
        raw = getattr(asock, "socket", None)
        if raw is None:
            return super()._read_pdu_data()

        header = bytearray(6)
        got = self._fp_read(raw, header)
        if got is None:
            return
        if got != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        limit = _max_pdu_body(pdu_type, self.assoc.acceptor.maximum_length)
        if pdu_length > limit:
            # Never allocate what a peer merely claims: a PDU longer than this node
            # advertised (or than any association PDU can be) is a protocol error.
            LOGGER.error(f"PDU of type 0x{pdu_type:02X} claims {pdu_length} bytes, more than {limit} allowed")
            self.event_queue.put("Evt19")
            return

        body = bytearray(pdu_length)
        got = self._fp_read(raw, body)
        if got is None:
            return
        if got != pdu_length:
            LOGGER.error(
                f"The received PDU is shorter than expected ({6 + got} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return

        assoc = self.assoc
        if (
            pdu_type == 0x04
            and not assoc.get_handlers(evt.EVT_DATA_RECV)
            and not assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            pdvs = _parse_p_data_tf(body)
            if pdvs is not None:
                if (
                    self.state_machine.current_state == "Sta6"
                    and self.event_queue.empty()
                    and self._recv_pdu.empty()
                    and not assoc.get_handlers(evt.EVT_FSM_TRANSITION)
                ):
                    # Equivalent of do_action("Evt10") in Sta6: action DT-2,
                    # next state Sta6, no FSM_TRANSITION handlers to notify.
                    try:
                        cast(_FastDIMSE, assoc.dimse)._fp_receive_pdvs(pdvs)
                    except Exception as exc:
                        LOGGER.error(
                            "State Machine received an exception attempting "
                            "to perform the action '%s' while in state '%s'",
                            "DT-2",
                            "Sta6",
                        )
                        LOGGER.exception(exc)
                        self.kill_dul()
                        self._fp_wake_assoc.set()
                    return
                self.event_queue.put("Evt10")
                self._recv_pdu.put(_FastPDataTF(_as_bytes_pdvs(pdvs)))  # type: ignore[arg-type]
                return

        header += body
        try:
            pdu, event = self._decode_pdu(header)
            self.event_queue.put(event)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    # -- reactor ------------------------------------------------------------
    def run_reactor(self) -> None:
        """DUL reactor: same loop as pynetdicom's, but waits on events."""
        try:
            self._fp_run_reactor()
        finally:
            self._fp_close()
            self._fp_wake_assoc.set()
            assoc = self.assoc
            if assoc.is_acceptor and assoc.requestor.primitive is None and self.to_user_queue.empty():
                # The connection ended before an A-ASSOCIATE-RQ: pynetdicom's acceptor
                # thread would wait the whole ACSE timeout for one. ``None`` is what
                # that wait returns when it times out, so the thread ends now instead.
                self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _fp_run_reactor(self) -> None:
        self._idle_timer.start()
        assoc = self.assoc
        wake_assoc = self._fp_wake_assoc
        sleep = False

        while True:
            if not assoc._dul_ready.is_set():
                assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._fp_wait(MAX_IDLE_WAIT)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("Exception in DUL.run(), aborting association")
                LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                assoc.is_aborted = True
                assoc.is_established = False
                assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                # A PDU handled directly (fast DT-2) counts as activity
                continue

            self.state_machine.do_action(event)
            wake_assoc.set()
            sleep = False

    def stop_dul(self) -> bool:  # noqa: D102
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._fp_signal()
            if threading.current_thread() is not self:
                self.join()
            return True
        return False


