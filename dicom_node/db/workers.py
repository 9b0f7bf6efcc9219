"""Worker heartbeats: each worker process keeps one ``worker_status`` row fresh; the UI lists them.

Why: GPU workers may run on other machines, where the node cannot see them; the
database is what they share. A worker writes its row every few seconds
(:class:`workers.heartbeat.WorkerHeartbeat`): queues, device, the load state of each
model, and the job it is running (taken from the ``jobs`` table, where the job's
claim names the worker, so it is never out of step with what the pipeline did).
A row whose ``last_seen_at`` is older than ``web.worker_stale_seconds`` is a worker
that stopped without saying so (killed, machine down): shown offline. A worker that
stops cleanly deletes its row; rows offline for a long time are pruned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Job, JobState, WorkerStatus, json_object

__all__ = [
    "FORGET_OFFLINE_AFTER",
    "WorkerView",
    "count_online",
    "list_workers",
    "prune_workers",
    "remove_worker",
    "upsert_worker",
]

logger = logging.getLogger(__name__)

#: Rows of workers silent for longer than this are deleted by the next heartbeat of any worker.
FORGET_OFFLINE_AFTER = timedelta(days=7)


@dataclass(frozen=True)
class WorkerView:
    """A worker as the dashboard, the models page and the API show it."""

    name: str
    queues: tuple[str, ...]
    device: str | None
    started_at: datetime
    last_seen_at: datetime
    models: dict[str, dict[str, Any]]
    current_job_id: int | None
    online: bool

    @property
    def models_loaded(self) -> int:
        return sum(1 for state in self.models.values() if state.get("state") == "loaded")


def _running_job_of(session: Session, worker: str) -> int | None:
    """The job this worker claimed and is running (the newest, should there be several)."""
    return session.scalar(
        select(Job.id).where(Job.state == JobState.RUNNING.value, Job.worker == worker[:255])
        .order_by(Job.started_at.desc(), Job.id.desc()).limit(1)
    )


def upsert_worker(
    sessions: sessionmaker[Session],
    *,
    name: str,
    queues: Sequence[str],
    device: str | None,
    started_at: datetime,
    now: datetime,
    models: Mapping[str, Mapping[str, Any]],
    current_job_id: int | None = None,
) -> int | None:
    """Write the heartbeat of worker ``name`` (``host:pid``): insert its row or refresh it.

    ``current_job_id`` none: the running job this worker claimed, from the jobs table.
    Returns the current job id written.
    """
    name = name[:255]
    values: dict[str, Any] = {
        "queues": ",".join(queues)[:64],
        "device": device[:64] if device else None,
        "started_at": started_at,
        "last_seen_at": now,
        "models": json.dumps(dict(models), sort_keys=True, default=str),
    }
    for attempt in range(2):
        with sessions.begin() as session:
            job = current_job_id if current_job_id is not None else _running_job_of(session, name)
            values["current_job_id"] = job
            changed = session.execute(update(WorkerStatus).where(WorkerStatus.name == name).values(**values)).rowcount
            if changed:
                return job
        try:
            with sessions.begin() as session:
                session.add(WorkerStatus(name=name, **values))
            return job
        except IntegrityError:  # inserted meanwhile (one name is one process, so hardly ever): update it
            if attempt:
                raise
    return None


def remove_worker(sessions: sessionmaker[Session], name: str) -> bool:
    """Delete the row of a worker that stopped cleanly; True if there was one."""
    with sessions.begin() as session:
        return bool(session.execute(delete(WorkerStatus).where(WorkerStatus.name == name[:255])).rowcount)


def prune_workers(sessions: sessionmaker[Session], *, now: datetime, older_than: timedelta = FORGET_OFFLINE_AFTER) -> int:
    """Delete rows of workers not seen for ``older_than``; returns how many."""
    with sessions.begin() as session:
        return int(session.execute(
            delete(WorkerStatus).where(WorkerStatus.last_seen_at < now - older_than)
        ).rowcount or 0)


def _models(raw: str | None, name: str) -> dict[str, dict[str, Any]]:
    value = json_object(raw, f"models column of worker {name}")
    return {str(k): dict(v) if isinstance(v, Mapping) else {"state": str(v)} for k, v in value.items()}


def list_workers(sessions: sessionmaker[Session], *, now: datetime, stale_seconds: float) -> list[WorkerView]:
    """Every known worker, online ones first, then by name; online: seen within ``stale_seconds``."""
    limit = now - timedelta(seconds=stale_seconds)
    with sessions() as session:
        rows = session.scalars(select(WorkerStatus).order_by(WorkerStatus.name)).all()
    views = [
        WorkerView(
            name=row.name, queues=tuple(q for q in row.queues.split(",") if q), device=row.device,
            started_at=row.started_at, last_seen_at=row.last_seen_at, models=_models(row.models, row.name),
            current_job_id=row.current_job_id, online=row.last_seen_at >= limit,
        )
        for row in rows
    ]
    return sorted(views, key=lambda w: (not w.online, w.name))


def count_online(sessions: sessionmaker[Session], *, now: datetime, stale_seconds: float) -> int:
    """How many workers sent a heartbeat within ``stale_seconds``."""
    return sum(1 for w in list_workers(sessions, now=now, stale_seconds=stale_seconds) if w.online)
