"""Seeded raw-PDU fuzz cases: peers that break the DICOM Upper Layer protocol on purpose.

Like the dataset cases, a case is a function of ``(seed, index)``: the kind cycles with
the index, the bytes come from ``random.Random(f"pdu/{seed}/{index}")``. A case says
whether it first negotiates a proper association, what it sends then, and how it ends:

* ``close`` - waits a moment for the node's reaction (A-ABORT, close, a response, or
  nothing) and closes the socket;
* ``half-close`` - shuts its sending side (FIN) and waits for the node to close;
* ``stall`` - keeps the socket open and silent: the node must drop it within its own
  timeouts (a stalled peer must not hold an association slot or the accept loop).

Kinds cover garbage before and after association, PDUs claiming huge lengths, PDVs that
overrun their PDU or name contexts never negotiated, a garbage command set (the PDV
``00 00 00 CA 01 03`` and 200 random bytes), release or abort followed by data, a second
A-ASSOCIATE-RQ, requestor-side PDUs only an acceptor sends, stalls mid-header,
mid-PDU and mid-message, and half-closed connections. ``valid-echo`` is the control: a
proper C-ECHO on the same path must be answered 0x0000 and released.
"""

from __future__ import annotations

import random
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fuzz_dicom import EXPLICIT_VR_LE
from fuzz_wire import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    COMMAND_LAST,
    DATASET_MORE,
    IMPLICIT_VR_LE,
    P_DATA_TF,
    PDU_TYPES,
    VERIFICATION,
    RawConnection,
    WireError,
    abort_pdu,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_set,
    pdata,
    pdu,
    release_rp,
    release_rq,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CONTEXTS = ((1, VERIFICATION, (IMPLICIT_VR_LE, EXPLICIT_VR_LE)), (3, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,)))
#: How long a ``close`` case waits for the node's reaction before it closes its socket.
REACTION_SECONDS = 0.5

CLOSE, HALF_CLOSE, STALL = "close", "half-close", "stall"

#: What a kind's builder returns: detail, payload, associate first?, ending[, bytes sent after the node's next PDU].
Script = tuple[str, bytes, bool, str] | tuple[str, bytes, bool, str, bytes]

# Reactions, as tallied.
ABORTED, CLOSED, SILENT, ANSWERED = "node aborted", "node closed", "node silent", "node answered"


@dataclass(frozen=True)
class PduCase:
    """One misbehaving peer (see the module docstring)."""

    seed: int
    index: int
    kind: str
    detail: str
    associate: bool  # negotiate a proper association first
    payload: bytes  # sent after the association (or as the first bytes when there is none)
    ending: str  # CLOSE, HALF_CLOSE or STALL
    then: bytes = b""  # sent after the node's next PDU (or a moment of its silence), when not empty
    raw_tcp: bool = False  # never speak TLS, even to a TLS listener (a silent TCP peer)

    @property
    def label(self) -> str:
        return f"seed {self.seed} pdu case {self.index} [{self.kind}]: {self.detail}"


@dataclass
class PduPlay:
    """A case being played: its connection (kept for HALF_CLOSE and STALL), what the node did."""

    case: PduCase
    connection: RawConnection | None
    local_port: int | None
    reaction: str = SILENT
    failure: str | None = None
    started: float = field(default_factory=time.monotonic)


def _rng_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _garbage_before(rng: random.Random) -> Script:
    body = _rng_bytes(rng, rng.randint(1, 4096))
    if rng.random() < 0.5:  # make it start like a PDU, to get past the first byte
        body = bytes([rng.choice(PDU_TYPES)]) + body[1:]
    ending = rng.choice((CLOSE, HALF_CLOSE))
    return f"{len(body)} random bytes starting {body[:6].hex()}, then {ending}", body, False, ending


def _garbage_pdu(rng: random.Random) -> Script:
    pdu_type = rng.randrange(256)
    declared = rng.randint(0, 8192)
    body = _rng_bytes(rng, rng.choice((declared, rng.randint(0, 8192))))
    return (f"PDU type 0x{pdu_type:02X} declaring {declared} bytes with {len(body)}",
            struct.pack(">BBI", pdu_type, 0, declared) + body, True, CLOSE)


def _huge_length(rng: random.Random, ending: str) -> Script:
    pdu_type = rng.choice((P_DATA_TF, 0x01, ABORT, 0x42))
    declared = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, rng.randint(1 << 24, 0xFFFFFFFF)))
    tail = _rng_bytes(rng, rng.randint(0, 64))
    return (f"PDU type 0x{pdu_type:02X} claiming {declared} bytes, {len(tail)} sent",
            struct.pack(">BBI", pdu_type, 0, declared) + tail, True, ending)


def _garbage_command(rng: random.Random) -> Script:
    garbage = _rng_bytes(rng, 200)
    return ("P-DATA PDV 00 00 00 CA 01 03 + 200 random bytes as a command set",
            pdu(P_DATA_TF, bytes.fromhex("000000CA0103") + garbage), True, CLOSE)


