"""Read the identifying header of a received dataset and check that it is whole, without decoding pixels.

The receiver needs a handful of attributes (UIDs, patient, series) to file and index an
instance, and must be sure the bytes are a whole dataset before it acknowledges them.
:func:`dicom_node.dataset_layout.walk` checks the element structure from the first byte
to the last; pydicom then parses only the identifying groups (up to group 0028); the
pixel data is checked against the image it claims to be (Rows x Columns x Samples x
Frames x Bits Allocated for native pixel data, one fragment per frame at least for
encapsulated pixel data) but never decoded. Image storage SOP classes must carry pixel
data. Deflated datasets are inflated in bounded steps: a "deflate bomb" is refused as
soon as it inflates past the node's instance size limit.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, UID

from dicom_node.codestream import HEAD_BYTES, frame_problem
from dicom_node.dataset_layout import Buffer, LayoutError, PixelDataLayoutError, PixelElement, walk

class InvalidDataset(ValueError):
    """A received dataset the node cannot accept; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# C-STORE failure statuses of this node (PS3.4 Table B.2-1 ranges; documented in docs/conformance.md).
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_TOO_LARGE = 0xA701
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_UID = 0xC220
STATUS_SOP_INSTANCE_MISMATCH = 0xC221
STATUS_INVALID_UID = 0xC222
STATUS_PIXEL_DATA_INVALID = 0xC230

#: Storage SOP classes whose IODs require pixel data although their names do not say "Image".
_PIXEL_SOP_CLASSES = frozenset((
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
    "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic OCT B-scan Volume Analysis
))
#: Transfer syntaxes whose pixel data is not encapsulated.
_NATIVE_SYNTAXES = frozenset(
    ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
)
#: What a UID may hold here: printable ASCII without space or backslash.
_PRINTABLE_UID = re.compile(r"^[\x21-\x5b\x5d-\x7e]+$")
#: Frames of one instance whose codestream signature is checked (the first ones).
_FRAMES_CHECKED = 256
#: Inflated bytes handed to zlib's decompressor per step (bounds memory while inflating).
_INFLATE_STEP = 1 << 20

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


def uid_problem(uid: str) -> str | None:
    """What makes a received UID unusable, or None.

    Missing, longer than 64 characters (PS3.5 9.1), or holding characters no UID can
    (controls, space, backslash, non-ASCII: decoded with replacement characters, two
    different UIDs could become one). Sloppy but printable UIDs (letters, leading zeros)
    are accepted as the files they come in are; they never reach a file name raw
    (:func:`dicom_node.spool.uid_to_filename`).
    """
    text = uid.strip("\0 ")
    if not text:
        return "is missing"
    if len(text) > 64:
        return f"is longer than 64 characters ({len(text)})"
    if not _PRINTABLE_UID.match(text):
        return "holds characters that no UID can"
    return None


def requires_pixel_data(sop_class_uid: str) -> bool:
    """Whether instances of this storage SOP class must carry pixel data (the image IODs)."""
    return sop_class_uid in _PIXEL_SOP_CLASSES or "Image Storage" in UID(sop_class_uid).name


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


def expected_native_length(dataset: Dataset, little_endian: bool) -> tuple[int, str] | None:
    """The bytes native pixel data of this image must hold, and the image it describes; None if undescribed.

    Rows x Columns x Frames x Samples x Bits Allocated, rounded up to whole bytes (PS3.5
    8.1.1); YBR_FULL_422 and YBR_PARTIAL_422 store two samples per pixel, not three
    (PS3.3 C.7.6.3.1.2).
    """
    rows = _unsigned_short(dataset, 0x00280010, little_endian)
    columns = _unsigned_short(dataset, 0x00280011, little_endian)
    bits = _unsigned_short(dataset, 0x00280100, little_endian)
    if not (rows and columns and bits):
        return None
    samples = _unsigned_short(dataset, 0x00280002, little_endian) or 1
    frames = max(_raw_integer(dataset, 0x00280008) or 1, 1)
    photometric = (_raw_ascii(dataset, 0x00280004) or "").upper()
    stored_samples = 2 if samples == 3 and photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") else samples
    total_bits = rows * columns * frames * stored_samples * bits
    image = f"{rows}x{columns}x{samples}x{frames} at {bits} bits" + (f" {photometric}" if stored_samples != samples else "")
    return (total_bits + 7) // 8, image


