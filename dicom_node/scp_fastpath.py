"""Acceptor-side acceleration layer for pynetdicom's C-STORE SCP.

Why this exists
---------------
Our C-STORE SCP must use pynetdicom, and stock pynetdicom 3.0.4 receives
roughly 200 uncompressed 512x512 CT instances per second on a 2-core machine,
far below DCMTK ``storescp``.  Profiling (py-spy ``--gil``) showed that the
time is not spent moving bytes but in per-message and per-PDU Python
overhead:

* every C-STORE-RSP command set is built and encoded *twice* through pydicom
  ``Dataset`` objects (``DIMSEMessage.__init__``, ``primitive_to_message``,
  ``_set_command_group_length``, ``dsutils.encode``);
* every C-STORE-RQ command set is decoded through pydicom and converted to a
  primitive attribute by attribute;
* every P-DATA-TF PDU is read from the socket in 4 KiB ``recv`` calls,
  decoded through the generic PDU item machinery and routed through the
  event queue / state machine;
* both reactors poll: ``Association._run_reactor`` sleeps a hard-coded 1 ms
  per loop and the DUL reactor sleeps ``_run_loop_delay`` (1 ms) whenever it
  is idle, which adds up to ~2 ms of latency to every request/response round
  trip (storescu waits for each response before sending the next request);
* the "standard" logging event handlers are bound to every association and
  format (and copy) every message even when nothing is logged;
* ``RequestHandler._create_association`` deep-copies every supported
  presentation context (150 storage SOP classes x ~12 transfer syntaxes), with
  UID re-validation, for every association: about a second per association.

What it does
------------
Only narrowly scoped, per-association substitutions are made; pynetdicom
still performs association negotiation, runs its state machine, dispatches
DIMSE services, calls our ``EVT_C_STORE`` handler, handles C-ECHO and all
other services, A-RELEASE, A-ABORT and timeouts.  Every fast path checks its
preconditions and otherwise defers to the original pynetdicom code:

``cheap_copy_contexts``
    returns presentation contexts whose ``__deepcopy__`` copies the
    attribute dict (UIDs are immutable ``str`` subclasses and are shared)
    instead of re-running the validating property setters.

``accelerate`` (call from an ``EVT_CONN_OPEN`` handler, see :func:`install`)
    swaps the classes of the association's three objects for subclasses:

    * ``_FastDUL`` - event-driven DUL reactor: blocks in ``select()`` on the
      peer socket and on a wake-up socketpair that is written by
      ``send_pdu``/``kill_dul`` instead of sleeping 1 ms; reads each PDU with
      a few large ``recv_into`` calls, never allocating more than the
      advertised maximum PDU length; decodes P-DATA-TF PDUs with a small
      struct parser and, in state Sta6 with an empty event queue, hands them
      straight to DIMSE (exactly what the state machine's DT-2 action does);
      when the connection ends before an A-ASSOCIATE-RQ it wakes the acceptor
      thread, which pynetdicom would leave waiting for the whole ACSE timeout;
    * ``_FastDIMSE`` - reassembles every command set (bounded) and decodes it
      with a small Implicit VR Little Endian parser; the data set of a C-STORE
      goes fragment by fragment to a *sink* (the node streams it to disk, see
      :func:`accelerate`), never through pynetdicom's in-memory reassembly;
      other messages go to pynetdicom's decoder with a bounded data set; bytes
      that are not a command set where one is due abort the association
      (pynetdicom's decoder raised instead, which ended the DUL thread without
      closing the connection); C-STORE-RSP command sets are encoded from a
      byte template;
    * ``_FastAssociation`` - the acceptor reactor waits on a
      ``threading.Event`` set by the DUL after every state-machine action,
      instead of sleeping 1 ms per loop; the rest of the loop (release, abort,
      DUL liveness, network timeout, pause checkpoint) is unchanged.  The
      C-STORE service is run by a copy of ``StorageServiceClass.SCP`` that
      copies the already validated UIDs into the response instead of
      re-validating them.

Fast paths are only used when no user handler is bound to the low-level
events they skip (``EVT_DATA_RECV``, ``EVT_PDU_RECV``, ``EVT_DIMSE_RECV``,
``EVT_DIMSE_SENT``, ``EVT_FSM_TRANSITION``).  pynetdicom's *standard*
logging handlers for the PDU/DIMSE events are unbound when the
``pynetdicom`` logger is not enabled for INFO at connection time (they only
emit INFO/DEBUG records, so no output is lost); pass
``drop_standard_log_handlers=False`` to keep them (the fast paths are then
bypassed for the affected events).

The module is pinned to the pynetdicom version(s) in
:data:`SUPPORTED_PYNETDICOM_VERSIONS`; on any other version
:func:`accelerate` logs a warning once and does nothing.

Usage
-----
.. code-block:: python

    from pynetdicom import AE, evt
    from dicom_node import scp_fastpath

    handlers = [(evt.EVT_C_STORE, handle_store),
                (evt.EVT_CONN_OPEN, scp_fastpath.on_conn_open)]
    server = ae.start_server(("0.0.0.0", 11112), block=False,
                             evt_handlers=handlers)
    server.contexts = scp_fastpath.cheap_copy_contexts(server.contexts)

or simply ``scp_fastpath.install(server)`` after ``start_server`` (does both).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
from io import BytesIO
from collections.abc import Callable
from typing import Any, Protocol, cast

import pynetdicom
from pynetdicom import _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass, attempt
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.utils import make_target

__all__ = [
    "SUPPORTED_PYNETDICOM_VERSIONS",
    "FastCopyPresentationContext",
    "cheap_copy_contexts",
    "accelerate",
    "on_conn_open",
    "install",
    "is_supported",
]

LOGGER = logging.getLogger(__name__)

#: pynetdicom versions whose internals this module has been written against.
SUPPORTED_PYNETDICOM_VERSIONS: tuple[str, ...] = ("3.0.4",)

#: Upper bound (seconds) on how long either reactor blocks before re-checking
#: its timers (ARTIM, network idle timeout) and kill flags.  Wake-ups for
#: socket data, locally queued primitives and DUL events are immediate; this
#: only bounds the latency of timer expiry, so it can be generous.
MAX_IDLE_WAIT = 0.05

#: Largest single ``recv_into`` request when reading a PDU body.
_RECV_CHUNK = 4 * 1024 * 1024

_warned_version = False


def is_supported() -> bool:
    """Return ``True`` if the installed pynetdicom version is supported."""
    return pynetdicom.__version__ in SUPPORTED_PYNETDICOM_VERSIONS


def _version_ok() -> bool:
    global _warned_version
    if is_supported():
        return True
    if not _warned_version:
        _warned_version = True
        LOGGER.warning(
            "dicom_node.scp_fastpath: pynetdicom %s is not one of the supported "
            "versions %s; SCP acceleration disabled (stock pynetdicom behaviour)",
            pynetdicom.__version__,
            ", ".join(SUPPORTED_PYNETDICOM_VERSIONS),
        )
    return False


# ---------------------------------------------------------------------------
# Presentation contexts
# ---------------------------------------------------------------------------
class FastCopyPresentationContext(PresentationContext):
    """A :class:`PresentationContext` whose deep copy is a cheap dict copy.

    ``RequestHandler._create_association`` deep-copies the server's supported
    contexts for every association.  The generic deep copy walks every
    attribute and every ``UID`` of every context (150 SOP classes x ~12
    transfer syntaxes), which dominated association setup (measured: ~100 ms
    -> ~35 ms per echoscu association).  UIDs are immutable, so sharing them
    is safe; only the mutable containers (the transfer syntax list) need
    copying.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> "FastCopyPresentationContext":
        new = object.__new__(type(self))
        d = self.__dict__.copy()
        for key, value in d.items():
            if isinstance(value, list):
                d[key] = list(value)
            elif isinstance(value, dict):
                d[key] = dict(value)
        new.__dict__.update(d)
        memo[id(self)] = new
        return new

    def __copy__(self) -> "FastCopyPresentationContext":
        return self.__deepcopy__({})


