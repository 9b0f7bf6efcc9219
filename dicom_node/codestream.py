"""Does a compressed frame start the way its transfer syntax says? A look at the first bytes, not a decode.

A C-STORE can carry JPEG 2000 data under a JPEG Lossless transfer syntax, or RLE under
JPEG-LS: the fragments are structurally fine, and the instance would be acknowledged and
then fail to decode in every viewer and model. Each family has a signature at the start
of a frame: JPEG (all processes and JPEG-LS) an SOI marker followed by marker segments up
to a start-of-frame marker whose process must match the transfer syntax; JPEG 2000 a
codestream's SOC and SIZ markers or a JP2 signature box; RLE its 64-byte header of segment
count and offsets (PS3.5 Annex G). :func:`frame_problem` checks that signature and nothing
more, so a frame that passes may still be damaged further in - but never of another kind.
"""

from __future__ import annotations

#: Bytes of each frame looked at: marker segments before a JPEG start-of-frame rarely run longer.
HEAD_BYTES = 8192

_JPEG_DCT = frozenset((0xC0, 0xC1))  # baseline and extended sequential
_JPEG_LOSSLESS = frozenset((0xC3,))  # lossless, process 14
_JPEG_LS = frozenset((0xF7,))  # JPEG-LS (SOF55)
#: Start-of-frame markers by transfer syntax UID, and a name for messages.
_JPEG_FRAMES: dict[str, tuple[frozenset[int], str]] = {
    "1.2.840.10008.1.2.4.50": (_JPEG_DCT, "JPEG baseline"),
    "1.2.840.10008.1.2.4.51": (_JPEG_DCT, "JPEG extended"),
    "1.2.840.10008.1.2.4.57": (_JPEG_LOSSLESS, "JPEG lossless"),
    "1.2.840.10008.1.2.4.70": (_JPEG_LOSSLESS, "JPEG lossless"),
    "1.2.840.10008.1.2.4.80": (_JPEG_LS, "JPEG-LS"),
    "1.2.840.10008.1.2.4.81": (_JPEG_LS, "JPEG-LS"),
}
_JPEG_2000 = frozenset(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"))
_RLE = "1.2.840.10008.1.2.5"
#: Every start-of-frame marker (SOF0-SOF15 but DHT, JPG, DAC; and JPEG-LS SOF55).
_ANY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC, SIZ
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def frame_problem(transfer_syntax_uid: str, head: bytes, fragment_length: int) -> str | None:
    """Why the frame starting with ``head`` is not of ``transfer_syntax_uid``, or None.

    ``head`` is the first :data:`HEAD_BYTES` (or fewer) bytes of the frame's first
    fragment, whose whole length is ``fragment_length``. Transfer syntaxes without a
    check here pass.
    """
    if transfer_syntax_uid in _JPEG_FRAMES:
        expected, name = _JPEG_FRAMES[transfer_syntax_uid]
        return _jpeg_problem(head, expected, name)
    if transfer_syntax_uid in _JPEG_2000:
        if head.startswith(_J2K_CODESTREAM) or head.startswith(_JP2_SIGNATURE):
            return None
        return "does not start with a JPEG 2000 codestream (SOC, SIZ) or JP2 signature"
    if transfer_syntax_uid == _RLE:
        return _rle_problem(head, fragment_length)
    return None


def _jpeg_problem(head: bytes, expected: frozenset[int], name: str) -> str | None:
    if not head.startswith(b"\xff\xd8"):
        return f"does not start with a JPEG start-of-image marker ({name} expected)"
    position = 2
    while position + 4 <= len(head):
        if head[position] != 0xFF:
            return f"has no JPEG marker at byte {position} ({name} expected)"
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _ANY_SOF:
            if marker in expected:
                return None
            return f"is a JPEG frame of another process (marker FF{marker:02X}; {name} expected)"
        if marker == 0xDA:
            return f"has a JPEG scan before any start-of-frame marker ({name} expected)"
        position += 2 + int.from_bytes(head[position + 2 : position + 4], "big")
    return None  # its start-of-frame lies beyond the bytes looked at: nothing to say


def _rle_problem(head: bytes, fragment_length: int) -> str | None:
    if len(head) < 64:
        return "is shorter than the 64-byte RLE header"
    segments = int.from_bytes(head[0:4], "little")
    offsets = [int.from_bytes(head[4 + 4 * n : 8 + 4 * n], "little") for n in range(15)]
    if not 1 <= segments <= 15:
        return f"has no valid RLE header ({segments} segments)"
    used = offsets[:segments]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= fragment_length:
        return "has no valid RLE header (segment offsets out of order or past the fragment)"
    if any(offsets[segments:]):
        return "has no valid RLE header (offsets beyond its segment count)"
    return None
