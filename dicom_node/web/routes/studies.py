"""Studies, jobs and deliveries: the list and page of studies, their live timeline and preview, and the
operator's actions (retry or cancel a job, re-send a delivery, release or discard held results), as pages
and as ``/api/v1``.

Pages and API read through the same :mod:`dicom_node.db.study_views` and
:mod:`dicom_node.db.job_views` functions and act through the same actions
(:mod:`dicom_node.web.routes.job_actions`: state checked, changed, audited); the API's
JSON models are in :mod:`dicom_node.web.routes.study_api_models`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from dicom_node.db import job_views, study_timeline, study_views
from dicom_node.db.models import Role, StudyState
from dicom_node.db.study_views import StudyFilters
from dicom_node.study_status import STATE_LABELS
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.preview import (
    Preview,
    PreviewError,
    job_preview,
    job_preview_problem,
    study_preview,
    study_preview_problem,
)
from dicom_node.web.routes.job_actions import (
    action_notice,
    api_action,
    cancel_job_action,
    discard_job_action,
    page_action,
    release_job_action,
    retry_delivery_action,
    retry_job_action,
)
from dicom_node.web.routes.study_api_models import ActionOut, DeliveryList, JobList, JobOut, StudyList, StudyOut
from dicom_node.web.urls import EncodedSlashRoute, api_study_path, header_text, study_path

__all__ = ["router"]

logger = logging.getLogger(__name__)

#: Study UIDs may hold "/" (sent as %2F): routes match it on the raw path (see dicom_node.web.urls).
router = APIRouter(route_class=EncodedSlashRoute)

_UID = Path(..., min_length=1, max_length=64, description="Study Instance UID")
_DATE_PATTERN = r"^(\d{4}-?\d{2}-?\d{2})?$"
StudyStateName = Literal["", "receiving", "complete", "routed", "ignored"]
ShownStateName = Literal["", "receiving", "waiting", "in_progress", "done", "held", "failed", "ignored"]
JobOutcomeName = Literal["", "in_progress", "done", "held", "failed", "none"]
JobStateName = Literal["", "queued", "running", "succeeded", "failed", "dead", "cancelled", "not_applicable", "held",
                       "released", "discarded"]
DeliveryStateName = Literal["", "pending", "sending", "delivered", "failed", "dead"]


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
    state: StudyStateName | None = Query(None, description="Stored study state (how far routing went)"),
    status: ShownStateName | None = Query(
        None, description="Shown state (status.state): receiving, waiting, in_progress, done, held, failed, ignored"),
    jobs: JobOutcomeName | None = Query(
        None, description="Older form of status (in_progress, done, held, failed select the studies shown in that "
                          "state); none: no current job"),
    modality: str | None = Query(None, max_length=16, description="Has a series of this modality (CT, MR, ...)"),
    source_ae: str | None = Query(None, max_length=16, description="Sent by this calling AE title"),
    received_from: datetime | None = Query(
        None, description="First received at or after this time (ISO 8601; UTC when it has no offset), as the "
                          "dashboard's counts link it"),
) -> StudyFilters:
    """The studies filters from the query string (the list page's form uses the same names)."""
    start, end = _dicom_date("date_from", date_from), _dicom_date("date_to", date_to)
    if start and end and start > end:
        raise _bad_query("date_to", f"date_to {date_to} is before date_from {date_from}")
    if received_from is not None and received_from.tzinfo is None:
        received_from = received_from.replace(tzinfo=timezone.utc)
    return StudyFilters(
        patient_id=_clean(patient_id), patient_name=_clean(patient_name), accession_number=_clean(accession_number),
        date_from=start, date_to=end, state=state or None, jobs=jobs or None,
        modality=(_clean(modality) or "").upper() or None, source_ae=_clean(source_ae), status=status or None,
        received_from=received_from,
    )


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


_CURSOR = Query(None, max_length=200, description="A page's next_cursor: the older items below it (keyset "
                                                   "pages: stable while items arrive, flat with the database size)")
_BEFORE = Query(None, max_length=200, description="A page's previous_cursor: the newer items above it")
_COUNT = Query("capped", description=f"capped: total counts matching items up to {study_views.COUNT_CAP:,} "
                                     "(total_exact false beyond); exact: all of them (slower on big databases)")


def _paged(load: Callable[..., Any], *, after: str | None, before: str | None, count: str, **kwargs: Any) -> Any:
    """The page a list (studies, jobs, deliveries) is asked for; a cursor the node did not give answers 422
    naming it."""
    try:
        return load(after=after, before=None if after else before,
                    count_cap=None if count == "exact" else study_views.COUNT_CAP, **kwargs)
    except ValueError as exc:
        raise _bad_query("after" if after else "before", str(exc)) from None


def _study_page(context: WebContext, filters: StudyFilters, *, limit: int, offset: int, after: str | None,
                before: str | None, count: str = "capped") -> study_views.StudyPage:
    """The page the query asks for; a cursor the node did not give answers 422 naming it."""
    return _paged(study_views.list_studies, sessions=context.sessions, filters=filters, limit=limit, offset=offset,
                  after=after, before=before, count=count)


def _page_links(filters: StudyFilters, limit: int, page: study_views.StudyPage) -> tuple[str | None, str | None]:
    """Links to the newer and the older page (by cursor), keeping the filters."""
    base = filters.active()

    def link(**cursor: str) -> str:
        return "/studies?" + urlencode({**base, "limit": limit, **cursor})

    previous = link(before=page.previous_cursor) if page.previous_cursor else None
    following = link(after=page.next_cursor) if page.next_cursor else None
    return previous, following


# --------------------------------------------------------------------------- pages


@router.get("/studies", include_in_schema=False)
def studies_page(
    request: Request,
    filters: StudyFilters = Depends(study_filters),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
    after: str | None = _CURSOR,
    before: str | None = _BEFORE,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    page = _study_page(context, filters, limit=limit, offset=offset, after=after, before=before)
    previous, following = _page_links(filters, limit, page)
    return render(request, "studies.html", page=page, filters=filters, limit=limit, paged=bool(offset or after or before),
                  previous_url=previous,
                  next_url=following, study_states=[s.value for s in StudyState],
                  shown_states=study_views.SHOWN_STATES, state_labels=STATE_LABELS, dicom=context.settings.dicom)


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
    return render(request, "study.html", **_study_values(context, detail),
                  message=action_notice(notice, subject, was))


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
        # Why there is no picture, shown instead of an image that would break (None: the picture is there).
        "preview_missing": study_preview_problem(context.settings.outbox_dir, detail),
        "job_preview_missing": {
            job.id: job_preview_problem(context.settings.outbox_dir, job, detail.purged_at) for job in detail.jobs
            if isinstance(job.summary.get("preview"), dict)},
        "study_link": study_path(detail.study_instance_uid),
    }


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
    return page_action(retry_job_action, "job", "retry", context, request, principal, job_id)


@router.post("/jobs/{job_id}/cancel", include_in_schema=False)
def cancel_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return page_action(cancel_job_action, "job", "cancel", context, request, principal, job_id)


@router.post("/jobs/{job_id}/release", include_in_schema=False)
def release_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return page_action(release_job_action, "job", "release", context, request, principal, job_id)


@router.post("/jobs/{job_id}/discard", include_in_schema=False)
def discard_job_page(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return page_action(discard_job_action, "job", "discard", context, request, principal, job_id)


@router.post("/deliveries/{delivery_id}/retry", include_in_schema=False)
def retry_delivery_page(
    request: Request, delivery_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    return page_action(retry_delivery_action, "delivery", "retry", context, request, principal, delivery_id)


# --------------------------------------------------------------------------- API


@router.get("/api/v1/studies", response_model=StudyList, tags=["studies"])
def list_studies_api(
    filters: StudyFilters = Depends(study_filters),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, description="Studies to skip (older clients; prefer after=next_cursor)"),
    after: str | None = _CURSOR,
    before: str | None = _BEFORE,
    count: Literal["capped", "exact"] = _COUNT,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> StudyList:
    """Studies matching the filters, most recently received first, one page at a time: follow
    ``next_cursor`` with ``after=`` (or ``previous_cursor`` with ``before=``); ``offset`` still works."""
    page = _study_page(context, filters, limit=limit, offset=offset, after=after, before=before, count=count)
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
    offset: int = Query(0, ge=0, description="Jobs to skip (older clients; prefer after=next_cursor)"),
    after: str | None = _CURSOR,
    before: str | None = _BEFORE,
    count: Literal["capped", "exact"] = _COUNT,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> JobList:
    """Jobs, newest first, optionally of one state and/or pipeline, with their results and deliveries, one page
    at a time: follow ``next_cursor`` with ``after=`` (or ``previous_cursor`` with ``before=``)."""
    page = _paged(job_views.list_jobs, sessions=context.sessions, state=state or None, pipeline=_clean(pipeline),
                  limit=limit, offset=offset, after=after, before=before, count=count)
    return JobList.model_validate(page)


@router.get("/api/v1/deliveries", response_model=DeliveryList, tags=["jobs"])
def list_deliveries_api(
    state: DeliveryStateName | None = Query(None),
    destination: str | None = Query(None, max_length=64),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, description="Deliveries to skip (older clients; prefer after=next_cursor)"),
    after: str | None = _CURSOR,
    before: str | None = _BEFORE,
    count: Literal["capped", "exact"] = _COUNT,
    principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> DeliveryList:
    """Deliveries, newest first, optionally of one state and/or destination (e.g. every dead delivery to one
    PACS), one page at a time as ``/api/v1/jobs``."""
    page = _paged(job_views.list_deliveries, sessions=context.sessions, state=state or None,
                  destination=_clean(destination), limit=limit, offset=offset, after=after, before=before,
                  count=count)
    return DeliveryList.model_validate(page)


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
    return api_action(retry_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/cancel", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not queued, running or failed"}})
def cancel_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Cancel a queued, running or failed job; a running attempt finishes on its worker but is discarded."""
    return api_action(cancel_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/release", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not held"}})
def release_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Send a held job's results (judged implausible) to its destinations after all; they go at the node's next
    sweep. A destination that already had the job's 'AI analysis not performed' SR gets the results too."""
    return api_action(release_job_action, context, request, principal, job_id)


@router.post("/api/v1/jobs/{job_id}/discard", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown job"}, 409: {"description": "Not held"}})
def discard_job_api(
    request: Request, job_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Throw a held job's results away (their files too); nothing of them is ever sent."""
    return api_action(discard_job_action, context, request, principal, job_id)


@router.post("/api/v1/deliveries/{delivery_id}/retry", response_model=ActionOut, tags=["jobs"],
             responses={404: {"description": "Unknown delivery"}, 409: {"description": "Not failed or dead"}})
def retry_delivery_api(
    request: Request, delivery_id: int, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ActionOut:
    """Send a failed or dead delivery again now, with a fresh attempt budget (inference is not re-run)."""
    return api_action(retry_delivery_action, context, request, principal, delivery_id)