def cheap_copy_contexts(
    contexts: list[PresentationContext],
) -> list[PresentationContext]:
    """Return copies of `contexts` that are cheap to ``deepcopy``.

    Assign the result to ``server.contexts`` (the
    :class:`~pynetdicom.transport.AssociationServer` returned by
    ``ae.start_server(..., block=False)``) so that per-association setup no
    longer deep-copies ~1800 transfer syntax UIDs with validation.  The
    returned objects are :class:`FastCopyPresentationContext` instances with
    the same attribute values (context ID, abstract syntax, transfer
    syntaxes, SCU/SCP roles); the input list is not modified.  Works (and is
    harmless) on any pynetdicom version because it only relies on the
    instance ``__dict__``.
    """
    out: list[PresentationContext] = []
    for cx in contexts:
        new = object.__new__(FastCopyPresentationContext)
        d = cx.__dict__.copy()
        for key, value in d.items():
            if isinstance(value, list):
                d[key] = list(value)
        new.__dict__.update(d)
        out.append(new)
    return out


# ---------------------------------------------------------------------------
# Command set encoding / decoding helpers (Implicit VR Little Endian)
# ---------------------------------------------------------------------------
_pack_I = struct.Struct("<I").pack
_pack_H = struct.Struct("<H").pack
_unpack_from_HHI = struct.Struct("<HHI").unpack_from
_unpack_from_H = struct.Struct("<H").unpack_from
_unpack_from_I_be = struct.Struct(">I").unpack_from

