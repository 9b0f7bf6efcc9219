"""What an operator does with a held result: release it to its destinations, or discard it.

Why a service: the web page, the REST API and the CLI offer the same two actions and
must behave alike (the job's destinations resolved as when it ran, the outbox files of
a discarded result removed, a timeline event naming who did it). Releasing needs no
queue: the deliveries are due at once and the node's next sweep sends them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import config_repo, jobs
from dicom_node.spool import Spool

__all__ = ["Released", "discard_held", "release_held"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Released:
    """A released job: the destinations its results go to and the deliveries that carry them."""

    job_id: int
    destinations: list[str]
    delivery_ids: list[int]


def release_held(sessions: sessionmaker[Session], job_id: int, *, now: datetime, by: str,
                 delivery_max_attempts: int) -> Released | None:
    """Send held job ``job_id``'s results to its destinations; None when it is not held."""
    held = jobs.held_job(sessions, job_id)
    if held is None:
        return None
    names = config_repo.resolve_destination_names(sessions, held.destinations)
    ids = jobs.release_job(sessions, job_id, now=now, destinations=names,
                           delivery_max_attempts=delivery_max_attempts, by=by)
    if ids is None:
        return None
    logger.info("job %d (%s): held results released by %s to %s", job_id, held.pipeline, by, ", ".join(names) or "-")
    return Released(job_id, names, ids)


def discard_held(sessions: sessionmaker[Session], outbox: Spool, job_id: int, *, now: datetime, by: str) -> bool:
    """Throw held job ``job_id``'s results away (their outbox files too); False when it is not held."""
    paths = jobs.discard_job(sessions, job_id, now=now, by=by)
    if paths is None:
        return False
    for path in paths:
        outbox.remove(path)
    logger.info("job %d: held results discarded by %s (%d file(s) removed)", job_id, by, len(paths))
    return True
