"""Monitoring endpoints: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz`` (readiness).

PUBLIC BY DESIGN: these routes use no ``require()`` - no user login and no API
token of a user - because Prometheus and orchestrators (systemd, Kubernetes probes,
load balancers) call them, and they carry no patient data: only counts, states,
pipeline and destination names, and check names. Each can be closed with a shared
bearer token instead: ``web.metrics_token`` for ``/metrics``, ``web.health_token``
for ``/healthz`` and ``/readyz`` (401 without it). With ``web.ops_port`` they are
served on their own port only (:func:`dicom_node.web.app.create_ops_app`) and the
admin app does not have them.

``/metrics`` is computed at scrape time from the database by :class:`NodeCollector`, from
the counts the database keeps as rows change (:mod:`dicom_node.db.counters`): a scrape reads
a few dozen rows whatever the size of the history, and its counters survive restarts. It is
registered in a :class:`~prometheus_client.CollectorRegistry` of the app's own
(never the process-global registry), so every app - and every test - has its own.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel

from dicom_node.db import monitoring
from dicom_node.db.models import DeliveryState, JobState, StudyState
from dicom_node.web.context import WebContext, get_context

__all__ = ["STAGE_BUCKETS", "NodeCollector", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["monitoring"])

#: Histogram buckets (seconds) of dicom_node_job_stage_seconds: from a fast outbox write to a long CPU inference.
#: The database counts stage times into these (migration 0012): changing them needs a migration.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class NodeCollector(Collector):
    """Reads the node's aggregates from the database at scrape time (see :mod:`dicom_node.db.monitoring`)."""

    def __init__(self, context: WebContext) -> None:
        self._context = context

    def collect(self) -> Iterator[Metric]:
        context = self._context
        up = GaugeMetricFamily("dicom_node_database_up", "1 if the node's database answered this scrape.")
        try:
            snapshot = monitoring.metrics_snapshot(
                context.sessions, now=context.clock(), worker_stale_seconds=context.settings.web.worker_stale_seconds)
        except Exception as exc:  # a scrape must say the database is away, not fail with a 500
            logger.warning("metrics: database not readable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _families(snapshot)
        yield _stage_histogram(snapshot)


def _stage_histogram(s: monitoring.MetricsSnapshot, buckets: tuple[float, ...] = STAGE_BUCKETS
                     ) -> HistogramMetricFamily:
    """dicom_node_job_stage_seconds from the database's counts of stage times per bucket (migration 0012 keeps
    them with the buckets of :data:`STAGE_BUCKETS`), made cumulative as Prometheus wants them."""
    family = HistogramMetricFamily(
        "dicom_node_job_stage_seconds", "Seconds each stage of finished jobs took (load, applicability, model_load, "
        "inference, plausibility, encoding, outbox); finished: succeeded, not_applicable, held, released or "
        "discarded.", labels=["stage", "pipeline"])
    labels = [repr(float(b)) for b in buckets]
    per_series: dict[tuple[str, str], dict[str, int]] = {}
    for (stage, pipeline, le), count in s.stage_buckets.items():
        per_series.setdefault((stage, pipeline), {})[le] = count
    for (stage, pipeline), counts in sorted(per_series.items()):
        unknown = set(counts) - set(labels) - {"+Inf"}
        if unknown:  # buckets of another version of the node: counted in +Inf only, never misplaced
            logger.warning("metrics: stage %s of %s has buckets %s, not those of this version", stage, pipeline,
                           sorted(unknown))
        running, cumulative = 0, []
        for label in labels:
            running += counts.get(label, 0)
            cumulative.append((label, running))
        cumulative.append(("+Inf", sum(counts.values())))
        family.add_metric([stage, pipeline], cumulative, s.stage_seconds.get((stage, pipeline), 0.0))
    return family


def _families(s: monitoring.MetricsSnapshot) -> Iterator[Metric]:
    yield CounterMetricFamily("dicom_node_instances_received", "Instances stored, counted when their association "
                              "or STOW-RS request ended.", value=s.instances_received)
    yield CounterMetricFamily("dicom_node_bytes_received", "Bytes of stored instances, counted when their "
                              "association or STOW-RS request ended.", value=s.bytes_received)
    associations = CounterMetricFamily("dicom_node_associations", "DICOM associations that ended, by outcome.",
                                       labels=["outcome"])
    for outcome in ("released", "aborted", "rejected", "interrupted"):
        associations.add_metric([outcome], s.associations.get(outcome, 0))
    yield associations
    yield GaugeMetricFamily("dicom_node_associations_open", "DICOM associations open now.", value=s.associations_open)
    stow = CounterMetricFamily("dicom_node_stow_requests", "STOW-RS requests that ended, by outcome (released: "
                               "answered, aborted: the body was cut off, too large or malformed).",
                               labels=["outcome"])
    for outcome in ("released", "aborted", "interrupted"):
        stow.add_metric([outcome], s.stow_requests.get(outcome, 0))
    yield stow
    rejected = CounterMetricFamily("dicom_node_associations_rejected", "Rejected associations, by reason.",
                                   labels=["reason"])
    for reason in ("called_ae_title", "calling_ae_title", "calling_address", "too_many_associations",
                   "invalid_request", "other"):
        rejected.add_metric([reason], s.rejected.get(reason, 0))
    yield rejected
    ingest = CounterMetricFamily("dicom_node_ingest_errors", "Instances refused, by the DIMSE status answered.",
                                 labels=["status"])
    for status, count in sorted(s.ingest_errors.items()):
        ingest.add_metric([status], count)
    yield ingest
    studies = GaugeMetricFamily("dicom_node_studies", "Studies by state.", labels=["state"])
    for state in StudyState:
        studies.add_metric([state.value], s.studies.get(state.value, 0))
    yield studies
    jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs by state and pipeline (held: results judged implausible, "
                             "waiting for an operator; not_applicable: the model was not made for the series).",
                             labels=["state", "pipeline"])
    pipelines = sorted({p for _, p in s.jobs})
    for pipeline in pipelines:
        for state in JobState:
            jobs.add_metric([state.value, pipeline], s.jobs.get((state.value, pipeline), 0))
    yield jobs
    queue = GaugeMetricFamily("dicom_node_queue_depth", "Work waiting (queued, or failed and waiting for a "
                              "retry): gpu = jobs, io = deliveries.", labels=["queue"])
    active = GaugeMetricFamily("dicom_node_queue_active", "Work being done now: gpu = running jobs, io = "
                               "deliveries sending.", labels=["queue"])
    for depth in s.queues:
        queue.add_metric([depth.queue], depth.waiting)
        active.add_metric([depth.queue], depth.active)
    yield queue
    yield active
    deliveries = GaugeMetricFamily("dicom_node_deliveries", "Deliveries by state and destination.",
                                   labels=["state", "destination"])
    destinations = sorted({d for _, d in s.deliveries})
    for destination in destinations:
        for state in DeliveryState:
            deliveries.add_metric([state.value, destination], s.deliveries.get((state.value, destination), 0))
    yield deliveries
    failures = CounterMetricFamily("dicom_node_delivery_failures", "Delivery attempts that failed, by destination.",
                                   labels=["destination"])
    for destination in destinations:
        failures.add_metric([destination], s.delivery_failures.get(destination, 0))
    yield failures
    yield GaugeMetricFamily("dicom_node_workers_online", "Workers whose heartbeat is newer than "
                            "web.worker_stale_seconds.", value=s.workers_online)


_REGISTRY_LOCK = threading.Lock()


def metrics_registry(request: Request, context: WebContext) -> CollectorRegistry:
    """This app's registry with its :class:`NodeCollector`, made on the first scrape."""
    state = request.app.state
    with _REGISTRY_LOCK:
        registry = getattr(state, "metrics_registry", None)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(context))
            state.metrics_registry = registry
    return registry