# (0000,0002) Affected SOP Class UID, UI
_T_AFFECTED_CLASS = b"\x00\x00\x02\x00"
# (0000,0100) Command Field = 0x8001 (C-STORE-RSP), US
_E_CMD_FIELD_STORE_RSP = b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x80"
# (0000,0120) Message ID Being Responded To, US (value appended)
_T_MSG_ID_RSP = b"\x00\x00\x20\x01\x02\x00\x00\x00"
# (0000,0800) Command Data Set Type = 0x0101 (no data set), US
_E_NO_DATASET = b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01"
# (0000,0900) Status, US (value appended)
_T_STATUS = b"\x00\x00\x00\x09\x02\x00\x00\x00"
# (0000,1000) Affected SOP Instance UID, UI
_T_AFFECTED_INSTANCE = b"\x00\x00\x00\x10"
# (0000,0000) Command Group Length, UL, length 4 (value appended)
_T_GROUP_LENGTH = b"\x00\x00\x00\x00\x04\x00\x00\x00"


def _ui_bytes(uid: str) -> bytes:
    """Encode a UID value as pydicom does: ASCII, padded to even length with NUL."""
    b = uid.encode("ascii")
    if len(b) & 1:
        b += b"\x00"
    return b


def encode_c_store_rsp(
    affected_sop_class_uid: str,
    message_id_being_responded_to: int,
    status: int,
    affected_sop_instance_uid: str,
) -> bytes:
    """Return the encoded C-STORE-RSP command set (no Error Comment/Offending Element).

    Byte-identical to what pynetdicom produces through pydicom for the same
    primitive: elements in tag order, Implicit VR Little Endian, UIDs padded
    to even length with ``\\0``, Command Data Set Type 0x0101.
    Raises :class:`struct.error` for out-of-range US values.
    """
    cls_b = _ui_bytes(affected_sop_class_uid)
    inst_b = _ui_bytes(affected_sop_instance_uid)
    body = b"".join(
        (
            _T_AFFECTED_CLASS,
            _pack_I(len(cls_b)),
            cls_b,
            _E_CMD_FIELD_STORE_RSP,
            _T_MSG_ID_RSP,
            _pack_H(message_id_being_responded_to),
            _E_NO_DATASET,
            _T_STATUS,
            _pack_H(status),
            _T_AFFECTED_INSTANCE,
            _pack_I(len(inst_b)),
            inst_b,
        )
    )
    return _T_GROUP_LENGTH + _pack_I(len(body)) + body


