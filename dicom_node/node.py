"""Wires the receiving node together from settings and runs it until asked to stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import datetime

from dicom_node.completion import CompletionMonitor
from dicom_node.db import repo
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.indexer import InstanceIndexer
from dicom_node.ingest import IngestService, utc_now
from dicom_node.recovery import CLEAN_STOP_MARKER, reindex_orphans
from dicom_node.scp import StorageSCP
from dicom_node.settings import Settings
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)


class Node:
    """The running node: database, spool, indexer, DICOM listener and completion monitor."""

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
        self._clock = clock

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
        self.scp.start()
        self.completion.start()

    def stop(self) -> None:
        self.scp.stop()
        self.completion.stop()
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
