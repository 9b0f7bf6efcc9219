"""One job, start to finish: series -> volume -> checks -> model -> checks -> DICOM results -> outbox -> deliveries.

Before the model runs, the applicability check (:mod:`workers.applicability`: header
and image) decides whether the series is what the model was made for; when it is
not, the job ends ``not_applicable`` with the reason. After the model ran, its
plausibility rules (:mod:`workers.plausibility`) judge the result; a result that
fails is kept but ``held`` (not sent) until an operator releases or discards it.
Destinations that ask for it (``not_performed: sr``) receive an "AI analysis not
performed" SR with the coded reason in both cases. Both decisions, their evidence and
their cost are stored with the job and written on the study's timeline.

The summary also keeps the findings coded (``summary["reported"]``, :mod:`workers.outputs.reported`)
and the model's name and version (``summary["algorithm"]``): what HL7 and FHIR notifications report.

With the results the worker draws a preview picture (:mod:`workers.outputs.preview`: the
key slice with the result on it) from the volume and the result it holds, and writes it
beside the result objects in the outbox; the job's summary names its files
(``summary["preview"]``) or why none was drawn. It is not a result object: it is never
delivered, and a preview that cannot be drawn never fails the job.

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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.contracts import AlgorithmInfo
from dicom_node.db import config_repo, job_reruns, job_scheduling, jobs
from dicom_node.db.models import JobState
from dicom_node.model_domain import Applicability
from dicom_node.result_variants import LOW_VARIANT_SUFFIX
from dicom_node.study_store import SeriesNotFound
from dicom_node.work_in_flight import StopRequested
from workers.applicability import check_applicability
from workers.context import WorkerContext
from workers.models.base import ClassificationResult, DetectionResult, Model, SegmentationResult
from workers.models.registry import UnknownModel
from workers.outputs.common import SeriesIdentity
from workers.outputs.confidence import is_low_confidence, split_by_confidence
from workers.outputs.preview import PreviewPicture, render_preview
from workers.outputs.reported import reported_findings
from workers.outputs.tracking import FindingTracker, tracked_findings
from workers.outputs.writing import dicom_bytes
from workers.plausibility import check_plausibility
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


def _identity(ctx: WorkerContext, model_id: str, kind: str, generation: int = 1) -> SeriesIdentity:
    """Series number and description of ``model_id``'s results of ``kind`` (each model has its own); a re-run
    (``generation`` 2, 3, ...) says so in the description ("... (run 2)"), its objects being new ones in new series."""
    number, description = ctx.models.result_series(model_id, kind)
    if generation > 1:
        suffix = f" (run {generation})"
        description = description[:64 - len(suffix)] + suffix
    return SeriesIdentity(series_number=number, series_description=description, manufacturer=ctx.results.manufacturer)


def _replaced_reports(volume: Volume, lineage: job_reruns.Lineage) -> list[Dataset]:
    """The earlier reports a re-run's SR replaces, as highdicom takes them (Predecessor Documents Sequence)."""
    replaced = []
    for sop_class, sop_instance, series in lineage.replaced_reports:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = volume.study_instance_uid, series
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
        replaced.append(ds)
    return replaced