# Element numbers (group 0x0000) the command parser decodes; others are kept as raw bytes.
_RQ_GROUP_LENGTH = 0x0000
_RQ_AFFECTED_CLASS = 0x0002
_RQ_COMMAND_FIELD = 0x0100
_RQ_MESSAGE_ID = 0x0110
_RQ_PRIORITY = 0x0700
_RQ_DATASET_TYPE = 0x0800
_RQ_AFFECTED_INSTANCE = 0x1000
_RQ_MOVE_ORIGINATOR_AE = 0x1030
_RQ_MOVE_ORIGINATOR_ID = 0x1031
_US_ELEMENTS = frozenset((_RQ_COMMAND_FIELD, _RQ_MESSAGE_ID, _RQ_PRIORITY, _RQ_DATASET_TYPE, _RQ_MOVE_ORIGINATOR_ID))
_TEXT_ELEMENTS = frozenset((_RQ_AFFECTED_CLASS, _RQ_AFFECTED_INSTANCE, _RQ_MOVE_ORIGINATOR_AE))
_C_STORE_RQ = 0x0001
#: A command set is a few hundred bytes; one longer than this is not a command set.
MAX_COMMAND_SET = 64 * 1024
#: Data set bytes accepted for a DIMSE message this SCP does not serve (not C-STORE).
MAX_OTHER_MESSAGE = 1024 * 1024


def _parse_command(cmd: bytes | memoryview) -> dict[int, Any] | None:
    """Parse a command set (group 0000, Implicit VR Little Endian), or None if it is not one.

    US elements become ints and UI/AE elements text (trailing NUL and space padding
    removed, as pydicom does); anything else is kept as raw bytes. A command set whose
    elements do not add up to its length, that leaves group 0000, or that has no
    Command Field, Message ID or Command Data Set Type is not a command set.
    """
    n = len(cmd)
    off = 0
    out: dict[int, Any] = {}
    try:
        while off < n:
            group, elem, length = _unpack_from_HHI(cmd, off)
            off += 8
            if group != 0 or length > n - off:
                return None
            if elem in _US_ELEMENTS:
                if length != 2:
                    return None
                out[elem] = _unpack_from_H(cmd, off)[0]
            elif elem in _TEXT_ELEMENTS:
                # latin-1 never fails: an invalid UID is the handler's to refuse, with a status
                out[elem] = bytes(cmd[off : off + length]).rstrip(b"\x00 ").decode("latin-1")
            elif elem == _RQ_GROUP_LENGTH:
                if length != 4:
                    return None
            else:
                out[elem] = bytes(cmd[off : off + length])
            off += length
    except struct.error:
        return None
    if _RQ_COMMAND_FIELD not in out or _RQ_MESSAGE_ID not in out or _RQ_DATASET_TYPE not in out:
        return None
    return out


class DatasetSink(Protocol):
    """Where the fragments of one C-STORE data set go as they arrive (see :func:`accelerate`)."""

    def write(self, fragment: memoryview) -> None:
        """Take one fragment; the view is only valid during the call."""


#: Opens the sink of a C-STORE whose command set has just arrived:
#: ``(association, context_id, affected SOP class UID, affected SOP instance UID)``.
OpenDataset = Callable[[Association, int, str, str], DatasetSink]


