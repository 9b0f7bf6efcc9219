"""The node's DICOMweb: QIDO-RS searches, WADO-RS retrieval of the instances it received, STOW-RS intake.

Why: a GPU worker on another machine fetches its series here instead of reading the
node's spool over a shared filesystem (issue 26), and PACS or scripts get a standard way
to query the node and push studies into it. Base URL ``/api/v1/dicomweb`` (so an
anonymous request gets 401, as the rest of the API); every read needs the ``worker`` role
or a person's (a viewer reads everything anyway).

* QIDO-RS (PS3.18 10.6): ``/studies``, ``/series``, ``/studies/{study}/series``,
  ``/studies/{study}/series/{series}/instances``; matching as :mod:`dicom_node.web.qido`
  reads it and :mod:`dicom_node.db.dicomweb_index` applies it (wildcards, date ranges,
  UID lists, ModalitiesInStudy, includefield); ``limit``/``offset``; ``application/dicom+json``.
* WADO-RS (PS3.18 10.4): ``/studies/{study}/series/{series}`` and
  ``.../instances/{sop}`` as ``multipart/related; type="application/dicom"``, each part
  the stored file exactly as received (never transcoded), streamed from the spool.
* STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``, for the
  ``sender`` role (a PACS's or script's token) and operators; the body streams into the
  node's ingest part by part (:mod:`dicom_node.stow_intake`), so a pushed study is
  received, completed and routed as one sent by C-STORE.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path as FsPath
from typing import Any

from anyio import from_thread
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node.db import dicomweb_index
from dicom_node.db.dicomweb_index import IndexedInstance
from dicom_node.db.models import Role
from dicom_node.header import uid_problem
from dicom_node.stow import multipart_body
from dicom_node.stow_intake import StowBodyError, StowBusy, StowMediaError, StowSender, stow_boundary
from dicom_node.web.auth import Principal, client_address, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.qido import (
    INSTANCE_ATTRIBUTES,
    SERIES_ATTRIBUTES,
    STUDY_ATTRIBUTES,
    WARNING_AGENT,
    QidoError,
    QidoQuery,
    parse_query,
    render,
)

__all__ = ["BASE", "router"]

logger = logging.getLogger(__name__)

BASE = "/api/v1/dicomweb"
DICOM_JSON = "application/dicom+json"
router = APIRouter(prefix=BASE, tags=["dicomweb"])
_reader = require(Role.WORKER)
_sender = require(Role.SENDER)
_STUDY = Path(..., min_length=1, max_length=64, description="Study Instance UID")
_SERIES = Path(..., min_length=1, max_length=64, description="Series Instance UID")
_SOP = Path(..., min_length=1, max_length=64, description="SOP Instance UID")
_LIMIT = Query(100, ge=1, le=1000, description="at most this many results")
_OFFSET = Query(0, ge=0, description="skip this many results")


def _json(results: list[dict[str, Any]], warnings: tuple[str, ...] = ()) -> Response:
    headers = {"Warning": ", ".join(f'299 {WARNING_AGENT} "{w}"' for w in warnings)} if warnings else None
    return JSONResponse(results, media_type=DICOM_JSON, headers=headers)


def _query(request: Request, **named: str | None) -> QidoQuery:
    try:
        return parse_query(request.query_params, **named)
    except QidoError as exc:
        raise HTTPException(400, str(exc)) from exc


_QIDO_HELP = ("Matching keys by keyword or tag; ``*`` and ``?`` wildcards on PatientName (any case), PatientID, "
              "AccessionNumber and StudyDescription; StudyDate YYYYMMDD or a range YYYYMMDD-YYYYMMDD; UID lists; "
              "``includefield`` (keywords, tags or ``all``); ``fuzzymatching=false``.")


@router.get("/studies", summary="QIDO-RS: search for studies", description=_QIDO_HELP)
def search_studies(
    request: Request, limit: int = _LIMIT, offset: int = _OFFSET, principal: Principal = Depends(_reader),
    context: WebContext = Depends(get_context),
) -> Response:
    query = _query(request)
    studies = dicomweb_index.find_studies(context.sessions, query.study, limit=limit, offset=offset)
    return _json(render(studies, STUDY_ATTRIBUTES, query.include), query.warnings)


def _series_json(context: WebContext, query: QidoQuery, limit: int, offset: int) -> Response:
    found = dicomweb_index.find_series(context.sessions, query.series, limit=limit, offset=offset)
    return _json(render(found, SERIES_ATTRIBUTES, query.include), query.warnings)


@router.get("/series", summary="QIDO-RS: search for series in all studies", description=_QIDO_HELP)
def search_all_series(
    request: Request, limit: int = _LIMIT, offset: int = _OFFSET, principal: Principal = Depends(_reader),
    context: WebContext = Depends(get_context),
) -> Response:
    return _series_json(context, _query(request), limit, offset)


@router.get("/studies/{study_instance_uid}/series", summary="QIDO-RS: search for series of a study",
            description=_QIDO_HELP)
def search_study_series(
    request: Request, study_instance_uid: str = _STUDY, limit: int = _LIMIT, offset: int = _OFFSET,
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    return _series_json(context, _query(request, study_uid=study_instance_uid), limit, offset)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances",
            summary="QIDO-RS: search for instances of a series")
def search_instances(
    request: Request, study_instance_uid: str = _STUDY, series_instance_uid: str = _SERIES,
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    query = _query(request, study_uid=study_instance_uid, series_uid=series_instance_uid)
    found = dicomweb_index.find_instances(context.sessions, study_instance_uid, series_instance_uid,
                                          sop_instance_uids=query.sop_instance_uids)
    return _json(render(found, INSTANCE_ATTRIBUTES, query.include), query.warnings)


def _retrieve(context: WebContext, instances: list[IndexedInstance], what: str) -> Response:
    """The files of ``instances`` as one multipart/related body, streamed; 404 when there are none or one is gone."""
    if not instances:
        raise HTTPException(404, f"{what} has no received instances")
    paths = [context.settings.spool_dir / i.path for i in instances]
    boundary = uuid.uuid4().hex
    try:
        length, chunks = multipart_body(paths, boundary)
    except FileNotFoundError as exc:  # purged by retention after the index was read
        missing = FsPath(exc.filename or "?").name
        raise HTTPException(404, f"{what}: the file of instance {missing} is gone from the spool") from exc
    return StreamingResponse(chunks, headers={"Content-Length": str(length)},
                             media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}",
            summary="WADO-RS: the instances of a series, as received")
def retrieve_series(
    study_instance_uid: str = _STUDY, series_instance_uid: str = _SERIES,
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    instances = dicomweb_index.find_instances(context.sessions, study_instance_uid, series_instance_uid)
    return _retrieve(context, instances, f"series {series_instance_uid} of study {study_instance_uid}")


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}",
            summary="WADO-RS: one instance, as received")
def retrieve_instance(
    study_instance_uid: str = _STUDY, series_instance_uid: str = _SERIES, sop_instance_uid: str = _SOP,
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    instances = dicomweb_index.find_instances(context.sessions, study_instance_uid, series_instance_uid,
                                              sop_instance_uid=sop_instance_uid)
    return _retrieve(context, instances, f"instance {sop_instance_uid} of series {series_instance_uid}")


def _blocking(stream: AsyncIterator[bytes]) -> Iterator[bytes]:
    """The request body's chunks for a thread of the pool: each one fetched from the event loop as it is needed
    (the body is never held whole)."""
    iterator = stream.__aiter__()

    async def next_chunk() -> bytes | None:
        try:
            return await iterator.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


async def _store(request: Request, principal: Principal, context: WebContext, study: str | None) -> Response:
    """STOW-RS: check the request, stream its body into the node's ingest, answer the Store Instances Response."""
    intake = context.stow
    if intake is None:
        raise HTTPException(503, "this web application stores no instances")
    try:
        boundary = stow_boundary(request.headers.get("content-type", ""))
    except StowMediaError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    if study is not None and uid_problem(study) is not None:
        raise HTTPException(400, f"the Study Instance UID in the URL {uid_problem(study)}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > intake.max_request_bytes:
        raise HTTPException(413, f"the request body ({declared} bytes) is larger than "
                                 f"{intake.max_request_bytes // 1_048_576} MiB (web.stow_max_request_mb); "
                                 "send the instances in several requests")
    sender = StowSender(principal.username, client_address(request) or "unknown",
                        request.client.port if request.client else 0, request.url.scheme == "https")
    try:
        result = await run_in_threadpool(intake.receive, _blocking(request.stream()), boundary, sender,
                                         study_instance_uid=study)
    except StowBusy as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
    except StowBodyError as exc:
        raise HTTPException(exc.status, f"{exc}; {len(exc.result.stored)} instance(s) stored before "
                                        "(sending them again is acknowledged as stored)") from exc
    except ClientDisconnect:
        logger.warning("STOW-RS from %s: the client went away before the body ended", principal.username)
        return Response(status_code=400)
    root = str(request.base_url).rstrip("/") + BASE
    return JSONResponse(result.response(root, study), status_code=result.http_status, media_type=DICOM_JSON)


_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every instance stored (ReferencedSOPSequence)"},
    202: {"description": "Some instances stored, some failed (FailedSOPSequence with FailureReason)"},
    409: {"description": "No instance stored"},
    400: {"description": "Malformed multipart body"}, 413: {"description": "Body or an instance too large"},
    415: {"description": "Not multipart/related; type=\"application/dicom\""},
    503: {"description": "web.stow_max_requests requests being received; try again (Retry-After)"},
}


@router.post("/studies", summary="STOW-RS: store instances", responses=_STOW_RESPONSES)
async def store_instances(
    request: Request, principal: Principal = Depends(_sender), context: WebContext = Depends(get_context),
) -> Response:
    return await _store(request, principal, context, None)


@router.post("/studies/{study_instance_uid}", summary="STOW-RS: store instances of one study",
             responses=_STOW_RESPONSES)
async def store_study_instances(
    request: Request, study_instance_uid: str = _STUDY, principal: Principal = Depends(_sender),
    context: WebContext = Depends(get_context),
) -> Response:
    return await _store(request, principal, context, study_instance_uid)
