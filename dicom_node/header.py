"""Read the identifying header of a received dataset without touching its pixel data.

The receiver needs a handful of attributes (UIDs, patient, series) to file and index an
instance, and must be sure the bytes are a whole dataset before it acknowledges them.
Parsing stops at Pixel Data; the pixel element itself is checked structurally (length
against the image size, encapsulated fragments terminated) but never decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, UID

PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class InvalidDataset(ValueError):
    """A received dataset the node cannot accept; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# C-STORE failure statuses of this node (PS3.4 Table B.2-1 ranges; documented in docs/conformance.md).
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_UID = 0xC220
STATUS_SOP_INSTANCE_MISMATCH = 0xC221
STATUS_INVALID_UID = 0xC222
STATUS_PIXEL_DATA_INCOMPLETE = 0xC230


# The longest value the index keeps of each text field (the VR maximum, PS3.5 6.2).
_INDEXED_LENGTHS = {
    "patient_id": 64,
    "patient_name": 324,
    "accession_number": 16,
    "study_date": 8,
    "study_description": 64,
    "modality": 16,
    "series_description": 64,
    "body_part_examined": 16,
}


@dataclass(frozen=True)
class InstanceHeader:
    """What the receiver files and indexes an instance by."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    instance_number: int | None


def _stop_at_pixels(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) in PIXEL_DATA_TAGS


_DEFAULT_CHARSETS = (None, b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192")


def _text(dataset: Dataset, tag: int, keyword: str) -> str | None:
    """A text value decoded with the dataset's character set (names, descriptions).

    The common character sets are decoded from the raw bytes directly; others (ISO 2022
    code extensions, for example) go through pydicom's full character set handling.
    """
    element = dataset.get_item(tag)
    if element is None or element.value is None:
        return None
    charset = dataset.get_item(0x00080005)
    charset_value = None if charset is None else charset.value
    if isinstance(element.value, bytes) and isinstance(charset_value, bytes | None):
        name = (charset_value or b"").strip(b"\0 ")
        if name in _DEFAULT_CHARSETS:
            encoding = "utf-8" if name == b"ISO_IR 192" else "latin-1"
            text = element.value.decode(encoding, "replace").strip("\0 ")
            return text or None
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _raw_ascii(dataset: Dataset, tag: int) -> str | None:
    """An ASCII-only value (UI, CS, IS, DA) straight from the raw element, skipping conversion."""
    element = dataset.get_item(tag)
    if element is None or element.value is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value).strip("\0 ")
    return text or None


def _raw_integer(dataset: Dataset, tag: int) -> int | None:
    text = _raw_ascii(dataset, tag)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _unsigned_short(dataset: Dataset, tag: int, little_endian: bool) -> int | None:
    """A US value (Rows, Columns, ...) from its raw two bytes."""
    element = dataset.get_item(tag)
    if element is None or not isinstance(element.value, bytes) or len(element.value) != 2:
        return None
    return int.from_bytes(element.value, "little" if little_endian else "big")


def _check_fragments(body: bytes, offset: int, endian: str) -> None:
    """Walk the items of encapsulated pixel data up to the sequence delimiter."""
    item_header = struct.Struct(f"{endian}HHI")
    while True:
        if offset + 8 > len(body):
            raise InvalidDataset(
                STATUS_PIXEL_DATA_INCOMPLETE, "encapsulated pixel data ends before its sequence delimiter"
            )
        group, element, length = item_header.unpack_from(body, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000):
            raise InvalidDataset(
                STATUS_PIXEL_DATA_INCOMPLETE,
                f"encapsulated pixel data has ({group:04X},{element:04X}) where an item was expected",
            )
        offset += 8 + length


def _check_pixel_element(body: bytes, offset: int, dataset: Dataset, little_endian: bool, implicit: bool) -> None:
    """Verify the Pixel Data element starting at ``offset`` is complete.

    Native pixel data must hold at least Rows x Columns x Samples x Frames x Bits/8
    bytes; encapsulated pixel data must end with its sequence delimiter.
    """
    if offset >= len(body):
        return  # no pixel data element (for example SR or a presentation state)
    endian = "<" if little_endian else ">"
    if implicit:
        if len(body) < offset + 8:
            raise InvalidDataset(STATUS_PIXEL_DATA_INCOMPLETE, "pixel data element header is truncated")
        (length,) = struct.unpack(f"{endian}I", body[offset + 4 : offset + 8])
        value_offset = offset + 8
    else:
        if len(body) < offset + 12:
            raise InvalidDataset(STATUS_PIXEL_DATA_INCOMPLETE, "pixel data element header is truncated")
        (length,) = struct.unpack(f"{endian}I", body[offset + 8 : offset + 12])
        value_offset = offset + 12
    available = len(body) - value_offset
    if length == 0xFFFFFFFF:
        _check_fragments(body, value_offset, endian)
        return
    if length > available:
        raise InvalidDataset(
            STATUS_PIXEL_DATA_INCOMPLETE,
            f"pixel data declares {length} bytes but only {available} were received",
        )
    rows = _unsigned_short(dataset, 0x00280010, little_endian)
    columns = _unsigned_short(dataset, 0x00280011, little_endian)
    bits = _unsigned_short(dataset, 0x00280100, little_endian)
    if rows and columns and bits:
        samples = _unsigned_short(dataset, 0x00280002, little_endian) or 1
        frames = _raw_integer(dataset, 0x00280008) or 1
        expected = rows * columns * samples * frames * bits // 8
        if length < expected:
            raise InvalidDataset(
                STATUS_PIXEL_DATA_INCOMPLETE,
                f"pixel data holds {length} bytes, {rows}x{columns}x{samples}x{frames} at {bits} bits needs {expected}",
            )


def parse_header(body: bytes, transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str) -> InstanceHeader:
    """Parse and check the dataset ``body`` (no file meta) sent under ``transfer_syntax_uid``.

    ``sop_class_uid`` and ``sop_instance_uid`` are the ones in the C-STORE request; the
    dataset must agree with them. Raises :class:`InvalidDataset` with the status to answer.
    """
    syntax = UID(transfer_syntax_uid)
    implicit = syntax == ImplicitVRLittleEndian
    little_endian = syntax != ExplicitVRBigEndian
    data = body
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InvalidDataset(STATUS_CANNOT_PARSE, f"deflated dataset does not inflate: {exc}") from exc
    stream = io.BytesIO(data)
    try:
        dataset = read_dataset(stream, implicit, little_endian, stop_when=_stop_at_pixels)
        uids = {
            "SOPClassUID": _raw_ascii(dataset, 0x00080016),
            "SOPInstanceUID": _raw_ascii(dataset, 0x00080018),
            "StudyInstanceUID": _raw_ascii(dataset, 0x0020000D),
            "SeriesInstanceUID": _raw_ascii(dataset, 0x0020000E),
        }
        header_fields = {
            "patient_id": _text(dataset, 0x00100020, "PatientID"),
            "patient_name": _text(dataset, 0x00100010, "PatientName"),
            "accession_number": _text(dataset, 0x00080050, "AccessionNumber"),
            "study_date": _raw_ascii(dataset, 0x00080020),
            "study_description": _text(dataset, 0x00081030, "StudyDescription"),
            "modality": _raw_ascii(dataset, 0x00080060),
            "series_number": _raw_integer(dataset, 0x00200011),
            "series_description": _text(dataset, 0x0008103E, "SeriesDescription"),
            "body_part_examined": _raw_ascii(dataset, 0x00180015),
            "instance_number": _raw_integer(dataset, 0x00200013),
        }
    except InvalidDataset:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "cannot parse"
        raise InvalidDataset(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc

    missing = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uids[keyword]]
    if missing:
        raise InvalidDataset(STATUS_MISSING_UID, f"dataset has no {', '.join(missing)}")
    too_long = [keyword for keyword, uid in uids.items() if uid and len(uid) > 64]
    if too_long:
        raise InvalidDataset(STATUS_INVALID_UID, f"{', '.join(too_long)} longer than 64 characters")
    if uids["SOPInstanceUID"] != sop_instance_uid.strip("\0 "):
        raise InvalidDataset(
            STATUS_SOP_INSTANCE_MISMATCH,
            f"dataset SOP Instance UID {uids['SOPInstanceUID']} differs from the request's {sop_instance_uid}",
        )
    if uids["SOPClassUID"] and uids["SOPClassUID"] != sop_class_uid.strip("\0 "):
        raise InvalidDataset(
            STATUS_SOP_CLASS_MISMATCH,
            f"dataset SOP Class UID {uids['SOPClassUID']} differs from the request's {sop_class_uid}",
        )
    _check_pixel_element(data, stream.tell(), dataset, little_endian, implicit)
    for field, limit in _INDEXED_LENGTHS.items():
        value = header_fields[field]
        if isinstance(value, str) and len(value) > limit:
            # Over-long values are common in the wild; the file keeps them whole.
            header_fields[field] = value[:limit]
    return InstanceHeader(
        sop_class_uid=sop_class_uid.strip("\0 "),
        sop_instance_uid=uids["SOPInstanceUID"] or "",
        study_instance_uid=uids["StudyInstanceUID"] or "",
        series_instance_uid=uids["SeriesInstanceUID"] or "",
        **header_fields,
    )