def _check_pixels(pixel: PixelElement | None, dataset: Dataset, syntax: UID, sop_class_uid: str,
                  little_endian: bool, data: Buffer, start: int) -> None:
    """Refuse pixel data that is missing from an image, mis-encoded for its transfer syntax, or of the wrong size."""
    if pixel is None:
        if requires_pixel_data(sop_class_uid):
            raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"no Pixel Data in a {UID(sop_class_uid).name} instance")
        return
    native = syntax in _NATIVE_SYNTAXES
    expected = expected_native_length(dataset, little_endian)
    if expected is None:
        raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, "pixel data without Rows, Columns and Bits Allocated")
    if pixel.length is None:
        if native:
            raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"encapsulated pixel data in a native transfer syntax {syntax}")
        frames = max(_raw_integer(dataset, 0x00280008) or 1, 1)
        if len(pixel.fragments) < frames:
            raise InvalidDataset(STATUS_PIXEL_DATA_INVALID,
                                 f"encapsulated pixel data has {len(pixel.fragments)} fragments for {frames} frames")
        for number, (offset, length) in _frame_starts(pixel, frames, data, start):
            head = bytes(data[start + offset : start + offset + min(length, HEAD_BYTES)])
            problem = frame_problem(str(syntax), head, length)
            if problem is not None:
                raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"frame {number} {problem}")
        return
    if not native and pixel.tag == 0x7FE00010:
        raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"pixel data of compressed transfer syntax {syntax} is not encapsulated")
    size, image = expected
    if pixel.length not in (size, size + (size & 1)):
        raise InvalidDataset(
            STATUS_PIXEL_DATA_INVALID, f"pixel data holds {pixel.length} bytes, {image} needs {size}"
        )


