"""Wires the node (``serve``) and the worker of either process together from settings.

Stopping (SIGTERM, SIGINT) takes bounded time, well inside systemd's ``TimeoutStopSec``
(60 s): the DICOM listener closes first, the running job or delivery gets
``queue.stop_grace_seconds`` and is then handed back to the queue, queued work stays
queued in the database, and every other part gets a few seconds (see :meth:`Node.stop`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completion import CompletionMonitor
from dicom_node.conductor import Conductor
from dicom_node.config_files import import_configuration
from dicom_node.db import counters, repo
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.indexer import InstanceIndexer
from dicom_node.dispatch import Dispatcher
from dicom_node.ingest import IngestService, utc_now
from dicom_node.queue import GPU_QUEUE, CeleryQueue
from dicom_node.periodic import Periodic
from dicom_node.recovery import CLEAN_STOP_MARKER, reindex_orphans
from dicom_node.retention import Retention, RetentionPolicy
from dicom_node.scp import StorageSCP
from dicom_node.settings import Settings
from dicom_node.stopping import StopSignals, run_bounded, start_step, wait_steps
from dicom_node.work_in_flight import WorkInFlight, hand_back_unfinished

if TYPE_CHECKING:
    from celery import Celery

    from dicom_node.queue import JobQueue
    from dicom_node.web.server import WebServer
    from workers.celery_app import EmbeddedWorker
    from workers.context import WorkerContext
    from workers.heartbeat import WorkerHeartbeat

logger = logging.getLogger(__name__)

#: Seconds associations still open get to end by themselves (a PACS finishing its send) before they are aborted.
LISTENER_DRAIN_SECONDS = 5.0
#: Seconds the DICOM listener gets to close and abort its associations before the stop goes on without it.
LISTENER_STOP_SECONDS = 8.0
#: Seconds each other part (web servers, completion monitor, router, heartbeat) gets, beyond the worker's stop.
PART_STOP_SECONDS = 5.0


class Node:
    """The running node: database, spool, indexer, DICOM listener, completion, routing and the queue.

    With ``queue.embedded_worker_queues`` the node also runs the Celery workers in its
    own process (embedded mode); otherwise ``dicom-node worker`` processes do.
    """

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_session_factory(self.engine)
        self.indexer = InstanceIndexer(self.engine, settings.completion.reopen_on_late_instances)
        self.ingest = IngestService.from_settings(settings, self.sessions, self.indexer, clock)
        self.spool = self.ingest.spool
        self.scp = StorageSCP(settings.dicom, self.ingest, self.sessions, clock)
        self.completion = CompletionMonitor(self.sessions, settings.completion, clock)
        from workers.celery_app import make_celery_app

        self.celery = make_celery_app(settings.queue.broker_url)
        self.queue = CeleryQueue(self.celery)
        self.conductor = Conductor(
            self.sessions, settings.spool_dir, self.queue, clock,
            job_max_attempts=settings.routing.job_max_attempts,
            interval_seconds=settings.queue.sweep_interval_seconds,
            resend_after_seconds=settings.queue.resend_after_seconds,
        )
        retention = RetentionPolicy.from_settings(settings.retention)
        self.retention = Retention(self.sessions, spool_dir=settings.spool_dir, outbox_dir=settings.outbox_dir,
                                   policy=retention, clock=clock, fsync=settings.storage.fsync)
        #: Runs retention every retention.check_interval_seconds, when a limit is set (off by default).
        self.retention_loop = Periodic("retention", settings.retention.check_interval_seconds,
                                       lambda: self.retention.run(actor="system")) if retention.active else None
        #: Folds the metric deltas PostgreSQL's triggers append into their counts (a no-op on SQLite), so that
        #: /metrics and the queue depths add a few rows, not every change since the start.
        self.counter_fold = Periodic("metric-counters", counters.FOLD_INTERVAL_SECONDS,
                                     lambda: counters.fold(self.sessions))
        self.worker: EmbeddedWorker | None = None
        self.heartbeat: WorkerHeartbeat | None = None
        if settings.queue.embedded_worker_queues:
            parts = build_worker(settings, self.celery, self.sessions, self.queue,
                                 settings.queue.embedded_worker_queues, clock)
            self.worker, self.heartbeat = parts.worker, parts.heartbeat
        self._clock = clock
        self.web_servers = self._web_servers() if settings.web.enabled else []

    def _web_servers(self) -> list["WebServer"]:
        """The admin app on web.host:port, and the monitoring endpoints on web.ops_port if set."""
        from dicom_node.web.app import create_app, create_ops_app
        from dicom_node.web.server import WebServer

        web = self.settings.web
        readiness = [("dicom listener", self.scp.listener_status)]
        app = create_app(self.settings, sessions=self.sessions, clock=self._clock, readiness=readiness,
                         ingest=self.ingest)
        servers = [WebServer(app, web.host, web.port, tls=web.tls)]
        if web.ops_port is not None:
            ops = create_ops_app(self.settings, sessions=self.sessions, clock=self._clock, readiness=readiness)
            servers.append(WebServer(ops, web.ops_host or web.host, web.ops_port, name="monitoring"))
        return servers

    def start(self) -> None:
        """Recover from whatever a previous run left behind, then start listening."""
        upgrade(self.engine)
        self.spool.remove_partial_files()
        marker = self.settings.data_dir / CLEAN_STOP_MARKER
        if marker.exists():
            marker.unlink()
        else:
            reindex_orphans(self.spool, self.sessions, self.indexer)
        interrupted = repo.interrupt_open_associations(self.sessions, self._clock())
        if interrupted:
            logger.warning("%d association(s) were open when the node last stopped; marked interrupted", interrupted)
        import_configuration(self.sessions, self.settings.routing, now=self._clock())
        for server in self.web_servers:  # first: a web port in use stops the start before anything else runs
            server.start()
        if self.worker is not None:
            self.worker.start()  # loads the models first, in a thread of its own, then consumes
        self.conductor.recover()
        self.scp.start()
        self.completion.start()
        self.conductor.start()
        if self.retention_loop is not None:
            self.retention_loop.start()
        self.counter_fold.start()

    def stop(self) -> bool:
        """Stop in bounded time; True when every part stopped (a handed-back job counts as stopped).

        Order: the DICOM listener closes (it aborts the associations still open); the web
        servers, the completion monitor and the router stop side by side with the
        worker, whose running job or delivery gets ``queue.stop_grace_seconds`` before it
        is handed back to the queue (queued work stays queued in the database); then the
        heartbeat and the indexer. A part that overruns its few seconds is left behind
        and named in the log. The clean-stop marker is written only when the listener
        closed, so a start after a stuck listener still looks for unindexed files.
        """
        started = time.monotonic()
        listener_closed = run_bounded("DICOM listener", lambda: self.scp.stop(drain_seconds=LISTENER_DRAIN_SECONDS),
                                      LISTENER_STOP_SECONDS)
        parts = [start_step(f"{server.name} server", server.stop) for server in self.web_servers]
        parts += [start_step("completion monitor", self.completion.stop), start_step("router", self.conductor.stop),
                  start_step("metric counters", self.counter_fold.stop)]
        if self.retention_loop is not None:
            self.retention.request_stop()  # between two studies; a purge cut short is finished by the next run
            parts.append(start_step("retention", self.retention_loop.stop))
        worker_stopped = True
        if self.worker is not None:
            worker_stopped = self.worker.stop(self.settings.queue.stop_grace_seconds)
        if self.heartbeat is not None:
            parts.append(start_step("worker heartbeat", self.heartbeat.stop))
        parts_stopped = wait_steps(parts, PART_STOP_SECONDS)
        self.indexer.stop()
        self.engine.dispose()
        if listener_closed:
            (self.settings.data_dir / CLEAN_STOP_MARKER).touch()
        stopped = listener_closed and worker_stopped and parts_stopped
        logger.info("stopped in %.2f s%s", time.monotonic() - started, "" if stopped else " (some parts left behind)")
        return stopped

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop (:meth:`stop`); a second signal ends the process at once."""
        signals = StopSignals("dicom-node serve").install()
        self.start()
        logger.info("node ready; data in %s", self.settings.data_dir.resolve())
        try:
            signals.wait()
        finally:
            logger.info("stopping")
            self.stop()