def _garbage_dataset(rng: random.Random) -> Script:
    uid = f"2.25.{rng.getrandbits(100)}".encode()
    garbage = _rng_bytes(rng, rng.randint(1, 3000))
    return (f"C-STORE with {len(garbage)} random bytes as its dataset",
            pdata((3, COMMAND_LAST, c_store_rq(1, CT_IMAGE_STORAGE.encode(), uid))) + pdata((3, 0x02, garbage)),
            True, CLOSE)


def _unknown_command(rng: random.Random) -> Script:
    field_value = rng.choice((0x0000, 0x0FFF, 0x8FFF, 0x0002, 0x0FFE, rng.randrange(0x10000)))
    command = command_set([(0x00000002, VERIFICATION.encode()), (0x00000100, struct.pack("<H", field_value)),
                           (0x00000110, struct.pack("<H", 1)), (0x00000800, struct.pack("<H", 0x0101))])
    return f"command field 0x{field_value:04X}", pdata((1, COMMAND_LAST, command)), True, CLOSE


def _bad_context(rng: random.Random) -> Script:
    context = rng.choice((0, 2, 5, 127, 255))
    return f"C-ECHO on presentation context {context} (not negotiated)", pdata((context, COMMAND_LAST, c_echo_rq(1))), True, CLOSE


def _pdv_overrun(rng: random.Random) -> Script:
    command = c_echo_rq(1)
    claimed = rng.choice((len(command) + 3, 5000, 0xFFFFFFFF, 0, 1))
    return (f"PDV claiming {claimed} bytes inside a PDU of {len(command) + 6}",
            pdu(P_DATA_TF, struct.pack(">IBB", claimed, 1, COMMAND_LAST) + command), True, CLOSE)


def _release_then_data(rng: random.Random) -> Script:
    return "A-RELEASE-RQ and a C-ECHO-RQ together", release_rq() + pdata((1, COMMAND_LAST, c_echo_rq(2))), True, CLOSE


def _data_after_release_rp(rng: random.Random) -> Script:
    return ("A-RELEASE-RQ, then, after the node's A-RELEASE-RP, a C-ECHO-RQ", release_rq(),
            True, CLOSE, pdata((1, COMMAND_LAST, c_echo_rq(2))))


def _abort_then_data(rng: random.Random) -> Script:
    return "A-ABORT, then a C-ECHO-RQ", abort_pdu() + pdata((1, COMMAND_LAST, c_echo_rq(2))), True, CLOSE


def _second_associate(rng: random.Random) -> Script:
    return "a second A-ASSOCIATE-RQ on an established association", associate_rq("DICOM_NODE", "FUZZER", CONTEXTS), True, CLOSE


def _acceptor_pdu(rng: random.Random) -> Script:
    choice = rng.choice(("A-RELEASE-RP", "A-ASSOCIATE-AC", "A-ASSOCIATE-RJ"))
    payload = {"A-RELEASE-RP": release_rp(), "A-ASSOCIATE-AC": pdu(ASSOCIATE_AC, _rng_bytes(rng, 68)),
               "A-ASSOCIATE-RJ": pdu(ASSOCIATE_RJ, b"\0\x01\x01\x01")}[choice]
    return f"unsolicited {choice} from the requestor", payload, True, CLOSE


def _partial_pdu_stall(rng: random.Random) -> Script:
    sent = rng.choice((10, rng.randint(0, 999)))
    return (f"P-DATA header announcing 1000 bytes, {sent} sent, then silence",
            struct.pack(">BBI", P_DATA_TF, 0, 1000) + _rng_bytes(rng, sent), True, STALL)


def _partial_header_stall(rng: random.Random) -> Script:
    header = struct.pack(">BBI", P_DATA_TF, 0, 200)[: rng.randint(1, 5)]
    return f"{len(header)} bytes of a PDU header, then silence", header, True, STALL


def _store_without_dataset_stall(rng: random.Random) -> Script:
    uid = f"2.25.{rng.getrandbits(100)}".encode()
    return ("C-STORE command announcing a dataset that never comes",
            pdata((3, COMMAND_LAST, c_store_rq(1, CT_IMAGE_STORAGE.encode(), uid))), True, STALL)


def _partial_associate_stall(rng: random.Random) -> Script:
    request = associate_rq("DICOM_NODE", "FUZZER", CONTEXTS)
    cut = rng.randint(1, len(request) - 1)
    return f"first {cut} of {len(request)} bytes of an A-ASSOCIATE-RQ, then silence", request[:cut], False, STALL


def _silent(rng: random.Random) -> Script:
    return "connects and sends nothing", b"", False, STALL


def _half_close(rng: random.Random) -> Script:
    return "associates, then shuts its sending side", b"", True, HALF_CLOSE


def _half_close_mid_store(rng: random.Random) -> Script:
    uid = f"2.25.{rng.getrandbits(100)}".encode()
    fragment = _rng_bytes(rng, rng.randint(1, 2000))
    return (f"C-STORE with {len(fragment)} bytes of a dataset not marked last, then shuts its sending side",
            pdata((3, COMMAND_LAST, c_store_rq(1, CT_IMAGE_STORAGE.encode(), uid))) + pdata((3, DATASET_MORE, fragment)),
            True, HALF_CLOSE)


