"""A study's timeline and findings table: pure functions of a :class:`~dicom_node.db.study_views.StudyDetail`.

Why a module of its own: the study page, its live fragment and ``GET /api/v1/studies/{uid}``
must show exactly the same steps and findings, so they are computed here from the detail
the page already read (no queries), and the rules of how a job's end, a held result or a
run of late instances reads on the timeline live in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dicom_node.db.job_views import DELIVERY_TROUBLE_STATES, JOB_ENDED_STATES, JOB_RESULTS_SENT_STATES, JobRow
from dicom_node.db.jobs import NOTICE_KIND
from dicom_node.db.models import DeliveryState, JobState, StudyState
from dicom_node.db.study_views import StudyDetail, StudyEventRow

__all__ = ["FindingRow", "TimelineEntry", "findings", "timeline"]


@dataclass(frozen=True)
class TimelineEntry:
    """One step of a study's life; ``duration_seconds`` is how long the step took (or has taken so far)."""

    at: datetime
    kind: str
    title: str
    state: str | None = None
    duration_seconds: float | None = None
    duration_label: str = "took"
    detail: str | None = None
    stages: list[tuple[str, float]] = field(default_factory=list)
    job_id: int | None = None
    delivery_id: int | None = None


@dataclass(frozen=True)
class FindingRow:
    """One line of the findings table: a segment volume or a detection, from a job's summary."""

    job_id: int
    pipeline: str
    kind: str  # "segment" or "detection"
    label: str
    volume_ml: float | None = None
    diameter_mm: float | None = None
    score: float | None = None
    centre_mm: list[float] | None = None


