"""A worker process's heartbeat: its ``worker_status`` row, refreshed every few seconds.

Why: the dashboard and the models page must say which workers are alive, on which
device, with which models loaded (or why a model failed to load) and what each one
is running - also for GPU workers on other machines, which share only the database
with the node. Two pieces:

* :class:`TrackedModels` wraps the model registry of a worker context and records
  the real load state of every model (``not loaded`` -> ``loading`` -> ``loaded`` |
  ``failed`` with the error) as :meth:`load` is called by ``preload_models`` and the
  pipeline. It is otherwise the registry (same ``ids``, ``entry``, ``path``).
* :class:`WorkerHeartbeat` is a daemon thread that upserts the row (name
  ``host:pid``, queues, device, start time, model states; the current job comes
  from the job claims in the DB) at once and then every ``interval`` seconds, and
  deletes the row when stopped cleanly. A worker that dies stops writing and is
  shown offline after ``web.worker_stale_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import workers as worker_rows

__all__ = ["DEFAULT_INTERVAL_SECONDS", "TrackedModels", "WorkerHeartbeat", "describe_device"]

logger = logging.getLogger(__name__)

#: Seconds between two heartbeats; ``web.worker_stale_seconds`` (default 60) must be well above it.
DEFAULT_INTERVAL_SECONDS = 5.0
_ERROR_CHARS = 500


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def describe_device() -> str:
    """The device models run on by default here: ``cuda:0 (<GPU name>)`` or ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"[:64]
    return "cpu"


class TrackedModels:
    """A model provider (the registry) that remembers the load state of each model it hands out.

    ``inner``: a provider with ``load(model_id)`` (and usually ``ids``, ``entry``);
    every other attribute is the inner provider's. ``device``: what a loaded
    model reports when it has no ``device`` attribute of its own.
    """

    def __init__(self, inner: Any, device: str | None = None) -> None:
        self._inner = inner
        self._device = device
        self._lock = threading.Lock()
        self._states: dict[str, dict[str, Any]] = {
            model_id: self._state(model_id, "not loaded") for model_id in getattr(inner, "ids", ())
        }

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found on the wrapper
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def inner(self) -> Any:
        """The wrapped provider."""
        return self._inner

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(getattr(self._inner, "ids", ()))

    def _version(self, model_id: str) -> str | None:
        entry = getattr(self._inner, "entry", None)
        if entry is None:
            return None
        try:
            return str(entry(model_id).version)
        except LookupError:
            return None

    def _state(self, model_id: str, state: str, device: str | None = None, error: str | None = None) -> dict[str, Any]:
        return {"state": state, "device": device, "error": error, "version": self._version(model_id)}

    def load(self, model_id: str) -> Any:
        """The inner provider's ``load``, with the state recorded around it (errors are re-raised)."""
        with self._lock:
            known = self._states.get(model_id)
            if known is None or known["state"] != "loaded":
                self._states[model_id] = self._state(model_id, "loading", self._device)
        try:
            model = self._inner.load(model_id)
        except Exception as exc:
            self.record_failure(model_id, exc)
            raise
        device = getattr(model, "device", None)
        with self._lock:
            self._states[model_id] = self._state(model_id, "loaded", str(device) if device is not None else self._device)
        return model

    def record_failure(self, model_id: str, error: BaseException | str) -> None:
        """Mark ``model_id`` failed (a load error, or a warm-up run that failed after loading)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._lock:
            self._states[model_id] = self._state(model_id, "failed", self._device, text[:_ERROR_CHARS])

    def states(self) -> dict[str, dict[str, Any]]:
        """``{model id: {state, device, error, version}}`` now (a copy)."""
        with self._lock:
            return {model_id: dict(state) for model_id, state in self._states.items()}


class WorkerHeartbeat:
    """Keeps this worker's ``worker_status`` row fresh from a daemon thread; see the module docstring.

    ``name``: ``host:pid`` - the same name the worker's job claims carry
    (``WorkerContext.worker_name``), so the running job is found. ``models``: the
    context's :class:`TrackedModels` (none for a delivery-only worker). ``device``:
    shown in the UI (none: nothing to show, e.g. an ``io`` worker).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        name: str,
        queues: Sequence[str],
        device: str | None,
        models: TrackedModels | None = None,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"heartbeat interval_seconds must be positive, got {interval_seconds!r}")
        self.name = name
        self._sessions = sessions
        self._queues = tuple(queues)
        self._device = device
        self._models = models
        self._interval = interval_seconds
        self._clock = clock
        self._started_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def beat(self) -> None:
        """Write one heartbeat now (the thread calls this; tests may too)."""
        worker_rows.upsert_worker(
            self._sessions, name=self.name, queues=self._queues, device=self._device, started_at=self._started_at,
            now=self._clock(), models=self._models.states() if self._models is not None else {},
        )

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as exc:  # the database may be away for a while; the worker goes on
                logger.warning("worker %s: heartbeat not written: %s", self.name, exc)
            if self._stop.wait(self._interval):
                return

    def start(self) -> None:
        """Forget long-dead workers, then beat now and every interval until :meth:`stop`."""
        if self._thread is not None or self._closed:  # stopped before it started (the node stopped early)
            return
        try:
            pruned = worker_rows.prune_workers(self._sessions, now=self._clock())
            if pruned:
                logger.info("forgot %d worker(s) not seen for %s", pruned, worker_rows.FORGET_OFFLINE_AFTER)
        except Exception as exc:
            logger.warning("could not prune old worker rows: %s", exc)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()
        logger.info("worker %s: heartbeat every %g s (queues %s)", self.name, self._interval, ",".join(self._queues))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating and delete the row: a worker that stopped on purpose is not a missing one.

        A heartbeat stopped before it started never starts.
        """
        self._closed = True
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        try:
            worker_rows.remove_worker(self._sessions, self.name)
        except Exception as exc:
            logger.warning("worker %s: could not remove its status row: %s", self.name, exc)