def encode_results(ctx: WorkerContext, model: Model, volume: Volume, result: Any,
                   lineage: job_reruns.Lineage = job_reruns.Lineage(1, ()),
                   tracker: FindingTracker | None = None, *, overlays: bool = False,
                   low_variants: frozenset[str] = frozenset()) -> ResultObjects:
    """The DICOM objects for one model result: SEG + SR for segmentations, SR + GSPS for detections,
    SR + PMAP + SC (the explanation map) for classifications; and a KO (Key Object Selection) of the source
    images with findings, when there are any. Every object names the model, with the registry's Device UID,
    as contributing equipment.

    An empty result still gives an SR that says nothing was found. ``lineage``: for a re-run of the
    model on the series, its generation (in the series descriptions), the reports its SR replaces and the
    findings they stated, whose tracking UIDs the same findings keep. ``tracker`` (default: one started from
    ``lineage``) records the findings the SR states (the job keeps them in its summary). ``overlays``: also
    burn a segmentation's or detection's key slices into an "AI overlay" Secondary Capture series (SC), which
    only destinations naming SC receive: built only when one of the job's destinations does (a few MB per job).

    A detection model's display threshold (registry ``display_threshold``) keeps its low-confidence findings
    out of the GSPS, the SC and the KO (the SR reports them, marked); ``low_variants`` names the kinds ("GSPS",
    "SC") for which a variant with them outlined too is built (kind "GSPS+LOW", "SC+LOW"; only when there are
    such findings), for the destinations that ask (:mod:`dicom_node.result_variants`).
    """
    from workers.outputs.seg import build_seg
    from workers.outputs.sr import DetectionFindings, SegmentationFindings, build_sr

    objects: ResultObjects = []
    model_id = model.algorithm.model_id
    algorithm = ctx.models.identify(model_id, model.algorithm)  # with the registry's Device UID
    replaces = _replaced_reports(volume, lineage)
    if tracker is None:
        tracker = FindingTracker(tracked_findings(lineage.earlier_tracking))

    def identity(kind: str) -> SeriesIdentity:
        return _identity(ctx, model_id, kind, lineage.generation)

    if isinstance(result, SegmentationResult):
        seg = build_seg(volume, result, algorithm, identity("SEG"))
        if seg is not None:
            objects.append(("SEG", seg))
        objects.append(("SR", build_sr(volume, [SegmentationFindings(algorithm, result, seg)], identity("SR"),
                                       replaces=replaces, tracker=tracker)))
        if overlays:
            from workers.outputs.overlay import build_segmentation_overlay

            objects.extend(("SC", sc) for sc in build_segmentation_overlay(volume, result, algorithm, identity("SC")))
    elif isinstance(result, DetectionResult):
        threshold = ctx.models.display_threshold(model_id)
        findings = DetectionFindings(algorithm, result.detections, model.labels, display_threshold=threshold)
        objects.append(("SR", build_sr(volume, [findings], identity("SR"), replaces=replaces, tracker=tracker)))
        objects.extend(_detection_marks(volume, result, algorithm, identity, threshold, overlays, low_variants))
        result = DetectionResult(split_by_confidence(result.detections, threshold)[0])  # the KO's key images
    elif isinstance(result, ClassificationResult):
        from workers.outputs.explanation import build_overlay_sc, build_parametric_map
        from workers.outputs.sr import ClassificationFindings

        objects.append(("SR", build_sr(volume, [ClassificationFindings(algorithm, result)], identity("SR"),
                                       replaces=replaces, tracker=tracker)))
        if result.explanation is not None:  # sent only to destinations that ask for PMAP / SC
            objects.append(("PMAP", build_parametric_map(volume, result, algorithm, identity("PMAP"))))
            objects.extend(("SC", sc) for sc in build_overlay_sc(volume, result, algorithm,
                                                                 identity("SC")))
    else:
        raise TypeError(f"model {algorithm.model_id} returned {type(result).__name__}, not a known result type")
    from workers.outputs.key_images import build_key_object_selection

    key_images = build_key_object_selection(volume, result, algorithm, identity("KO"))
    if key_images is not None:
        objects.append(("KO", key_images))
    return objects


def _detection_marks(volume: Volume, result: DetectionResult, algorithm: AlgorithmInfo,
                     identity: Callable[[str], SeriesIdentity], threshold: float | None, overlays: bool,
                     low_variants: frozenset[str]) -> ResultObjects:
    """A detection's GSPS (and SC when ``overlays``) without its low-confidence findings, and the variants
    with them (``GSPS+LOW``, ``SC+LOW``) of the kinds in ``low_variants`` when there are such findings."""
    from workers.outputs.gsps import build_gsps
    from workers.outputs.overlay import build_detection_overlay

    objects: ResultObjects = []
    any_low = bool(split_by_confidence(result.detections, threshold)[1])
    for outline_low in (False, True) if any_low else (False,):
        suffix = LOW_VARIANT_SUFFIX if outline_low else ""
        if not outline_low or "GSPS" in low_variants:
            gsps = build_gsps(volume, result.detections, algorithm, identity("GSPS"), threshold=threshold,
                              outline_low_confidence=outline_low)
            if gsps is not None:
                objects.append(("GSPS" + suffix, gsps))
        if overlays and (not outline_low or "SC" in low_variants):
            objects.extend(("SC" + suffix, sc) for sc in build_detection_overlay(
                volume, result.detections, algorithm, identity("SC"), threshold=threshold,
                outline_low_confidence=outline_low))
    return objects


