"""Re-send a study's results and re-process a study: the study page's buttons and ``/api/v1``.

Both act through :mod:`dicom_node.study_actions` (the service the CLI uses too), which checks,
changes and audits; this module only parses, picks the front end's way to answer, and
renders. The page's re-send goes through a short form (which destination, which job) that
shows what each job would send where; a refusal is shown on that form with its reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dicom_node.db import config_repo, study_views
from dicom_node.db.job_reruns import RESENDABLE_JOB_STATES
from dicom_node.db.models import Role
from dicom_node.study_actions import Reprocessed, Resent, StudyActionRefused, reprocess_study, resend_results
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.routes.config_edit import actor
from dicom_node.web.urls import EncodedSlashRoute, study_path

__all__ = ["router"]

router = APIRouter(route_class=EncodedSlashRoute)

_UID = Path(..., min_length=1, max_length=64, description="Study Instance UID")


class ResendIn(BaseModel):
    """Which results to send again, and where (default: where each job's rule sends them now)."""

    model_config = ConfigDict(extra="forbid")
    destination: str | None = Field(None, min_length=1, max_length=64,
                                    description="Only to this destination; default: the ones each job's rule names now")
    job_id: int | None = Field(None, ge=1, description="Only this job's results; default: every current job's")


class ResendTargetOut(BaseModel):
    job_id: int
    pipeline: str
    destination: str
    delivery_id: int
    created: bool = Field(description="A new delivery (the destination never had these results)")


class ResendOut(BaseModel):
    study_instance_uid: str
    deliveries: list[ResendTargetOut]
    skipped: list[str] = Field(description="Jobs left out, and why")
    message: str


class ReprocessIn(BaseModel):
    """Which models to run again (default: every model the routing rules ask for now)."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=list, max_length=32)


class RerunOut(BaseModel):
    model: str
    series_instance_uid: str
    job_id: int | None = Field(description="The new job; null when this model was not run again (see skipped)")
    supersedes_job_id: int | None = Field(description="The job whose results the new one replaces when ready")
    skipped: str | None


class ReprocessOut(BaseModel):
    study_instance_uid: str
    jobs: list[RerunOut]
    message: str


def _resend(context: WebContext, request: Request, principal: Principal, uid: str, *, api: bool,
            destination: str | None, job_id: int | None) -> Resent:
    return resend_results(context.sessions, uid, now=context.clock(), actor=actor(request, principal, api=api),
                          delivery_max_attempts=context.settings.delivery.max_attempts, destination=destination,
                          job_id=job_id)


def _reprocess(context: WebContext, request: Request, principal: Principal, uid: str, *, api: bool,
               models: list[str]) -> Reprocessed:
    return reprocess_study(context.sessions, context.settings.spool_dir, uid, now=context.clock(),
                           actor=actor(request, principal, api=api), models=models,
                           job_max_attempts=context.settings.routing.job_max_attempts)


def _resend_message(resent: Resent) -> str:
    return (f"{len(resent.targets)} delivery(ies) due now: "
            + ", ".join(f"job {t.job_id} to {t.destination}" for t in resent.targets))


def _reprocess_message(done: Reprocessed) -> str:
    started = [r for r in done.reruns if r.job_id is not None]
    return f"{len(started)} job(s) will run at the node's next sweep; their results go out as new series"


# --------------------------------------------------------------------------- pages


def _resend_form(context: WebContext, request: Request, uid: str, *, error: str | None = None,
                 status_code: int = 200) -> Response:
    detail = study_views.study_detail(context.sessions, uid)
    if detail is None:
        raise HTTPException(404, f"study {uid!r} was not received by this node")
    rows: list[dict[str, Any]] = []
    for job in detail.jobs:
        if job.superseded_at is not None:
            continue
        sendable = job.state in RESENDABLE_JOB_STATES and any(r.kind != "NOTICE" for r in job.results)
        rows.append({"job": job, "sendable": sendable, "destinations": config_repo.resolve_destination_names(
            context.sessions, job.destinations)})
    names = [d.name for d in config_repo.list_destinations(context.sessions)]
    return render(request, "study_resend.html", status_code=status_code, study=detail, rows=rows,
                  destination_names=names, error=error, study_link=study_path(uid))


@router.get("/studies/{study_instance_uid}/resend", include_in_schema=False)
def resend_page(
    request: Request, study_instance_uid: str = _UID, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    """What each current job would send where, and the form to send it again."""
    return _resend_form(context, request, study_instance_uid)


@router.post("/studies/{study_instance_uid}/resend", include_in_schema=False)
def resend_post(
    request: Request, study_instance_uid: str = _UID, destination: str = Form("", max_length=64),
    job_id: str = Form("", max_length=12), principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    try:
        resent = _resend(context, request, principal, study_instance_uid, api=False,
                         destination=destination or None, job_id=int(job_id) if job_id.isdigit() else None)
    except StudyActionRefused as refused:
        return _resend_form(context, request, study_instance_uid, error=refused.message,
                            status_code=refused.status)
    return RedirectResponse(f"{study_path(study_instance_uid)}?notice=study.resend.done&id={len(resent.targets)}"
                            "#jobs", status_code=303)


@router.post("/studies/{study_instance_uid}/reprocess", include_in_schema=False)
def reprocess_post(
    request: Request, study_instance_uid: str = _UID, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    try:
        done = _reprocess(context, request, principal, study_instance_uid, api=False, models=[])
    except StudyActionRefused as refused:
        raise HTTPException(refused.status, refused.message) from None
    started = sum(r.job_id is not None for r in done.reruns)
    return RedirectResponse(f"{study_path(study_instance_uid)}?notice=study.reprocess.done&id={started}#jobs",
                            status_code=303)


# --------------------------------------------------------------------------- API


@router.post("/api/v1/studies/{study_instance_uid}/resend", response_model=ResendOut, tags=["studies"],
             responses={404: {"description": "Unknown study, job or destination"},
                        409: {"description": "Nothing to send (each job's reason), or the study was purged"}})
def resend_api(
    request: Request, body: ResendIn | None = None, study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.OPERATOR)), context: WebContext = Depends(get_context),
) -> ResendOut:
    """Send the study's current results again - to the destinations each job's rule names now (a destination
    added after the study was processed included), or to one destination. Nothing runs again; the same objects
    are sent. The deliveries go at the node's next sweep."""
    wanted = body or ResendIn()
    try:
        resent = _resend(context, request, principal, study_instance_uid, api=True, destination=wanted.destination,
                         job_id=wanted.job_id)
    except StudyActionRefused as refused:
        raise HTTPException(refused.status, refused.message) from None
    return ResendOut(
        study_instance_uid=resent.study_instance_uid, skipped=resent.skipped, message=_resend_message(resent),
        deliveries=[ResendTargetOut(job_id=t.job_id, pipeline=t.pipeline, destination=t.destination,
                                    delivery_id=t.delivery_id, created=t.created) for t in resent.targets])


@router.post("/api/v1/studies/{study_instance_uid}/reprocess", response_model=ReprocessOut, tags=["studies"],
             responses={404: {"description": "Unknown study"},
                        409: {"description": "Still receiving, purged, or no rule asks for a model now"}})
def reprocess_api(
    request: Request, body: ReprocessIn | None = None, study_instance_uid: str = _UID,
    principal: Principal = Depends(require(Role.OPERATOR)), context: WebContext = Depends(get_context),
) -> ReprocessOut:
    """Evaluate the routing rules on the study again and run the models they ask for again. The new results are
    new objects in new series; the earlier ones are marked superseded when the new ones are ready."""
    wanted = body or ReprocessIn()
    try:
        done = _reprocess(context, request, principal, study_instance_uid, api=True, models=wanted.models)
    except StudyActionRefused as refused:
        raise HTTPException(refused.status, refused.message) from None
    return ReprocessOut(
        study_instance_uid=done.study_instance_uid, message=_reprocess_message(done),
        jobs=[RerunOut(model=r.pipeline, series_instance_uid=r.series_instance_uid, job_id=r.job_id,
                       supersedes_job_id=r.supersedes_job_id, skipped=r.skipped) for r in done.reruns])
