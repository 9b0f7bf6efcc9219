"""The Celery app of the node and its workers, and the in-process worker of the embedded mode.

Why: one function builds the app from the settings (no import-time app): the node
uses it to send ids, ``dicom-node worker`` and the embedded worker to run them. In
embedded mode the broker is ``memory://`` and the worker threads live in the node
process; the database makes that safe (a restart re-enqueues what was unfinished).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from celery import Celery

from dicom_node.queue import GPU_QUEUE

__all__ = ["EmbeddedWorker", "make_celery_app"]

logger = logging.getLogger(__name__)


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


class EmbeddedWorker:
    """A Celery worker running in a thread of this process, consuming ``queues`` of ``app``.

    ``app`` becomes the process's default app (Celery's pool threads look tasks up
    there) and must have the tasks registered. Jobs run one at a time anyway (the
    worker context's job slot), so a delivery never waits for an inference to finish.
    """

    def __init__(self, app: Celery, queues: Sequence[str], concurrency: int = 3) -> None:
        self._app = app
        self._queues = list(queues)
        self._concurrency = concurrency
        self._controller: object | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from celery.worker import WorkController

        if not self._queues:
            return
        self._app.set_default()  # the pool threads look tasks up in the default app
        self._controller = WorkController(
            app=self._app, hostname="embedded@localhost", pool="threads", concurrency=self._concurrency,
            queues=self._queues, without_heartbeat=True, without_mingle=True, without_gossip=True,
            loglevel=logging.WARNING, ready_callback=None,
        )
        self._thread = threading.Thread(target=self._controller.start, name="celery-worker", daemon=True)  # type: ignore[attr-defined]
        self._thread.start()
        logger.info("embedded worker consuming %s", ", ".join(self._queues))

    def stop(self, timeout: float = 30.0) -> None:
        if self._controller is not None:
            self._controller.stop(in_sighandler=False, exitcode=0)  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout)
