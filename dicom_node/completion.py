"""Decides, on a timer, which receiving studies are complete.

A study is complete when it has been quiet for ``quiet_seconds`` with no sending
association open, or ``max_wait_seconds`` after it started receiving. Completion is a
state change in the database (with a study event); the router picks it up from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo
from dicom_node.periodic import Periodic
from dicom_node.settings import CompletionSettings

logger = logging.getLogger(__name__)


class CompletionMonitor:
    """A background thread that runs :func:`repo.complete_due_studies` periodically."""

    def __init__(
        self, sessions: sessionmaker[Session], settings: CompletionSettings, clock: Callable[[], datetime]
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._clock = clock
        self._loop = Periodic("completion-monitor", settings.check_interval_seconds, self.check_once)

    def check_once(self) -> list[str]:
        """Complete every study that is due now; returns their Study Instance UIDs."""
        completed = repo.complete_due_studies(
            self._sessions,
            now=self._clock(),
            quiet_seconds=self._settings.quiet_seconds,
            max_wait_seconds=self._settings.max_wait_seconds,
        )
        for study_uid in completed:
            logger.info("study %s is complete", study_uid)
        return completed

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
