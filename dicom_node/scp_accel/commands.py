"""DIMSE command sets in Implicit VR Little Endian, without pydicom: C-STORE-RSP from a template, requests parsed.

pynetdicom builds and encodes every C-STORE-RSP twice through pydicom ``Dataset`` objects
and decodes every C-STORE-RQ command set through pydicom; these functions do the same in
a few microseconds. Byte-identical output is checked by the tests against pynetdicom's encoder.
"""

from __future__ import annotations

import struct
from typing import Any

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

