"""The element structure of an encoded dataset, checked without decoding any value.

A receiver must not acknowledge bytes that are not a whole dataset, and pydicom, which
is made to read what it can, silently accepts a dataset cut at an element boundary or
an element whose length runs past the end. :func:`walk` follows the encoding itself:
every element header, every declared length, every sequence item and delimiter, and
the fragments of encapsulated pixel data, down to the last byte. It raises
:class:`LayoutError` naming the element and the offset where the structure breaks, and
otherwise returns where the identifying header ends and where the pixel data lies.

It works on any buffer (``bytes`` or an ``mmap`` of a file as received) and reads only
element headers, so its cost does not depend on the size of the pixel data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview | mmap.mmap

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))  # Pixel, Float Pixel, Double Float Pixel Data
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
#: Explicit VRs whose element header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: Explicit VRs with a 16-bit length; any VR in neither set is refused (PS3.5 Table 6.2-1).
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
#: Nesting deeper than this is refused rather than followed (no real IOD comes close).
MAX_DEPTH = 32


class LayoutError(ValueError):
    """The bytes are not a well-formed dataset; the message says where and why."""


class PixelDataLayoutError(LayoutError):
    """The structure breaks inside the pixel data element (truncated pixel data, most often)."""


@dataclass(frozen=True)
class PixelElement:
    """Where the pixel data element's value lies.

    ``length`` is None for encapsulated pixel data, whose ``fragments`` (items after
    the basic offset table) are listed instead as ``(value offset, length)``, with the
    basic offset table's own ``(value offset, length)``.
    """

    tag: int
    value_offset: int
    length: int | None
    fragments: tuple[tuple[int, int], ...] = ()
    offset_table: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class DatasetLayout:
    """What :func:`walk` found: where to stop parsing for identification, and the pixel data."""

    header_end: int
    pixel: PixelElement | None


def walk(buffer: Buffer, *, implicit_vr: bool, little_endian: bool, start: int = 0,
         header_last_group: int = 0x0028) -> DatasetLayout:
    """Check the element structure of the dataset in ``buffer[start:]`` from its first byte to its last.

    Offsets (in the result and in error messages) count from ``start``.
    ``header_end`` is the offset of the first top-level element past group
    ``header_last_group`` (or of the pixel data, or the end): the identifying
    attributes all lie before it, so a parser need read no further. ``buffer`` is
    only read through ``struct.unpack_from`` (an ``mmap`` is never exported).
    """
    walker = _Walker(buffer, start, implicit_vr, "<" if little_endian else ">")
    return walker.top_level(header_last_group)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(self, data: Buffer, start: int, implicit_vr: bool, endian: str) -> None:
        self.data = data
        self.base = start
        self.size = len(data) - start
        self.implicit = implicit_vr
        self.tag_length = struct.Struct(f"{endian}HHI")
        self.tag_vr = struct.Struct(f"{endian}HH2s")
        self.short_length = struct.Struct(f"{endian}H")
        self.long_length = struct.Struct(f"{endian}I")

    def top_level(self, header_last_group: int) -> DatasetLayout:
        position, header_end, pixel = 0, None, None
        while position < self.size:
            tag, vr, length, value = self._element_header(position, self.implicit, self.size)
            if header_end is None and (tag >> 16) > header_last_group:
                header_end = position
            if tag in PIXEL_DATA_TAGS and pixel is None:
                try:
                    if length == UNDEFINED_LENGTH:
                        items, position = self._fragments(tag, value)
                        pixel = PixelElement(tag, value, None, tuple(items[1:]), items[0] if items else (0, 0))
                        continue
                    pixel = PixelElement(tag, value, length)
                    position = self._value_end(tag, vr, length, value, self.implicit, self.size, 0)
                except LayoutError as exc:
                    raise PixelDataLayoutError(str(exc)) from exc
                continue
            position = self._value_end(tag, vr, length, value, self.implicit, self.size, 0)
        return DatasetLayout(self.size if header_end is None else header_end, pixel)

    def _element_header(self, position: int, implicit: bool, end: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, value offset) of the element at ``position``."""
        if end - position < 8:
            raise LayoutError(f"dataset ends inside an element header at byte {position} ({end - position} bytes left)")
        if implicit:
            group, element, length = self.tag_length.unpack_from(self.data, self.base + position)
            return (group << 16) | element, None, length, position + 8
        group, element, vr = self.tag_vr.unpack_from(self.data, self.base + position)
        tag = (group << 16) | element
        if group == 0xFFFE:  # items and delimiters carry no VR
            return tag, None, self.long_length.unpack_from(self.data, self.base + position + 4)[0], position + 8
        if vr not in SHORT_VRS and vr not in LONG_VRS:
            raise LayoutError(f"element {_tag_text(tag)} at byte {position} has no valid VR ({vr!r})")
        if vr in LONG_VRS:
            if end - position < 12:
                raise LayoutError(f"dataset ends inside the header of {_tag_text(tag)} at byte {position}")
            return tag, vr, self.long_length.unpack_from(self.data, self.base + position + 8)[0], position + 12
        return tag, vr, self.short_length.unpack_from(self.data, self.base + position + 6)[0], position + 8

    def _value_end(self, tag: int, vr: bytes | None, length: int, value: int, implicit: bool, end: int,
                   depth: int) -> int:
        """The offset just past the value of the element whose value starts at ``value``."""
        if tag in (ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER):
            raise LayoutError(f"{_tag_text(tag)} at byte {value - 8} outside a sequence")
        if length == UNDEFINED_LENGTH:
            if vr not in (None, b"SQ", b"UN"):
                raise LayoutError(f"element {_tag_text(tag)} of VR {vr.decode()} has an undefined length")
            # An undefined-length UN holds a sequence in implicit VR little endian (PS3.5 6.2.2).
            return self._items(tag, value, implicit or vr == b"UN", end, depth + 1, defined_end=None)
        if length > end - value:
            raise LayoutError(
                f"element {_tag_text(tag)} at byte {value} declares {length} bytes but only {end - value} remain")
        if vr == b"SQ":
            self._items(tag, value, implicit, value + length, depth + 1, defined_end=value + length)
        return value + length

    def _items(self, tag: int, position: int, implicit: bool, end: int, depth: int, defined_end: int | None) -> int:
        """Walk the items of a sequence; returns the offset after it (after its delimiter if undefined)."""
        if depth > MAX_DEPTH:
            raise LayoutError(f"sequences nested more than {MAX_DEPTH} deep at {_tag_text(tag)}")
        while True:
            if defined_end is not None and position == defined_end:
                return position
            item_tag, _, length, value = self._element_header(position, True, end)
            if item_tag == SEQUENCE_DELIMITER and defined_end is None:
                return value
            if item_tag != ITEM:
                raise LayoutError(f"sequence {_tag_text(tag)} has {_tag_text(item_tag)} at byte {position} "
                                  "where an item was expected")
            position = self._item_contents(tag, value, length, implicit, end, depth)

    def _item_contents(self, tag: int, position: int, length: int, implicit: bool, end: int, depth: int) -> int:
        item_end = end if length == UNDEFINED_LENGTH else position + length
        if item_end > end:
            raise LayoutError(f"an item of {_tag_text(tag)} at byte {position} declares {length} bytes "
                              f"but only {end - position} remain")
        while position < item_end:
            element_tag, vr, element_length, value = self._element_header(position, implicit, item_end)
            if element_tag == ITEM_DELIMITER and length == UNDEFINED_LENGTH:
                return value
            position = self._value_end(element_tag, vr, element_length, value, implicit, item_end, depth)
        if length == UNDEFINED_LENGTH:
            raise LayoutError(f"an item of {_tag_text(tag)} ends without its delimiter")
        return position

    def _fragments(self, tag: int, position: int) -> tuple[list[tuple[int, int]], int]:
        """Walk encapsulated pixel data to its sequence delimiter; returns its items and the offset after it."""
        items: list[tuple[int, int]] = []
        while True:
            if self.size - position < 8:
                raise LayoutError("encapsulated pixel data ends before its sequence delimiter")
            item_tag, length = _item_header(self.tag_length, self.data, self.base + position)
            if item_tag == SEQUENCE_DELIMITER:
                return items, position + 8
            if item_tag != ITEM:
                raise LayoutError(f"encapsulated pixel data has {_tag_text(item_tag)} at byte {position} "
                                  "where an item was expected")
            if length == UNDEFINED_LENGTH or length > self.size - position - 8:
                raise LayoutError(f"a pixel data fragment at byte {position} declares {length} bytes but only "
                                  f"{self.size - position - 8} remain")
            items.append((position + 8, length))
            position += 8 + length


def _item_header(layout: struct.Struct, data: Buffer, position: int) -> tuple[int, int]:
    group, element, length = layout.unpack_from(data, position)
    return (group << 16) | element, length