def _token_refused(request: Request, expected: str | None, what: str) -> Response | None:
    """401 unless ``expected`` is unset or the request sends ``Authorization: Bearer <expected>``."""
    if not expected:
        return None
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if given and secrets.compare_digest(given.encode(), expected.encode()):
        return None
    return JSONResponse({"detail": f"{what} needs Authorization: Bearer <token>"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, context: WebContext = Depends(get_context)) -> Response:
    """Prometheus metrics (text exposition format), read from the database at scrape time.

    Public (no login; no patient identifiers in it); ``web.metrics_token`` makes it
    require ``Authorization: Bearer <token>``.
    """
    refused = _token_refused(request, context.settings.web.metrics_token, "/metrics")
    if refused is not None:
        return refused
    return Response(generate_latest(metrics_registry(request, context)), media_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})


class Health(BaseModel):
    status: str


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: str
    checks: list[Check]


@router.get("/healthz", response_model=Health, responses={401: {"description": "web.health_token not sent"}})
def healthz(request: Request, context: WebContext = Depends(get_context)) -> Any:
    """Liveness: 200 ``{"status": "ok"}`` whenever the process serves requests (it checks nothing else).

    Public (no login); ``web.health_token`` makes it require ``Authorization: Bearer <token>``.
    """
    refused = _token_refused(request, context.settings.web.health_token, "/healthz")
    if refused is not None:
        return refused
    return Health(status="ok")


def readiness_checks(context: WebContext) -> list[Check]:
    """The database answers, its schema is at this version's migration head, and every lent check passes."""
    database = monitoring.database_status(context.sessions)
    checks = [Check(name="database", ok=database.reachable, detail=database.error or "reachable")]
    if database.reachable:
        checks.append(Check(
            name="migrations", ok=database.at_head,
            detail=f"at revision {database.current_revision}" if database.at_head else
            f"database at revision {database.current_revision or 'none'}, this version needs "
            f"{database.head_revision}: run `dicom-node db upgrade` or start the node"))
    for name, check in context.readiness:
        try:
            ok, detail = check()
        except Exception as exc:  # a probe that raises is a failed probe
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append(Check(name=name, ok=bool(ok), detail=str(detail)))
    return checks


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "a check failed"},
                       401: {"description": "web.health_token not sent"}})
def readyz(request: Request, context: WebContext = Depends(get_context)) -> Any:
    """Readiness: 200 when the database answers at the right schema revision and every readiness check of
    the node passes (its DICOM listener); else 503 naming the checks that failed.

    Public (no login); ``web.health_token`` makes it require ``Authorization: Bearer <token>``.
    """
    refused = _token_refused(request, context.settings.web.health_token, "/readyz")
    if refused is not None:
        return refused
    checks = readiness_checks(context)
    ready = all(c.ok for c in checks)
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    if not ready:
        logger.info("not ready: %s", "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok))
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})
