"""Everything a worker process needs, built once from the settings and passed to every task.

Why: tasks take only ids and re-read everything; what they read it with (the
database, the study store, the model registry, the outbox, the queue for follow-up
work) lives here instead of in module globals, so tests, the embedded worker and
GPU workers build the same thing from their own settings.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.contracts import AlgorithmInfo
from dicom_node.db.job_scheduling import CachedVolume
from dicom_node.model_domain import InputDomain, SynonymTable
from dicom_node.plausibility_rules import PlausibilityRules
from dicom_node.queue import JobQueue
from dicom_node.remote_outbox import Outbox
from dicom_node.settings import ResultsSettings, Settings
from dicom_node.spool import Spool
from dicom_node.study_store import FileStudyStore, StudyStore
from dicom_node.work_in_flight import WorkInFlight
from workers.encoder import ResultEncoder
from workers.heartbeat import TrackedModels
from workers.models.base import Model
from workers.volume import FrameRef, Volume, load_series

__all__ = ["ModelProvider", "WorkerContext", "build_worker_context", "declared_seconds", "node_access",
           "preload_models"]

logger = logging.getLogger(__name__)


class ModelProvider(Protocol):
    """Loads a model by registry id (once per process) and hands it out, with what its entry declares."""

    def load(self, model_id: str) -> Model: ...

    def input_domain(self, model_id: str) -> InputDomain: ...

    def plausibility(self, model_id: str) -> PlausibilityRules | None: ...

    def result_series(self, model_id: str, kind: str) -> tuple[int, str]: ...

    def identify(self, model_id: str, loaded: AlgorithmInfo | None = None) -> AlgorithmInfo: ...

    def display_threshold(self, model_id: str) -> float | None: ...


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class VolumeCache:
    """The last series this worker loaded: the jobs of one study (segmentation, then detection) share it.

    Keyed by Series Instance UID and the exact list of files, so a series that
    received more instances since is loaded again. It remembers what the load cost, so
    that the scheduler can prefer the jobs that skip it (:meth:`cached`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, tuple[str, ...]] | None = None
        self._volume: Volume | None = None
        self._load_seconds = 0.0

    def cached(self) -> CachedVolume | None:
        """The series held now and the seconds its load took (None when nothing is held)."""
        with self._lock:
            return None if self._key is None else CachedVolume(self._key[0], self._load_seconds)

    def load(self, series_instance_uid: str, files: Sequence[Path]) -> Volume:
        key = (series_instance_uid, tuple(str(f) for f in files))
        with self._lock:
            if self._key == key and self._volume is not None:
                return self._volume
            self._key, self._volume = None, None  # release the old one before loading the next
            started = time.perf_counter()
            volume = load_series(files)
            self._key, self._volume, self._load_seconds = key, volume, time.perf_counter() - started
            return volume


@dataclass
class WorkerContext:
    """What :func:`workers.pipeline.run_job` reads and writes with (delivery has its own Dispatcher)."""

    sessions: sessionmaker[Session]
    store: StudyStore
    models: ModelProvider
    outbox: Outbox
    queue: JobQueue
    results: ResultsSettings
    synonyms: SynonymTable = field(default_factory=SynonymTable)
    job_lease_seconds: float = 300.0
    delivery_max_attempts: int = 10
    clock: Callable[[], datetime] = _utc_now
    worker_name: str = socket.gethostname()
    job_slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    volumes: VolumeCache = field(default_factory=VolumeCache)
    #: The jobs this process runs now; shared with its dispatcher, so that a stop hands back both.
    work: WorkInFlight = field(default_factory=WorkInFlight)
    #: Model id -> the seconds its registry entry says one job takes (``expected_seconds``), for the order in
    #: which queued jobs are taken until the node has learned it (:mod:`dicom_node.db.job_scheduling`).
    expected_seconds: Mapping[str, float] = field(default_factory=dict)
    #: Encodes and finishes the jobs whose model ran, so that the next model runs meanwhile
    #: (:mod:`workers.encoder`); None: each job is encoded in its own job slot.
    encoder: ResultEncoder | None = None


