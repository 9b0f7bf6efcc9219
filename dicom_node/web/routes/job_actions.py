"""The operator's actions on jobs and deliveries, shared by the study page's forms and the API.

Retry or cancel a job, re-send a delivery, release or discard held results: each action
checks the state, changes it with :mod:`dicom_node.db.jobs` (held results:
:mod:`dicom_node.held_results`, shared with the CLI), writes the audit entry (before and
after state) and says what it did (:class:`~dicom_node.web.routes.study_api_models.ActionOut`),
or raises :class:`ActionRefused`. :func:`api_action` turns a refusal into an HTTP error;
:func:`page_action` into a redirect back to the study page with a fixed notice
(:func:`action_notice`). Why a module of its own: the same five actions serve two front
ends, and their state rules must not differ between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from dicom_node import held_results
from dicom_node.db import job_views, jobs
from dicom_node.db.models import DeliveryState, JobState
from dicom_node.spool import Spool
from dicom_node.web.auth import Principal, audit_event
from dicom_node.web.context import WebContext
from dicom_node.web.routes.study_api_models import ActionOut
from dicom_node.web.urls import study_path

__all__ = ["Action", "ActionRefused", "action_notice", "api_action", "cancel_job_action", "discard_job_action",
           "page_action", "release_job_action", "retry_delivery_action", "retry_job_action"]

_RETRYABLE_JOB = (JobState.FAILED.value, JobState.DEAD.value, JobState.CANCELLED.value)
_RETRYABLE_DELIVERY = (DeliveryState.FAILED.value, DeliveryState.DEAD.value)


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
        current = _known_job(context, job_id)
        purged = job_views.deleted_by_retention(context.sessions, job.study_instance_uid, "study's instances")
        if purged is not None:
            raise ActionRefused(409, f"job {job_id} cannot run again: {purged}", current.state, job.study_instance_uid)
        if current.superseded_at is not None:
            raise ActionRefused(409, f"job {job_id} was superseded by a later run of {job.pipeline} on its series; "
                                     "re-process the study to run it again", current.state, job.study_instance_uid)
        raise ActionRefused(409, f"job {job_id} is {current.state}; only failed, dead or cancelled jobs can be "
                                 "retried", current.state, job.study_instance_uid)
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
        purged = job_views.deleted_by_retention(context.sessions, found.study_instance_uid, "results")
        if purged is not None:
            raise ActionRefused(409, f"delivery {delivery_id} cannot be re-sent: {purged}", state,
                                found.study_instance_uid)
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


def api_action(fn: Action, context: WebContext, request: Request, principal: Principal, target: int) -> ActionOut:
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
    ("study", "resend", True): "Results will be sent again: {id} delivery(ies) are due now (see Deliveries below).",
    ("study", "reprocess", True): "{id} job(s) will run again at the node's next sweep; their results go out as new "
                                  "series and replace the earlier ones when ready.",
}
_STATE_NAMES = frozenset(s.value for s in JobState) | frozenset(s.value for s in DeliveryState)


def page_action(fn: Action, kind: str, action: str, context: WebContext, request: Request, principal: Principal,
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


def action_notice(notice: str | None, target: int | None, was: str | None) -> str | None:
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
