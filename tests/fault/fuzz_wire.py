"""A raw DICOM Upper Layer client for the fault tests: every byte on the wire is ours.

pynetdicom as a requestor validates and re-encodes what it sends (UIDs, command sets,
datasets), which would repair most of what a fuzzer breaks. This client builds the PDUs
(PS3.8 9.3) and DIMSE command sets (PS3.7 9.3, 6.3.1; Implicit VR Little Endian) by hand,
so a hostile UID or a mutated dataset reaches the node exactly as built, and a peer that
stops mid-PDU, releases and then sends data, or sends garbage can be played on purpose.

Only what the fuzzers need: A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE, A-ABORT, and the
C-ECHO / C-STORE request and response command sets.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
IMPLEMENTATION_CLASS_UID = "2.25.318215465925011823911417766121187530277"  # this client's, UUID-derived

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT)

COMMAND_LAST = 0x03  # message control header: command fragment, last
DATASET_MORE, DATASET_LAST = 0x00, 0x02

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET, DATASET_PRESENT = 0x0101, 0x0000

#: How a request ended when no DIMSE status came back.
ABORTED, CLOSED, HANG, REFUSED = "aborted", "closed", "hang", "association refused"


class WireError(RuntimeError):
    """The peer did something this client cannot go on from; the message says what."""


# -- encoding --------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(
    called: str, calling: str, contexts: Sequence[tuple[int, str, Sequence[str]]], max_pdu: int = 1_048_576
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts``: (context id, abstract syntax, transfer syntaxes)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for context_id, abstract, syntaxes in contexts:
        body = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, abstract.encode("ascii"))
        body += b"".join(_item(0x40, syntax.encode("ascii")) for syntax in syntaxes)
        items.append(_item(0x20, body))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    items.append(_item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    return pdu(ASSOCIATE_RQ, fixed + b"".join(items))


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF of PDVs (presentation context id, message control header, fragment)."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, context_id, control) + data for context_id, control, data in pdvs)
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\0" * 4)


def release_rp() -> bytes:
    return pdu(RELEASE_RP, b"\0" * 4)


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return pdu(ABORT, bytes([0, 0, source, reason]))


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid_value(uid: bytes) -> bytes:
    """A UI value padded to even length with NUL, as PS3.5 6.2 wants (hostile bytes kept)."""
    return uid + b"\0" if len(uid) % 2 else uid


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """An Implicit VR Little Endian command set with its (0000,0000) group length first."""
    body = b"".join(_element(tag, value) for tag, value in sorted(elements))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int) -> bytes:
    return command_set([
        (0x00000002, _uid_value(VERIFICATION.encode())),
        (0x00000100, struct.pack("<H", C_ECHO_RQ)),
        (0x00000110, struct.pack("<H", message_id)),
        (0x00000800, struct.pack("<H", NO_DATASET)),
    ])


def c_store_rq(message_id: int, sop_class_uid: bytes, sop_instance_uid: bytes) -> bytes:
    """A C-STORE-RQ command set; the UIDs are bytes so that hostile values reach the node as they are."""
    return command_set([
        (0x00000002, _uid_value(sop_class_uid)),
        (0x00000100, struct.pack("<H", C_STORE_RQ)),
        (0x00000110, struct.pack("<H", message_id)),
        (0x00000700, struct.pack("<H", 0)),
        (0x00000800, struct.pack("<H", DATASET_PRESENT)),
        (0x00001000, _uid_value(sop_instance_uid)),
    ])


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set: tag -> raw value."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if offset + length > len(data):
            raise WireError(f"command element ({group:04X},{element:04X}) claims {length} bytes, "
                            f"{len(data) - offset} left")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


# -- the connection ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pdu:
    """One PDU read from the peer."""

    type: int
    body: bytes


@dataclass(frozen=True)
class Answer:
    """How the peer answered a request: a DIMSE status, or how it ended without one."""

    status: int | None
    ended: str | None = None  # ABORTED, CLOSED, HANG or REFUSED when there is no status
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"0x{self.status:04X}" if self.status is not None else str(self.ended)


class RawConnection:
    """One TCP connection to a DICOM listener, driven PDU by PDU."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = int(raw.getsockname()[1])
        try:
            self.sock = tls.wrap_socket(raw) if tls is not None else raw
        except BaseException:
            raw.close()
            raise
        self.accepted: dict[int, str] = {}  # context id -> transfer syntax, after associate()
        self.peer_max_pdu = 0
        self._buffer = bytearray()

    # raw bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def half_close(self) -> None:
        """Shut the sending side (FIN) and keep reading: the peer sees end of stream."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fill(self, size: int, deadline: float) -> bool:
        """Read until ``size`` bytes are buffered; False when the peer closed first."""
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"peer sent {len(self._buffer)} of {size} bytes before the deadline")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(max(65536, size - len(self._buffer)))
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return False
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_pdu(self, timeout: float) -> Pdu | None:
        """The next PDU, or None when the peer closed the connection; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        if not self._fill(6, deadline):
            return None
        pdu_type, _, length = struct.unpack_from(">BBI", self._buffer, 0)
        if not self._fill(6 + length, deadline):
            return None
        body = bytes(self._buffer[6 : 6 + length])
        del self._buffer[: 6 + length]
        return Pdu(pdu_type, body)

    def peer_closed_within(self, timeout: float) -> bool:
        """Whether the peer ends the connection (close or A-ABORT) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                received = self.read_pdu(max(0.0, deadline - time.monotonic()))
                if received is None or received.type == ABORT:
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    # association
    def associate(
        self, contexts: Sequence[tuple[int, str, Sequence[str]]], called: str, calling: str = "FUZZER",
        timeout: float = 10.0,
    ) -> bool:
        """Negotiate; True when accepted (``accepted`` then holds the contexts), False when rejected."""
        self.send(associate_rq(called, calling, contexts))
        answer = self.read_pdu(timeout)
        if answer is None:
            raise WireError("the peer closed the connection instead of answering the A-ASSOCIATE-RQ")
        if answer.type == ASSOCIATE_RJ:
            return False
        if answer.type != ASSOCIATE_AC:
            raise WireError(f"the peer answered the A-ASSOCIATE-RQ with PDU type 0x{answer.type:02X}")
        self._read_accept(answer.body)
        return True

    def _read_accept(self, body: bytes) -> None:
        offset = 68  # protocol version, reserved, called, calling, reserved (PS3.8 9.3.3)
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4 : offset + 4 + length]
            if item_type == 0x21 and len(value) >= 8 and value[2] == 0:
                _, _, syntax_length = struct.unpack_from(">BBH", value, 4)
                self.accepted[value[0]] = value[8 : 8 + syntax_length].decode("ascii").rstrip("\0 ")
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub)
                    if sub_type == 0x51 and sub_length == 4:
                        self.peer_max_pdu = struct.unpack_from(">I", value, sub + 4)[0]
                    sub += 4 + sub_length
            offset += 4 + length

    def release(self, timeout: float = 5.0) -> bool:
        """A-RELEASE-RQ; True when the A-RELEASE-RP came back."""
        try:
            self.send(release_rq())
            while True:
                answer = self.read_pdu(timeout)
                if answer is None or answer.type == ABORT:
                    return False
                if answer.type == RELEASE_RP:
                    return True
        except (OSError, TimeoutError):
            return False

    # DIMSE
    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """Send a command set and optional dataset, the dataset in PDVs the peer's maximum PDU allows."""
        self.send(pdata((context_id, COMMAND_LAST, command)))
        if dataset is None:
            return
        chunk = (self.peer_max_pdu or 1_048_576) - 6
        offsets = range(0, max(len(dataset), 1), chunk)
        for start in offsets:
            last = start + chunk >= len(dataset)
            self.send(pdata((context_id, DATASET_LAST if last else DATASET_MORE, dataset[start : start + chunk])))

    def read_status(self, timeout: float) -> Answer:
        """Wait for a response command set; its (0000,0900) Status, or how the association ended."""
        started = time.monotonic()
        command = b""
        try:
            while True:
                received = self.read_pdu(max(0.0, timeout - (time.monotonic() - started)))
                if received is None:
                    return Answer(None, CLOSED, time.monotonic() - started)
                if received.type == ABORT:
                    return Answer(None, ABORTED, time.monotonic() - started)
                if received.type != P_DATA_TF:
                    continue
                offset = 0
                while offset + 6 <= len(received.body):
                    length, _, control = struct.unpack_from(">IBB", received.body, offset)
                    if control & 0x01:
                        command += received.body[offset + 6 : offset + 4 + length]
                        if control & 0x02:
                            status = parse_command(command).get(0x00000900)
                            if status is None or len(status) != 2:
                                raise WireError(f"response command set without a Status: {command.hex()}")
                            return Answer(struct.unpack("<H", status)[0], None, time.monotonic() - started)
                    offset += 4 + length
        except TimeoutError:
            return Answer(None, HANG, time.monotonic() - started)
        except (ConnectionResetError, BrokenPipeError):
            return Answer(None, CLOSED, time.monotonic() - started)

    def c_store(self, context_id: int, sop_class_uid: bytes, sop_instance_uid: bytes, dataset: bytes,
                timeout: float, message_id: int = 1) -> Answer:
        """One C-STORE with ``dataset`` sent byte for byte; the status or how it ended."""
        started = time.monotonic()
        try:
            self.send_message(context_id, c_store_rq(message_id, sop_class_uid, sop_instance_uid), dataset)
        except (ConnectionResetError, BrokenPipeError):
            return Answer(None, CLOSED, time.monotonic() - started)
        except TimeoutError:  # the peer stopped reading the dataset
            return Answer(None, HANG, time.monotonic() - started)
        return self.read_status(timeout)