def build_worker_context(
    settings: Settings, sessions: sessionmaker[Session], queue: JobQueue, models: ModelProvider | None = None,
    *, job_concurrency: int = 1, work: WorkInFlight | None = None, worker_name: str | None = None,
) -> WorkerContext:
    """The context of a worker (embedded or separate) from the node's settings; at most ``job_concurrency``
    jobs run at once in this process (one per GPU). ``work``: the process's :class:`WorkInFlight` (new if none);
    ``worker_name``: how its job claims name it (default host:pid)."""
    from workers.models.loading import use_cudnn_benchmark

    use_cudnn_benchmark(settings.worker.cudnn_benchmark)
    if models is None:
        from workers.models.registry import default_registry, load_model_registry

        models_file: Path | None = settings.routing.models_file
        models = default_registry() if models_file is None else load_model_registry(models_file)
    if not isinstance(models, TrackedModels):  # load states for the worker's heartbeat (dashboard, models page)
        models = TrackedModels(models)
    store, outbox = node_access(settings, sessions)
    return WorkerContext(
        sessions=sessions,
        store=store,
        models=models,
        outbox=outbox,
        queue=queue,
        results=settings.results,
        synonyms=settings.applicability.synonym_table(),
        job_lease_seconds=settings.routing.job_lease_seconds,
        delivery_max_attempts=settings.delivery.max_attempts,
        worker_name=worker_name or f"{socket.gethostname()}:{os.getpid()}",
        job_slots=threading.Semaphore(job_concurrency),
        work=work if work is not None else WorkInFlight(),
        expected_seconds=declared_seconds(models),
        encoder=ResultEncoder(settings.worker.pending_encodes) if settings.worker.pending_encodes else None,
    )


def node_access(settings: Settings, sessions: sessionmaker[Session]) -> tuple[StudyStore, Outbox]:
    """How this worker reads series and writes results (``worker.node_access``): the node's spool and outbox
    on a shared filesystem, or the node's DICOMweb and outbox uploads over HTTP (a cache in this data_dir)."""
    if settings.worker.node_access == "shared_filesystem":
        return (FileStudyStore(sessions, settings.spool_dir),
                Spool(settings.outbox_dir, fsync=settings.storage.fsync))
    from dicom_node.http_study_store import HttpStudyStore
    from dicom_node.node_client import NodeClient, node_ssl_context
    from dicom_node.remote_outbox import HttpOutbox

    access = settings.worker
    assert access.node_url is not None  # WorkerSettings checks it for http
    client = NodeClient(access.node_url, access.resolved_token(), timeout_seconds=access.timeout_seconds,
                        ssl_context=node_ssl_context(access.tls_verify, access.ca_certificates))
    logger.info("worker reaches the node over HTTP at %s (series cache %s, %d MiB)", access.node_url,
                settings.series_cache_dir, access.cache_max_mb)
    return (HttpStudyStore(client, settings.series_cache_dir, max_bytes=access.cache_max_mb * 1_048_576),
            HttpOutbox(client))


def declared_seconds(models: ModelProvider) -> dict[str, float]:
    """Model id -> ``expected_seconds`` of its registry entry, for the models whose entry declares it."""
    entry_of = getattr(models, "entry", None)
    if entry_of is None:
        return {}
    declared = {}
    for model_id in getattr(models, "ids", ()):
        seconds = getattr(entry_of(model_id), "expected_seconds", None)
        if seconds is not None:
            declared[model_id] = float(seconds)
    return declared


def preload_models(models: ModelProvider) -> None:
    """Load every model of the registry now and run it once on a small synthetic CT, so the first study
    waits neither for loading nor for first-call initialisation; failures are logged, not raised."""
    warm_up = _warm_up_volume()
    for model_id in getattr(models, "ids", ()):
        try:
            models.input_domain(model_id)  # a wrong declaration shows now, as this model's failure
            models.plausibility(model_id)
            models.load(model_id).predict(warm_up)
        except Exception as exc:  # a broken entry must not stop the worker; its jobs fail with the reason
            logger.error("model %s cannot be loaded: %s", model_id, exc)
            if isinstance(models, TrackedModels):  # a warm-up run that fails after loading counts too
                models.record_failure(model_id, exc)


def _warm_up_volume() -> Volume:
    """A 24-slice 64x64 axial volume of air, soft tissue and bone at 5 mm (what a model's first call needs)."""
    array = np.full((24, 64, 64), -1000.0, dtype=np.float32)
    array[:, 12:52, 8:56] = 40.0
    array[:, 28:36, 30:34] = 700.0
    return Volume(
        array=array, spacing_mm=(5.0, 5.0, 5.0), origin_mm=(-160.0, -160.0, -60.0), axes=np.eye(3)[::-1].copy(),
        series_instance_uid="2.25.1", study_instance_uid="2.25.2", frame_of_reference_uid="2.25.3", modality="CT",
        frames=tuple(FrameRef(f"2.25.4.{k}") for k in range(24)), datasets=(),
    )