def _frame_starts(pixel: PixelElement, frames: int, data: Buffer, start: int) -> list[tuple[int, tuple[int, int]]]:
    """(frame number, its first fragment) for the frames whose start is known, at most :data:`_FRAMES_CHECKED`.

    A basic offset table gives every frame's first fragment; without one, fragments are
    frames when there are as many of each; otherwise only the first frame's start is known.
    """
    table_offset, table_length = pixel.offset_table
    if table_length:
        if table_length % 4:
            raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"basic offset table of {table_length} bytes")
        first_item = pixel.fragments[0][0] - 8
        by_item = {offset - 8 - first_item: (offset, length) for offset, length in pixel.fragments}
        starts = []
        for number in range(min(table_length // 4, _FRAMES_CHECKED)):
            position = start + table_offset + 4 * number
            frame_offset = int.from_bytes(bytes(data[position : position + 4]), "little")
            if frame_offset not in by_item:
                raise InvalidDataset(STATUS_PIXEL_DATA_INVALID,
                                     f"basic offset table entry {number + 1} ({frame_offset}) starts no fragment")
            starts.append((number + 1, by_item[frame_offset]))
        return starts
    if len(pixel.fragments) == frames:
        return list(enumerate(pixel.fragments[:_FRAMES_CHECKED], start=1))
    return [(1, pixel.fragments[0])]


def parse_header(body: bytes | memoryview, transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str,
                 *, max_inflated_bytes: int | None = None) -> InstanceHeader:
    """Parse and check the dataset ``body`` (no file meta) sent under ``transfer_syntax_uid``.

    ``sop_class_uid`` and ``sop_instance_uid`` are the ones in the C-STORE request; the
    dataset must agree with them. Raises :class:`InvalidDataset` with the status to answer.
    """
    if UID(transfer_syntax_uid) == DeflatedExplicitVRLittleEndian:
        with _inflated(io.BytesIO(body), max_inflated_bytes, None) as inflated:
            return _parse_plain(inflated, 0, transfer_syntax_uid, sop_class_uid, sop_instance_uid)
    return _parse_plain(body, 0, transfer_syntax_uid, sop_class_uid, sop_instance_uid)


def parse_header_file(path: Path, offset: int, transfer_syntax_uid: str, sop_class_uid: str, sop_instance_uid: str,
                      *, max_inflated_bytes: int | None = None) -> InstanceHeader:
    """:func:`parse_header` for a dataset stored in ``path`` from byte ``offset`` (after its file meta).

    The file is mapped, not read: memory use does not grow with the pixel data. A
    deflated dataset is inflated into a temporary file beside ``path``.
    """
    with open(path, "rb") as handle:
        if UID(transfer_syntax_uid) == DeflatedExplicitVRLittleEndian:
            handle.seek(offset)
            with _inflated(handle, max_inflated_bytes, path.parent) as inflated:
                return _parse_plain(inflated, 0, transfer_syntax_uid, sop_class_uid, sop_instance_uid)
        with _mapped(handle) as mapped:
            return _parse_plain(mapped, offset, transfer_syntax_uid, sop_class_uid, sop_instance_uid)


@contextmanager
def _mapped(handle: BinaryIO) -> Iterator[mmap.mmap | bytes]:
    """The file mapped read-only (never exported as a memoryview, so it always closes)."""
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        yield b""
        return
    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mapping
    finally:
        mapping.close()


@contextmanager
def _inflated(source: BinaryIO, limit: int | None, directory: Path | None) -> Iterator[mmap.mmap | bytes]:
    """The inflated dataset, written to a temporary file in steps; refused past ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with tempfile.TemporaryFile(dir=directory, prefix=".inflate-") as target:
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or source.read(_INFLATE_STEP)
                if not chunk:
                    raise InvalidDataset(STATUS_CANNOT_PARSE, "deflated dataset ends before its deflate stream does")
                data = inflater.decompress(chunk, _INFLATE_STEP)
                total += len(data)
                if limit is not None and total > limit:
                    raise InvalidDataset(
                        STATUS_TOO_LARGE,
                        f"deflated dataset inflates to more than the limit of {limit // 1_048_576} MiB",
                    )
                target.write(data)
        except zlib.error as exc:
            raise InvalidDataset(STATUS_CANNOT_PARSE, f"deflated dataset does not inflate: {exc}") from exc
        target.flush()
        with _mapped(target) as mapped:  # type: ignore[arg-type]
            yield mapped


def _parse_plain(data: bytes | memoryview | mmap.mmap, start: int, transfer_syntax_uid: str, sop_class_uid: str,
                 sop_instance_uid: str) -> InstanceHeader:
    syntax = UID(transfer_syntax_uid)
    implicit = syntax == ImplicitVRLittleEndian
    little_endian = syntax != ExplicitVRBigEndian
    try:
        layout = walk(data, implicit_vr=implicit, little_endian=little_endian, start=start)
    except PixelDataLayoutError as exc:
        raise InvalidDataset(STATUS_PIXEL_DATA_INVALID, f"pixel data incomplete: {exc}") from exc
    except LayoutError as exc:
        raise InvalidDataset(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {exc}") from exc
    try:
        dataset = read_dataset(io.BytesIO(data[start : start + layout.header_end]), implicit, little_endian)
        uids = {
            "SOPClassUID": _raw_ascii(dataset, 0x00080016),
            "SOPInstanceUID": _raw_ascii(dataset, 0x00080018),
            "StudyInstanceUID": _raw_ascii(dataset, 0x0020000D),
            "SeriesInstanceUID": _raw_ascii(dataset, 0x0020000E),
        }
        header_fields: dict[str, Any] = {
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
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "cannot parse"
        raise InvalidDataset(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from exc

    missing = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not uids[keyword]]
    if missing:
        raise InvalidDataset(STATUS_MISSING_UID, f"no {', '.join(missing)} in the dataset")
    for keyword, uid in uids.items():
        problem = uid_problem(uid) if uid else None
        if problem is not None:
            raise InvalidDataset(STATUS_INVALID_UID, f"{keyword} {problem}")
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
    _check_pixels(layout.pixel, dataset, syntax, sop_class_uid.strip("\0 "), little_endian, data, start)
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
