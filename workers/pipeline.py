"""One job, start to finish: series -> volume -> model -> DICOM results -> outbox -> deliveries.

Why: the Celery task is a thin wrapper; this is the whole pipeline, callable with
a :class:`WorkerContext` from a test, the embedded worker or a GPU worker alike.
It is idempotent: a job that is not ``queued`` (already running elsewhere, or done)
is left alone, and a redelivered message costs one UPDATE. Every stage is timed and
the times are stored with the job.

Errors: a series that cannot become a trustworthy volume, or a pipeline that is not
in the registry, makes the job ``dead`` at once with the precise message (retrying
cannot help); anything else is ``failed`` and retried while attempts remain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node.db import config_repo, jobs
from dicom_node.study_store import SeriesNotFound
from dicom_node.work_in_flight import StopRequested
from workers.context import WorkerContext
from workers.models.base import DetectionResult, Model, SegmentationResult
from workers.models.registry import UnknownModel
from workers.outputs.common import SeriesIdentity
from workers.volume import Volume, VolumeError

__all__ = ["ResultObjects", "encode_results", "run_job"]

logger = logging.getLogger(__name__)

ResultObjects = list[tuple[str, Dataset]]


class _Stages:
    """Wall-clock seconds per stage of one attempt."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


@contextmanager
def _lease_kept(ctx: WorkerContext, job_id: int) -> Iterator[None]:
    """Renew the job's lease while the body runs, so a long inference is not taken for a dead worker."""
    stop = threading.Event()
    interval = max(1.0, ctx.job_lease_seconds / 3)

    def renew() -> None:
        while not stop.wait(interval):
            try:
                jobs.heartbeat_job(ctx.sessions, job_id, now=ctx.clock(), lease_seconds=ctx.job_lease_seconds)
            except Exception:
                logger.exception("could not renew the lease of job %d", job_id)

    thread = threading.Thread(target=renew, name=f"lease-job-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _identity(ctx: WorkerContext, kind: str) -> SeriesIdentity:
    series = getattr(ctx.results, kind.lower())
    return SeriesIdentity(
        series_number=series.series_number,
        series_description=series.series_description,
        manufacturer=ctx.results.manufacturer,
    )


def encode_results(ctx: WorkerContext, model: Model, volume: Volume, result: Any) -> ResultObjects:
    """The DICOM objects for one model result: SEG + SR for segmentations, SR + GSPS for detections.

    An empty result still gives an SR that says nothing was found.
    """
    from workers.outputs.gsps import build_gsps
    from workers.outputs.seg import build_seg
    from workers.outputs.sr import DetectionFindings, SegmentationFindings, build_sr

    objects: ResultObjects = []
    algorithm = model.algorithm
    if isinstance(result, SegmentationResult):
        seg = build_seg(volume, result, algorithm, _identity(ctx, "SEG"))
        if seg is not None:
            objects.append(("SEG", seg))
        objects.append(("SR", build_sr(volume, [SegmentationFindings(algorithm, result, seg)], _identity(ctx, "SR"))))
    elif isinstance(result, DetectionResult):
        findings = DetectionFindings(algorithm, result.detections, model.labels)
        objects.append(("SR", build_sr(volume, [findings], _identity(ctx, "SR"))))
        gsps = build_gsps(volume, result.detections, algorithm, _identity(ctx, "GSPS"))
        if gsps is not None:
            objects.append(("GSPS", gsps))
    else:
        raise TypeError(f"model {algorithm.model_id} returned {type(result).__name__}, not a known result type")
    return objects


def _summary(result: Any, volume: Volume) -> dict[str, Any]:
    if isinstance(result, SegmentationResult):
        # Voxel counts only (one pass): the SR already carries the full measurements.
        from workers.outputs.measurements import label_counts, voxel_volume_ml

        counts, voxel_ml = label_counts(result.label_map), voxel_volume_ml(volume)
        return {"kind": "segmentation",
                "volumes_ml": {label.name: round(float(counts[label.value]) * voxel_ml, 2) for label in result.labels}}
    return {
        "kind": "detection",
        "findings": len(result.detections),
        "detections": [
            {"centre_mm": [round(v, 1) for v in d.centre_mm], "diameter_mm": round(d.diameter_mm, 1),
             "score": round(d.score, 3)}
            for d in result.detections
        ],
    }


def _encode_file(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _destination_names(ctx: WorkerContext, wanted: list[str] | str) -> list[str]:
    if wanted == "default":
        return config_repo.default_destination_names(ctx.sessions)
    known = {d.name for d in config_repo.list_destinations(ctx.sessions)}
    missing = [name for name in wanted if name not in known]
    if missing:
        logger.warning("routing asked for unknown destination(s) %s; they are skipped", ", ".join(missing))
    return [name for name in wanted if name in known]


def run_job(ctx: WorkerContext, job_id: int) -> str | None:
    """Run job ``job_id`` if it is queued; returns its new state (None when it was not ours to run).

    Waits for one of the context's job slots first (one job at a time per GPU). Raises
    :class:`StopRequested` when the worker stops (``ctx.work``) before it claimed the
    job: the job stays ``queued`` (the task sends its id back to the queue).
    """
    if not ctx.work.acquire(ctx.job_slots):
        raise StopRequested(f"not claiming job {job_id}: this worker is stopping")
    try:
        claim = ctx.work.claim("job", job_id, lambda: jobs.claim_job(
            ctx.sessions, job_id, worker=ctx.worker_name, now=ctx.clock(), lease_seconds=ctx.job_lease_seconds),
            lambda claimed: claimed.attempt)
        if claim is None:
            logger.debug("job %d is not queued; message ignored", job_id)
            return None
        try:
            return _run_claimed(ctx, claim)
        finally:
            ctx.work.release("job", job_id)
    finally:
        ctx.job_slots.release()


def _run_claimed(ctx: WorkerContext, claim: jobs.JobClaim) -> str | None:
    job_id = claim.job_id
    logger.info("job %d: %s on series %s (attempt %d)", job_id, claim.pipeline, claim.series_instance_uid,
                claim.attempt)
    stages = _Stages()
    try:
        with _lease_kept(ctx, job_id):
            with stages.stage("load"):
                files = ctx.store.series_files(claim.series_instance_uid, study_instance_uid=claim.study_instance_uid)
                volume = ctx.volumes.load(claim.series_instance_uid, files)
            with stages.stage("model_load"):
                model = ctx.models.load(claim.pipeline)
            with stages.stage("inference"):
                result = model.predict(volume)
            with stages.stage("encoding"):
                objects = encode_results(ctx, model, volume, result)
                files = [(kind, dataset, _encode_file(dataset)) for kind, dataset in objects]
            with stages.stage("outbox"):
                specs = []
                for kind, dataset, data in files:
                    relative = f"job-{job_id}/{kind.lower()}-{dataset.SOPInstanceUID}.dcm"
                    ctx.outbox.write(relative, [data])
                    specs.append(jobs.ResultSpec(kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID),
                                                 str(dataset.SeriesInstanceUID), relative))
    except (VolumeError, SeriesNotFound, UnknownModel) as exc:
        return _fail(ctx, job_id, str(exc), retryable=False, stages=stages)
    except Exception as exc:  # a model or encoder bug must fail this job, not the worker
        logger.exception("job %d failed", job_id)
        return _fail(ctx, job_id, f"{type(exc).__name__}: {exc}", retryable=True, stages=stages)
    destinations = _destination_names(ctx, claim.destinations)
    delivery_ids = jobs.finish_job(
        ctx.sessions, job_id, now=ctx.clock(), stage_seconds=stages.seconds, summary=_summary(result, volume),
        results=specs, destinations=destinations, delivery_max_attempts=ctx.delivery_max_attempts,
        worker=ctx.worker_name,
    )
    if delivery_ids is None:
        for spec in specs:
            ctx.outbox.remove(spec.path)
        logger.info("job %d was cancelled, handed back or taken over while it ran; its results are discarded",
                    job_id)
        return None
    for delivery_id in delivery_ids:
        ctx.queue.enqueue_delivery(delivery_id)
    logger.info("job %d succeeded: %s; stages %s; %d delivery(ies)", job_id,
                ", ".join(kind for kind, _, _ in files), stages.seconds, len(delivery_ids))
    return "succeeded"


def _fail(ctx: WorkerContext, job_id: int, error: str, *, retryable: bool, stages: _Stages) -> str | None:
    state = jobs.fail_job(ctx.sessions, job_id, now=ctx.clock(), error=error, retryable=retryable,
                          stage_seconds=stages.seconds, worker=ctx.worker_name)
    logger.warning("job %d %s: %s", job_id, state, error)
    return state
