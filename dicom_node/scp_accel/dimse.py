"""The accelerated DIMSE provider: C-STORE data sets stream to a sink, C-STORE-RSP from a template.

Every command set is reassembled here (at most :data:`MAX_COMMAND_SET` bytes) and parsed
without pydicom; the data set of a C-STORE goes fragment by fragment to a *sink* (the
node streams it to a staging file in its spool), never through pynetdicom's in-memory
reassembly. Other messages go to pynetdicom's decoder with at most
:data:`MAX_OTHER_MESSAGE` bytes of data set. Bytes that are not a command set where one
is due abort the association (stock pynetdicom raised instead, which ended the DUL thread
without closing the connection).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.scp_accel.commands import (
    _C_STORE_RQ,
    _RQ_AFFECTED_CLASS,
    _RQ_AFFECTED_INSTANCE,
    _RQ_COMMAND_FIELD,
    _RQ_DATASET_TYPE,
    _RQ_MESSAGE_ID,
    _RQ_PRIORITY,
    MAX_COMMAND_SET,
    MAX_OTHER_MESSAGE,
    _parse_command,
    encode_c_store_rsp,
)

LOGGER = logging.getLogger(__name__)


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


