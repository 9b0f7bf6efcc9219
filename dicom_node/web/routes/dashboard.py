"""The dashboard: what is flowing through the node right now (page, live fragment, API).

One function, :func:`dashboard_data`, reads everything (through
:mod:`dicom_node.db.monitoring` and :mod:`dicom_node.db.workers`); the page, the
fragment ``/dashboard/live`` that the page re-fetches every 5 s
(``data-refresh-url``), and ``GET /api/v1/dashboard`` all show its result.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from dicom_node.db import monitoring, workers
from dicom_node.db.models import Role
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render

__all__ = ["DashboardOut", "WorkerOut", "dashboard_data", "list_worker_status", "router"]

router = APIRouter()

#: The windows the dashboard counts studies over.
WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
#: Seconds between two refreshes of the live part of the page.
REFRESH_SECONDS = 5
_ERRORS_SHOWN = 20


class StudyCountsOut(BaseModel):
    """Studies first received in the window, by the state each is shown in now (the studies list's states:
    ``/studies?status=...&received_from=...`` lists them); received = the sum of the others."""

    complete: bool = Field(True, description="false: the window holds more studies than the dashboard counts "
                                             "(5,000, the newest); the numbers are theirs, the window holds more")
    received: int
    receiving: int = Field(description="instances still arriving")
    waiting: int = Field(description="complete and about to be routed, or routed with every job queued")
    in_progress: int = Field(description="a job or delivery under way, or waiting for its retry")
    done: int = Field(description="every job finished (succeeded, not applicable, released or discarded) and every "
                                  "delivery was delivered")
    held: int = Field(description="results judged implausible wait for an operator (release or discard), or results "
                                  "have no destination to go to (needs a person)")
    failed: int = Field(description="a job is dead or cancelled, or a delivery is dead (needs a person)")
    ignored: int = Field(description="no routing rule matched")


class QueueOut(BaseModel):
    queue: str = Field(description="gpu: inference jobs; io: deliveries")
    waiting: int = Field(description="queued, or failed and waiting for the next attempt")
    active: int = Field(description="running jobs / deliveries being sent")
    retrying: int = Field(description="of waiting: failed at least once")
    dead: int = Field(description="no attempts left")


class ModelStateOut(BaseModel):
    state: str = Field(description="not loaded, loading, loaded or failed")
    device: str | None = None
    error: str | None = None
    version: str | None = None


class WorkerOut(BaseModel):
    name: str = Field(description="host:pid")
    online: bool = Field(description="heartbeat newer than web.worker_stale_seconds")
    queues: list[str]
    device: str | None
    started_at: datetime
    last_seen_at: datetime
    current_job_id: int | None
    current_job_study: str | None = Field(None, description="Study Instance UID of the current job")
    current_job_pipeline: str | None = None
    models: dict[str, ModelStateOut]


class Bucket(BaseModel):
    start: datetime
    count: int


class ThroughputOut(BaseModel):
    studies_per_hour: list[Bucket] = Field(description="studies done, by the hour their last result was delivered")
    instances_per_minute: list[Bucket] = Field(description="instances received per minute, last hour")


class ErrorOut(BaseModel):
    at: datetime
    kind: str = Field(description="job (failed, dead, or held: results waiting for an operator), delivery, ingest "
                                  "(a refused instance) or association (rejected)")
    state: str
    what: str
    error: str
    study_instance_uid: str | None = None
    job_id: int | None = None
    delivery_id: int | None = None


class DashboardOut(BaseModel):
    generated_at: datetime
    studies: dict[str, StudyCountsOut] = Field(description="by window: hour, day")
    queues: list[QueueOut]
    workers: list[WorkerOut]
    throughput: ThroughputOut
    errors: list[ErrorOut]


def list_worker_status(context: WebContext) -> list[WorkerOut]:
    """Every known worker (online first), with the study and pipeline of the job each one runs."""
    views = workers.list_workers(context.sessions, now=context.clock(),
                                 stale_seconds=context.settings.web.worker_stale_seconds)
    briefs = monitoring.job_briefs(context.sessions, [w.current_job_id for w in views if w.current_job_id])
    result = []
    for view in views:
        study, pipeline = briefs.get(view.current_job_id or 0, (None, None))
        result.append(WorkerOut(
            name=view.name, online=view.online, queues=list(view.queues), device=view.device,
            started_at=view.started_at, last_seen_at=view.last_seen_at,
            current_job_id=view.current_job_id if view.online else None,
            current_job_study=study if view.online else None, current_job_pipeline=pipeline if view.online else None,
            models={name: ModelStateOut(**{k: state.get(k) for k in ("device", "error", "version")},
                                        state=str(state.get("state") or "unknown"))
                    for name, state in view.models.items()},
        ))
    return result


def dashboard_data(context: WebContext) -> DashboardOut:
    """Everything the dashboard shows, read now."""
    now = context.clock()
    counts = monitoring.study_counts(context.sessions, now=now, windows=WINDOWS)
    flow = monitoring.throughput(context.sessions, now=now)
    return DashboardOut(
        generated_at=now,
        studies={name: StudyCountsOut(**vars(c)) for name, c in counts.items()},
        queues=[QueueOut(**vars(q)) for q in monitoring.queue_depths(context.sessions)],
        workers=list_worker_status(context),
        throughput=ThroughputOut(
            studies_per_hour=[Bucket(start=t, count=n) for t, n in flow.studies_per_hour],
            instances_per_minute=[Bucket(start=t, count=n) for t, n in flow.instances_per_minute],
        ),
        errors=[ErrorOut(**vars(e)) for e in monitoring.recent_errors(context.sessions, limit=_ERRORS_SHOWN)],
    )


def _bars(buckets: list[Bucket], width: int, height: int = 60) -> dict[str, Any]:
    """Geometry of a small server-rendered SVG bar chart (no script, no inline style: CSP)."""
    top = max((b.count for b in buckets), default=0)
    step = width / max(1, len(buckets))
    bars = []
    for i, bucket in enumerate(buckets):
        h = height * bucket.count / top if top else 0.0
        if bucket.count:
            h = max(1.0, h)  # a bucket with anything in it is never invisible
        bars.append({"x": round(i * step, 2), "y": round(height - h, 2), "w": round(max(1.0, step - 1), 2),
                     "h": round(h, 2), "bucket": bucket})
    return {"bars": bars, "width": width, "height": height, "top": top,
            "total": sum(b.count for b in buckets)}


def _live_values(context: WebContext) -> dict[str, Any]:
    data = dashboard_data(context)
    return {
        "data": data,
        # each count links to the studies list showing those studies (same state, same window)
        "window_from": {name: (data.generated_at - length).isoformat() for name, length in WINDOWS.items()},
        "study_chart": _bars(data.throughput.studies_per_hour, 480),
        "instance_chart": _bars(data.throughput.instances_per_minute, 480),
        "stale_seconds": context.settings.web.worker_stale_seconds,
        "count_cap": monitoring.STUDY_COUNT_CAP,
    }


@router.get("/", include_in_schema=False)
def dashboard_page(request: Request, principal: Principal = Depends(require(Role.VIEWER)),
                   context: WebContext = Depends(get_context)) -> Response:
    return render(request, "dashboard.html", refresh_seconds=REFRESH_SECONDS, **_live_values(context))


@router.get("/dashboard/live", include_in_schema=False)
def dashboard_live(request: Request, principal: Principal = Depends(require(Role.VIEWER)),
                   context: WebContext = Depends(get_context)) -> Response:
    """The live part of the dashboard, as an HTML fragment (the page re-fetches it every few seconds)."""
    return render(request, "dashboard_live.html", **_live_values(context))


@router.get("/api/v1/dashboard", response_model=DashboardOut, tags=["dashboard"])
def dashboard_api(principal: Principal = Depends(require(Role.VIEWER)),
                  context: WebContext = Depends(get_context)) -> DashboardOut:
    """The dashboard's numbers: studies by outcome in the last hour and day, queue depths, workers,
    throughput and the latest errors."""
    return dashboard_data(context)


@router.get("/api/v1/workers", response_model=list[WorkerOut], tags=["dashboard"])
def workers_api(principal: Principal = Depends(require(Role.VIEWER)),
                context: WebContext = Depends(get_context)) -> list[WorkerOut]:
    """Every worker that sent a heartbeat (online ones first): queues, device, model load states, current job."""
    return list_worker_status(context)
