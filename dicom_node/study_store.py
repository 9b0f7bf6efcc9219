"""How workers reach the instances of a series: the ``StudyStore`` seam.

Why: a worker on another machine must not build spool paths by hand. The shared-
filesystem store below maps a Series Instance UID to its files through the index;
an HTTP or object-store implementation can replace it without touching the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Series

__all__ = ["FileStudyStore", "SeriesNotFound", "StudyStore"]


class SeriesNotFound(LookupError):
    """The index has no instances of the requested series."""


class StudyStore(Protocol):
    def series_files(self, series_instance_uid: str) -> list[Path]:
        """Paths of every received instance of a series, readable by this process."""
        ...


class FileStudyStore:
    """Instances in the node's spool directory, on a filesystem shared with the workers."""

    def __init__(self, sessions: sessionmaker[Session], spool_dir: Path) -> None:
        self._sessions = sessions
        self._spool_dir = spool_dir

    def series_files(self, series_instance_uid: str) -> list[Path]:
        with self._sessions() as session:
            rows = session.execute(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_instance_uid == series_instance_uid)
                .order_by(Instance.id)
            ).all()
        if not rows:
            raise SeriesNotFound(f"series {series_instance_uid} has no received instances")
        return [self._spool_dir / str(r[0]) for r in rows]
