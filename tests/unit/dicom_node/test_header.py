"""Header parsing of received datasets: identification, and refusal of incomplete or inconsistent ones."""

from __future__ import annotations

import copy
import io
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicom_node.header import (
    STATUS_CANNOT_PARSE,
    STATUS_MISSING_UID,
    STATUS_PIXEL_DATA_INVALID,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SOP_INSTANCE_MISMATCH,
    STATUS_TOO_LARGE,
    InvalidDataset,
    parse_header,
)
from training.phantoms.ct_series import GeneratedSeries, encode_series


def body_of(dataset: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset encoded as it travels in a C-STORE: no preamble, no file meta."""
    buffer = io.BytesIO()
    dataset = copy.deepcopy(dataset)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.preamble = None
    dcmwrite(buffer, dataset, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


@pytest.fixture
def ct(small_series: GeneratedSeries) -> Dataset:
    return pydicom.dcmread(small_series.paths[0])


def parse(body: bytes, dataset: Dataset, syntax: str = ExplicitVRLittleEndian):  # type: ignore[no-untyped-def]
    return parse_header(body, syntax, dataset.SOPClassUID, dataset.SOPInstanceUID)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_identifies_native_instances(ct: Dataset, small_series: GeneratedSeries, syntax: str) -> None:
    header = parse(body_of(ct, syntax), ct, syntax)
    assert header.study_instance_uid == small_series.study_uid
    assert header.series_instance_uid == small_series.series_uid
    assert header.sop_instance_uid == ct.SOPInstanceUID
    assert header.modality == "CT" and header.patient_id == ct.PatientID
    assert header.instance_number == 1 and header.series_number == ct.SeriesNumber


def test_deflated_dataset_is_inflated_for_the_header(ct: Dataset) -> None:
    plain = body_of(ct)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(plain) + compressor.flush()
    assert parse(deflated, ct, DeflatedExplicitVRLittleEndian).sop_instance_uid == ct.SOPInstanceUID
    with pytest.raises(InvalidDataset) as raised:
        parse(b"not deflate data at all", ct, DeflatedExplicitVRLittleEndian)
    assert raised.value.status == STATUS_CANNOT_PARSE


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_encapsulated_instances_are_checked_to_their_delimiter(ct: Dataset, syntax: str) -> None:
    encoded = encode_series([ct], syntax)[0]
    body = body_of(encoded, syntax)
    assert parse(body, encoded, syntax).sop_instance_uid == ct.SOPInstanceUID
    with pytest.raises(InvalidDataset) as raised:
        parse(body[: len(body) - 40], encoded, syntax)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID
    assert "fragment" in raised.value.reason and "remain" in raised.value.reason


def test_truncated_native_pixel_data_is_refused(ct: Dataset) -> None:
    body = body_of(ct)
    with pytest.raises(InvalidDataset) as raised:
        parse(body[:-100], ct)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID
    assert "(7FE0,0010)" in raised.value.reason and "only" in raised.value.reason


def test_pixel_data_shorter_than_the_image_is_refused(ct: Dataset) -> None:
    short = copy.deepcopy(ct)
    short.PixelData = ct.PixelData[:1000]
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(short), short)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID
    assert "64x64" in raised.value.reason


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uids_are_refused_by_name(ct: Dataset, keyword: str) -> None:
    damaged = copy.deepcopy(ct)
    delattr(damaged, keyword)
    with pytest.raises(InvalidDataset) as raised:
        parse_header(body_of(damaged), ExplicitVRLittleEndian, ct.SOPClassUID, ct.SOPInstanceUID)
    assert raised.value.status == STATUS_MISSING_UID
    assert keyword in raised.value.reason


def test_dataset_must_match_the_request(ct: Dataset) -> None:
    body = body_of(ct)
    with pytest.raises(InvalidDataset) as raised:
        parse_header(body, ExplicitVRLittleEndian, ct.SOPClassUID, "1.2.3.999")
    assert raised.value.status == STATUS_SOP_INSTANCE_MISMATCH
    with pytest.raises(InvalidDataset) as raised:
        parse_header(body, ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.4", ct.SOPInstanceUID)
    assert raised.value.status == STATUS_SOP_CLASS_MISMATCH


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"\xff" * 4096, bytes(range(256)) * 20])
def test_garbage_is_refused_not_crashed_on(ct: Dataset, garbage: bytes) -> None:
    with pytest.raises(InvalidDataset) as raised:
        parse(garbage, ct)
    assert raised.value.status in (STATUS_CANNOT_PARSE, STATUS_MISSING_UID)


def structured_report(ct: Dataset) -> Dataset:
    """A small Comprehensive SR about ``ct``, with nested sequences and no pixel data."""
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    report.SOPInstanceUID = pydicom.uid.generate_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = ct.StudyInstanceUID, pydicom.uid.generate_uid()
    report.PatientID, report.Modality = ct.PatientID, "SR"
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", "no finding"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [inner]
    report.ContentSequence = [item, copy.deepcopy(item)]
    return report


def test_an_image_without_pixel_data_is_refused_and_a_report_accepted(ct: Dataset) -> None:
    header_only = copy.deepcopy(ct)
    del header_only.PixelData
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(header_only), header_only)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID and "no Pixel Data in a CT Image Storage" in raised.value.reason
    report = structured_report(ct)
    assert parse(body_of(report), report).sop_instance_uid == report.SOPInstanceUID


def element_boundaries(body: bytes) -> list[int]:
    """Offsets at which a top-level element of an explicit VR little endian dataset starts."""
    offsets, position = [], 0
    while position < len(body):
        offsets.append(position)
        vr = body[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
            position += 12 + int.from_bytes(body[position + 8 : position + 12], "little")
        else:
            position += 8 + int.from_bytes(body[position + 6 : position + 8], "little")
    return offsets


def test_truncation_anywhere_is_refused(ct: Dataset) -> None:
    """At every element boundary, and inside every element header and value: never accepted."""
    body = body_of(ct)
    boundaries = element_boundaries(body)
    cuts = set(boundaries[1:]) | {b + 3 for b in boundaries[1:]} | {b + 9 for b in boundaries[1:-1]}
    for cut in sorted(cuts):
        with pytest.raises(InvalidDataset) as raised:
            parse(body[:cut], ct)
        assert raised.value.status in (STATUS_CANNOT_PARSE, STATUS_MISSING_UID, STATUS_PIXEL_DATA_INVALID), cut


def test_an_element_longer_than_the_dataset_is_refused_by_name(ct: Dataset) -> None:
    report = structured_report(ct)
    body = bytearray(body_of(report))
    modality = body.index(b"\x60\x00CS")  # (0008,0060) Modality
    body[modality + 4 : modality + 6] = (60_000).to_bytes(2, "little")
    with pytest.raises(InvalidDataset) as raised:
        parse(bytes(body), report)
    assert raised.value.status == STATUS_CANNOT_PARSE and "(0008,0060)" in raised.value.reason


def test_truncated_report_inside_a_sequence_is_refused(ct: Dataset) -> None:
    report = structured_report(ct)
    body = body_of(report)
    for cut in range(len(body) - 60, len(body), 7):
        with pytest.raises(InvalidDataset) as raised:
            parse(body[:cut], report)
        assert raised.value.status == STATUS_CANNOT_PARSE, cut


def test_bytes_in_another_encoding_than_claimed_are_refused(ct: Dataset) -> None:
    explicit = body_of(ct, ExplicitVRLittleEndian)
    with pytest.raises(InvalidDataset):
        parse(explicit, ct, ImplicitVRLittleEndian)
    implicit = body_of(ct, ImplicitVRLittleEndian)
    with pytest.raises(InvalidDataset):
        parse(implicit, ct, ExplicitVRLittleEndian)
    with pytest.raises(InvalidDataset) as raised:
        parse(explicit, ct, JPEG2000Lossless)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID and "not encapsulated" in raised.value.reason


def test_pixel_data_longer_than_the_image_is_refused(ct: Dataset) -> None:
    padded = copy.deepcopy(ct)
    padded.PixelData = ct.PixelData + b"\0" * 64
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(padded), padded)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID and "needs 8192" in raised.value.reason


def test_native_ybr_full_422_is_sized_as_two_samples_per_pixel(ct: Dataset) -> None:
    colour = copy.deepcopy(ct)
    colour.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "YBR_FULL_422", 0
    colour.BitsAllocated = colour.BitsStored = 8
    colour.HighBit, colour.PixelRepresentation = 7, 0
    colour.PixelData = bytes(64 * 64 * 2)
    assert parse(body_of(colour), colour).sop_instance_uid == ct.SOPInstanceUID
    colour.PixelData = bytes(64 * 64 * 3)
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(colour), colour)
    assert "YBR_FULL_422 needs 8192" in raised.value.reason


def test_deflate_bomb_is_refused_within_the_limit(ct: Dataset) -> None:
    plain = body_of(ct)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(plain) + compressor.compress(b"\0" * (64 << 20)) + compressor.flush()
    assert len(bomb) < 200_000
    with pytest.raises(InvalidDataset) as raised:
        parse_header(bomb, DeflatedExplicitVRLittleEndian, ct.SOPClassUID, ct.SOPInstanceUID,
                     max_inflated_bytes=8 << 20)
    assert raised.value.status == STATUS_TOO_LARGE and "8 MiB" in raised.value.reason


def test_sequences_nested_without_end_are_refused(ct: Dataset) -> None:
    report = structured_report(ct)
    deep = report.ContentSequence[0]
    for _ in range(40):
        outer = Dataset()
        outer.ContentSequence = [deep]
        deep = outer
    report.ContentSequence = [deep]
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(report), report)
    assert raised.value.status == STATUS_CANNOT_PARSE and "nested" in raised.value.reason


@pytest.mark.parametrize(
    "charset, name",
    [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Ødegård^李"), ("ISO_IR 144", "Иванов^Иван"), (None, "Plain^Name")],
)
def test_names_are_decoded_with_the_specific_character_set(ct: Dataset, charset: str | None, name: str) -> None:
    labelled = copy.deepcopy(ct)
    if charset is None:
        del labelled.SpecificCharacterSet
    else:
        labelled.SpecificCharacterSet = charset
    labelled.PatientName = name
    labelled.StudyDescription = name.split("^")[0]
    header = parse(body_of(labelled), labelled)
    assert header.patient_name == name and header.study_description == name.split("^")[0]


def test_over_long_values_are_shortened_for_the_index_and_long_uids_refused(ct: Dataset) -> None:
    long_values = copy.deepcopy(ct)
    long_values.AccessionNumber = "A" * 40
    long_values.StudyDescription = "D" * 100
    header = parse(body_of(long_values), long_values)
    assert header.accession_number == "A" * 16 and header.study_description == "D" * 64
    long_uid = copy.deepcopy(ct)
    long_uid.StudyInstanceUID = "1." + "2" * 70
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(long_uid), long_uid)
    assert raised.value.status == 0xC222 and "StudyInstanceUID" in raised.value.reason


def test_uids_with_bytes_no_uid_can_hold_are_refused(ct: Dataset) -> None:
    """Decoded with replacement characters, two UIDs differing in such bytes would become one."""
    body = body_of(ct)
    study = ct.StudyInstanceUID.encode()
    damaged = body.replace(study, study[:-2] + b"\xe9" + study[-1:])
    with pytest.raises(InvalidDataset) as raised:
        parse(damaged, ct)
    assert raised.value.status == 0xC222 and "StudyInstanceUID holds characters" in raised.value.reason


@pytest.mark.parametrize("actual, claimed, words", [
    (RLELossless, "1.2.840.10008.1.2.4.70", "JPEG start-of-image"),
    (JPEG2000Lossless, "1.2.840.10008.1.2.4.80", "JPEG start-of-image"),
    (RLELossless, JPEG2000Lossless, "JPEG 2000 codestream"),
    (JPEG2000Lossless, RLELossless, "RLE header"),
])
def test_compressed_frames_of_another_kind_than_claimed_are_refused(
    ct: Dataset, actual: str, claimed: str, words: str
) -> None:
    """Structurally fine fragments, but a codestream no decoder of the claimed syntax would read."""
    encoded = encode_series([ct], actual)[0]
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(encoded, actual), encoded, claimed)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID and "frame 1" in raised.value.reason
    assert words in raised.value.reason


def test_jpeg_frames_of_another_process_are_refused() -> None:
    lossless_ls = pydicom.dcmread(pydicom.data.get_testdata_file("JPEGLSNearLossless_08.dcm"))
    lossless_ls.StudyInstanceUID, lossless_ls.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    syntax = str(lossless_ls.file_meta.TransferSyntaxUID)
    body = body_of(lossless_ls, syntax)
    assert parse(body, lossless_ls, syntax).study_instance_uid == "1.2.3"
    with pytest.raises(InvalidDataset) as raised:
        parse(body, lossless_ls, "1.2.840.10008.1.2.4.70")
    assert "another process (marker FFF7; JPEG lossless expected)" in raised.value.reason


def test_an_unknown_vr_is_refused_by_element(ct: Dataset) -> None:
    """Two capital letters that are no VR: pydicom could not read the file back (found by the fuzzer)."""
    body = bytearray(body_of(ct))
    modality = body.index(b"\x60\x00CS")
    body[modality + 2 : modality + 4] = b"WS"
    with pytest.raises(InvalidDataset) as raised:
        parse(bytes(body), ct)
    assert raised.value.status == STATUS_CANNOT_PARSE and "(0008,0060)" in raised.value.reason and "VR" in raised.value.reason


def test_encapsulated_pixel_data_needs_the_image_attributes(ct: Dataset) -> None:
    encoded = encode_series([ct], RLELossless)[0]
    del encoded.BitsAllocated
    with pytest.raises(InvalidDataset) as raised:
        parse(body_of(encoded, RLELossless), encoded, RLELossless)
    assert raised.value.status == STATUS_PIXEL_DATA_INVALID and "Bits Allocated" in raised.value.reason
