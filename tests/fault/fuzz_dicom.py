"""Encoded DICOM datasets as bytes: transfer syntaxes, a structural walker and deflate.

The fuzzers mutate encoded datasets byte by byte and the oracle judges what the node
stored, so both need to see the byte layout pydicom hides: where each top-level element
starts, where its length field is, where its value ends. :func:`walk` gives that, and
refuses (with the offset and tag) any element whose value runs past the end of the data,
which is exactly what "a dataset that is not complete" means.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

PIXEL_DATA = 0x7FE00010
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E
ROWS, COLUMNS = 0x00280010, 0x00280011

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})


@dataclass(frozen=True)
class Encoding:
    """The byte layout a transfer syntax implies."""

    implicit: bool
    little: bool
    deflated: bool

    @classmethod
    def of(cls, transfer_syntax_uid: str) -> "Encoding":
        uid = UID(transfer_syntax_uid)
        return cls(implicit=uid == IMPLICIT_VR_LE, little=uid != EXPLICIT_VR_BE, deflated=uid == DEFLATED_LE)

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"


@dataclass(frozen=True)
class Element:
    """Where one top-level element lies in the encoded bytes."""

    tag: int
    vr: str
    start: int  # the tag's offset
    length_offset: int
    length_size: int  # 2 or 4 bytes
    length: int  # as encoded; UNDEFINED for undefined length
    value_start: int
    end: int  # first byte after the value (after its delimiter when the length is undefined)

    @property
    def name(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


def inflate(data: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate, PS3.5 A.5)."""
    return zlib.decompress(data, -zlib.MAX_WBITS)


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _header(data: bytes, offset: int, encoding: Encoding) -> tuple[int, str, int, int, int]:
    """(tag, VR, length offset, length size, length) of the element at ``offset``."""
    endian = encoding.endian
    if offset + 8 > len(data):
        raise ValueError(f"element header at offset {offset} is cut off ({len(data) - offset} bytes left)")
    group, number = struct.unpack_from(f"{endian}HH", data, offset)
    tag = (group << 16) | number
    if encoding.implicit or group == 0xFFFE:
        (length,) = struct.unpack_from(f"{endian}I", data, offset + 4)
        try:
            vr = dictionary_VR(tag) if group != 0xFFFE else "NONE"
        except KeyError:
            vr = "UN"
        return tag, vr, offset + 4, 4, length
    vr_bytes = data[offset + 4 : offset + 6]
    if vr_bytes in LONG_VRS:
        if offset + 12 > len(data):
            raise ValueError(f"element {tag:08X} at offset {offset}: long-form header is cut off")
        (length,) = struct.unpack_from(f"{endian}I", data, offset + 8)
        return tag, vr_bytes.decode("latin-1"), offset + 8, 4, length
    (length,) = struct.unpack_from(f"{endian}H", data, offset + 6)
    return tag, vr_bytes.decode("latin-1"), offset + 6, 2, length


def _skip_items(data: bytes, offset: int, encoding: Encoding, depth: int) -> int:
    """Skip the items of an undefined-length value up to and including its sequence delimiter."""
    while True:
        tag, _, length_offset, _, length = _header(data, offset, encoding)
        value_start = length_offset + 4
        if tag == SEQUENCE_END:
            return value_start
        if tag != ITEM:
            raise ValueError(f"offset {offset}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item was expected")
        if length == UNDEFINED:
            offset = _elements(data, value_start, encoding, depth + 1, until=ITEM_END)[1]
        elif value_start + length > len(data):
            raise ValueError(f"item at offset {offset} claims {length} bytes, {len(data) - value_start} left")
        else:
            offset = value_start + length


def _elements(data: bytes, offset: int, encoding: Encoding, depth: int, until: int | None) -> tuple[list[Element], int]:
    if depth > 32:
        raise ValueError("sequences nested more than 32 deep")
    found: list[Element] = []
    while offset < len(data):
        tag, vr, length_offset, length_size, length = _header(data, offset, encoding)
        value_start = length_offset + length_size
        if until is not None and tag == until:
            return found, value_start
        if length == UNDEFINED:
            end = _skip_items(data, value_start, encoding, depth)
        else:
            end = value_start + length
            if end > len(data):
                raise ValueError(
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {offset} claims {length} bytes, "
                    f"only {len(data) - value_start} left"
                )
        found.append(Element(tag, vr, offset, length_offset, length_size, length, value_start, end))
        offset = end
    if until is not None:
        raise ValueError("an undefined-length item ends without its delimiter")
    return found, offset


def walk(data: bytes, encoding: Encoding) -> list[Element]:
    """The top-level elements of ``data`` (already inflated); ValueError if any is incomplete."""
    return _elements(data, 0, encoding, 0, until=None)[0]


def find(elements: list[Element], tag: int) -> Element | None:
    return next((element for element in elements if element.tag == tag), None)


def pad_uid(value: bytes) -> bytes:
    """A UI value padded to even length with NUL."""
    return value + b"\0" if len(value) % 2 else value


def replace_value(data: bytes, encoding: Encoding, tag: int, value: bytes) -> bytes:
    """``data`` with the value of top-level element ``tag`` replaced (its length field rewritten)."""
    elements = walk(data, encoding)
    element = find(elements, tag)
    if element is None:
        raise ValueError(f"no top-level element ({tag >> 16:04X},{tag & 0xFFFF:04X}) to replace")
    if element.length_size == 2 and len(value) > 0xFFFF:
        raise ValueError(f"{len(value)} bytes do not fit the 2-byte length of {element.name}")
    length = struct.pack(f"{encoding.endian}{'H' if element.length_size == 2 else 'I'}", len(value))
    return data[: element.length_offset] + length + value + data[element.end :]
