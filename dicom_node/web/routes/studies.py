"""Studies, jobs and deliveries: the list and page of studies, their live timeline and preview, and the
operator's actions (retry or cancel a job, re-send a delivery, release or discard held results), as pages
and as ``/api/v1``.

Pages and API read through the same :mod:`dicom_node.db.study_views` functions and act
through the same action functions below, which check the state, change it with
:mod:`dicom_node.db.jobs` (held results: :mod:`dicom_node.held_results`, shared with the
CLI) and write the audit entry (before and after state).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicom_node import held_results
from dicom_node.db import job_views, jobs, study_timeline, study_views
from dicom_node.db.models import DeliveryState, JobState, Role, StudyState
from dicom_node.db.study_views import StudyFilters
from dicom_node.spool import Spool
from dicom_node.web.auth import Principal, audit_event, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.preview import Preview, PreviewError, job_preview, study_preview, study_preview_job
from dicom_node.web.urls import EncodedSlashRoute, api_study_path, header_text, study_path

__all__ = ["router"]

logger = logging.getLogger(__name__)

#: Study UIDs may hold "/" (sent as %2F): routes match it on the raw path (see dicom_node.web.urls).
router = APIRouter(route_class=EncodedSlashRoute)

_UID = Path(..., min_length=1, max_length=64, description="Study Instance UID")
_DATE_PATTERN = r"^(\d{4}-?\d{2}-?\d{2})?$"
StudyStateName = Literal["", "receiving", "complete", "routed", "ignored"]
JobOutcomeName = Literal["", "in_progress", "done", "held", "failed", "none"]
JobStateName = Literal["", "queued", "running", "succeeded", "failed", "dead", "cancelled", "not_applicable", "held",
                       "released", "discarded"]
_RETRYABLE_JOB = (JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value)
_CANCELLABLE_JOB = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.FAILED.value)
_RETRYABLE_DELIVERY = (DeliveryState.FAILED.value, DeliveryState.DEAD.value)


# --------------------------------------------------------------------------- API models


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class StudyItem(_Out):
    """One study of the list, with what became of its jobs and deliveries (counts by state)."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None = Field(description="YYYYMMDD, as in the DICOM header")
    study_description: str | None
    state: str = Field(description="receiving, complete, routed or ignored")
    modalities: list[str]
    source_ae_titles: list[str] = Field(description="Calling AE titles of the associations that sent it")
    series_count: int
    instance_count: int
    job_counts: dict[str, int] = Field(description="Jobs by state, e.g. {\"succeeded\": 2, \"held\": 1}")
    delivery_counts: dict[str, int] = Field(description="Deliveries by state")
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


class StudyList(_Out):
    items: list[StudyItem]
    total: int = Field(description="Studies matching the filters, all pages")
    limit: int
    offset: int


class SeriesOut(_Out):
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    is_result: bool = Field(description="A series of results this node produced, sent back to it")


class AssociationOut(_Out):
    id: int
    calling_ae_title: str
    peer_address: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    instances_stored: int


class EventOut(_Out):
    at: datetime
    kind: str
    detail: str | None


class ResultOut(_Out):
    id: int
    job_id: int
    kind: str = Field(description="SEG, SR or GSPS")
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    created_at: datetime


class DeliveryOut(_Out):
    id: int
    job_id: int
    study_instance_uid: str
    destination: str
    state: str = Field(description="pending, sending, delivered, failed (awaiting its next attempt) or dead")
    attempts: int
    max_attempts: int
    error: str | None
    objects_sent: int
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    state_changed_at: datetime
    kinds: list[str] | None = Field(None, description="The result kinds it carries: [\"NOTICE\"] for the "
                                    "'AI analysis not performed' SR alone; null: the job's results")


