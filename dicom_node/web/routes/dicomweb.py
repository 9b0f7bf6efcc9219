"""The node's DICOMweb read endpoints: QIDO-RS searches and WADO-RS retrieval of the instances it received.

Why: a GPU worker on another machine fetches its series here instead of reading the
node's spool over a shared filesystem (issue 26), and PACS or scripts get a standard way
to query the node. Base URL ``/api/v1/dicomweb`` (so an anonymous request gets 401, as
the rest of the API); every route needs the ``worker`` role or more (a viewer reads
everything anyway).

* QIDO-RS (PS3.18 10.6): ``/studies``, ``/series``, ``/studies/{study}/series``,
  ``/studies/{study}/series/{series}/instances``; exact matching on the UIDs,
  PatientID, AccessionNumber and Modality; ``limit``/``offset``; ``application/dicom+json``.
* WADO-RS (PS3.18 10.4): ``/studies/{study}/series/{series}`` and
  ``.../instances/{sop}`` as ``multipart/related; type="application/dicom"``, each part
  the stored file exactly as received (never transcoded), streamed from the spool.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path as FsPath
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dicom_node.db import dicomweb_index
from dicom_node.db.dicomweb_index import IndexedInstance
from dicom_node.db.models import Role
from dicom_node.stow import multipart_body
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context

__all__ = ["BASE", "router"]

logger = logging.getLogger(__name__)

BASE = "/api/v1/dicomweb"
DICOM_JSON = "application/dicom+json"
router = APIRouter(prefix=BASE, tags=["dicomweb"])
_reader = require(Role.WORKER)
_STUDY = Path(..., min_length=1, max_length=64, description="Study Instance UID")
_SERIES = Path(..., min_length=1, max_length=64, description="Series Instance UID")
_SOP = Path(..., min_length=1, max_length=64, description="SOP Instance UID")
_UID_QUERY: dict[str, Any] = {"default": None, "min_length": 1, "max_length": 64}
_LIMIT = Query(100, ge=1, le=1000, description="at most this many results")
_OFFSET = Query(0, ge=0, description="skip this many results")


def _attribute(vr: str, value: Any) -> dict[str, Any]:
    """One attribute of the DICOM JSON model (PS3.18 F.2): empty when the value is unknown."""
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


def _json(results: list[dict[str, Any]]) -> Response:
    return JSONResponse(results, media_type=DICOM_JSON)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(
    StudyInstanceUID: str | None = Query(**_UID_QUERY), PatientID: str | None = Query(None, max_length=64),  # noqa: N803
    AccessionNumber: str | None = Query(None, max_length=16), limit: int = _LIMIT, offset: int = _OFFSET,  # noqa: N803
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    studies = dicomweb_index.find_studies(context.sessions, study_instance_uid=StudyInstanceUID, patient_id=PatientID,
                                          accession_number=AccessionNumber, limit=limit, offset=offset)
    return _json([{
        "0020000D": _attribute("UI", s.study_instance_uid), "00100020": _attribute("LO", s.patient_id),
        "00100010": _attribute("PN", s.patient_name), "00080050": _attribute("SH", s.accession_number),
        "00080020": _attribute("DA", s.study_date), "00081030": _attribute("LO", s.study_description),
        "00201208": _attribute("IS", s.instance_count),
    } for s in studies])


def _series_json(context: WebContext, study: str | None, series: str | None, modality: str | None, limit: int,
                 offset: int) -> Response:
    found = dicomweb_index.find_series(context.sessions, study_instance_uid=study, series_instance_uid=series,
                                       modality=modality, limit=limit, offset=offset)
    return _json([{
        "0020000D": _attribute("UI", s.study_instance_uid), "0020000E": _attribute("UI", s.series_instance_uid),
        "00080060": _attribute("CS", s.modality), "00200011": _attribute("IS", s.series_number),
        "0008103E": _attribute("LO", s.series_description), "00201209": _attribute("IS", s.instance_count),
    } for s in found])


@router.get("/series", summary="QIDO-RS: search for series in all studies")
def search_all_series(
    StudyInstanceUID: str | None = Query(**_UID_QUERY), SeriesInstanceUID: str | None = Query(**_UID_QUERY),  # noqa: N803
    Modality: str | None = Query(None, max_length=16), limit: int = _LIMIT, offset: int = _OFFSET,  # noqa: N803
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    return _series_json(context, StudyInstanceUID, SeriesInstanceUID, Modality, limit, offset)


@router.get("/studies/{study_instance_uid}/series", summary="QIDO-RS: search for series of a study")
def search_study_series(
    study_instance_uid: str = _STUDY, SeriesInstanceUID: str | None = Query(**_UID_QUERY),  # noqa: N803
    Modality: str | None = Query(None, max_length=16), limit: int = _LIMIT, offset: int = _OFFSET,  # noqa: N803
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    return _series_json(context, study_instance_uid, SeriesInstanceUID, Modality, limit, offset)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances",
            summary="QIDO-RS: search for instances of a series")
def search_instances(
    study_instance_uid: str = _STUDY, series_instance_uid: str = _SERIES,
    SOPInstanceUID: str | None = Query(**_UID_QUERY),  # noqa: N803
    principal: Principal = Depends(_reader), context: WebContext = Depends(get_context),
) -> Response:
    found = dicomweb_index.find_instances(context.sessions, study_instance_uid, series_instance_uid,
                                          sop_instance_uid=SOPInstanceUID)
    return _json([{
        "0020000D": _attribute("UI", i.study_instance_uid), "0020000E": _attribute("UI", i.series_instance_uid),
        "00080016": _attribute("UI", i.sop_class_uid), "00080018": _attribute("UI", i.sop_instance_uid),
        "00200013": _attribute("IS", i.instance_number), "00083002": _attribute("UI", i.transfer_syntax_uid),
    } for i in found])


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
