"""Which queued job a worker runs next: rule priority, then expected cost with aging, then the loaded volume.

Why: a queue message only wakes a worker up. With one worker (the embedded node, or one
GPU) first-in-first-out made a 6 s detection wait minutes behind the segmentation of the
same study, and every study behind the one being segmented waited for all of it. So a
worker that has taken its job slot does not run the job its message names but claims
the best queued job from the database, ranked by:

1. the rule's ``priority``, highest first (what an admin asked for always wins);
2. the expected cost, lowest first: the pipeline's expected duration minus the seconds
   the job has waited since it was queued (``state_changed_at``) - shortest job first,
   with aging, so no job starves: a long job waits at most about its own expected
   duration beyond the short ones queued before it, and once it has waited that long
   it goes before short jobs that arrive later;
3. minus the seconds this worker spent loading the volume it holds now, for jobs on
   that series (they skip the load), so a study's jobs share one loaded volume when
   that costs nobody more than the load it saves;
4. the job id (first queued first) on equal footing.

The expected duration of a pipeline is learned at this site: the median wall time
(``finished_at - started_at``) of its last :data:`HISTORY` jobs that ran the model
(succeeded, held, released, discarded; a declined or failed run says nothing about
the model's time). A pipeline without such history takes what its model registry entry
declares (``expected_seconds``), else the median of the other queued pipelines' expected
durations (0 when none is known, so a node without history or declarations stays
first-in-first-out).

Each message still runs at most one job, and there are at least as many messages as
queued jobs (one per job queued, plus re-sends), so every queued job is run; a message
whose claim finds nothing queued (others took the jobs) is a no-op. The claim itself is
:func:`dicom_node.db.jobs.claim_job` (a conditional UPDATE): two workers that rank the
same job first do not both run it; the loser takes its next candidate.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs
from dicom_node.db.models import Job, JobState

__all__ = ["HISTORY", "CachedVolume", "QueuedJob", "claim_next_job", "expected_durations", "rank_queued_jobs"]

logger = logging.getLogger(__name__)

#: How many of a pipeline's latest jobs that ran the model its expected duration is the median of.
HISTORY = 20
#: The end states of a job whose model ran (its wall time is the model's cost at this site).
_RAN_THE_MODEL = (JobState.SUCCEEDED.value, JobState.HELD.value, JobState.RELEASED.value, JobState.DISCARDED.value)


@dataclass(frozen=True)
class CachedVolume:
    """The volume a worker holds in memory now: its series and what loading it cost (seconds)."""

    series_instance_uid: str
    load_seconds: float


@dataclass(frozen=True)
class QueuedJob:
    """A queued job as the scheduler ranks it (:func:`rank_queued_jobs`)."""

    job_id: int
    pipeline: str
    priority: int
    series_instance_uid: str
    waited_seconds: float
    expected_seconds: float
    #: Expected duration minus waited seconds minus the load the worker's volume saves: lower runs first.
    cost: float


def _median_wall_seconds(session: Session, pipeline: str, history: int) -> float | None:
    rows = session.execute(
        select(Job.started_at, Job.finished_at)
        .where(Job.pipeline == pipeline, Job.state.in_(_RAN_THE_MODEL), Job.started_at.is_not(None),
               Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc(), Job.id.desc()).limit(history)
    ).all()
    walls = [(finished - started).total_seconds() for started, finished in rows]
    return float(statistics.median(walls)) if walls else None


def expected_durations(
    sessions: sessionmaker[Session], pipelines: Iterable[str], *, declared: Mapping[str, float] | None = None,
    history: int = HISTORY,
) -> dict[str, float]:
    """Expected seconds per pipeline of ``pipelines``: learned at this site, else ``declared`` (model id ->
    seconds, from the model registry), else the median of the others (0 when none is known)."""
    names = sorted(set(pipelines))
    if history < 1:
        raise ValueError(f"expected_durations: history must be >= 1, got {history}")
    known: dict[str, float] = {}
    with sessions() as session:
        for pipeline in names:
            learned = _median_wall_seconds(session, pipeline, history)
            if learned is not None:
                known[pipeline] = learned
            elif declared and pipeline in declared:
                known[pipeline] = float(declared[pipeline])
    neutral = float(statistics.median(known.values())) if known else 0.0
    return {pipeline: known.get(pipeline, neutral) for pipeline in names}


def rank_queued_jobs(
    sessions: sessionmaker[Session], *, now: datetime, declared: Mapping[str, float] | None = None,
    cached: CachedVolume | None = None, history: int = HISTORY,
) -> list[QueuedJob]:
    """Every queued job, the one to run first first (see the module docstring for the order)."""
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.pipeline, Job.priority, Job.series_instance_uid, Job.state_changed_at)
            .where(Job.state == JobState.QUEUED.value)
        ).all()
    if not rows:
        return []
    expected = expected_durations(sessions, (row[1] for row in rows), declared=declared, history=history)
    ranked = []
    for job_id, pipeline, priority, series_uid, since in rows:
        waited = max(0.0, (now - since).total_seconds())
        saved = cached.load_seconds if cached is not None and cached.series_instance_uid == series_uid else 0.0
        ranked.append(QueuedJob(int(job_id), str(pipeline), int(priority or 0), str(series_uid), waited,
                                expected[pipeline], expected[pipeline] - waited - saved))
    ranked.sort(key=lambda job: (-job.priority, job.cost, job.job_id))
    return ranked


def claim_next_job(
    sessions: sessionmaker[Session], *, worker: str, now: datetime, lease_seconds: float,
    declared: Mapping[str, float] | None = None, cached: CachedVolume | None = None, history: int = HISTORY,
) -> jobs.JobClaim | None:
    """Claim the best queued job for ``worker`` (:func:`rank_queued_jobs`); None when none is queued.

    A job another worker claimed since the ranking is skipped for the next one; the claim
    is :func:`dicom_node.db.jobs.claim_job`, so it records what any claim records.
    """
    ranked = rank_queued_jobs(sessions, now=now, declared=declared, cached=cached, history=history)
    for candidate in ranked:
        claim = jobs.claim_job(sessions, candidate.job_id, worker=worker, now=now, lease_seconds=lease_seconds)
        if claim is not None:
            if len(ranked) > 1:
                logger.info("job %d (%s, priority %d, expected %.1f s, waited %.1f s) chosen from %d queued",
                            candidate.job_id, candidate.pipeline, candidate.priority, candidate.expected_seconds,
                            candidate.waited_seconds, len(ranked))
            return claim
    return None
