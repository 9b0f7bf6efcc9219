"""The jobs and deliveries a worker process is running now, so that it can stop without losing them.

Why: a stop (SIGTERM from systemd, which kills after ``TimeoutStopSec``) must not wait for
the whole queue, nor leave a half-run job to be found only when its lease expires. Every
task of the process claims its job or delivery through one :class:`WorkInFlight`; once a
stop is requested, tasks claim nothing more (the job stays ``queued`` and its id goes
back to the broker), the work already claimed gets the stop grace period, and what is
still unfinished then is handed back (:func:`hand_back_unfinished`): queued or pending
again, the attempt not counted, a study event saying why, a new message sent so that
another worker (or this node after its restart) picks it up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs
from dicom_node.queue import JobQueue

__all__ = ["HandedBack", "StopRequested", "WorkInFlight", "hand_back_unfinished"]

logger = logging.getLogger(__name__)

WorkKind = Literal["job", "delivery"]
C = TypeVar("C")

#: How long :meth:`WorkInFlight.unfinished` waits for claims already being written when the stop comes.
CLAIM_SETTLE_SECONDS = 5.0


class StopRequested(Exception):
    """This process is stopping: a task must not claim new work."""


class WorkInFlight:
    """What this process has claimed (job and delivery ids with their attempt), and whether it stops.

    One per worker process, shared by its pipeline (:class:`workers.context.WorkerContext`)
    and its dispatcher. Thread-safe: the worker's task threads claim and release, the
    thread that stops the process waits and hands back.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._stopping = False
        self._claiming = 0
        self._claimed: dict[tuple[WorkKind, int], int] = {}

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping

    def acquire(self, slots: threading.Semaphore, poll_seconds: float = 0.1) -> bool:
        """Take one of ``slots`` (a job slot) unless the process stops first; False when it stopped."""
        while not self._stopping:
            if slots.acquire(timeout=poll_seconds):
                if not self._stopping:
                    return True
                slots.release()
        return False

    def claim(self, kind: WorkKind, item_id: int, claim: Callable[[], C | None],
              attempt_of: Callable[[C], int], id_of: Callable[[C], int] | None = None) -> C | None:
        """Run ``claim`` (the database claim of job or delivery ``item_id``) and remember what it claimed.

        ``id_of``: the id of what ``claim`` actually claimed, when it may be another than
        ``item_id`` (a job message only wakes the worker up, and the scheduler picks the job);
        what is remembered, released and handed back is that id. Raises
        :class:`StopRequested` instead of claiming once the process stops. Returns what
        ``claim`` returned (None: not claimed, e.g. a duplicate message).
        """
        with self._condition:
            if self._stopping:
                raise StopRequested(f"not claiming {kind} {item_id}: this worker is stopping")
            self._claiming += 1
        claimed: C | None = None
        try:
            claimed = claim()
        finally:
            with self._condition:
                self._claiming -= 1
                if claimed is not None:
                    self._claimed[(kind, item_id if id_of is None else id_of(claimed))] = attempt_of(claimed)
                self._condition.notify_all()
        return claimed

    def release(self, kind: WorkKind, item_id: int) -> None:
        """The task is done with ``item_id`` (finished, failed, or gave up)."""
        with self._condition:
            self._claimed.pop((kind, item_id), None)
            self._condition.notify_all()

    def request_stop(self) -> None:
        """From now on nothing is claimed; what is claimed already may finish."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def wait_finished(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until nothing claimed is left; True if so."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._claimed and not self._claiming, timeout=timeout)

    def unfinished(self) -> list[tuple[WorkKind, int, int]]:
        """``(kind, id, attempt)`` of everything still claimed, once claims being written have settled."""
        with self._condition:
            self._condition.wait_for(lambda: not self._claiming, timeout=CLAIM_SETTLE_SECONDS)
            return [(kind, item_id, attempt) for (kind, item_id), attempt in sorted(self._claimed.items())]


@dataclass(frozen=True)
class HandedBack:
    """What :func:`hand_back_unfinished` put back: job and delivery ids."""

    jobs: list[int]
    deliveries: list[int]


def hand_back_unfinished(
    work: WorkInFlight, sessions: sessionmaker[Session], queue: JobQueue, *, worker: str, reason: str,
    clock: Callable[[], datetime],
) -> HandedBack:
    """Hand back everything ``work`` still has claimed (call after :meth:`WorkInFlight.request_stop`).

    Each job still running on ``worker`` becomes ``queued`` and each delivery still in the
    attempt this process made becomes ``pending``; neither attempt counts, and the study
    gets an event with ``reason``. A new message is sent for each, so a worker that is
    still running (or this one after a restart) takes it. A job or delivery that finished
    meanwhile is left as it is.
    """
    started = time.monotonic()
    handed_jobs: list[int] = []
    handed_deliveries: list[int] = []
    for kind, item_id, attempt in work.unfinished():
        try:
            if kind == "job":
                if jobs.hand_back_job(sessions, item_id, worker=worker, now=clock(), reason=reason):
                    handed_jobs.append(item_id)
            elif jobs.hand_back_delivery(sessions, item_id, attempt=attempt, now=clock(), reason=reason):
                handed_deliveries.append(item_id)
        except Exception:  # the database may be gone; the lease brings this one back later
            logger.exception("could not hand back %s %d; it runs again once its lease expires", kind, item_id)
    for job_id in handed_jobs:
        _send_again(queue.enqueue_job, "job", job_id)
    for delivery_id in handed_deliveries:
        _send_again(queue.enqueue_delivery, "delivery", delivery_id)
    if handed_jobs or handed_deliveries:
        logger.warning("handed back %s (%s) in %.2f s", ", ".join(
            [f"job {j}" for j in handed_jobs] + [f"delivery {d}" for d in handed_deliveries]), reason,
            time.monotonic() - started)
    return HandedBack(handed_jobs, handed_deliveries)


def _send_again(send: Callable[[int], None], kind: str, item_id: int) -> None:
    try:
        send(item_id)
    except Exception as exc:  # the broker may be gone: the database still says queued/pending
        logger.warning("%s %d is handed back but its message could not be sent (%s); it runs when the node "
                       "next starts or re-sends it", kind, item_id, exc)
