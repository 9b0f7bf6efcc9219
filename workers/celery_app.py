"""The Celery app of the node and its workers, and the Celery worker that runs in a thread of a process.

Why: one function builds the app from the settings (no import-time app): the node
uses it to send ids, ``dicom-node worker`` and the embedded worker to run them. In
embedded mode the broker is ``memory://`` and the worker threads live in the node
process; the database makes that safe (a restart re-enqueues what was unfinished).
Both ``serve`` and ``worker`` run Celery's worker in a thread (:class:`EmbeddedWorker`)
so that they, not Celery, decide how a stop goes: Celery's own warm shutdown waits
for every task it has taken, however long; ours gives the running one a grace period
and hands it back to the queue after that.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from dicom_node.queue import GPU_QUEUE, IO_QUEUE
from dicom_node.work_in_flight import WorkInFlight

__all__ = ["EmbeddedWorker", "local_worker_nodenames", "make_celery_app", "worker_nodename"]

logger = logging.getLogger(__name__)

#: How long :meth:`EmbeddedWorker.stop` waits for Celery itself, beyond the grace period, once nothing is
#: claimed (or all of it was handed back): consumers cancelled, connections closed, idle threads ended.
CELERY_STOP_SECONDS = 3.0
#: The same once work was handed back: its task thread is still computing, so Celery's stop cannot complete;
#: this only lets the consumer close its broker connection.
HANDED_BACK_STOP_SECONDS = 1.0


def make_celery_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` with the node's delivery guarantees (late acks, one task at a time)."""
    if broker_url.rstrip("/") == "memory:":
        broker_url = "memory://localhost//"  # the same in-process broker, named (kombu warns otherwise)
    app = Celery("dicom_node", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_default_queue=GPU_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # A long inference must not be redelivered to another worker while it still runs.
        broker_transport_options={"visibility_timeout": 6 * 3600}
        | ({"polling_interval": 0.01} if broker_url.startswith("memory://") else {}),
    )
    return app


def worker_nodename(queues: Sequence[str], host: str) -> str:
    """The Celery node name of ``dicom-node worker --queues ...`` on ``host``: ``gpu+io@host``."""
    return f"{'+'.join(queues)}@{host}"


def local_worker_nodenames(host: str) -> list[str]:
    """Every node name a ``dicom-node worker`` on ``host`` can have (each order of each set of the queues),
    so that ``dicom-node worker --check`` finds it whatever ``--queues`` it was started with."""
    queues = (GPU_QUEUE, IO_QUEUE)
    return [worker_nodename(chosen, host)
            for size in range(1, len(queues) + 1) for chosen in itertools.permutations(queues, size)]


class EmbeddedWorker:
    """A Celery worker running in a thread of this process, consuming ``queues`` of ``app``.

    Used by ``dicom-node serve`` (embedded mode) and by ``dicom-node worker``, which
    handle the signals themselves and call :meth:`stop`. ``app`` becomes the process's
    default app (Celery's pool threads look tasks up there) and must have the tasks
    registered. Jobs run one at a time anyway (the worker context's job slot), so a
    delivery never waits for an inference to finish.

    ``work``: the :class:`WorkInFlight` of the process's tasks; ``hand_back``: what to
    call when work is still claimed at the end of the stop grace period (see
    :meth:`stop`). ``prepare``: run before consuming (loading the models), in the
    worker's start thread.
    """

    def __init__(
        self, app: Celery, queues: Sequence[str], *, work: WorkInFlight, hand_back: Callable[[], object],
        concurrency: int = 3, hostname: str = "embedded@localhost", prepare: Callable[[], object] | None = None,
    ) -> None:
        self._app = app
        self._queues = list(queues)
        self._concurrency = concurrency
        self._hostname = hostname
        self._work = work
        self._hand_back = hand_back
        self._prepare = prepare
        self._lock = threading.Lock()
        self._stopped = False
        self._controller: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Prepare (load the models), then consume the queues, in a daemon thread; returns at once."""
        if not self._queues:
            return
        threading.Thread(target=self._prepare_and_run, name="worker-start", daemon=True).start()

    def _prepare_and_run(self) -> None:
        from celery.worker import WorkController

        if self._prepare is not None:
            self._prepare()
        self._app.set_default()  # the pool threads look tasks up in the default app
        with self._lock:
            if self._stopped:  # stopped while the models were loading: never consume
                return
            self._controller = WorkController(
                app=self._app, hostname=self._hostname, pool="threads", concurrency=self._concurrency,
                queues=self._queues, without_heartbeat=True, without_mingle=True, without_gossip=True,
                loglevel=logging.WARNING, ready_callback=None,
            )
            self._thread = threading.Thread(target=self._controller.start, name="celery-worker", daemon=True)
            self._thread.start()
        logger.info("worker %s consuming %s", self._hostname, ", ".join(self._queues))

    def stop(self, grace_seconds: float) -> bool:
        """Stop consuming; give the work already claimed ``grace_seconds``, then hand back what is left.

        Tasks that have not claimed their job or delivery yet send the id back to the
        queue and end. Returns True when the Celery worker stopped completely, False when
        a task thread is still busy (a model computing a job that was handed back): the
        process should then exit without waiting for it.
        """
        with self._lock:
            self._stopped = True
            controller, thread = self._controller, self._thread
        started = time.monotonic()
        celery_stop: threading.Thread | None = None
        if controller is not None:
            # Celery's warm shutdown stops consuming at once, then waits for the task threads: in a thread
            # of its own, so that this one can hand back what is still running after the grace period.
            celery_stop = threading.Thread(target=self._stop_celery, args=(controller,), name="celery-stop",
                                           daemon=True)
            celery_stop.start()
        self._work.request_stop()
        wait_for_celery = CELERY_STOP_SECONDS
        if not self._work.wait_finished(grace_seconds):
            logger.warning("work still running %g s after the stop was requested; handing it back", grace_seconds)
            self._hand_back()
            wait_for_celery = HANDED_BACK_STOP_SECONDS  # a task thread is still computing: Celery cannot finish
        deadline = time.monotonic() + wait_for_celery
        for waiting in (celery_stop, thread):
            if waiting is not None:
                waiting.join(timeout=max(0.0, deadline - time.monotonic()))
        stopped = not any(t is not None and t.is_alive() for t in (celery_stop, thread))
        logger.info("worker %s %s in %.2f s", self._hostname, "stopped" if stopped else "left a task thread running",
                    time.monotonic() - started)
        return stopped

    @staticmethod
    def _stop_celery(controller: Any) -> None:
        try:
            controller.stop(in_sighandler=False, exitcode=0)
        except Exception:  # the stop goes on: the database, not Celery, holds the state of the work
            logger.exception("the Celery worker did not stop cleanly")