def _summary(result: Any, volume: Volume, threshold: float | None = None) -> dict[str, Any]:
    if isinstance(result, SegmentationResult):
        # Voxel counts only (one pass): the SR already carries the full measurements.
        from workers.outputs.measurements import label_counts, voxel_volume_ml

        counts, voxel_ml = label_counts(result.label_map), voxel_volume_ml(volume)
        return {"kind": "segmentation",
                "volumes_ml": {label.name: round(float(counts[label.value]) * voxel_ml, 2) for label in result.labels}}
    if isinstance(result, ClassificationResult):
        return {"kind": "classification", "class": result.winner.name,
                "probabilities": {label.name: round(p, 4) for label, p in zip(result.labels, result.probabilities)},
                "explanation": result.explanation_method}
    return {
        "kind": "detection",
        "findings": len(result.detections),
        "display_threshold": threshold,
        "detections": [
            {"centre_mm": [round(v, 1) for v in d.centre_mm], "diameter_mm": round(d.diameter_mm, 1),
             "score": round(d.score, 3), "low_confidence": is_low_confidence(d, threshold)}
            for d in result.detections
        ],
    }


def run_job(ctx: WorkerContext, job_id: int) -> str | None:
    """Run the queued job that should run first, woken by the message of job ``job_id``; returns the new
    state of the job it ran (None when no job was queued any more: others took them; ``running`` when its
    objects are being encoded by the context's encoder, which finishes it).

    The message's job is not necessarily the one that runs: once this worker has one of
    the context's job slots (one job at a time per GPU), it claims the best queued job
    (:func:`dicom_node.db.job_scheduling.claim_next_job`: rule priority, expected
    duration with aging, the series whose volume it holds), so a message waiting for a
    slot pins no job. One message runs at most one job, and every queued job has a
    message, so every queued job runs. Raises :class:`StopRequested` when the worker
    stops (``ctx.work``) before it claimed a job: the jobs stay ``queued`` (the task
    sends its id back to the queue).

    The job slot is held while the series loads, the checks and the model run; with an encoder
    (``ctx.encoder``, :mod:`workers.encoder`) the rest - DICOM objects, outbox, finishing the job
    and queueing its deliveries - is handed to it and the slot freed for the next job's model, the
    job staying ``running`` (lease renewed, claim held) until it is finished. Without one, it is
    all done here, in the slot.
    """
    if not ctx.work.acquire(ctx.job_slots):
        raise StopRequested(f"not claiming a job for the message of job {job_id}: this worker is stopping")
    try:
        claim = ctx.work.claim("job", job_id, lambda: job_scheduling.claim_next_job(
            ctx.sessions, worker=ctx.worker_name, now=ctx.clock(), lease_seconds=ctx.job_lease_seconds,
            declared=ctx.expected_seconds, cached=ctx.volumes.cached()),
            lambda claimed: claimed.attempt, lambda claimed: claimed.job_id)
        if claim is None:
            logger.debug("message of job %d: no job is queued any more; nothing to run", job_id)
            return None
        with ExitStack() as held:  # what the job holds until it is finished: its claim, its lease
            held.callback(ctx.work.release, "job", claim.job_id)
            held.enter_context(_lease_kept(ctx, claim.job_id))
            ran = _run_model(ctx, claim)
            if not isinstance(ran, _Ran):
                return ran
            if ctx.encoder is None:
                return _encode_and_finish(ctx, ran)
            handed = held.pop_all()
            try:
                with ran.stages.stage("encoder_wait"):  # only while the encoder still has `pending` jobs
                    ctx.encoder.submit(partial(_finish_handed_over, ctx, ran, handed))
            except BaseException:
                handed.close()
                raise
            return JobState.RUNNING.value
    finally:
        ctx.job_slots.release()


