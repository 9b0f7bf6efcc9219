"""How the long-running commands (``serve``, ``worker``) stop: on a signal, in bounded time.

Why: systemd sends SIGTERM and kills the process ``TimeoutStopSec`` (60 s) later, and an
operator who presses Ctrl-C twice means "now". So: the first SIGTERM or SIGINT asks for
a clean stop (:class:`StopSignals`); every step of the stop gets a time limit and is
abandoned, with a warning naming it, when it overruns (:func:`run_bounded`,
:func:`start_step` and :func:`wait_steps` for steps that run side by side); a second
signal ends the process at once (the database's leases bring back what was running);
and once the stop is done the process exits without waiting for threads left behind -
a model still computing a job that was handed back (:func:`exit_process`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

__all__ = ["StopSignals", "exit_process", "run_bounded", "start_step", "wait_steps"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError):  # a closed stream: nothing more to save
            continue
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue


class StopSignals:
    """SIGTERM/SIGINT for a long-running command: the first asks for a stop, the second exits at once.

    ``install`` must be called from the main thread. ``requested`` is set by the first
    signal; the second one logs, flushes the log and ends the process with status
    128 + signal number, without running any more of the stop.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.requested = threading.Event()

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.requested.is_set():
            self.requested.set()
            logger.info("%s: %s received, stopping (send it again to stop at once)", self.what, name)
            return
        logger.warning("%s: second stop signal (%s): exiting now; work still running is taken up again when its "
                       "lease expires", self.what, name)
        _flush_output()
        os._exit(128 + signum)

    def wait(self) -> None:
        """Block until the first stop signal."""
        while not self.requested.wait(timeout=1.0):  # a timed wait, so the handler runs promptly
            continue


def start_step(name: str, action: Callable[[], object]) -> threading.Thread:
    """Start ``action`` (one step of a stop) in a daemon thread named after it; see :func:`wait_steps`.

    An exception in the step is logged and counts as finished: the stop goes on.
    """

    def run() -> None:
        try:
            action()
        except Exception:  # one failing step must not keep the others from running
            logger.exception("stop: %s failed", name)

    thread = threading.Thread(target=run, name=f"stop {name}", daemon=True)
    thread.start()
    return thread


def wait_steps(steps: Sequence[threading.Thread], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds in all for ``steps``; False (and a warning naming each) if some overran.

    A step that overruns is left behind in its daemon thread rather than holding up the
    rest of the stop.
    """
    deadline = time.monotonic() + timeout
    for step in steps:
        step.join(max(0.0, deadline - time.monotonic()))
    late = [step.name.removeprefix("stop ") for step in steps if step.is_alive()]
    for name in late:
        logger.warning("stop: %s did not finish within %g s; not waiting for it", name, timeout)
    return not late


def run_bounded(name: str, action: Callable[[], object], timeout: float) -> bool:
    """Run ``action`` (one step of a stop) for at most ``timeout`` seconds; False if it did not finish."""
    return wait_steps([start_step(name, action)], timeout)


def exit_process(code: int) -> NoReturn:
    """End the process now with ``code``, once its stop has finished: output flushed, no interpreter shutdown.

    Why not a normal exit: Python joins every thread of a ``concurrent.futures`` pool
    (Celery's task threads) before it exits, so a model still computing a job that was
    handed back would hold the process for the rest of the inference; and freeing the
    loaded models and libraries takes seconds more on a busy machine. The stop has
    already closed what matters (listener, database, the workers' rows and the
    clean-stop marker), so nothing is lost by skipping that.
    """
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    logger.debug("exiting with status %d; threads not waited for: %s", code, ", ".join(sorted(left)) or "none")
    _flush_output()
    os._exit(code)
