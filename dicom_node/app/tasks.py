"""The Celery tasks: thin wrappers that take an id and call the pipeline or the dispatcher.

Why thin: everything worth testing lives in :mod:`workers.pipeline` and
:mod:`dicom_node.dispatch`, which run without Celery. Why here, in the wiring layer:
a worker process runs both (inference on ``gpu``, deliveries on ``io``), and neither
side may import the other. The tasks are ``acks_late``
with ``reject_on_worker_lost``: a worker that dies mid-task leaves the message to be
redelivered, and the database claim makes the redelivery harmless. The context is
handed in (no module globals), built once per worker process.

A worker that is stopping claims nothing more (:class:`StopRequested`): the task then
sends its id back to the queue and ends, so the job stays ``queued`` (the delivery
``pending``) and another worker - or this one after its restart - takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import Celery

from dicom_node.dispatch import Dispatcher
from dicom_node.queue import DELIVER_TASK, RUN_JOB_TASK, JobQueue
from dicom_node.work_in_flight import StopRequested

if TYPE_CHECKING:
    from workers.context import WorkerContext

__all__ = ["register_tasks"]

logger = logging.getLogger(__name__)


def register_tasks(
    app: Celery, queue: JobQueue, dispatcher: Callable[[], Dispatcher], context: Callable[[], WorkerContext] | None,
) -> None:
    """Register ``deliver`` and, with a worker ``context`` (a process that runs models), ``run_job`` on ``app``;
    ``dispatcher``/``context`` give this process's instances, ``queue`` takes back what a stopping worker
    could not start."""
    if context is not None:
        _register_run_job(app, queue, context)

    @app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, shared=False)
    def deliver(delivery_id: int) -> str | None:
        try:
            return dispatcher().deliver(int(delivery_id))
        except StopRequested as stop:
            _send_back(queue.enqueue_delivery, int(delivery_id), stop)
            return None

    # Register now: Celery adds decorated tasks lazily, and a worker that receives a message waiting in
    # the queue before that happens reports the task as never registered.
    app.finalize(auto=True)


def _register_run_job(app: Celery, queue: JobQueue, context: Callable[[], WorkerContext]) -> None:
    from workers.pipeline import run_job as run  # only a process that runs models imports the pipeline

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, shared=False)
    def run_job(job_id: int) -> str | None:
        try:
            return run(context(), int(job_id))
        except StopRequested as stop:
            _send_back(queue.enqueue_job, int(job_id), stop)
            return None


def _send_back(send: Callable[[int], None], item_id: int, stop: StopRequested) -> None:
    """Send ``item_id`` to the queue again: this worker stops, and the message it took is acknowledged."""
    send(item_id)
    logger.debug("%s; its id is back in the queue", stop)
