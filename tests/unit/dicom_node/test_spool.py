"""The spool: file meta encoding, durable writes, safe names, crash leftovers."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from dicom_node.spool import PART_SUFFIX, Spool, file_meta_bytes, uid_to_filename


def test_file_meta_is_what_pydicom_reads_back() -> None:
    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.4.90", "CT_SCANNER")
    dataset = pydicom.dcmread(io.BytesIO(meta + b"\x08\x00\x60\x00CS\x02\x00CT"), force=False)
    assert meta[128:132] == b"DICM"
    assert dataset.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert dataset.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert dataset.file_meta.SourceApplicationEntityTitle.strip() == "CT_SCANNER"
    assert dataset.file_meta.FileMetaInformationGroupLength == len(meta) - 132 - 12


@pytest.mark.parametrize(
    "uid, safe",
    [("1.2.840.113619.2.55", True), ("1.2.3 ", True), ("../../etc/passwd", False), ("1.2.abc", False), ("", False)],
)
def test_uid_file_names_never_escape_the_spool(uid: str, safe: bool) -> None:
    name = uid_to_filename(uid)
    assert "/" not in name and name not in ("", ".", "..")
    assert (name == uid.strip()) is safe
    assert uid_to_filename(uid) == name


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.4")
    stored = spool.write(relative, [b"first", b"-copy"])
    assert stored.path.read_bytes() == b"first-copy" and stored.size_bytes == 10
    spool.write(relative, [b"second"])
    assert stored.path.read_bytes() == b"second"
    assert not list((tmp_path / "spool").rglob(f"*{PART_SUFFIX}"))


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    class Exploding:
        def __buffer__(self, flags: int) -> memoryview:
            raise OSError("disk on fire")

    with pytest.raises(Exception):
        spool.write("1/2/3.dcm", [b"ok", Exploding()])  # type: ignore[list-item]
    assert not list((tmp_path / "spool").rglob("*.*"))


def test_partial_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    kept = spool.write("1/2/3.dcm", [b"complete"])
    leftover = kept.path.parent / f".4.dcm.abc{PART_SUFFIX}"
    leftover.write_bytes(b"half")
    assert spool.remove_partial_files() == 1
    assert not leftover.exists() and kept.path.exists()