@dataclass(frozen=True)
class _Wanted:
    """What the job's destinations ask for beyond the default objects."""

    overlays: bool  # one names SC: build the burned-in overlay series
    low_variants: frozenset[str]  # the kinds (GSPS, SC) one that outlines low-confidence findings receives


def _outputs_wanted(ctx: WorkerContext, names: list[str]) -> _Wanted:
    """Whether one of the destinations ``names`` receives the burned-in overlay series (outputs name SC), and
    of which kinds a low-confidence variant is wanted (a destination with ``outline_low_confidence``)."""
    chosen = [d for d in config_repo.list_destinations(ctx.sessions) if d.name in names]
    return _Wanted(overlays=any(d.accepts("SC") for d in chosen),
                   low_variants=frozenset(kind for d in chosen if d.outline_low_confidence
                                          for kind in ("GSPS", "SC") if d.accepts(kind)))


def _notice_destinations(ctx: WorkerContext, names: list[str]) -> list[str]:
    """Which of ``names`` asked for the "AI analysis not performed" SR (``not_performed: sr``)."""
    wanting = {d.name for d in config_repo.list_destinations(ctx.sessions) if d.name in names and d.not_performed == "sr"}
    return [name for name in names if name in wanting]


def _algorithm(ctx: WorkerContext, model_id: str) -> AlgorithmInfo:
    """Who declined, for the notice, without loading the network: the registry entry's id, name, version and
    Device UID."""
    return ctx.models.identify(model_id)


def _job_folder(job_id: int) -> str:
    """The job's folder in the outbox: its result objects and its preview."""
    return f"job-{job_id}"


def _write_objects(ctx: WorkerContext, job_id: int, objects: ResultObjects) -> list[jobs.ResultSpec]:
    specs = []
    for kind, dataset in objects:
        data = dicom_bytes(dataset)
        relative = f"{_job_folder(job_id)}/{kind.lower()}-{dataset.SOPInstanceUID}.dcm"
        ctx.outbox.write(relative, [data])
        specs.append(jobs.ResultSpec(kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID),
                                     str(dataset.SeriesInstanceUID), relative))
    return specs


def _render_preview(volume: Volume, result: Any, model: Model, threshold: float | None) -> PreviewPicture | str:
    """The job's preview picture, or why none could be drawn (a preview is not worth failing the job for)."""
    try:
        return render_preview(volume, result, model.algorithm, threshold=threshold)
    except Exception as exc:  # a drawing bug must cost the picture only
        logger.warning("no preview of series %s by %s: %s: %s", volume.series_instance_uid,
                       model.algorithm.model_id, type(exc).__name__, exc, exc_info=True)
        return f"the preview could not be drawn: {type(exc).__name__}: {exc}"


def _write_preview(ctx: WorkerContext, job_id: int, preview: PreviewPicture | str) -> dict[str, str]:
    """Write the preview beside the job's result objects (never recorded as a result, so never delivered);
    returns what the job's summary says of it: ``{"png": path, "facts": path}`` (outbox-relative) or
    ``{"error": why}``."""
    if isinstance(preview, str):
        return {"error": preview}
    written = {}
    for role, (name, data) in preview.files().items():
        relative = f"{_job_folder(job_id)}/{name}"
        ctx.outbox.write(relative, [data])
        written[role] = relative
    return written


