"""GPU workers upload a job's result files into the node's outbox: ``PUT``/``DELETE /api/v1/outbox/job-<id>/<name>``.

Why a PUT of outbox files rather than STOW-RS: a job writes DICOM objects *and* its
preview (a PNG and a JSON file), which STOW-RS cannot carry; the job's result rows
name outbox paths (``job-<id>/<kind>-<sop>.dcm``) that the worker chooses and the
node's deliveries (:mod:`dicom_node.dispatch`) read unchanged, so the upload must land
at exactly that path; and a result must not enter the node's receive path (index,
completion, routing) as a STOW-RS'd instance would. A PUT to a path is idempotent: a
retried job (or a retried request) writes the same path again and replaces the file.

Only accounts of the ``worker`` role itself may write (no person's account can place
results that get delivered to a PACS), and only into the folder of a job that is
``running`` now; the body is streamed into the outbox's staging area and renamed into
place after fsync, as received instances are. ``DELETE`` removes a file (a job whose
results are discarded because it was cancelled or taken over while it ran).
"""

from __future__ import annotations

import logging
import re

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Job, JobState, Role
from dicom_node.spool import Spool
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/outbox", tags=["workers"])
_writer = require(Role.WORKER, only=True)
#: ``job-<id>/<file>``: the folders the pipeline writes (workers.pipeline._job_folder), one level, no dot first.
_OUTBOX_PATH = re.compile(r"^job-([1-9][0-9]{0,17})/([A-Za-z0-9][A-Za-z0-9._+-]{0,199})$")
_PATH = Path(..., max_length=220, description="job-<id>/<file name>, as the job's results name it")


def _job_of(path: str) -> int:
    match = _OUTBOX_PATH.match(path)
    if match is None or ".." in path:
        raise HTTPException(422, f"outbox path {path!r} is not job-<id>/<file name> (letters, digits, . _ + -)")
    return int(match.group(1))


def _job_state(sessions: sessionmaker[Session], job_id: int) -> str | None:
    with sessions() as session:
        return session.scalar(select(Job.state).where(Job.id == job_id))


@router.put("/{path:path}", status_code=204, summary="Upload one result file of a running job")
async def put_outbox_file(
    request: Request, path: str = _PATH, principal: Principal = Depends(_writer),
    context: WebContext = Depends(get_context),
) -> Response:
    job_id = _job_of(path)
    state = await run_in_threadpool(_job_state, context.sessions, job_id)
    if state is None:
        raise HTTPException(404, f"job {job_id} does not exist")
    if state != JobState.RUNNING.value:
        raise HTTPException(409, f"job {job_id} is {state}, not running: its results are not taken")
    declared = request.headers.get("content-length")
    limit = context.settings.dicom.max_instance_mb * 1_048_576
    if declared is None or not declared.isdigit():
        raise HTTPException(411, "send Content-Length with the file")
    if int(declared) > limit:
        raise HTTPException(413, f"{path}: {declared} bytes is more than {limit} (dicom.max_instance_mb)")
    outbox = Spool(context.settings.outbox_dir, fsync=context.settings.storage.fsync)
    staged = outbox.stage()
    try:
        async for chunk in request.stream():
            staged.append(chunk)
        if staged.size != int(declared):
            raise HTTPException(400, f"{path}: received {staged.size} bytes of the {declared} announced")
        await run_in_threadpool(outbox.commit, staged, path)
    except BaseException:
        staged.discard()
        raise
    logger.info("%s uploaded %s (%d bytes) for job %d", principal.username, path, staged.size, job_id)
    return Response(status_code=204)


@router.delete("/{path:path}", status_code=204, summary="Remove one result file of a job")
def delete_outbox_file(
    path: str = _PATH, principal: Principal = Depends(_writer), context: WebContext = Depends(get_context),
) -> Response:
    _job_of(path)
    Spool(context.settings.outbox_dir, fsync=context.settings.storage.fsync).remove(path)
    logger.info("%s removed %s from the outbox", principal.username, path)
    return Response(status_code=204)
