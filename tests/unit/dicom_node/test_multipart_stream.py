"""The streaming multipart splitter a worker reads WADO-RS answers with: every part back byte for byte, whatever
the chunking, from the node's own writer and from another writer; a truncated body is an error, not fewer parts."""

from __future__ import annotations

import os
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from pathlib import Path

import pytest

from dicom_node.multipart_stream import MultipartError, boundary_of, split_multipart
from dicom_node.stow import multipart_body


class _Collect:
    def __init__(self, parts: list[tuple[dict[str, str], bytearray]], headers: dict[str, str]) -> None:
        self.data = bytearray()
        self.closed = False
        parts.append((headers, self.data))

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.data += data

    def close(self) -> None:
        self.closed = True


def _split(body: bytes, boundary: str, chunk: int) -> list[tuple[dict[str, str], bytearray]]:
    parts: list[tuple[dict[str, str], bytearray]] = []
    chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
    count = split_multipart(chunks, boundary, lambda headers: _Collect(parts, headers))
    assert count == len(parts)
    return parts


@pytest.mark.parametrize("chunk", [1, 7, 41, 4096, 1 << 20])
def test_the_nodes_own_bodies_split_back_into_the_files(tmp_path: Path, chunk: int) -> None:
    # Contents that look like delimiters (CRLF, dashes, the boundary without its CRLF, a shorter one, a part
    # ending in CRLF) and an empty file; a full CRLF--boundary never occurs in a part (the writer's duty).
    boundary = "b0e1a2"
    contents = [os.urandom(3000), b"\r\n--b0e1a\r\n-b0e1a2x", b"", b"--b0e1a2--", b"x\r\n", os.urandom(70_000) + b"\r\n"]
    paths = []
    for k, content in enumerate(contents):
        paths.append(tmp_path / f"{k}.dcm")
        paths[-1].write_bytes(content)
    length, chunks = multipart_body(paths, boundary)
    body = b"".join(chunks)
    assert len(body) == length
    parts = _split(body, boundary, chunk)
    assert [bytes(data) for _, data in parts] == contents
    assert all(headers["content-type"] == "application/dicom" for headers, _ in parts)


def test_a_body_from_another_writer_with_preamble_and_part_headers() -> None:
    message = MIMEMultipart("related", type="application/dicom")
    message.preamble = "a preamble a parser must skip"
    payloads = [os.urandom(500).hex().encode(), b"short"]  # text: the email package rewrites binary line ends
    for k, payload in enumerate(payloads):
        part = MIMEApplication(payload, "dicom", _encoder=lambda p: None)
        part.set_payload(payload)
        part["Content-Location"] = f"/instances/{k}"
        message.attach(part)
    raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    body = raw.partition(b"\r\n\r\n")[2]
    boundary = boundary_of(str(message["Content-Type"]))
    assert boundary == message.get_boundary()
    parts = _split(body, boundary, 13)
    assert [bytes(data) for _, data in parts] == payloads
    assert [headers["content-location"] for headers, _ in parts] == ["/instances/0", "/instances/1"]


def test_a_truncated_body_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(os.urandom(500))
    _, chunks = multipart_body([path, path], "xyz")
    body = b"".join(chunks)
    for cut in (len(body) - 3, len(body) // 2, 10):
        with pytest.raises(MultipartError, match="before its closing boundary"):
            _split(body[:cut], "xyz", 64)


def test_boundary_of_content_types() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == "abc"
    assert boundary_of('multipart/related; boundary="a b"; type="application/dicom"') == "a b"
    with pytest.raises(MultipartError, match="not multipart"):
        boundary_of("application/json")
    with pytest.raises(MultipartError, match="names no boundary"):
        boundary_of("multipart/related")
