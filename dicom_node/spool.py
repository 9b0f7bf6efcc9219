"""Durable storage of received instances: the bytes as sent, never transcoded.

An instance is written to a temporary name in its final directory, flushed to disk with
``fdatasync``, renamed into place and the directory entry synced, so after a crash at
any moment a file under its final name is always complete, and a leftover ``*.part``
file is never mistaken for an instance. Paths are built here and nowhere else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PART_SUFFIX = ".part"
# The node's implementation class: a UUID-derived UID (PS3.5 B.2), unique without a registered root.
IMPLEMENTATION_CLASS_UID = "2.25.198902813236010109457631078717880827925"
IMPLEMENTATION_VERSION_NAME = "DICOM_NODE_01"


def uid_to_filename(uid: str) -> str:
    """A file-name-safe form of a UID: the UID itself when it is well formed, else a hash.

    Real-world UIDs are sometimes malformed (letters, leading zeros, trailing spaces);
    such an instance is still accepted, but its UID never reaches the file system raw.
    """
    uid = uid.strip("\0 ")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """Encode one Explicit VR Little Endian element (file meta group only)."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str | None
) -> bytes:
    """The 128-byte preamble, ``DICM`` and a File Meta Information group (PS3.10 7.1).

    Hand-encoded because this runs once per received instance and pydicom's general
    writer costs more than the rest of the receive path together.
    """
    elements = [
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _even(sop_class_uid.encode("ascii", "replace"), b"\0")),
        _element(0x0002, 0x0003, b"UI", _even(sop_instance_uid.encode("ascii", "replace"), b"\0")),
        _element(0x0002, 0x0010, b"UI", _even(transfer_syntax_uid.encode("ascii"), b"\0")),
        _element(0x0002, 0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0")),
        _element(0x0002, 0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
    ]
    if source_ae_title:
        elements.append(_element(0x0002, 0x0016, b"AE", _even(source_ae_title.encode("ascii", "replace"), b" ")))
    body = b"".join(elements)
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed: the absolute path and the path relative to the spool."""

    path: Path
    relative: str
    size_bytes: int


class StagingFile:
    """A file being written under a temporary ``*.part`` name, not yet an instance.

    :meth:`append` writes straight from the caller's buffer (no copy);
    :meth:`Spool.commit` makes it durable and gives it its final name; :meth:`discard`
    removes it. A crash leaves only a ``*.part`` file, which start-up removes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def append(self, data: bytes | memoryview) -> None:
        """Write all of ``data``; raises :class:`OSError` (for example ENOSPC) as the disk does."""
        if self._fd is None:
            raise ValueError(f"staging file {self.path} is already closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written

    def sync(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and delete the file (nothing happens if it was already moved away)."""
        self.close()
        self.path.unlink(missing_ok=True)


class Spool:
    """The directory tree of received instances: ``<study>/<series>/<sop>.dcm``.

    Instances being received are staged in ``.incoming/`` under the same root (the same
    file system), so accepting one is a rename, not a copy.
    """

    STAGING = ".incoming"

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return f"{uid_to_filename(study_uid)}/{uid_to_filename(series_uid)}/{uid_to_filename(sop_uid)}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def stage(self) -> StagingFile:
        """A new staging file for an instance whose final name is not known yet."""
        directory = self.root / self.STAGING
        directory.mkdir(exist_ok=True)
        return StagingFile(directory / f"{uuid.uuid4().hex}{PART_SUFFIX}")

    def write(self, relative: str, chunks: list[bytes] | tuple[bytes, ...]) -> StoredFile:
        """Write ``chunks`` durably under ``relative``, replacing any file already there."""
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = StagingFile(final.parent / f".{final.name}.{uuid.uuid4().hex}{PART_SUFFIX}")
        try:
            for chunk in chunks:
                staged.append(chunk)
        except BaseException:
            staged.discard()
            raise
        return self.commit(staged, relative)

    def commit(self, staged: StagingFile, relative: str) -> StoredFile:
        """Make ``staged`` durable and rename it to ``relative``, replacing any file already there.

        On failure the staging file is left for the caller to discard or keep.
        """
        final = self.root / relative
        directory = final.parent
        created = not directory.is_dir()
        if created:
            directory.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            staged.sync()
        staged.close()
        os.replace(staged.path, final)
        if self.fsync:
            self._sync_directory(directory)
            if created:
                self._sync_directory(directory.parent)
                self._sync_directory(directory.parent.parent)
        return StoredFile(final, relative, staged.size)

    def remove(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def remove_partial_files(self) -> int:
        """Delete ``*.part`` files a crash left behind; they were never acknowledged."""
        removed = 0
        for leftover in self.root.rglob(f"*{PART_SUFFIX}"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.warning("removed %d partial file(s) left by an interrupted write in %s", removed, self.root)
        return removed

    @staticmethod
    def _sync_directory(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_bytes(path: Path) -> int:
    """Free space available to the node on the file system holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize
