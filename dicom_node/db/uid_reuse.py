"""Warnings on the timelines of two studies that share a Series or SOP Instance UID.

Why: UIDs are meant to be globally unique, but real senders reuse them (a modality
with a broken UID root, an anonymiser that maps UIDs per series, a PACS merge). The
node keeps the studies apart (series are keyed by study) and says so on both
studies' timelines, naming the other study, so an admin can find and fix the sender.
One warning per kind and pair of studies: a reused series of 300 instances is one
event on each timeline, not 300. Only UIDs are named, never patient identifiers.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from dicom_node.db.models import StudyEvent

__all__ = ["SERIES_UID_REUSED", "SOP_INSTANCE_UID_REUSED", "warn_on_both"]

logger = logging.getLogger(__name__)

#: Study event kinds (the timeline shows them).
SERIES_UID_REUSED = "series_uid_reused"
SOP_INSTANCE_UID_REUSED = "sop_instance_uid_reused"

_EVENTS = StudyEvent.__table__


def _already_warned(connection: Connection, study_id: int, kind: str, other_study_uid: str) -> bool:
    found = connection.execute(
        select(_EVENTS.c.id)
        .where(_EVENTS.c.study_id == study_id, _EVENTS.c.kind == kind,
               _EVENTS.c.detail.contains(f"study {other_study_uid}", autoescape=True))
        .limit(1)
    ).first()
    return found is not None


def warn_on_both(
    connection: Connection, *, kind: str, at: datetime, warnings: list[tuple[int, str, str, str]]
) -> None:
    """Add a ``kind`` event per (study id, its UID, the other study's UID, detail), once per kind and pair.

    ``detail`` must name the other study as ``study <UID>`` (that is how a repeat is recognised).
    Runs in the caller's transaction; each new warning is also logged.
    """
    for study_id, study_uid, other_study_uid, detail in warnings:
        if f"study {other_study_uid}" not in detail:
            raise ValueError(f"a {kind} warning must name the other study {other_study_uid}: {detail!r}")
        if _already_warned(connection, study_id, kind, other_study_uid):
            continue
        connection.execute(insert(_EVENTS).values(study_id=study_id, at=at, kind=kind, detail=detail))
        logger.warning("study %s: %s", study_uid, detail)
