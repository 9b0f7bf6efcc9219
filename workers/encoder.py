"""The worker's result encoder: one thread that turns finished inferences into DICOM objects and finishes their jobs.

Why: building and writing a job's SEG, SR, GSPS and KO takes seconds of CPU (about 3 s for a
300-slice segmentation) that the GPU would otherwise spend idle, since a worker runs one job at a
time per GPU (its job slot). :func:`workers.pipeline.run_job` therefore holds the job slot only
until the model (and the plausibility check) ran, then hands the rest of the job - encoding, the
outbox, ``finish_job`` and its deliveries - to this thread, and the next job's model starts at once.

Guarantees:

* Bounded: at most ``pending`` jobs are handed over and not yet finished. :meth:`ResultEncoder.submit`
  blocks while that many are (back-pressure: the job slot stays held, so no further model runs and
  no more volumes and label maps pile up in memory than ``pending`` extra ones).
* Nothing is lost or duplicated: a handed-over job stays ``running`` in the database, its lease
  renewed and its claim held in the process's ``WorkInFlight``, until its objects are in the outbox
  and it is finished (or failed). A worker killed meanwhile leaves a running job whose lease expires
  and which is then run again from the start; a worker stopped meanwhile waits for it within the stop
  grace period and hands it back after that, like a job still at its model; ``finish_job`` records
  nothing for a job that is no longer this worker's.
* Failures stay the job's: the work handed over handles its own errors (the job fails with the
  reason); anything escaping it is logged here and never stops the thread.

The thread is started by the first :meth:`ResultEncoder.submit` (a daemon: the process's stop, not
this thread, decides how long unfinished work may take).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["ResultEncoder"]

logger = logging.getLogger(__name__)


class ResultEncoder:
    """One encoder thread of a worker process, taking at most ``pending`` jobs at a time (see the module docstring)."""

    def __init__(self, pending: int = 1, *, name: str = "result-encoder") -> None:
        if pending < 1:
            raise ValueError(f"ResultEncoder: pending must be at least 1, got {pending}")
        self._pending = pending
        self._name = name
        self._room = threading.BoundedSemaphore(pending)
        self._work: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._condition = threading.Condition()
        self._outstanding = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """How many jobs may be handed over and not yet finished."""
        return self._pending

    @property
    def outstanding(self) -> int:
        """How many handed-over jobs are waiting or being encoded now."""
        with self._condition:
            return self._outstanding

    def submit(self, work: Callable[[], object]) -> None:
        """Run ``work`` (a job's encoding and finish) in the encoder thread, after the work handed over before it.

        Blocks while ``pending`` jobs are handed over and unfinished. ``work`` handles its job's errors;
        it must release what it holds (lease, claim) itself, whatever happens.
        """
        self._room.acquire()
        with self._condition:
            self._outstanding += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._work.put(work)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over job is finished; False when ``timeout`` seconds passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: self._outstanding == 0, timeout)

    def _run(self) -> None:
        while True:
            work = self._work.get()
            try:
                work()
            except Exception:  # the work handles its job's errors; this is a bug, and the thread must go on
                logger.exception("%s: work handed over raised", self._name)
            finally:
                with self._condition:
                    self._outstanding -= 1
                    self._condition.notify_all()
                self._room.release()
