"""The producer side of the job queue: the only place the node hands work to Celery.

Why: the database is the source of truth and the queue only carries ids; this
module is the seam between them. Messages are sent after the transaction that
created the job or delivery has committed, and a lost message costs nothing but a
delay (the sweeper re-sends from the database).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["CeleryQueue", "GPU_QUEUE", "IO_QUEUE", "JobQueue", "RUN_JOB_TASK", "DELIVER_TASK"]

logger = logging.getLogger(__name__)

#: Celery queue for inference (one worker per GPU) and for delivery (network I/O).
GPU_QUEUE = "gpu"
IO_QUEUE = "io"
#: Task names, shared with :mod:`dicom_node.app.tasks` (by name, so the producer never imports the workers).
RUN_JOB_TASK = "dicom_node.run_job"
DELIVER_TASK = "dicom_node.deliver"


class JobQueue(Protocol):
    """Hands job and delivery ids to whoever runs them."""

    def enqueue_job(self, job_id: int) -> None: ...

    def enqueue_delivery(self, delivery_id: int) -> None: ...


class CeleryQueue:
    """:class:`JobQueue` over a Celery app (``memory://`` in embedded mode, Redis when distributed)."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def enqueue_job(self, job_id: int) -> None:
        self._app.send_task(RUN_JOB_TASK, args=[int(job_id)], queue=GPU_QUEUE)
        logger.debug("job %d enqueued", job_id)

    def enqueue_delivery(self, delivery_id: int) -> None:
        self._app.send_task(DELIVER_TASK, args=[int(delivery_id)], queue=IO_QUEUE)
        logger.debug("delivery %d enqueued", delivery_id)
