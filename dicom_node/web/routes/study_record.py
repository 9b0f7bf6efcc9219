"""``GET /api/v1/studies/{uid}/record``: one study's complete record as JSON, for an incident report.

The document is :func:`dicom_node.db.study_record.study_record` (the same as
``dicom-node studies export``), versioned by its ``format`` field. Admins only: it carries
the audit entries about the study, which only admins may read. Every export is audited
(``study.export``) before the record leaves.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import Response

from dicom_node.db.models import Role
from dicom_node.db.study_record import FORMAT, record_json, study_record
from dicom_node.web.auth import Principal, audit_event, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.urls import EncodedSlashRoute, path_segment

__all__ = ["router"]

#: Study UIDs may hold "/" (sent as %2F): routes match it on the raw path (see dicom_node.web.urls).
router = APIRouter(route_class=EncodedSlashRoute)

_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/json": {}},
          "description": f"The record, format {FORMAT!r}: study (header, purged_at, status: the shown state and "
                         "its reason), series, associations, events, timeline, jobs (state, generation, supersedes_job_id, superseded_at, error, checks, "
                         "stage_seconds, results with their UIDs, delivery_ids), deliveries (state, attempts, error, "
                         "timestamps) and audit (entries about the study, its jobs and deliveries, oldest first)"},
    404: {"description": "Unknown study"},
}


@router.get("/api/v1/studies/{study_instance_uid}/record", tags=["studies"], response_class=Response,
            responses=_RESPONSES)
def study_record_api(
    request: Request,
    study_instance_uid: str = Path(..., min_length=1, max_length=64, description="Study Instance UID"),
    principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """The study's complete record (timeline, jobs, deliveries, audit entries) as one JSON document; audited."""
    now = context.clock()
    record = study_record(context.sessions, study_instance_uid, now=now, exported_by=principal.username)
    if record is None:
        raise HTTPException(404, f"study {study_instance_uid} is not known to this node")
    audit_event(context, request, principal, "study.export", target_kind="study", target=study_instance_uid,
                detail=f"record ({FORMAT}) over the API")
    name = f"study-record-{path_segment(study_instance_uid)}.json"
    return Response(record_json(record), media_type="application/json", headers={
        "Cache-Control": "private, no-store", "Content-Disposition": f"attachment; filename=\"{name}\""})
