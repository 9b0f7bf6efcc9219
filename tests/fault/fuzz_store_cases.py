"""Seeded C-STORE fuzz cases: real instances, mutated byte by byte.

A case is a function of ``(seed, index)`` alone, so any failure is replayed with
:func:`make_case` from the two numbers its message names. The mutation class cycles
with the index (every class appears in every few cases); the base instance and the
details come from ``random.Random(f"{seed}/{index}")``.

Bases are real, valid instances: a generated CT slice in five transfer syntaxes and
pydicom's own test files (CT, MR, Secondary Capture; big endian, implicit VR, RLE,
JPEG, JPEG-LS, JPEG 2000, deflated). Each case gets a SOP Instance UID of its own
before it is mutated, so a mutated copy is never taken for a duplicate of a good one.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from fuzz_dicom import (
    COLUMNS,
    DEFLATED_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PIXEL_DATA,
    ROWS,
    SERIES_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_UID,
    UNDEFINED,
    Element,
    Encoding,
    deflate,
    find,
    inflate,
    pad_uid,
    replace_value,
    walk,
)
from tests.integration.peers import split_part10
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

# What the oracle demands of a case's answer.
EXPECT_SUCCESS = "success"  # an unmutated instance: must be stored
EXPECT_REFUSAL = "refusal"  # must not be acknowledged (blank SOP Instance UID, deflate bomb)
EXPECT_ORACLE = "oracle"  # either; a success must have stored a complete, readable instance

MUTATIONS = (
    "valid",
    "truncate-random",
    "truncate-boundary",
    "truncate-pixels",
    "drop-pixel-data",
    "flip-header",
    "wrong-length",
    "wrong-syntax-claim",
    "hostile-uid",
)

PYDICOM_BASES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle_2frame.dcm",
    "image_dfl.dcm",
)
GENERATED_SYNTAXES = (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    DEFLATED_LE,
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
)
# Transfer syntaxes a case may claim that its bytes are not in (all accepted by the node).
CLAIMABLE_SYNTAXES = (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    DEFLATED_LE,
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.90",
)

#: Marker in UIDs that try to escape the spool; the invariant checks look for it on disk.
ESCAPE_MARKER = "fuzz-escape"

# (label, value); "{n}" becomes the case index, so path-like UIDs differ between cases.
HOSTILE_UIDS: tuple[tuple[str, bytes], ...] = (
    ("empty", b""),
    ("NUL", b"\0"),
    ("NULs", b"\0\0\0\0"),
    ("blank", b"  "),
    ("dot", b"."),
    ("dot-dot", b".."),
    ("relative-escape", b"../../" + ESCAPE_MARKER.encode() + b"-{n}"),
    ("deep-escape", b"../../../../../../../../../tmp/" + ESCAPE_MARKER.encode() + b"-{n}"),
    ("absolute-path", b"/tmp/" + ESCAPE_MARKER.encode() + b"-{n}"),
    ("backslashes", b"..\\..\\" + ESCAPE_MARKER.encode() + b"-{n}"),
    ("slash-inside", b"1.2.3/4.{n}"),
    ("very-long", b"1.2." + b"9" * 250 + b".{n}"),
    ("65-characters", b"1.2.840.10008." + b"1" * 45 + b".{n}"),
    ("non-ascii-utf8", "1.2.3.\u00e9.{n}".encode()),
    ("non-ascii-latin1", "1.2.3.\u00e9.{n}".encode("latin-1")),
    ("leading-zeros", b"1.02.003.{n}"),
    ("empty-component", b"1..2.{n}"),
    ("trailing-dot", b"1.2.3.{n}."),
    ("control-characters", b"1.2\n3\r4\t.{n}"),
    ("format-string", b"%s%n%x.{n}"),
)
BLANK_UIDS = frozenset({"empty", "NUL", "NULs", "blank"})
HOSTILE_TARGETS = ("sop-instance", "command-only", "dataset-only", "study", "series", "dataset-sop-class")


@dataclass(frozen=True)
class BaseInstance:
    """A valid instance to mutate: its dataset bytes (inflated when deflated) and encoding."""

    name: str
    sop_class_uid: str
    transfer_syntax_uid: str
    data: bytes
    has_pixels: bool

    @property
    def encoding(self) -> Encoding:
        return Encoding.of(self.transfer_syntax_uid)

    def encoded(self, data: bytes | None = None) -> bytes:
        """``data`` (default: the base's) as sent on the wire: deflated for the deflated syntax."""
        data = self.data if data is None else data
        return deflate(data) if self.encoding.deflated else data


@dataclass(frozen=True)
class StoreCase:
    """One C-STORE to send: the request's UIDs, the claimed syntax and the exact dataset bytes."""

    seed: int
    index: int
    mutation: str
    detail: str
    base: str
    sop_class_uid: bytes  # the request's Affected SOP Class UID (and the negotiated abstract syntax)
    sop_instance_uid: bytes  # the request's Affected SOP Instance UID
    transfer_syntax_uid: str  # the syntax negotiated for the context (maybe not the bytes' own)
    body: bytes
    expect: str
    image: bool  # the stored instance must hold complete pixel data

    @property
    def label(self) -> str:
        return f"seed {self.seed} case {self.index} [{self.mutation}] {self.base}: {self.detail}"


def case_uid(seed: int, index: int) -> str:
    """A SOP Instance UID for case ``index`` of campaign ``seed`` (2.25 + 38 digits)."""
    digest = hashlib.sha256(f"fuzz/{seed}/{index}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def load_bases(work_dir: Path) -> list[BaseInstance]:
    """The valid instances every case starts from (generated CT slices and pydicom's test files)."""
    paths: list[tuple[str, Path]] = []
    for number, syntax in enumerate(GENERATED_SYNTAXES):
        series = generate_ct_series(
            work_dir / f"generated-{number}",
            geometry=SeriesGeometry(rows=32, columns=32, slices=1, pixel_spacing=(8.0, 8.0), slice_spacing=5.0),
            seed=7,
            transfer_syntax_uid=syntax,
        )
        paths.append((f"generated CT {pydicom.uid.UID(syntax).name}", series.paths[0]))
    for name in PYDICOM_BASES:
        found = get_testdata_file(name)
        if found is None:
            raise FileNotFoundError(f"pydicom test file {name} is not installed with pydicom")
        paths.append((name, Path(str(found))))
    bases = []
    for name, path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        syntax = str(meta.TransferSyntaxUID)
        body = split_part10(path.read_bytes())[1]
        data = inflate(body) if Encoding.of(syntax).deflated else body
        has_pixels = find(walk(data, Encoding.of(syntax)), PIXEL_DATA) is not None
        bases.append(BaseInstance(name, str(meta.MediaStorageSOPClassUID), syntax, data, has_pixels))
    return bases


def _with_uid(base: BaseInstance, tag: int, value: bytes, data: bytes | None = None) -> bytes:
    return replace_value(base.data if data is None else data, base.encoding, tag, pad_uid(value))


def make_case(bases: list[BaseInstance], seed: int, index: int) -> StoreCase:
    """Case ``index`` of campaign ``seed`` (see the module docstring)."""
    rng = random.Random(f"{seed}/{index}")
    mutation = MUTATIONS[index % len(MUTATIONS)]
    base = rng.choice(bases)
    uid = case_uid(seed, index).encode()
    data = _with_uid(base, SOP_INSTANCE_UID, uid)
    case = dict(seed=seed, index=index, mutation=mutation, base=base.name, sop_class_uid=base.sop_class_uid.encode(),
                sop_instance_uid=uid, transfer_syntax_uid=base.transfer_syntax_uid, expect=EXPECT_ORACLE,
                image=base.has_pixels)
    if mutation == "valid":
        return StoreCase(**{**case, "expect": EXPECT_SUCCESS}, detail="unmutated", body=base.encoded(data))
    if mutation == "wrong-syntax-claim":
        claims = [s for s in CLAIMABLE_SYNTAXES if s != base.transfer_syntax_uid]
        claim = rng.choice(claims)
        detail = f"bytes in {pydicom.uid.UID(base.transfer_syntax_uid).name}, claimed {pydicom.uid.UID(claim).name}"
        return StoreCase(**{**case, "transfer_syntax_uid": claim}, detail=detail, body=base.encoded(data))
    if mutation == "hostile-uid":
        return _hostile_case(rng, base, data, case)
    if base.encoding.deflated and mutation in ("truncate-random", "flip-header") and rng.random() < 0.5:
        return _deflate_stream_case(rng, base, data, case, mutation)
    mutated, detail = MUTATORS[mutation](rng, base, data, walk(data, base.encoding))
    return StoreCase(**case, detail=detail, body=base.encoded(mutated))


def _pixel_element(elements: list[Element]) -> Element | None:
    return find(elements, PIXEL_DATA)


def _truncate_random(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    cut = rng.randrange(1, len(data))
    return data[:cut], f"cut at byte {cut} of {len(data)}"


def _truncate_boundary(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    element = rng.choice(elements[1:])
    return data[: element.start], f"cut at byte {element.start}, exactly before {element.name}"


def _truncate_pixels(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    pixels = _pixel_element(elements)
    if pixels is None:
        return _truncate_random(rng, base, data, elements)
    cut = rng.randrange(pixels.value_start, pixels.end)
    return data[:cut], f"cut at byte {cut}, {cut - pixels.value_start} bytes into pixel data of {pixels.end - pixels.value_start}"


def _drop_pixel_data(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    pixels = _pixel_element(elements)
    if pixels is None:
        return _truncate_boundary(rng, base, data, elements)
    return data[: pixels.start] + data[pixels.end :], f"(7FE0,0010) removed (bytes {pixels.start}-{pixels.end})"


def _flip_header(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    """Flip 1-4 bytes before the pixel data. Compressed images keep their image pixel module
    (group 0028): the node never decodes pixel data, so it cannot know that a changed Rows no
    longer fits a JPEG stream; uncompressed images may have any byte flipped."""
    pixels = _pixel_element(elements)
    end = pixels.start if pixels is not None else len(data)
    compressed = pydicom.uid.UID(base.transfer_syntax_uid).is_encapsulated
    allowed = [e for e in elements if e.end <= end and not (compressed and e.tag >> 16 == 0x0028)]
    mutated = bytearray(data)
    flips = []
    for _ in range(rng.randint(1, 4)):
        element = rng.choice(allowed)
        position = rng.randrange(element.start, element.end)
        mask = rng.randrange(1, 256)
        mutated[position] ^= mask
        flips.append(f"byte {position} in {element.name} ^0x{mask:02X}")
    return bytes(mutated), ", ".join(flips)


def _wrong_length(rng: random.Random, base: BaseInstance, data: bytes, elements: list[Element]) -> tuple[bytes, str]:
    element = rng.choice(elements)
    maximum = 0xFFFF if element.length_size == 2 else 0xFFFFFFFF
    left = len(data) - element.value_start
    choices = [0, 1, element.length + 1, element.length + 2, element.length - 1, element.length - 2,
               left + rng.randint(1, 64), left + 2, maximum - 1, rng.randrange(0, maximum)]
    if element.length_size == 4:
        choices.append(UNDEFINED)
    length = rng.choice([c for c in choices if 0 <= c <= maximum and c != element.length] or [0])
    packed = struct.pack(f"{base.encoding.endian}{'H' if element.length_size == 2 else 'I'}", length)
    mutated = data[: element.length_offset] + packed + data[element.length_offset + element.length_size :]
    past = " (past the end)" if length != UNDEFINED and element.value_start + length > len(data) else ""
    return mutated, f"{element.name} length {element.length} -> {length}{past}"


MUTATORS = {
    "truncate-random": _truncate_random,
    "truncate-boundary": _truncate_boundary,
    "truncate-pixels": _truncate_pixels,
    "drop-pixel-data": _drop_pixel_data,
    "flip-header": _flip_header,
    "wrong-length": _wrong_length,
}


def _deflate_stream_case(rng: random.Random, base: BaseInstance, data: bytes, case: dict, mutation: str) -> StoreCase:  # type: ignore[type-arg]
    """Mutate the deflate stream itself rather than what it inflates to."""
    stream = bytearray(base.encoded(data))
    if mutation == "truncate-random":
        cut = rng.randrange(1, len(stream))
        return StoreCase(**case, detail=f"deflate stream cut at byte {cut} of {len(stream)}", body=bytes(stream[:cut]))
    position = rng.randrange(len(stream))
    mask = rng.randrange(1, 256)
    stream[position] ^= mask
    return StoreCase(**case, detail=f"deflate stream byte {position} ^0x{mask:02X}", body=bytes(stream))


def _hostile_case(rng: random.Random, base: BaseInstance, data: bytes, case: dict) -> StoreCase:  # type: ignore[type-arg]
    label, template = rng.choice(HOSTILE_UIDS)
    value = template.replace(b"{n}", str(case["index"]).encode())
    target = rng.choice(HOSTILE_TARGETS)
    detail = f"{label} UID {value[:40]!r}{'...' if len(value) > 40 else ''} as {target}"
    expect = EXPECT_ORACLE
    if target == "sop-instance":
        data = _with_uid(base, SOP_INSTANCE_UID, value, data)
        case = {**case, "sop_instance_uid": value}
    elif target == "command-only":
        case = {**case, "sop_instance_uid": value}
    elif target == "dataset-only":
        data = _with_uid(base, SOP_INSTANCE_UID, value, data)
    elif target == "study":
        data = _with_uid(base, STUDY_UID, value, data)
    elif target == "series":
        data = _with_uid(base, SERIES_UID, value, data)
    else:
        data = _with_uid(base, SOP_CLASS_UID, value, data)
    if label in BLANK_UIDS and target in ("sop-instance", "command-only", "dataset-only", "study", "series"):
        expect = EXPECT_REFUSAL  # an instance without an identity cannot be filed
    return StoreCase(**{**case, "expect": expect}, detail=detail, body=base.encoded(data))


# -- deflate bombs -----------------------------------------------------------------------


def _zero_blocks(size: int) -> bytes:
    """Raw deflate blocks (not final, byte aligned) that inflate to ``size`` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(bytes(size)) + compressor.flush(zlib.Z_FULL_FLUSH)


def deflate_bomb(base: BaseInstance, seed: int, index: int, inflated_bytes: int, consistent: bool) -> StoreCase:
    """A Deflated Explicit VR LE C-STORE of a few MB that inflates to about ``inflated_bytes``.

    Built from blocks of a full-flushed deflate stream of zeros repeated (they do not refer
    back across a full flush), so a bomb of gigabytes costs a few milliseconds to make.
    ``consistent``: Rows x Columns match the pixel data, so the instance is complete and only
    its size is wrong; otherwise the header still says the base's small image.
    """
    if base.encoding.implicit or not base.encoding.little or not base.has_pixels:
        raise ValueError(f"a deflate bomb needs an explicit VR little endian image base, not {base.name}")
    uid = case_uid(seed, index).encode()
    data = _with_uid(base, SOP_INSTANCE_UID, uid)
    chunk = 16 << 20
    pixel_bytes = max(chunk, inflated_bytes // chunk * chunk)
    detail = f"{len(data)}-byte header + {pixel_bytes} zero bytes of pixel data"
    if consistent:
        columns = 32768
        rows = pixel_bytes // (columns * 2)
        if rows * columns * 2 != pixel_bytes or rows > 0xFFFF:
            raise ValueError(f"cannot shape {pixel_bytes} bytes of 16-bit pixels as Rows x 32768")
        data = replace_value(data, base.encoding, ROWS, struct.pack("<H", rows))
        data = replace_value(data, base.encoding, COLUMNS, struct.pack("<H", columns))
        detail += f", Rows {rows} x Columns {columns} (consistent)"
    else:
        detail += " (the header's Rows x Columns need far fewer)"
    pixels = find(walk(data, base.encoding), PIXEL_DATA)
    assert pixels is not None
    head = data[: pixels.start] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream += _zero_blocks(chunk) * (pixel_bytes // chunk)
    stream += zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # the final (empty) block
    return StoreCase(
        seed=seed, index=index, mutation="deflate-bomb", detail=f"{len(stream)} bytes deflated: {detail}",
        base=base.name, sop_class_uid=base.sop_class_uid.encode(), sop_instance_uid=uid,
        transfer_syntax_uid=DEFLATED_LE, body=stream, expect=EXPECT_REFUSAL, image=True,
    )
