"""Wires the receiving node together from settings and runs it until asked to stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completion import CompletionMonitor
from dicom_node.conductor import Conductor
from dicom_node.config_files import import_configuration
from dicom_node.db import repo
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.indexer import InstanceIndexer
from dicom_node.dispatch import Dispatcher
from dicom_node.ingest import IngestService, utc_now
from dicom_node.queue import GPU_QUEUE, CeleryQueue
from dicom_node.recovery import CLEAN_STOP_MARKER, reindex_orphans
from dicom_node.scp import StorageSCP
from dicom_node.settings import Settings
from dicom_node.spool import Spool

if TYPE_CHECKING:
    from dicom_node.web.server import WebServer
    from workers.context import WorkerContext
    from workers.heartbeat import WorkerHeartbeat

logger = logging.getLogger(__name__)


class Node:
    """The running node: database, spool, indexer, DICOM listener, completion, routing and the queue.

    With ``queue.embedded_worker_queues`` the node also runs the Celery workers in its
    own process (embedded mode); otherwise ``dicom-node worker`` processes do.
    """

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_session_factory(self.engine)
        self.spool = Spool(settings.spool_dir, fsync=settings.storage.fsync)
        self.indexer = InstanceIndexer(self.engine, settings.completion.reopen_on_late_instances)
        self.ingest = IngestService(
            spool=self.spool,
            quarantine_dir=settings.quarantine_dir,
            sessions=self.sessions,
            indexer=self.indexer,
            duplicate_policy=settings.dicom.duplicate_policy,
            min_free_bytes=settings.storage.min_free_mb * 1_048_576,
            clock=clock,
        )
        self.scp = StorageSCP(settings.dicom, self.ingest, self.sessions, clock)
        self.completion = CompletionMonitor(self.sessions, settings.completion, clock)
        from workers.celery_app import EmbeddedWorker, make_celery_app

        self.celery = make_celery_app(settings.queue.broker_url)
        self.queue = CeleryQueue(self.celery)
        self.conductor = Conductor(
            self.sessions, settings.spool_dir, self.queue, clock,
            job_max_attempts=settings.routing.job_max_attempts,
            interval_seconds=settings.queue.sweep_interval_seconds,
            resend_after_seconds=settings.queue.resend_after_seconds,
        )
        self.worker: EmbeddedWorker | None = None
        self.heartbeat: WorkerHeartbeat | None = None
        if settings.queue.embedded_worker_queues:
            from workers.context import build_worker_context
            from workers.tasks import register_tasks

            context = self._context = build_worker_context(settings, self.sessions, self.queue)
            dispatcher = make_dispatcher(settings, self.sessions, clock)
            register_tasks(self.celery, lambda: context, lambda: dispatcher)
            self.worker = EmbeddedWorker(self.celery, settings.queue.embedded_worker_queues)
            self.heartbeat = worker_heartbeat(self.sessions, context, settings.queue.embedded_worker_queues, clock)
        self._clock = clock
        self.web_servers = self._web_servers() if settings.web.enabled else []

    def _web_servers(self) -> list["WebServer"]:
        """The admin app on web.host:port, and the monitoring endpoints on web.ops_port if set."""
        from dicom_node.web.app import create_app, create_ops_app
        from dicom_node.web.server import WebServer

        web = self.settings.web
        readiness = [("dicom listener", self._listener_ready)]
        app = create_app(self.settings, sessions=self.sessions, clock=self._clock, readiness=readiness)
        servers = [WebServer(app, web.host, web.port)]
        if web.ops_port is not None:
            ops = create_ops_app(self.settings, sessions=self.sessions, clock=self._clock, readiness=readiness)
            servers.append(WebServer(ops, web.ops_host or web.host, web.ops_port, name="monitoring"))
        return servers

    def _listener_ready(self) -> tuple[bool, str]:
        try:
            return True, f"accepting associations on port {self.scp.port}"
        except RuntimeError as exc:
            return False, str(exc)

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
            threading.Thread(target=self._start_worker, name="worker-start", daemon=True).start()
        self.conductor.recover()
        self.scp.start()
        self.completion.start()
        self.conductor.start()

    def _start_worker(self) -> None:
        """Load the models first (the first study must not wait for them), then consume the queues."""
        assert self.worker is not None
        if self.heartbeat is not None:
            self.heartbeat.start()  # before loading, so the models page shows them loading
        if GPU_QUEUE in self.settings.queue.embedded_worker_queues:
            from workers.context import preload_models

            preload_models(self._context.models)
        self.worker.start()

    def stop(self) -> None:
        for server in self.web_servers:
            server.stop()
        self.scp.stop()
        self.completion.stop()
        self.conductor.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.indexer.stop()
        self.engine.dispose()
        (self.settings.data_dir / CLEAN_STOP_MARKER).touch()

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM."""
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        self.start()
        logger.info("node ready; data in %s", self.settings.data_dir.resolve())
        try:
            stop.wait()
        finally:
            logger.info("stopping")
            self.stop()


def make_dispatcher(settings: Settings, sessions: sessionmaker[Session], clock: Callable[[], datetime]) -> Dispatcher:
    """The delivery sender of this process, from the settings."""
    return Dispatcher(
        sessions=sessions, outbox_dir=settings.outbox_dir,
        calling_ae_title=settings.delivery.calling_ae_title or settings.dicom.ae_title,
        policy=settings.delivery, clock=clock,
    )


def worker_heartbeat(sessions: sessionmaker[Session], context: "WorkerContext", queues: Sequence[str],
                     clock: Callable[[], datetime]) -> "WorkerHeartbeat":
    """The heartbeat of a worker process (embedded or ``dicom-node worker``), named like its job claims."""
    from workers.heartbeat import TrackedModels, WorkerHeartbeat, describe_device

    models = context.models if isinstance(context.models, TrackedModels) else None
    return WorkerHeartbeat(sessions, name=context.worker_name, queues=queues,
                           device=describe_device() if GPU_QUEUE in queues else None, models=models, clock=clock)
