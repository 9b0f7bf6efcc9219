"""Split a ``multipart/related`` body (a WADO-RS answer) into its parts as it streams in, each part into a sink.

Why streaming: a series of 1,000 CT slices is about 500 MB; the worker writes each part
to its own file as the bytes arrive and never holds more than one network chunk plus a
delimiter's length (RFC 2046 5.1: parts are separated by ``CRLF--boundary``, the last
one followed by ``--``). The parser is told nothing about the parts' sizes, so it works
on any server's answer, with or without a ``Content-Length`` per part.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["MultipartError", "PartSink", "boundary_of", "split_multipart"]

_MAX_HEADERS = 16 * 1024
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class MultipartError(ValueError):
    """The body is not a complete multipart body with the announced boundary."""


class PartSink(Protocol):
    """Where one part's bytes go: :meth:`write` as they arrive, :meth:`close` once the part ended."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a ``multipart/...`` Content-Type; :class:`MultipartError` when it has none."""
    if not content_type.lower().startswith("multipart/"):
        raise MultipartError(f"the answer is {content_type or 'untyped'}, not multipart")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MultipartError(f"Content-Type {content_type!r} names no boundary")
    return match.group(1) or match.group(2)


def _headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def split_multipart(chunks: Iterable[bytes], boundary: str,
                    open_part: Callable[[dict[str, str]], PartSink]) -> int:
    """Feed every part of the body in ``chunks`` to a sink from ``open_part(its headers, lower-case names)``;
    returns the number of parts. Raises :class:`MultipartError` for a body that ends before its closing
    delimiter or whose part headers never end (the sink of an unfinished part is not closed)."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    keep = len(delimiter) + 1
    buffer = b"\r\n"  # so that a delimiter at the very start is found like every other one
    state, sink, parts = "preamble", None, 0
    for chunk in chunks:
        buffer += chunk
        while True:
            if state in ("preamble", "body"):
                at = buffer.find(delimiter)
                if at < 0:
                    if state == "body" and len(buffer) > keep:
                        assert sink is not None
                        sink.write(buffer[:-keep])
                        buffer = buffer[-keep:]
                    elif state == "preamble":
                        buffer = buffer[-keep:]
                    break
                if state == "body":
                    assert sink is not None
                    sink.write(buffer[:at])
                    sink.close()
                    sink, parts = None, parts + 1
                buffer, state = buffer[at + len(delimiter):], "delimiter"
            elif state == "delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    return parts  # the closing delimiter; the epilogue is ignored
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    break
                buffer, state = buffer[line_end:], "headers"  # keep the CRLF: headers end at CRLF CRLF
            else:  # headers
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEADERS:
                        raise MultipartError(f"a part's headers run past {_MAX_HEADERS} bytes")
                    break
                sink = open_part(_headers(buffer[2:end]))
                buffer, state = buffer[end + 4:], "body"
    raise MultipartError(f"the body ended after {parts} part(s), before its closing boundary")
