"""The oracle: is what the node acknowledged (status 0x0000) a complete, readable instance?

The node answers success only for a complete dataset, so every acknowledged instance is
read back from the node's spool and judged here, independently of the node's own checks:

* every element, at every level, lies inside the file (:func:`fuzz_dicom.walk`) and
  pydicom reads the file and every value in it;
* its SOP Instance UID is the one the C-STORE request named; Study and Series Instance
  UIDs are present;
* an image holds its pixel data: for native transfer syntaxes exactly
  Rows x Columns x Samples x Frames x Bits Allocated / 8 bytes (plus one byte of padding
  when that is odd), for encapsulated ones fragments that pydicom decodes to that shape.

A problem is a sentence; an empty list means the instance is fine.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from fuzz_dicom import PIXEL_DATA, SERIES_UID, SOP_INSTANCE_UID, STUDY_UID, UNDEFINED, Encoding, find, inflate, walk
from fuzz_store_cases import StoreCase
from peers import split_part10

#: Larger acknowledged files are judged by size alone (the cases are small; a huge one is a bomb let in).
MAX_READ_BYTES = 256 << 20


def _stripped(value: bytes) -> bytes:
    return value.strip(b"\0 ")


def _native_pixel_problem(dataset: Dataset, length: int) -> str | None:
    try:
        rows, columns, bits = int(dataset.Rows), int(dataset.Columns), int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image attributes unreadable: {type(exc).__name__}: {exc}"
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length not in (expected, expected + expected % 2):
        return (f"pixel data holds {length} bytes, {rows}x{columns}x{samples}x{frames} at {bits} bits "
                f"needs {expected}")
    return None


def stored_instance_problems(path: Path, case: StoreCase) -> list[str]:
    """What is wrong with the file the node stored for ``case`` (see the module docstring)."""
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    # pydicom warns of invalid values (a flipped byte in a UID) and logs every failed decoder with its
    # traceback; the verdict is what this function returns, so none of that goes to the test's log.
    pydicom_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _problems(path, case)
    finally:
        pydicom_logger.setLevel(level)


def _problems(path: Path, case: StoreCase) -> list[str]:
    size = path.stat().st_size
    if size > MAX_READ_BYTES:
        return [f"stored file is {size} bytes, far larger than any case but a deflate bomb"]
    try:
        body = split_part10(path.read_bytes())[1]
        syntax = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
    except (ValueError, AttributeError, OSError) as exc:
        return [f"stored file has no readable file meta: {type(exc).__name__}: {exc}"]
    encoding = Encoding.of(syntax)
    try:
        data = inflate(body) if encoding.deflated else body
        elements = walk(data, encoding)
    except (ValueError, zlib.error) as exc:
        return [f"stored dataset is incomplete: {type(exc).__name__}: {exc}"]
    problems: list[str] = []
    try:
        dataset = pydicom.dcmread(path)
        for element in dataset.iterall():
            _ = element.value
    except Exception as exc:  # anything pydicom raises means "not readable"
        return [f"pydicom cannot read the stored instance: {type(exc).__name__}: {exc}"]
    uid = find(elements, SOP_INSTANCE_UID)
    stored_uid = _stripped(data[uid.value_start : uid.end]) if uid else b""
    if stored_uid != _stripped(case.sop_instance_uid):
        problems.append(f"stored SOP Instance UID {stored_uid!r} is not the request's {case.sop_instance_uid!r}")
    for tag, name in ((STUDY_UID, "Study"), (SERIES_UID, "Series")):
        element = find(elements, tag)
        if element is None or not _stripped(data[element.value_start : element.end]):
            problems.append(f"stored instance has no {name} Instance UID")
    if case.image:
        problems += _pixel_problems(dataset, elements, syntax)
    return problems


def _pixel_problems(dataset: Dataset, elements: list, syntax: str) -> list[str]:  # type: ignore[type-arg]
    pixels = find(elements, PIXEL_DATA)
    if pixels is None:
        return ["stored image has no Pixel Data"]
    encapsulated = UID(syntax).is_encapsulated
    if not encapsulated:
        if pixels.length == UNDEFINED:
            return [f"native transfer syntax {syntax} with encapsulated (undefined-length) pixel data"]
        problem = _native_pixel_problem(dataset, pixels.length)
        return [problem] if problem else []
    if pixels.length != UNDEFINED:
        return [f"encapsulated transfer syntax {syntax} with {pixels.length} bytes of native pixel data"]
    try:
        array = dataset.pixel_array
    except Exception as exc:  # every decoder failure counts
        return [f"encapsulated pixel data does not decode: {type(exc).__name__}: {exc}"]
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if array.size != int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1)) * frames:
        return [f"pixel data decodes to shape {array.shape}, not {frames} frame(s) of {dataset.Rows}x{dataset.Columns}"]
    return []