class _MemorySink:
    """The default sink: fragments kept as zero-copy views and joined once at the end."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []

    def write(self, fragment: memoryview) -> None:
        self.chunks.append(fragment)

    def value(self) -> bytes:
        chunks, self.chunks = self.chunks, []
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)


class _FastStoreRQ:
    """In-progress C-STORE-RQ being reassembled by :class:`_FastDIMSE`.

    Data set fragments go to ``sink``: the one :func:`accelerate` was given (the data
    set streams to it as it arrives), or a :class:`_MemorySink` whose joined bytes back
    the request's ``DataSet`` ``BytesIO`` without a further copy (CPython shares the
    initial ``bytes`` of a ``BytesIO``).
    """

    __slots__ = ("context_id", "fields", "sink")

    def __init__(self, context_id: int, fields: dict[int, Any], sink: DatasetSink) -> None:
        self.context_id = context_id
        self.fields = fields
        self.sink = sink

    def to_primitive(self) -> C_STORE:
        """Build the C-STORE request primitive.

        pynetdicom's setters validate the UIDs; one they refuse (longer than 64
        characters) is left unset, and the EVT_C_STORE handler answers the request
        with a failure status instead of the association being aborted.
        """
        f = self.fields
        p = C_STORE()
        p.MessageID = f[_RQ_MESSAGE_ID]
        for element, keyword in ((_RQ_AFFECTED_CLASS, "AffectedSOPClassUID"),
                                 (_RQ_AFFECTED_INSTANCE, "AffectedSOPInstanceUID")):
            if f.get(element):
                try:
                    setattr(p, keyword, f[element])
                except ValueError:
                    LOGGER.warning("C-STORE-RQ with an invalid %s", keyword)
        if _RQ_PRIORITY in f:
            try:
                p.Priority = f[_RQ_PRIORITY]
            except ValueError:
                LOGGER.warning("C-STORE-RQ with an invalid priority %r", f[_RQ_PRIORITY])
        sink = self.sink
        p.DataSet = BytesIO(sink.value() if isinstance(sink, _MemorySink) else b"")
        p._context_id = self.context_id
        p._dataset_path = None
        p._dataset_file = None
        return p


# ---------------------------------------------------------------------------
# DIMSE
# ---------------------------------------------------------------------------
def _as_bytes_pdvs(pdvs: list[Any]) -> list[Any]:
    return [[cx, data if type(data) is bytes else bytes(data)] for cx, data in pdvs]


class _FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider: C-STORE data sets stream to a sink, template C-STORE-RSP encoding.

    Every command set is reassembled here (up to :data:`MAX_COMMAND_SET` bytes);
    C-STORE requests never go through pynetdicom's in-memory reassembly. Other
    messages go to pynetdicom's decoder, with at most :data:`MAX_OTHER_MESSAGE`
    bytes of data set. Anything that is not a command set where one is due, and any
    decoding error, is a protocol error: the association is aborted (A-ABORT).
    """

    _fp_wake: threading.Event
    _fp_open_dataset: OpenDataset | None
    _fp_command: bytearray
    _fp_other_bytes: int

    def receive_primitive(self, primitive: P_DATA) -> None:  # noqa: D102
        self._fp_receive_pdvs(primitive.presentation_data_value_list)

    def _fp_protocol_error(self, reason: str) -> None:
        """Abort the association: the peer broke the DIMSE protocol."""
        LOGGER.error("%s; aborting the association", reason)
        self.message = None
        self._fp_command = bytearray()
        self.dul.event_queue.put("Evt19")

    def _fp_slow(self, pdvs: list[Any]) -> None:
        """Hand `pdvs` to pynetdicom's own DIMSE decoder (messages other than C-STORE)."""
        self._fp_other_bytes += sum(len(data) for _, data in pdvs)
        if self._fp_other_bytes > MAX_OTHER_MESSAGE:
            return self._fp_protocol_error(f"DIMSE message of more than {MAX_OTHER_MESSAGE} bytes for a service "
                                           "this SCP does not provide")
        p = P_DATA()
        p._presentation_data_value_list = _as_bytes_pdvs(pdvs)
        try:
            DIMSEServiceProvider.receive_primitive(self, p)
        except Exception as exc:
            return self._fp_protocol_error(f"invalid DIMSE message ({type(exc).__name__}: {exc})")
        if self.message is None:
            self._fp_other_bytes = 0
            self._fp_wake.set()
        return None

    def _fp_receive_pdvs(self, pdvs: list[Any]) -> None:
        """Process PDV items ``[context ID, data]`` (``data`` may be a memoryview)."""
        msg = self.message
        if msg is not None and type(msg) is not _FastStoreRQ:
            return self._fp_slow(pdvs)  # a message pynetdicom is decoding
        if _config.STORE_RECV_CHUNKED_DATASET or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return self._fp_slow(pdvs)
        for index, (context_id, data) in enumerate(pdvs):
            if not len(data):
                return self._fp_protocol_error("empty presentation data value")
            header = data[0]
            if header & 0x01:
                if msg is not None:
                    # A command fragment while a data set is outstanding is a protocol violation
                    return self._fp_protocol_error("command fragment inside a C-STORE data set")
                self._fp_command += memoryview(data)[1:]
                if len(self._fp_command) > MAX_COMMAND_SET:
                    return self._fp_protocol_error(f"command set longer than {MAX_COMMAND_SET} bytes")
                if not header & 0x02:
                    continue
                command, self._fp_command = bytes(self._fp_command), bytearray()
                fields = _parse_command(command)
                if fields is None:
                    return self._fp_protocol_error("the peer sent bytes that are not a DIMSE command set")
                if fields[_RQ_COMMAND_FIELD] != _C_STORE_RQ:
                    return self._fp_slow([[context_id, b"\x03" + command], *pdvs[index + 1 :]])
                msg = self.message = _FastStoreRQ(context_id, fields, self._fp_sink(context_id, fields))  # type: ignore[assignment]
                if fields[_RQ_DATASET_TYPE] == 0x0101:
                    msg = self._fp_complete(msg)
                continue
            if msg is None:
                return self._fp_protocol_error("data set fragment without a command set")
            msg = cast(_FastStoreRQ, msg)
            if context_id != msg.context_id:
                return self._fp_protocol_error(f"data set fragment on presentation context {context_id} for a "
                                               f"C-STORE on context {msg.context_id}")
            msg.sink.write(memoryview(data)[1:])
            if header & 0x02:
                msg = self._fp_complete(msg)
        return None

    def _fp_sink(self, context_id: int, fields: dict[int, Any]) -> DatasetSink:
        opener = self._fp_open_dataset
        if opener is None:
            return _MemorySink()
        return opener(self.assoc, context_id, fields.get(_RQ_AFFECTED_CLASS, ""),
                      fields.get(_RQ_AFFECTED_INSTANCE, ""))

    def _fp_complete(self, msg: _FastStoreRQ) -> None:
        self.message = None
        try:
            primitive = msg.to_primitive()
        except Exception as exc:
            return self._fp_protocol_error(f"invalid C-STORE request ({type(exc).__name__}: {exc})")
        if not isinstance(msg.sink, _MemorySink):
            primitive._fp_sink = msg.sink  # type: ignore[attr-defined]  # read by _fast_store_scp
        self.msg_queue.put((msg.context_id, primitive))
        self._fp_wake.set()
        return None

    def send_msg(self, primitive: Any, context_id: int) -> None:  # noqa: D102
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPClassUID is not None
            and primitive.AffectedSOPInstanceUID is not None
            and primitive.Status is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            try:
                cmd = encode_c_store_rsp(
                    primitive.AffectedSOPClassUID,
                    primitive.MessageIDBeingRespondedTo,
                    primitive.Status,
                    primitive.AffectedSOPInstanceUID,
                )
            except (struct.error, UnicodeEncodeError):
                cmd = None
            max_pdu = self.maximum_pdu_size
            if cmd is not None and (not max_pdu or len(cmd) + 6 <= max_pdu):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + cmd))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


