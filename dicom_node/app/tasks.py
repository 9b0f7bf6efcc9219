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

from celery import Celery

from dicom_node.dispatch import Dispatcher
from dicom_node.queue import DELIVER_TASK, RUN_JOB_TASK
from dicom_node.work_in_flight import StopRequested
from workers.context import WorkerContext
from workers.pipeline import run_job as run_pipeline_job

__all__ = ["register_tasks"]

logger = logging.getLogger(__name__)


def register_tasks(
    app: Celery, context: Callable[[], WorkerContext], dispatcher: Callable[[], Dispatcher]
) -> None:
    """Register ``run_job`` and ``deliver`` on ``app``; ``context``/``dispatcher`` give this process's instances."""

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, shared=False)
    def run_job(job_id: int) -> str | None:
        try:
            return run_pipeline_job(context(), int(job_id))
        except StopRequested as stop:
            _send_back(context().queue.enqueue_job, int(job_id), stop)
            return None

    @app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, shared=False)
    def deliver(delivery_id: int) -> str | None:
        try:
            return dispatcher().deliver(int(delivery_id))
        except StopRequested as stop:
            _send_back(context().queue.enqueue_delivery, int(delivery_id), stop)
            return None

    # Register now: Celery adds decorated tasks lazily, and a worker that receives a message waiting in
    # the queue before that happens reports the task as never registered.
    app.finalize(auto=True)


def _send_back(send: Callable[[int], None], item_id: int, stop: StopRequested) -> None:
    """Send ``item_id`` to the queue again: this worker stops, and the message it took is acknowledged."""
    send(item_id)
    logger.debug("%s; its id is back in the queue", stop)
