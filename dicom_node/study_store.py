"""How workers reach the instances of a series: the ``StudyStore`` seam.

Why: a worker on another machine must not build spool paths by hand. The shared-
filesystem store below maps a series to its files through the index; an HTTP or
object-store implementation can replace it without touching the workers.

A series is named by its study and its Series Instance UID: a sender may reuse a
series UID in another study (issue 20), and the index then holds two series with
that UID, one per study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Series, Study

__all__ = ["AmbiguousSeries", "FileStudyStore", "SeriesNotFound", "StudyStore"]


class SeriesNotFound(LookupError):
    """The index has no instances of the requested series."""


class AmbiguousSeries(SeriesNotFound):
    """A Series Instance UID asked for without its study, and more than one study has it."""


class StudyStore(Protocol):
    def series_files(self, series_instance_uid: str, *, study_instance_uid: str | None = None) -> list[Path]:
        """Paths of every received instance of a series of ``study_instance_uid``, readable by this process.

        Without the study, the series UID must belong to one study only (AmbiguousSeries otherwise).
        """
        ...


class FileStudyStore:
    """Instances in the node's spool directory, on a filesystem shared with the workers."""

    def __init__(self, sessions: sessionmaker[Session], spool_dir: Path) -> None:
        self._sessions = sessions
        self._spool_dir = spool_dir

    def series_files(self, series_instance_uid: str, *, study_instance_uid: str | None = None) -> list[Path]:
        query = (
            select(Instance.path)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_instance_uid == series_instance_uid)
            .order_by(Instance.id)
        )
        where = f"series {series_instance_uid}"
        with self._sessions() as session:
            if study_instance_uid is not None:
                query = query.join(Study, Study.id == Series.study_id).where(
                    Study.study_instance_uid == study_instance_uid)
                where += f" of study {study_instance_uid}"
            else:
                studies = session.scalar(select(func.count(Series.id))
                                         .where(Series.series_instance_uid == series_instance_uid))
                if studies and studies > 1:
                    raise AmbiguousSeries(f"series {series_instance_uid} is in {studies} studies (the sender "
                                          "reused its UID); name the study")
            rows = session.execute(query).all()
        if not rows:
            raise SeriesNotFound(f"{where} has no received instances")
        return [self._spool_dir / str(r[0]) for r in rows]
