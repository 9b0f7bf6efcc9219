"""A background thread that runs one action every few seconds until stopped.

Why: the completion monitor and the conductor both poll the database on a timer;
both need the same stop handling and the same rule that a failing pass is logged
and tried again, never the end of the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Periodic"]

logger = logging.getLogger(__name__)


class Periodic:
    """Runs ``action`` every ``interval_seconds`` in a daemon thread called ``name``."""

    def __init__(self, name: str, interval_seconds: float, action: Callable[[], object]) -> None:
        self._name = name
        self._interval = interval_seconds
        self._action = action
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._action()
            except Exception:  # a failing pass (database restarting, ...) must not end the loop
                logger.exception("%s pass failed; retrying in %s s", self._name, self._interval)