def _garbage_after_echo(rng: random.Random) -> Script:
    body = _rng_bytes(rng, rng.randint(1, 512))
    return f"a valid C-ECHO, then {len(body)} random bytes", body, True, CLOSE


def _valid_echo(rng: random.Random) -> Script:
    return "control: a proper C-ECHO and release", b"", True, CLOSE


KINDS: dict[str, Callable[[random.Random], Script]] = {
    "garbage-before-association": _garbage_before,
    "pdata-before-association": lambda rng: ("a C-ECHO-RQ P-DATA as the first PDU",
                                             pdata((1, COMMAND_LAST, c_echo_rq(1))), False, CLOSE),
    "release-before-association": lambda rng: ("an A-RELEASE-RQ as the first PDU", release_rq(), False, CLOSE),
    "garbage-pdu": _garbage_pdu,
    "huge-length": lambda rng: _huge_length(rng, CLOSE),
    "huge-length-stall": lambda rng: _huge_length(rng, STALL),
    "garbage-command": _garbage_command,
    "garbage-dataset": _garbage_dataset,
    "unknown-command": _unknown_command,
    "bad-context-id": _bad_context,
    "pdv-overrun": _pdv_overrun,
    "release-then-data": _release_then_data,
    "data-after-release-rp": _data_after_release_rp,
    "abort-then-data": _abort_then_data,
    "second-associate": _second_associate,
    "acceptor-pdu": _acceptor_pdu,
    "partial-pdu-stall": _partial_pdu_stall,
    "partial-header-stall": _partial_header_stall,
    "store-without-dataset-stall": _store_without_dataset_stall,
    "partial-associate-stall": _partial_associate_stall,
    "silent-stall": _silent,
    "half-close": _half_close,
    "half-close-mid-store": _half_close_mid_store,
    "garbage-after-echo": _garbage_after_echo,
    "valid-echo": _valid_echo,
}
KIND_NAMES = tuple(KINDS)


def make_pdu_case(seed: int, index: int) -> PduCase:
    """Case ``index`` of raw-PDU campaign ``seed`` (see the module docstring)."""
    rng = random.Random(f"pdu/{seed}/{index}")
    kind = KIND_NAMES[index % len(KIND_NAMES)]
    detail, payload, associate, ending, *then = KINDS[kind](rng)
    return PduCase(seed, index, kind, detail, associate, payload, ending, then=then[0] if then else b"",
                   raw_tcp=kind == "silent-stall")


def _echo_failure(connection: RawConnection, timeout: float) -> str | None:
    connection.send(pdata((1, COMMAND_LAST, c_echo_rq(7))))
    answer = connection.read_status(timeout)
    return None if answer.status == 0x0000 else f"a valid C-ECHO on the association got {answer.label}"


def play(case: PduCase, host: str, port: int, called_ae: str, tls: ssl.SSLContext | None,
         answer_timeout: float = 10.0) -> PduPlay:
    """Play ``case`` against ``host``:``port``; the connection stays open for HALF_CLOSE and STALL."""
    try:
        connection = RawConnection(host, port, tls=None if case.raw_tcp else tls)
    except (OSError, ssl.SSLError) as exc:
        return PduPlay(case, None, None, CLOSED, f"cannot connect: {type(exc).__name__}: {exc}")
    state = PduPlay(case, connection, connection.local_port)
    try:
        if case.associate:
            if not connection.associate(CONTEXTS, called_ae, timeout=answer_timeout):
                state.failure = "association refused (A-ASSOCIATE-RJ)"
                return _finish(state)
            if case.kind in ("valid-echo", "garbage-after-echo"):
                state.failure = _echo_failure(connection, answer_timeout)
                if case.kind == "valid-echo" and state.failure is None and not connection.release(answer_timeout):
                    state.failure = "A-RELEASE-RQ after a valid C-ECHO not answered with A-RELEASE-RP"
        if case.payload:
            connection.send(case.payload)
        if case.then:
            state.reaction = _reaction(connection, REACTION_SECONDS)
            connection.send(case.then)
    except (OSError, WireError, TimeoutError) as exc:
        state.reaction = CLOSED
        if case.associate and state.failure is None and isinstance(exc, (WireError, TimeoutError)):
            state.failure = f"association not negotiated: {type(exc).__name__}: {exc}"
        return _finish(state)
    if case.ending == HALF_CLOSE:
        connection.half_close()
    if case.ending == CLOSE:
        state.reaction = _reaction(connection, REACTION_SECONDS)
        return _finish(state)
    return state


def _reaction(connection: RawConnection, timeout: float) -> str:
    try:
        received = connection.read_pdu(timeout)
    except TimeoutError:
        return SILENT
    except OSError:
        return CLOSED
    if received is None:
        return CLOSED
    if received.type == ABORT:
        return ABORTED
    return f"{ANSWERED} PDU 0x{received.type:02X}"


def _finish(state: PduPlay) -> PduPlay:
    if state.connection is not None:
        state.connection.close()
        state.connection = None
    return state