def _span(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


_EVENT_TITLES = {
    "complete": "Study complete",
    "routed": "Routed",
    "ignored": "Ignored (no rule matched)",
    "reopened": "Reopened by a late instance",
    "late_instance": "Late instance",
    "reprocess": "Re-process requested",
    "purged": "Files removed by retention",
}

#: Timeline events about one job (the worker and the operator actions write them, naming the job first):
#: event kind -> (entry kind, what happened). not_applicable and held are shown on the job's own end entry.
_JOB_EVENTS = {
    "job_checked": ("job.checked", "checked before the model"),
    "job_released": ("job.released", "held results released"),
    "job_discarded": ("job.discarded", "held results discarded"),
    "rerun_on_more_instances": ("job.rerun", "runs again: the series received more instances"),
    "results_superseded": ("job.superseded", "its results replace the earlier ones"),
    "results_resent": ("job.resent", "results sent again"),
}
_MERGED_JOB_EVENTS = frozenset({"job_not_applicable", "job_held"})
_EVENT_JOB = re.compile(r"^job (\d+)\b")
#: How a job's end is titled on the timeline, where its state's name is not plain words.
_END_TITLES = {JobState.NOT_APPLICABLE.value: "not applicable", JobState.HELD.value: "held: results not sent"}


def _event_job(event: StudyEventRow) -> int | None:
    found = _EVENT_JOB.match(event.detail or "")
    return int(found.group(1)) if found else None


def _job_event_entry(event: StudyEventRow, jobs_by_id: dict[int, JobRow]) -> TimelineEntry | None:
    """The entry of an event about a job (None: it is shown on the job's end entry instead)."""
    job_id = _event_job(event)
    job = jobs_by_id.get(job_id) if job_id is not None else None
    if event.kind in _MERGED_JOB_EVENTS and job is not None:
        return None
    kind, what = _JOB_EVENTS.get(event.kind, (f"study.{event.kind}", event.kind.replace("_", " ")))
    title = f"Job {job.id} · {job.pipeline}: {what}" if job is not None else what[:1].upper() + what[1:]
    state = kind.split(".", 1)[1] if kind in ("job.released", "job.discarded") else None
    return TimelineEntry(at=event.at, kind=kind, title=title, state=state, detail=event.detail,
                         job_id=job.id if job is not None else job_id)


def _end_detail(job: JobRow, end_kind: str) -> str | None:
    """What the end entry of a job says about how it ended."""
    if end_kind == JobState.FAILED.value:
        return f"{job.error or 'failed'}; attempt {job.attempts} of {job.max_attempts}, will be retried"
    if end_kind == JobState.DEAD.value:
        return f"{job.error or 'failed'}; attempt {job.attempts} of {job.max_attempts}, no retry"
    if end_kind == JobState.SUCCEEDED.value:
        return ", ".join(r.kind for r in job.results) or "no result objects"
    if end_kind == JobState.NOT_APPLICABLE.value:
        return job.outcome_reason or "the model was not made for this series"
    if end_kind == JobState.HELD.value:
        reasons = job.outcome_reason or "see the checks"
        if job.state != JobState.HELD.value:  # released or discarded since: its own entry says so
            return f"results judged implausible, held: {reasons}"
        kept = ", ".join(r.kind for r in job.results if r.kind != NOTICE_KIND) or "no result objects"
        return f"results judged implausible ({kept} kept, not sent): {reasons}"
    return job.error


def timeline(detail: StudyDetail, *, now: datetime) -> list[TimelineEntry]:
    """The study's life in time order: receiving, its events, each job's run and stages, each delivery.

    A job's checks (before the model) and an operator's release or discard of held results
    are entries of their own (kinds ``job.checked``, ``job.released``, ``job.discarded``); a job
    that was not applicable or held says why on its end entry (``job.not_applicable``, ``job.held``).

    Durations: receiving from the first to the last instance; complete after the last
    instance; a job's start after it was queued (waiting), its end after it started
    (running; a running job counts up to ``now``), with the stage times the worker
    measured; a delivery from its creation to its arrival or last failure.
    """
    entries: list[TimelineEntry] = [TimelineEntry(
        at=detail.first_received_at, kind="received", title="Receiving",
        state="receiving" if detail.state == StudyState.RECEIVING.value else None,
        duration_seconds=_span(detail.first_received_at, detail.last_received_at),
        duration_label="first to last instance",
        detail=f"{detail.instance_count} instance(s) in {len(detail.series)} series"
        + (f" from {', '.join(detail.sources)}" if detail.sources else "")
        + f"; last instance {detail.last_received_at:%Y-%m-%d %H:%M:%S}",
    )]
    jobs_by_id = {job.id: job for job in detail.jobs}
    late: list[StudyEventRow] = []
    for event in [*detail.events, None]:
        if event is not None and event.kind == "late_instance":
            late.append(event)  # one event per late instance: shown as one line per run of them
            continue
        if late:
            entries.append(TimelineEntry(
                at=late[0].at, kind="study.late_instance", title=f"{len(late)} late instance(s)",
                duration_seconds=_span(late[0].at, late[-1].at) if len(late) > 1 else None,
                detail=late[-1].detail))
            late = []
        if event is None or event.kind == "first_instance":  # the receiving entry already says it
            continue
        if event.kind.startswith("job_") or event.kind in _JOB_EVENTS:
            entry = _job_event_entry(event, jobs_by_id)
            if entry is not None:
                entries.append(entry)
            continue
        complete = event.kind == "complete"
        entries.append(TimelineEntry(
            at=event.at, kind=f"study.{event.kind}", title=_EVENT_TITLES.get(event.kind, event.kind.replace("_", " ")),
            state="ignored" if event.kind == "ignored" else ("complete" if complete else None),
            duration_seconds=_span(detail.last_received_at, event.at) if complete else None,
            duration_label="after the last instance", detail=event.detail))
    for job in detail.jobs:
        name = f"Job {job.id} · {job.pipeline}"
        entries.append(TimelineEntry(at=job.queued_at, kind="job.queued", title=f"{name} queued", state="queued",
                                     detail=f"rule {job.rule}, series {job.series_instance_uid}", job_id=job.id))
        if job.started_at is not None:
            entries.append(TimelineEntry(
                at=job.started_at, kind="job.started", title=f"{name} started (attempt {job.attempts})",
                duration_seconds=_span(job.queued_at, job.started_at), duration_label="waited in the queue",
                detail=f"on worker {job.worker or '?'}", stages=list(job.stage_seconds.items()), job_id=job.id))
        # A released or discarded job ended its run held; the operator's action is an entry of its own.
        end_kind = JobState.HELD.value if job.state in (JobState.RELEASED.value, JobState.DISCARDED.value) \
            else job.state if job.state in JOB_ENDED_STATES else None
        if job.state == JobState.RUNNING.value and job.started_at is not None:
            entries.append(TimelineEntry(at=now, kind="job.running", title=f"{name} running", state="running",
                                         duration_seconds=_span(job.started_at, now), duration_label="so far",
                                         job_id=job.id))
        elif end_kind is not None:
            at = job.state_changed_at if end_kind == JobState.CANCELLED.value else (job.finished_at or job.state_changed_at)
            entries.append(TimelineEntry(
                at=at, kind=f"job.{end_kind}", title=f"{name} {_END_TITLES.get(end_kind, end_kind)}", state=end_kind,
                duration_seconds=None if end_kind == JobState.CANCELLED.value else _span(job.started_at, at),
                detail=_end_detail(job, end_kind), job_id=job.id))
        for d in job.deliveries:
            dname = f"Delivery {d.id} to {d.destination}" + (" ('not performed' notice)" if d.notice_only else "")
            entries.append(TimelineEntry(at=d.created_at, kind="delivery.created", title=f"{dname} created",
                                         state="pending", job_id=job.id, delivery_id=d.id))
            if d.state == DeliveryState.DELIVERED.value:
                entries.append(TimelineEntry(
                    at=d.delivered_at or d.state_changed_at, kind="delivery.delivered", title=f"{dname} delivered",
                    state="delivered", duration_seconds=_span(d.created_at, d.delivered_at or d.state_changed_at),
                    detail=f"{d.objects_sent} object(s), attempt {d.attempts}", job_id=job.id, delivery_id=d.id))
            elif d.state in DELIVERY_TROUBLE_STATES:
                retry = (f"; next attempt {d.next_attempt_at:%Y-%m-%d %H:%M:%S}"
                         if d.state == DeliveryState.FAILED.value and d.next_attempt_at else "; no retry")
                entries.append(TimelineEntry(
                    at=d.state_changed_at, kind=f"delivery.{d.state}", title=f"{dname} {d.state}", state=d.state,
                    duration_seconds=_span(d.created_at, d.state_changed_at),
                    detail=f"{d.error or 'failed'}; attempt {d.attempts} of {d.max_attempts}{retry}",
                    job_id=job.id, delivery_id=d.id))
            elif d.state == DeliveryState.SENDING.value:
                entries.append(TimelineEntry(
                    at=d.state_changed_at, kind="delivery.sending", title=f"{dname} sending", state="sending",
                    duration_seconds=_span(d.state_changed_at, now), duration_label="so far",
                    detail=f"attempt {d.attempts}",
                    job_id=job.id, delivery_id=d.id))
    entries.sort(key=lambda e: e.at)
    return entries


def findings(detail: StudyDetail) -> list[FindingRow]:
    """Segment volumes and detections from the summaries of the study's succeeded (or released) jobs.

    A segmentation job's summary holds ``volumes_ml`` (label -> millilitres); a
    detection job's ``detections`` (centre, diameter, score), largest first here.
    """
    rows: list[FindingRow] = []
    for job in detail.jobs:
        if job.state not in JOB_RESULTS_SENT_STATES:
            continue
        summary = job.summary
        volumes = summary.get("volumes_ml")
        if isinstance(volumes, dict):
            for label, volume in volumes.items():
                rows.append(FindingRow(job_id=job.id, pipeline=job.pipeline, kind="segment", label=str(label),
                                       volume_ml=_number(volume)))
        detections = summary.get("detections")
        if isinstance(detections, list):
            found = [d for d in detections if isinstance(d, dict)]
            found.sort(key=lambda d: _number(d.get("diameter_mm")) or 0.0, reverse=True)
            for n, item in enumerate(found, start=1):
                centre = item.get("centre_mm")
                rows.append(FindingRow(
                    job_id=job.id, pipeline=job.pipeline, kind="detection", label=str(item.get("label") or f"finding {n}"),
                    diameter_mm=_number(item.get("diameter_mm")), score=_number(item.get("score")),
                    centre_mm=[float(v) for v in centre] if isinstance(centre, list)
                    and all(isinstance(v, (int, float)) for v in centre) else None,
                ))
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
