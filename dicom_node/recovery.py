"""Start-up recovery after an unclean stop: the spool and the index agree again.

A crash can leave two things behind: ``*.part`` files (never acknowledged; removed by
the spool) and complete files renamed into place whose index row was not yet committed
(also never acknowledged, but whole and durable). Those are indexed here rather than
left as orphans, so the study they belong to is complete and nothing received is lost.
Only directories changed since shortly before the last indexed instance are walked.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo
from dicom_node.db.models import Instance
from dicom_node.header import InvalidDataset, parse_header_file
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

CLEAN_STOP_MARKER = "clean-stop"
_MARGIN = timedelta(minutes=10)


def _recent_files(root: Path, since: float) -> list[Path]:
    """``*.dcm`` files in series directories modified at or after ``since``.

    A file added to an existing series changes only the series directory's time, so
    every study directory is listed, but only recently changed series are read.
    """
    found: list[Path] = []
    for study in os.scandir(root):
        if not study.is_dir() or study.name.startswith("."):
            continue  # .incoming holds instances still being received
        for series in os.scandir(study.path):
            if series.is_dir() and series.stat().st_mtime >= since:
                found.extend(Path(entry.path) for entry in os.scandir(series.path) if entry.name.endswith(".dcm"))
    return found


def reindex_orphans(spool: Spool, sessions: sessionmaker[Session], indexer: InstanceIndexer) -> int:
    """Index complete spool files the index lacks; returns how many were recovered."""
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    since = (newest - _MARGIN).timestamp() if newest else 0.0
    recovered = 0
    for path in _recent_files(spool.root, since):
        relative = path.relative_to(spool.root).as_posix()
        try:
            with open(path, "rb") as stream:
                read_preamble(stream, False)
                meta = _read_file_meta_info(stream)
                offset = stream.tell()
            header = parse_header_file(
                path,
                offset,
                str(meta.TransferSyntaxUID),
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
            )
        except (InvalidDataset, OSError, ValueError, AttributeError) as exc:
            logger.error("spool file %s is not a usable instance (%s); left in place", relative, exc)
            continue
        existing = repo.find_instance(sessions, header.sop_instance_uid)
        if existing is not None:
            continue
        indexer.index(
            IndexRecord(
                header=header,
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                relative_path=relative,
                size_bytes=path.stat().st_size,
                received_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc),
                association_id=None,
            )
        )
        recovered += 1
    if recovered:
        logger.warning("indexed %d instance(s) that were written but not indexed before an unclean stop", recovered)
    return recovered