class JobOut(_Out):
    id: int
    study_instance_uid: str
    series_instance_uid: str
    pipeline: str
    rule: str
    state: str = Field(description="queued, running, succeeded, failed (to be retried), dead, cancelled, "
                                   "not_applicable (the series is outside what the model was made for), held "
                                   "(results judged implausible: kept, not sent), released (held results an "
                                   "operator sent) or discarded (held results an operator threw away)")
    attempts: int
    max_attempts: int
    error: str | None
    worker: str | None
    stage_seconds: dict[str, float] = Field(description="Seconds per stage of the last attempt "
                                                        "(load, model_load, inference, encoding, outbox)")
    summary: dict[str, Any] = Field(description="The findings: volumes_ml per segment, or detections")
    checks: dict[str, Any] = Field(description="The worker's checks: applicability (before the model: applies, "
                                   "reason_code, reason, header_regions, image_regions, checks [{name, passed, "
                                   "detail}], seconds) and plausibility (after it: plausible, reasons, checks, "
                                   "seconds); {} before the job ran")
    outcome_reason: str | None = Field(description="not_applicable: why the model did not apply; held, released "
                                       "or discarded: what the result broke; null otherwise")
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    state_changed_at: datetime
    results: list[ResultOut]
    deliveries: list[DeliveryOut]


class JobList(_Out):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class StageOut(BaseModel):
    stage: str
    seconds: float