@dataclass(frozen=True)
class WorkerParts:
    """A worker of this process (:func:`build_worker`): the Celery worker, its heartbeat and, when it runs
    jobs (``gpu``), its context; a worker of deliveries only (``io``) has none and loads no model."""

    worker: "EmbeddedWorker"
    heartbeat: "WorkerHeartbeat"
    context: "WorkerContext | None"


def build_worker(
    settings: Settings, celery: "Celery", sessions: sessionmaker[Session], queue: "JobQueue", queues: Sequence[str],
    clock: Callable[[], datetime], *, job_concurrency: int = 1, pool_threads: int = 3,
    hostname: str = "embedded@localhost",
) -> WorkerParts:
    """The worker of ``serve`` (embedded) or of ``dicom-node worker``: tasks registered on ``celery``,
    consuming ``queues`` once started; it beats and loads the models (``gpu``) before it consumes.

    Its job and its deliveries share one :class:`WorkInFlight`, so that a stop hands back
    both: what still runs after ``queue.stop_grace_seconds`` is queued again (the
    attempt not counted) and its id sent to ``queue`` for whichever worker comes next.
    Without ``gpu`` nothing of the workers' model code is imported: a machine installed
    without ``[worker]`` (no torch, no MONAI) runs deliveries.
    """
    from dicom_node.app.tasks import register_tasks
    from workers.celery_app import EmbeddedWorker

    work = WorkInFlight()
    name = f"{socket.gethostname()}:{os.getpid()}"  # as the job claims and the heartbeat row name it
    context = None
    if GPU_QUEUE in queues:
        from workers.context import build_worker_context

        context = build_worker_context(settings, sessions, queue, job_concurrency=job_concurrency, work=work,
                                       worker_name=name)
    dispatcher = make_dispatcher(settings, sessions, clock, work=work)
    register_tasks(celery, queue, lambda: dispatcher, None if context is None else (lambda: context))
    heartbeat = worker_heartbeat(sessions, name, context, queues, clock)
    grace = settings.queue.stop_grace_seconds

    def prepare() -> None:
        heartbeat.start()  # before loading, so the models page shows them loading
        if context is not None:
            from workers.context import preload_models

            preload_models(context.models)  # the first study must not wait for them

    def hand_back() -> None:
        hand_back_unfinished(work, sessions, queue, worker=name, clock=clock,
                             reason=f"worker {name} stopped and did not finish within the stop grace "
                             f"period ({grace:g} s)")

    worker = EmbeddedWorker(celery, queues, work=work, hand_back=hand_back, concurrency=pool_threads,
                            hostname=hostname, prepare=prepare)
    return WorkerParts(worker, heartbeat, context)