@dataclass
class _Ran:
    """A claimed job whose series was loaded and checked and whose model ran (or was found not to apply):
    what encoding its objects and finishing it need."""

    claim: jobs.JobClaim
    stages: _Stages
    destinations: list[str]
    volume: Volume
    applicability: Applicability
    checks: dict[str, Any]
    events: list[tuple[str, str]]
    state: str = JobState.SUCCEEDED.value
    model: Model | None = None
    result: Any = None
    reason_code: str | None = None
    reason: str | None = None


def _run_model(ctx: WorkerContext, claim: jobs.JobClaim) -> _Ran | str | None:
    """Load and check the series, run the model and check its result: the part of a job that needs the job slot
    (the GPU). Returns what the rest of the job needs, or the state of a job that failed here."""
    job_id = claim.job_id
    model_id = claim.pipeline
    logger.info("job %d: %s on series %s (attempt %d)", job_id, model_id, claim.series_instance_uid,
                claim.attempt)
    stages = _Stages()
    try:
        destinations = config_repo.resolve_destination_names(ctx.sessions, claim.destinations)
        with stages.stage("load"):
            files = ctx.store.series_files(claim.series_instance_uid, study_instance_uid=claim.study_instance_uid)
            volume = ctx.volumes.load(claim.series_instance_uid, files)
        with stages.stage("applicability"):
            checked = check_applicability(model_id, ctx.models.input_domain(model_id), volume, ctx.synonyms)
        applicability = checked.applicability
        ran = _Ran(claim, stages, destinations, volume, applicability, {"applicability": applicability.as_record()},
                   [("job_checked", f"job {job_id}: {applicability.summary()} ({_evidence(applicability)}; "
                                    f"{applicability.seconds:.2f} s)")])
        if not applicability.applies:
            ran.state, ran.reason_code, ran.reason = JobState.NOT_APPLICABLE.value, applicability.reason_code, \
                applicability.reason
            return ran
        with stages.stage("model_load"):
            ran.model = ctx.models.load(model_id)
        with stages.stage("inference"):
            ran.result = ran.model.predict(volume)
        rules = ctx.models.plausibility(model_id)
        if rules is not None:
            with stages.stage("plausibility"):
                plausibility = check_plausibility(model_id, rules, ran.result, volume, checked.survey)
            ran.checks["plausibility"] = plausibility.as_record()
            if not plausibility.plausible:
                ran.state, ran.reason_code, ran.reason = JobState.HELD.value, "implausible", \
                    "; ".join(plausibility.reasons)
                ran.events.append(("job_held", f"job {job_id} ({model_id}): results held, not sent: {ran.reason}"))
        return ran
    except Exception as exc:
        return _failed(ctx, job_id, exc, stages)


def _finish_handed_over(ctx: WorkerContext, ran: _Ran, held: ExitStack) -> str | None:
    """The encoder thread's part of a job: :func:`_encode_and_finish`, then release its lease and claim."""
    with held:
        return _encode_and_finish(ctx, ran)