class TimelineOut(_Out):
    at: datetime
    kind: str = Field(description="received, study.<event>, job.<state>, delivery.<state>")
    title: str
    state: str | None
    duration_seconds: float | None
    duration_label: str
    detail: str | None
    stages: list[StageOut]
    job_id: int | None
    delivery_id: int | None

    @field_validator("stages", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        return [{"stage": v[0], "seconds": v[1]} if isinstance(v, (tuple, list)) else v for v in value]


class FindingOut(_Out):
    job_id: int
    pipeline: str
    kind: str = Field(description="segment or detection")
    label: str
    volume_ml: float | None
    diameter_mm: float | None
    score: float | None
    centre_mm: list[float] | None


class StudyOut(_Out):
    """A study with everything known about it."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str
    instance_count: int
    late_instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    state_changed_at: datetime
    modalities: list[str]
    source_ae_titles: list[str]
    series: list[SeriesOut]
    associations: list[AssociationOut]
    events: list[EventOut]
    jobs: list[JobOut]
    timeline: list[TimelineOut]
    findings: list[FindingOut]
    preview_url: str


class ActionOut(BaseModel):
    """What a retry, cancel, re-send, release or discard did."""

    kind: Literal["job", "delivery"]
    id: int
    action: str
    before: str = Field(description="State before")
    after: str = Field(description="State after")
    message: str


# --------------------------------------------------------------------------- filters


def _bad_query(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", field), "msg": message, "type": "value_error"}])


def _dicom_date(field: str, value: str | None) -> str | None:
    if not value:
        return None
    digits = value.replace("-", "")
    try:
        datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        raise _bad_query(field, f"{value!r} is not a date (YYYY-MM-DD)") from None
    return digits


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def study_filters(
    patient_id: str | None = Query(None, max_length=64, description="Patient ID, exactly"),
    patient_name: str | None = Query(None, max_length=324, description="Any part of the patient name, any case"),
    accession_number: str | None = Query(None, max_length=16, description="Accession number, exactly"),
    date_from: str | None = Query(None, max_length=10, pattern=_DATE_PATTERN,
                                  description="Study date from (YYYY-MM-DD or YYYYMMDD), inclusive"),
    date_to: str | None = Query(None, max_length=10, pattern=_DATE_PATTERN, description="Study date to, inclusive"),
    state: StudyStateName | None = Query(None, description="Study state"),
    jobs: JobOutcomeName | None = Query(
        None, description="in_progress: a job or delivery not finished; done: every job finished (succeeded, "
                          "not applicable, released, discarded or cancelled) and every delivery arrived; held: a "
                          "job's results wait for an operator (release or discard); failed: a job or delivery "
                          "failed or is dead; none: no job"),
    modality: str | None = Query(None, max_length=16, description="Has a series of this modality (CT, MR, ...)"),
    source_ae: str | None = Query(None, max_length=16, description="Sent by this calling AE title"),
) -> StudyFilters:
    """The studies filters from the query string (the list page's form uses the same names)."""
    start, end = _dicom_date("date_from", date_from), _dicom_date("date_to", date_to)
    if start and end and start > end:
        raise _bad_query("date_to", f"date_to {date_to} is before date_from {date_from}")
    return StudyFilters(
        patient_id=_clean(patient_id), patient_name=_clean(patient_name), accession_number=_clean(accession_number),
        date_from=start, date_to=end, state=state or None, jobs=jobs or None,
        modality=(_clean(modality) or "").upper() or None, source_ae=_clean(source_ae),
    )


# --------------------------------------------------------------------------- actions (pages and API)


class ActionRefused(Exception):
    """The action cannot be done: ``status`` 404 (unknown) or 409 (its state does not allow it)."""

    def __init__(self, status: int, message: str, state: str | None = None, study_uid: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.state, self.study_uid = status, message, state, study_uid


def _job_facts(job: job_views.JobRow) -> dict[str, Any]:
    return {"state": job.state, "attempts": job.attempts, "max_attempts": job.max_attempts, "error": job.error}


def _delivery_facts(d: job_views.DeliveryRow) -> dict[str, Any]:
    return {"state": d.state, "attempts": d.attempts, "max_attempts": d.max_attempts, "error": d.error,
            "next_attempt_at": d.next_attempt_at}


def _known_job(context: WebContext, job_id: int) -> job_views.JobRow:
    job = job_views.get_job(context.sessions, job_id)
    if job is None:
        raise ActionRefused(404, f"job {job_id} does not exist")
    return job


def retry_job_action(context: WebContext, request: Request, principal: Principal, job_id: int) -> tuple[ActionOut, str]:
    """Retry a failed, dead or cancelled job (fresh attempts; the node's next sweep queues it)."""
    job = _known_job(context, job_id)
    if job.state not in _RETRYABLE_JOB or not jobs.retry_job(context.sessions, job_id, now=context.clock()):
        current = _known_job(context, job_id).state
        raise ActionRefused(409, f"job {job_id} is {current}; only failed, dead or cancelled jobs can be retried",
                            current, job.study_instance_uid)
    after = _known_job(context, job_id)
    audit_event(context, request, principal, "job.retry", target_kind="job", target=str(job_id),
                before=_job_facts(job), after=_job_facts(after),
                detail=f"{job.pipeline} on series {job.series_instance_uid} of study {job.study_instance_uid}")
    return ActionOut(kind="job", id=job_id, action="retry", before=job.state, after=after.state,
                     message=f"job {job_id} will run again (it was {job.state})"), job.study_instance_uid


def cancel_job_action(context: WebContext, request: Request, principal: Principal, job_id: int) -> tuple[ActionOut, str]:
    """Cancel a queued, running or failed job (a running attempt's results are discarded)."""
    job = _known_job(context, job_id)
    before = jobs.cancel_job(context.sessions, job_id, now=context.clock())
    if before is None:
        current = _known_job(context, job_id).state
        raise ActionRefused(409, f"job {job_id} is {current}; only queued, running or failed jobs can be cancelled",
                            current, job.study_instance_uid)
    after = _known_job(context, job_id)
    audit_event(context, request, principal, "job.cancel", target_kind="job", target=str(job_id),
                before={**_job_facts(job), "state": before}, after=_job_facts(after),
                detail=f"{job.pipeline} on series {job.series_instance_uid} of study {job.study_instance_uid}")
    return ActionOut(kind="job", id=job_id, action="cancel", before=before, after=after.state,
                     message=f"job {job_id} was cancelled (it was {before})"), job.study_instance_uid


def retry_delivery_action(
    context: WebContext, request: Request, principal: Principal, delivery_id: int
) -> tuple[ActionOut, str]:
    """Send a failed or dead delivery again now (fresh attempts; never re-runs inference)."""
    found = job_views.get_delivery(context.sessions, delivery_id)
    if found is None:
        raise ActionRefused(404, f"delivery {delivery_id} does not exist")
    if found.state not in _RETRYABLE_DELIVERY or not jobs.retry_delivery(context.sessions, delivery_id,
                                                                         now=context.clock()):
        current = job_views.get_delivery(context.sessions, delivery_id)
        state = current.state if current else found.state
        raise ActionRefused(409, f"delivery {delivery_id} is {state}; only failed or dead deliveries can be re-sent",
                            state, found.study_instance_uid)
    after = job_views.get_delivery(context.sessions, delivery_id) or found
    audit_event(context, request, principal, "delivery.retry", target_kind="delivery", target=str(delivery_id),
                before=_delivery_facts(found), after=_delivery_facts(after),
                detail=f"to {found.destination}, job {found.job_id}, study {found.study_instance_uid}")
    return ActionOut(kind="delivery", id=delivery_id, action="retry", before=found.state, after=after.state,
                     message=f"delivery {delivery_id} to {found.destination} will be sent again "
                             f"(it was {found.state})"), found.study_instance_uid


def _held_or_409(context: WebContext, job_id: int, verb: str) -> job_views.JobRow:
    job = _known_job(context, job_id)
    if job.state != JobState.HELD.value:
        raise ActionRefused(409, f"job {job_id} is {job.state}; only held jobs can be {verb}", job.state,
                            job.study_instance_uid)
    return job


def _refused_now(context: WebContext, job: job_views.JobRow, verb: str) -> ActionRefused:
    """The refusal when a job stopped being held between the check and the change (another operator acted)."""
    current = _known_job(context, job.id).state
    return ActionRefused(409, f"job {job.id} is {current}; only held jobs can be {verb}", current,
                         job.study_instance_uid)


def release_job_action(context: WebContext, request: Request, principal: Principal,
                       job_id: int) -> tuple[ActionOut, str]:
    """Send a held job's results to its destinations after all (the node's next sweep sends them)."""
    job = _held_or_409(context, job_id, "released")
    released = held_results.release_held(context.sessions, job_id, now=context.clock(), by=principal.username,
                                         delivery_max_attempts=context.settings.delivery.max_attempts)
    if released is None:
        raise _refused_now(context, job, "released")
    after = _known_job(context, job_id)
    to = ", ".join(released.destinations) or "no destination (none is configured for it now)"
    audit_event(context, request, principal, "job.release", target_kind="job", target=str(job_id),
                before={**_job_facts(job), "reasons": job.outcome_reason},
                after={**_job_facts(after), "destinations": released.destinations,
                       "deliveries": released.delivery_ids},
                detail=f"{job.pipeline} on series {job.series_instance_uid} of study {job.study_instance_uid}: "
                       f"held results released to {to}")
    return ActionOut(kind="job", id=job_id, action="release", before=job.state, after=after.state,
                     message=f"job {job_id}: held results released to {to} (it was {job.state})"), \
        job.study_instance_uid


def discard_job_action(context: WebContext, request: Request, principal: Principal,
                       job_id: int) -> tuple[ActionOut, str]:
    """Throw a held job's results away (their outbox files too); a notice already sent stays."""
    job = _held_or_409(context, job_id, "discarded")
    outbox = Spool(context.settings.outbox_dir, fsync=context.settings.storage.fsync)
    if not held_results.discard_held(context.sessions, outbox, job_id, now=context.clock(), by=principal.username):
        raise _refused_now(context, job, "discarded")
    after = _known_job(context, job_id)
    thrown = [r.kind for r in job.results if r.kind != jobs.NOTICE_KIND]
    audit_event(context, request, principal, "job.discard", target_kind="job", target=str(job_id),
                before={**_job_facts(job), "reasons": job.outcome_reason, "results": thrown},
                after={**_job_facts(after), "results": [r.kind for r in after.results]},
                detail=f"{job.pipeline} on series {job.series_instance_uid} of study {job.study_instance_uid}: "
                       f"held results discarded ({', '.join(thrown) or 'no result objects'})")
    return ActionOut(kind="job", id=job_id, action="discard", before=job.state, after=after.state,
                     message=f"job {job_id}: held results discarded, nothing will be sent (it was {job.state})"), \
        job.study_instance_uid


#: An action: (context, request, principal, job or delivery id) -> (what it did, the study's UID).
Action = Callable[[WebContext, Request, Principal, int], tuple[ActionOut, str]]


def _api_action(fn: Action, context: WebContext, request: Request, principal: Principal, target: int) -> ActionOut:
    try:
        outcome, _ = fn(context, request, principal, target)
    except ActionRefused as refused:
        raise HTTPException(refused.status, refused.message) from None
    return outcome


_NOTICES = {
    ("job", "retry", True): "Job {id} will run again at the node's next sweep (it was {was}).",
    ("job", "cancel", True): "Job {id} was cancelled (it was {was}).",
    ("delivery", "retry", True): "Delivery {id} will be sent again now (it was {was}).",
    ("job", "retry", False): "Job {id} was not retried: it is {was}; only failed, dead or cancelled jobs can be.",
    ("job", "cancel", False): "Job {id} was not cancelled: it is {was}; only queued, running or failed jobs can be.",
    ("delivery", "retry", False): "Delivery {id} was not re-sent: it is {was}; only failed or dead deliveries can be.",
    ("job", "release", True): "Job {id}: its held results were released; the node sends them at its next sweep "
                              "(it was {was}).",
    ("job", "discard", True): "Job {id}: its held results were discarded; nothing will be sent (it was {was}).",
    ("job", "release", False): "Job {id} was not released: it is {was}; only held jobs can be.",
    ("job", "discard", False): "Job {id} was not discarded: it is {was}; only held jobs can be.",
}
_STATE_NAMES = frozenset(s.value for s in JobState) | frozenset(s.value for s in DeliveryState)


def _page_action(fn: Action, kind: str, action: str, context: WebContext, request: Request, principal: Principal,
                 target: int) -> Response:
    """Run an action from a page's form and go back to the study page (303) with what happened."""
    try:
        outcome, study_uid = fn(context, request, principal, target)
        ok, was = True, outcome.before
    except ActionRefused as refused:
        if refused.status == 404 or refused.study_uid is None:
            raise HTTPException(refused.status, refused.message) from None
        ok, was, study_uid = False, refused.state or "", refused.study_uid
    query = urlencode({"notice": f"{kind}.{action}.{'done' if ok else 'refused'}", "id": target, "was": was})
    return RedirectResponse(f"{study_path(study_uid)}?{query}#jobs", status_code=303)


def _notice(notice: str | None, target: int | None, was: str | None) -> str | None:
    """The flash message of a redirect after an action: fixed texts only (nothing from the URL is echoed
    but a number and a known state name)."""
    if not notice or target is None:
        return None
    parts = notice.split(".")
    if len(parts) != 3 or parts[2] not in ("done", "refused"):
        return None
    text = _NOTICES.get((parts[0], parts[1], parts[2] == "done"))
    if text is None:
        return None
    return text.format(id=target, was=was if was in _STATE_NAMES else "in another state")


# --------------------------------------------------------------------------- study views shared by page and API


def _detail_or_404(context: WebContext, uid: str) -> study_views.StudyDetail:
    detail = study_views.study_detail(context.sessions, uid)
    if detail is None:
        raise HTTPException(404, f"study {uid} is not known to this node")
    return detail


def _study_out(context: WebContext, detail: study_views.StudyDetail) -> StudyOut:
    return StudyOut.model_validate({
        **{name: getattr(detail, name) for name in StudyOut.model_fields
           if name not in ("timeline", "findings", "preview_url")},
        "timeline": study_timeline.timeline(detail, now=context.clock()),
        "findings": study_timeline.findings(detail),
        "preview_url": api_study_path(detail.study_instance_uid, "/preview.png"),
    })


def _preview_response(load: Callable[[], Preview]) -> Response:
    """The PNG the worker drew, with what it shows in X-Preview-* headers; 404/422 with the reason when none."""
    try:
        preview = load()
    except PreviewError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return Response(preview.png, media_type="image/png", headers={
        "Cache-Control": "private, no-store",
        "X-Preview-Job": str(preview.job_id),
        "X-Preview-Series": header_text(preview.series_instance_uid),  # percent-encoded UTF-8 if not ASCII
        "X-Preview-Slice": f"{preview.slice_index + 1}/{preview.slice_count}",
        "X-Preview-Overlay": "yes" if preview.overlay else "no",
    })


def _study_preview_response(context: WebContext, uid: str) -> Response:
    return _preview_response(lambda: study_preview(context.settings, context.sessions, uid))


def _job_preview_response(context: WebContext, job_id: int) -> Response:
    return _preview_response(lambda: job_preview(context.settings, context.sessions, job_id))


def _page_links(filters: StudyFilters, limit: int, offset: int, total: int) -> tuple[str | None, str | None]:
    base = filters.active()

    def link(at: int) -> str:
        return "/studies?" + urlencode({**base, "limit": limit, "offset": at})

    previous = link(max(0, offset - limit)) if offset > 0 else None
    following = link(offset + limit) if offset + limit < total else None
    return previous, following


# --------------------------------------------------------------------------- pages


@router.get("/studies", include_in_schema=False)
def studies_page(
    request: Request,
    filters: StudyFilters = Depends(study_filters),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    page = study_views.list_studies(context.sessions, filters, limit=limit, offset=offset)
    previous, following = _page_links(filters, limit, offset, page.total)
    return render(request, "studies.html", page=page, filters=filters, limit=limit, previous_url=previous,
                  next_url=following, study_states=[s.value for s in StudyState],
                  job_outcomes=study_views.JOB_OUTCOMES, dicom=context.settings.dicom)


@router.get("/studies/{study_instance_uid}", include_in_schema=False)
def study_page(
    request: Request,
    study_instance_uid: str = _UID,
    notice: str | None = Query(None, max_length=40),
    subject: int | None = Query(None, alias="id"),
    was: str | None = Query(None, max_length=16),
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    detail = _detail_or_404(context, study_instance_uid)
    return render(request, "study.html", **_study_values(context, detail), message=_notice(notice, subject, was))


@router.get("/studies/{study_instance_uid}/live", include_in_schema=False)
def study_live(
    request: Request,
    study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    """The live part of the study page (timeline, jobs, deliveries, findings, results) as an HTML fragment."""
    detail = _detail_or_404(context, study_instance_uid)
    return render(request, "study_live.html", **_study_values(context, detail))


def _study_values(context: WebContext, detail: study_views.StudyDetail) -> dict[str, Any]:
    return {
        "study": detail,
        "timeline": study_timeline.timeline(detail, now=context.clock()),
        "findings": study_timeline.findings(detail),
        "preview_missing": _preview_missing(detail),
        "study_link": study_path(detail.study_instance_uid),
    }


def _preview_missing(detail: study_views.StudyDetail) -> str | None:
    """Why the study has no preview picture (shown instead of a broken image), None when it has one."""
    try:
        study_preview_job(detail)
    except PreviewError as exc:
        return exc.message
    return None


@router.get("/studies/{study_instance_uid}/preview.png", include_in_schema=False)
def study_preview_page(
    study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _study_preview_response(context, study_instance_uid)


@router.get("/jobs/{job_id}/preview.png", include_in_schema=False)
def job_preview_page(
    job_id: int, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context),
) -> Response:
    return _job_preview_response(context, job_id)


@router.post("/jobs/{job_id}/retry", include_in_schema=False)
def retry_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _page_action(retry_job_action, "job", "retry", context, request, principal, job_id)


@router.post("/jobs/{job_id}/cancel", include_in_schema=False)
def cancel_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _page_action(cancel_job_action, "job", "cancel", context, request, principal, job_id)


@router.post("/jobs/{job_id}/release", include_in_schema=False)
def release_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _page_action(release_job_action, "job", "release", context, request, principal, job_id)


@router.post("/jobs/{job_id}/discard", include_in_schema=False)
def discard_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _page_action(discard_job_action, "job", "discard", context, request, principal, job_id)


@router.post("/deliveries/{delivery_id}/retry", include_in_schema=False)
def retry_delivery_page(
    request: Request, delivery_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _page_action(retry_delivery_action, "delivery", "retry", context, request, principal, delivery_id)


# --------------------------------------------------------------------------- API


@router.get("/api/v1/studies", response_model=StudyList, tags=["studies"])
def list_studies_api(
    filters: StudyFilters = Depends(study_filters),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> StudyList:
    """Studies matching the filters, most recently received first, one page at a time."""
    page = study_views.list_studies(context.sessions, filters, limit=limit, offset=offset)
    return StudyList.model_validate(page)


@router.get("/api/v1/studies/{study_instance_uid}", response_model=StudyOut, tags=["studies"])
def get_study_api(
    study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> StudyOut:
    """A study: series, senders, events, jobs with stage times, results, deliveries, timeline and findings."""
    return _study_out(context, _detail_or_404(context, study_instance_uid))


_PREVIEW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}},
          "description": "Key slice with the results drawn on it and a legend; X-Preview-Job, X-Preview-Series, "
                         "X-Preview-Slice (n/count) and X-Preview-Overlay (yes/no) say what it shows"},
    404: {"description": "No preview, and why (unknown, no finished job, failed, not performed, discarded)"},
    422: {"description": "The preview files cannot be read"}}


@router.get("/api/v1/studies/{study_instance_uid}/preview.png", tags=["studies"], response_class=Response,
            responses=_PREVIEW_RESPONSES)
def study_preview_api(
    study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    """The study's preview: the picture its newest detection job's worker drew (else segmentation's, else
    classification's) of the key slice (largest detection, most lesion, most segmented, else middle)."""
    return _study_preview_response(context, study_instance_uid)


@router.get("/api/v1/jobs/{job_id}/preview.png", tags=["jobs"], response_class=Response,
            responses=_PREVIEW_RESPONSES)
def job_preview_api(
    job_id: int, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context),
) -> Response:
    """The preview the job's worker drew when it encoded its results (succeeded, released or held jobs)."""
    return _job_preview_response(context, job_id)


@router.get("/api/v1/jobs", response_model=JobList, tags=["jobs"])
def list_jobs_api(
    state: JobStateName | None = Query(None),
    pipeline: str | None = Query(None, max_length=64),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> JobList:
    """Jobs, newest first, optionally of one state and/or pipeline, with their results and deliveries."""
    page = job_views.list_jobs(context.sessions, state=state or None, pipeline=_clean(pipeline), limit=limit,
                                 offset=offset)
    return JobList.model_validate(page)


@router.get("/api/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def get_job_api(
    job_id: int, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context),
) -> JobOut:
    job = job_views.get_job(context.sessions, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} does not exist")
    return JobOut.model_validate(job)


@router.post("/api/v1/jobs/{job_id}/retry", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not failed, dead or cancelled"}})
def retry_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Run a failed, dead or cancelled job again, with a fresh attempt budget."""
    return _api_action(retry_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/cancel", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not queued, running or failed"}})
def cancel_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Cancel a queued, running or failed job; a running attempt finishes on its worker but is discarded."""
    return _api_action(cancel_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/release", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not held"}})
def release_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Send a held job's results (judged implausible) to its destinations after all; they go at the node's next
    sweep. A destination that already had the job's 'AI analysis not performed' SR gets the results too."""
    return _api_action(release_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/discard", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not held"}})
def discard_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Throw a held job's results away (their files too); nothing of them is ever sent."""
    return _api_action(discard_job_action, context, request, principal, job_id)


@router.post("/api/v1/deliveries/{delivery_id}/retry", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown delivery"}, 409: {"description": "Not failed or dead"}})
def retry_delivery_api(
    request: Request, delivery_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Send a failed or dead delivery again now, with a fresh attempt budget (inference is not re-run)."""
    return _api_action(retry_delivery_action, context, request, principal, delivery_id)