# ---------------------------------------------------------------------------
# DUL
# ---------------------------------------------------------------------------
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
            except OSError:  # buffer full (already signalled) or closed
                pass

    def _fp_close(self) -> None:
        with self._fp_lock:
            if self._fp_closed:
                return
            self._fp_closed = True
            for s in (self._fp_rsock, self._fp_wsock):
                try:
                    s.close()
                except OSError:
                    pass

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
        except (OSError, ValueError):
            return
        if self._fp_rsock in ready:
            try:
                while self._fp_rsock.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

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

    def _read_pdu_data(self) -> None:  # noqa: D102
        asock = self.socket
        raw = getattr(asock, "socket", None)
        if raw is None:
            return super()._read_pdu_data()

        header = bytearray(6)
        try:
            got = self._fp_recv_exact(raw, header)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
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
        try:
            got = self._fp_recv_exact(raw, body)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
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


# ---------------------------------------------------------------------------
# Association
# ---------------------------------------------------------------------------
class _FastAssociation(Association):
    """Acceptor whose reactor waits on a wake-up event instead of sleeping 1 ms."""

    _fp_wake: threading.Event

    def _run_reactor(self) -> None:
        """Same checks as pynetdicom's acceptor loop, event-driven."""
        self._is_paused = False
        wake = self._fp_wake
        dimse = self.dimse
        while not self._kill:
            wake.wait(MAX_IDLE_WAIT)
            wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                # There may be more queued messages: loop without waiting
                wake.set()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return

    def kill(self) -> None:  # noqa: D102
        super().kill()
        self._fp_wake.set()

    def _serve_request(self, msg: Any, context_id: int) -> None:  # noqa: D102
        # Fast path only for plain C-STORE requests served by the stock
        # StorageServiceClass; everything else goes through pynetdicom.
        # A request whose data set streamed to a sink is always answered by the
        # EVT_C_STORE handler, even with missing or invalid UIDs (pynetdicom would
        # ignore such a request and leave the peer waiting for its response).
        streamed = getattr(msg, "_fp_sink", None) is not None
        if (
            type(msg) is C_STORE
            and not self._sent_release
            and not _config.UNRESTRICTED_STORAGE_SERVICE
            and (msg.is_valid_request or (streamed and msg.MessageID is not None))
            and context_id in self._accepted_cx
        ):
            class_uid = cast(str, msg.AffectedSOPClassUID or "")
            try:
                class_uid = self.acceptor.accepted_common_extended[class_uid][0]
            except KeyError:
                pass
            if streamed or uid_to_service_class(class_uid) is StorageServiceClass:
                context = self._accepted_cx[context_id]
                service = StorageServiceClass(self)
                try:
                    self.dimse.cancel_req = {}
                    self._is_paused = True
                    _fast_store_scp(service, msg, context)
                    self._is_paused = False
                    self.dimse.cancel_req = {}
                except Exception as exc:  # same handling as pynetdicom
                    LOGGER.exception(exc)
                    self.abort()
                return
        super()._serve_request(msg, context_id)