def _encode_and_finish(ctx: WorkerContext, ran: _Ran) -> str | None:
    """The DICOM objects of a job whose model ran, written to the outbox; the job finished with its deliveries
    queued. Returns its new state (None when it was no longer this worker's: its objects are discarded)."""
    job_id, model_id, stages = ran.claim.job_id, ran.claim.pipeline, ran.stages
    volume, result, model = ran.volume, ran.result, ran.model
    objects: ResultObjects = []
    summary: dict[str, Any] | None = None
    preview: PreviewPicture | str | None = None
    try:
        if model is not None:
            with stages.stage("encoding"):
                lineage = job_reruns.lineage(ctx.sessions, job_id)
                tracker = FindingTracker(tracked_findings(lineage.earlier_tracking))
                wanted = _outputs_wanted(ctx, ran.destinations)
                threshold = ctx.models.display_threshold(model_id) if isinstance(result, DetectionResult) else None
                objects = encode_results(ctx, model, volume, result, lineage, tracker,
                                         overlays=wanted.overlays, low_variants=wanted.low_variants)
                preview = _render_preview(volume, result, model, threshold)
            summary = _summary(result, volume, threshold)
            summary["tracking"] = [finding.as_record() for finding in tracker.records]
            summary["reported"] = reported_findings(result, summary.get("volumes_ml"), threshold)
            summary["algorithm"] = {"name": model.algorithm.name, "version": model.algorithm.version}
        noticed = _notice_destinations(ctx, ran.destinations) if ran.reason_code is not None else []
        if noticed:
            assert ran.reason_code is not None and ran.reason is not None
            with stages.stage("encoding"):
                from workers.outputs.notice import build_not_performed_sr

                objects.append((jobs.NOTICE_KIND, build_not_performed_sr(
                    volume, _algorithm(ctx, model_id), ran.reason_code, ran.reason,
                    _identity(ctx, model_id, jobs.NOTICE_KIND))))
        with stages.stage("outbox"):
            specs = _write_objects(ctx, job_id, objects)
            if summary is not None and preview is not None:
                summary["preview"] = _write_preview(ctx, job_id, preview)
    except Exception as exc:
        return _failed(ctx, job_id, exc, stages)
    events = list(ran.events)
    if ran.state == JobState.NOT_APPLICABLE.value:
        events.append(("job_not_applicable", f"job {job_id}: {ran.applicability.summary()}"))
    if ran.state == JobState.SUCCEEDED.value:
        deliveries = [jobs.DeliverySpec(name) for name in ran.destinations]
    else:
        deliveries = [jobs.DeliverySpec(name, (jobs.NOTICE_KIND,)) for name in noticed]
    delivery_ids = jobs.finish_job(
        ctx.sessions, job_id, now=ctx.clock(), stage_seconds=stages.seconds, summary=summary,
        results=specs, deliveries=deliveries, delivery_max_attempts=ctx.delivery_max_attempts,
        worker=ctx.worker_name, state=ran.state, checks=ran.checks, events=events,
    )
    if delivery_ids is None:
        # Only this attempt's objects (named by their SOP Instance UIDs): the preview's files are the job's, the
        # same for every attempt, and may be those of the attempt that took the job over and finished it.
        for spec in specs:
            ctx.outbox.remove(spec.path)
        logger.info("job %d was cancelled, handed back or taken over while it ran; its results are discarded",
                    job_id)
        return None
    for delivery_id in delivery_ids:
        ctx.queue.enqueue_delivery(delivery_id)
    logger.info("job %d %s: %s; stages %s; %d delivery(ies)%s", job_id, ran.state,
                ", ".join(spec.kind for spec in specs) or "no objects", stages.seconds, len(delivery_ids),
                f"; {ran.reason}" if ran.reason else "")
    return ran.state


def _evidence(applicability: Applicability) -> str:
    """The header's and the image's word on the body region, for the timeline."""
    parts = [f"header: {', '.join(applicability.header_regions) or 'no region named'}"]
    if applicability.image_regions is not None:
        parts.append(f"image: {', '.join(applicability.image_regions) or 'no region found'}")
    return "; ".join(parts)


def _failed(ctx: WorkerContext, job_id: int, exc: Exception, stages: _Stages) -> str | None:
    """Fail job ``job_id`` for ``exc``: at once (``dead``) when retrying cannot help - a series that cannot become a
    trustworthy volume, a pipeline not in the registry - else ``failed``, retried while attempts remain."""
    if isinstance(exc, (VolumeError, SeriesNotFound, UnknownModel)):
        return _fail(ctx, job_id, str(exc), retryable=False, stages=stages)
    # A model or encoder bug must fail this job, not the worker.
    logger.error("job %d failed", job_id, exc_info=exc)
    return _fail(ctx, job_id, f"{type(exc).__name__}: {exc}", retryable=True, stages=stages)


def _fail(ctx: WorkerContext, job_id: int, error: str, *, retryable: bool, stages: _Stages) -> str | None:
    state = jobs.fail_job(ctx.sessions, job_id, now=ctx.clock(), error=error, retryable=retryable,
                          stage_seconds=stages.seconds, worker=ctx.worker_name)
    logger.warning("job %d %s: %s", job_id, state, error)
    return state
