"""A result object as the bytes of a DICOM file, written by pydicom once its value representations are settled.

Why: pydicom's writer settles ambiguous value representations (US or SS, OB or OW, ...) of
every dataset it writes that was not read in the transfer syntax being written, and it does
so recursively, for the dataset and everything below it - again for each nested dataset on
the way down. A freshly built dataset was read in no transfer syntax, so a SEG of 1,500 frames
(14,000 nested datasets in its per-frame functional groups) was walked about five times over:
about a third of the 1.1-1.4 s pydicom took to write it.

How: :func:`dicom_bytes` settles them once for the whole tree (pydicom's own
``correct_ambiguous_vr``, recursive), then tells pydicom, through
``Dataset.set_original_encoding``, that each dataset is already in the transfer syntax being
written (Explicit VR Little Endian, the only one our builders use) - so the writer skips the
settling and writes every element as it would have. Datasets holding raw elements (read from
a file and not decoded, e.g. copied from a source image) are left as they are, so pydicom
still decodes and re-encodes those. Any other transfer syntax is written the plain way. The
bytes are the same as ``save_as`` gives: a test writes our objects both ways and compares.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["dicom_bytes"]


def dicom_bytes(dataset: Dataset) -> bytes:
    """``dataset`` (with its file meta information) as a DICOM file in memory; see the module docstring.

    Marks ``dataset`` and its nested datasets as encoded in Explicit VR Little Endian (their
    ambiguous VRs settled): write it after it is complete, as the last thing done with it.
    """
    meta = dataset.get("file_meta")
    if meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian:
        correct_ambiguous_vr(dataset, True)
        for item in _datasets(dataset):
            if not any(element.is_raw for element in item.elements()):
                item.set_original_encoding(False, True, _character_set(item))
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _datasets(dataset: Dataset) -> Iterator[Dataset]:
    """``dataset`` and every dataset nested in its sequences, at any depth."""
    stack = [dataset]
    while stack:
        item = stack.pop()
        yield item
        for element in item.elements():
            if not element.is_raw and element.VR == "SQ":
                stack.extend(element.value)


def _character_set(dataset: Dataset) -> str | list[str]:
    """The character set pydicom encodes ``dataset``'s text with: its Specific Character Set, else the default one
    a dataset built here has (a nested dataset decoded from a file may have its parent's: pydicom then still settles
    its VRs, nothing worse)."""
    value = dataset.get("SpecificCharacterSet")
    return convert_encodings(value) if value else default_encoding