def make_dispatcher(settings: Settings, sessions: sessionmaker[Session], clock: Callable[[], datetime], *,
                    work: WorkInFlight | None = None) -> Dispatcher:
    """The delivery sender of this process, from the settings; ``work``: the process's :class:`WorkInFlight`."""
    return Dispatcher(
        sessions=sessions, outbox_dir=settings.outbox_dir,
        calling_ae_title=settings.delivery.calling_ae_title or settings.dicom.ae_title,
        policy=settings.delivery, clock=clock, work=work if work is not None else WorkInFlight(),
    )


def worker_heartbeat(sessions: sessionmaker[Session], name: str, context: "WorkerContext | None",
                     queues: Sequence[str], clock: Callable[[], datetime]) -> "WorkerHeartbeat":
    """The heartbeat of a worker process (embedded or ``dicom-node worker``), named ``name`` like its job claims;
    it reports the models' load states of ``context`` (a worker of jobs) and the device of a ``gpu`` worker."""
    from workers.heartbeat import TrackedModels, WorkerHeartbeat, describe_device

    models = context.models if context is not None and isinstance(context.models, TrackedModels) else None
    return WorkerHeartbeat(sessions, name=name, queues=queues,
                           device=describe_device() if GPU_QUEUE in queues else None, models=models, clock=clock)


def run_worker(settings: Settings, queues: list[str], concurrency: int) -> int:
    """``dicom-node worker``: a Celery worker on ``queues`` until SIGTERM/SIGINT (distributed mode), then a stop
    in bounded time; returns the exit code (2 for queues it does not know, 1 without the node's database).

    The running job or delivery gets ``queue.stop_grace_seconds`` and is then handed
    back to the queue; a second signal ends the process at once (see :mod:`dicom_node.stopping`).
    """
    import sys

    from dicom_node.db.session import DatabaseNotReady, open_sessions
    from dicom_node.queue import IO_QUEUE
    from workers.celery_app import make_celery_app, worker_nodename

    unknown = sorted(set(queues) - {GPU_QUEUE, IO_QUEUE})
    if unknown or not queues:
        print(f"dicom-node: --queues must list gpu and/or io, got {','.join(queues) or 'nothing'}", file=sys.stderr)
        return 2
    try:
        sessions = open_sessions(settings.resolved_database_url, migrate=False)
    except DatabaseNotReady as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    signals = StopSignals("dicom-node worker").install()
    app = make_celery_app(settings.queue.broker_url)
    parts = build_worker(settings, app, sessions, CeleryQueue(app), queues, utc_now, job_concurrency=concurrency,
                         pool_threads=concurrency + (1 if IO_QUEUE in queues else 0),
                         hostname=worker_nodename(queues, socket.gethostname()))
    parts.worker.start()  # the heartbeat, the models (gpu), then the queues, in a thread of its own
    signals.wait()
    parts.worker.stop(settings.queue.stop_grace_seconds)
    run_bounded("worker heartbeat", parts.heartbeat.stop, 5.0)
    return 0