def _fast_store_scp(
    service: StorageServiceClass, req: C_STORE, context: PresentationContext
) -> None:
    """``StorageServiceClass.SCP`` without re-validating UIDs for the response.

    Identical control flow to pynetdicom 3.0.4: the ``EVT_C_STORE`` handler is
    triggered inside pynetdicom's ``attempt`` context manager (so a raising
    handler produces status 0xC211), the returned status is validated with
    ``validate_status`` (int, Dataset with optional Error Comment/Offending
    Element, invalid return values -> 0xC001/0xC002) and the response is sent
    unless the handler released or aborted the association.
    """
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    # Already validated by the request primitive's setters
    rsp._affected_sop_instance_uid = req._affected_sop_instance_uid
    rsp._affected_sop_class_uid = req._affected_sop_class_uid

    cx_id = cast(int, context.context_id)
    with attempt(rsp, service.dimse, cx_id, service.assoc) as ctx:
        ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_STORE'"
        ctx.error_status = 0xC211
        attributes: dict[str, Any] = {"request": req, "context": context.as_tuple}
        sink = getattr(req, "_fp_sink", None)
        if sink is not None:
            attributes["dataset_sink"] = sink
        rsp_status = evt.trigger(ctx.assoc, evt.EVT_C_STORE, attributes)
        if req._dataset_file:
            req._dataset_file.close()
            try:
                os.unlink(req._dataset_file.name)
            except OSError:
                pass

    if not ctx.success or not service.assoc.is_established:
        return

    rsp = service.validate_status(rsp_status, rsp)
    service.dimse.send_msg(rsp, cx_id)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def accelerate(
    assoc: Association, *, drop_standard_log_handlers: bool | None = None,
    open_dataset: OpenDataset | None = None,
) -> bool:
    """Install the fast paths on a freshly accepted association.

    Call this from an ``EVT_CONN_OPEN`` handler (``event.assoc``): pynetdicom
    triggers that event in ``RequestHandler.handle`` after creating the
    :class:`~pynetdicom.association.Association` and before starting its
    thread, which is the only moment at which the reactors can be replaced
    safely.  Does nothing (and logs one warning per process) if the
    installed pynetdicom version is not supported, and does nothing for
    requestor associations, already started or already accelerated ones.

    Parameters
    ----------
    assoc:
        The acceptor association (not yet started).
    drop_standard_log_handlers:
        Unbind pynetdicom's standard PDU/DIMSE logging handlers from this
        association.  ``None`` (default) drops them only if the
        ``pynetdicom`` logger is not enabled for INFO, in which case they
        would produce no output anyway but still format every message (and
        copy every received data set).
    open_dataset:
        Called when a C-STORE-RQ command set has arrived, with ``(association,
        context ID, affected SOP class UID, affected SOP instance UID)`` as sent
        (possibly empty or invalid); returns the :class:`DatasetSink` that the data
        set fragments are written to as they arrive. The ``EVT_C_STORE`` handler
        then finds it as ``event.dataset_sink`` (and ``event.request.DataSet`` is
        empty); it answers every such request, even one with missing or invalid
        UIDs. Without it, data sets are reassembled in memory as pynetdicom does.

    Returns whether the association was accelerated.
    """
    if not _version_ok():
        return False
    if not assoc.is_acceptor or assoc.is_alive() or assoc.dul.is_alive():
        return False
    if isinstance(assoc, _FastAssociation):
        return False
    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider:
        # Somebody else already customised these objects; do not stack on top.
        return False
    if type(assoc.dimse) is not DIMSEServiceProvider:
        return False

    if drop_standard_log_handlers is None:
        drop_standard_log_handlers = not logging.getLogger("pynetdicom").isEnabledFor(
            logging.INFO
        )
    if drop_standard_log_handlers:
        for event, handler in _STANDARD_LOG_HANDLERS:
            if any(h[0] is handler for h in assoc.get_handlers(event)):
                assoc.unbind(event, handler)

    wake = threading.Event()
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)

    dul = assoc.dul
    dul.__class__ = _FastDUL
    dul = cast(_FastDUL, dul)
    dul._fp_rsock = rsock
    dul._fp_wsock = wsock
    dul._fp_lock = threading.Lock()
    dul._fp_closed = False
    dul._fp_wake_assoc = wake
    # threading.Thread stored the bound *original* run_reactor at __init__
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]

    assoc.dimse.__class__ = _FastDIMSE
    dimse = cast(_FastDIMSE, assoc.dimse)
    dimse._fp_wake = wake
    dimse._fp_open_dataset = open_dataset
    dimse._fp_command = bytearray()
    dimse._fp_other_bytes = 0
    assoc.__class__ = _FastAssociation
    cast(_FastAssociation, assoc)._fp_wake = wake
    # Association.__init__ also bound run_reactor; it calls self._run_reactor
    # which now resolves to the fast one, so the thread target is unchanged.
    return True


def on_conn_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler that calls :func:`accelerate` on acceptors."""
    assoc = event.assoc
    if assoc.is_acceptor:
        accelerate(assoc)


def install(server: Any) -> None:
    """Accelerate an already started ``AssociationServer`` (``block=False``).

    Replaces ``server.contexts`` with :func:`cheap_copy_contexts` copies and
    binds :func:`on_conn_open` to ``EVT_CONN_OPEN`` so that every association
    accepted from now on is accelerated.  Connections accepted before this
    call are left alone.
    """
    server.contexts = cheap_copy_contexts(server.contexts)
    if _version_ok():
        server.bind(evt.EVT_CONN_OPEN, on_conn_open)
