"""Destinations in the admin UI and the REST API: list with delivery statistics, edit, delete, test connection.

Why: admins add and change where results go (a PACS by C-STORE, a DICOMweb server by
STOW-RS) and who is told of them (a RIS by HL7 v2 over MLLP, an EHR by FHIR) and need to see at a glance whether deliveries get through. Routes here only
parse and render: :class:`dicom_node.config_service.DestinationsService` validates
(each error at its field), keeps secrets on the server (pages show "(unchanged)" and
keep the stored value when the field is left blank, the API answers ``**********`` and
takes that, or nothing, back as "keep the stored secret"), refuses a stored secret
following an edited URL to another server (422 at ``auth.password``/``auth.token``,
audited as ``destination.secret_refused``), checks TLS files, saves, tests the
connection (C-ECHO or QIDO-RS) and audits every change with the definition redacted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Form, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dicom_node.config_service import Refused
from dicom_node.config_service.base import FieldError
from dicom_node.config_service.destinations import KINDS, TestOutcome, UnusableTlsFiles, redacted, secret_moved
from dicom_node.db import config_repo
from dicom_node.db.models import Role
from dicom_node.destinations import (
    ALL_OUTPUTS,
    DEFAULT_OUTPUTS,
    NOTIFY_EVENTS,
    Destination,
    DicomDestination,
    FhirDestination,
    HL7Destination,
)
from dicom_node.study_actions import MAX_RECENT_HOURS, StudyActionRefused, resend_recent
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.routes.config_edit import (
    FormData,
    actor,
    api_delete,
    api_save,
    destinations_service,
    form_save,
    or_404,
    refused_json,
    submitted_form,
)

__all__ = ["NOT_PERFORMED_CHOICES", "router"]

logger = logging.getLogger(__name__)

router = APIRouter()

_OUTPUTS = sorted(ALL_OUTPUTS)
#: The choices of ``not_performed`` as the form offers them: (value, label).
NOT_PERFORMED_CHOICES = (("none", "nothing"), ("sr", "'AI analysis not performed' SR"))
#: When a notification destination is told, as the form offers it: (value, label).
NOTIFY_CHOICES = (("results", "results delivered"), ("not_performed", "AI not performed"),
                  ("held", "results held for review"))

#: Form inputs that have an error slot of their own; other errors go to the top of the form.
_FORM_KEYS = frozenset({
    "name", "type", "default", "outputs", "not_performed", "outline_low_confidence", "timeout_seconds", "ae_title",
    "host", "port", "calling_ae_title", "max_pdu",
    "tls", "tls-ca_certificates", "tls-certificate", "tls-private_key", "tls-check_hostname", "url", "auth",
    "auth-type", "auth-username", "auth-password", "auth-token", "verify_tls", "ca_certificates",
    "notify", "sending_application", "sending_facility", "receiving_application", "receiving_facility",
    "patient_id_authority", "processing_id", "patient_id_system",
})
#: What each kind of destination is called on the pages.
KIND_LABELS = {"dicom": "DICOM (C-STORE)", "dicomweb": "DICOMweb (STOW-RS)", "hl7": "HL7 v2 (MLLP)",
               "fhir": "FHIR R4"}
_KIND_PATTERN = "^(" + "|".join(KIND_LABELS) + ")$"
_HL7_TEXTS = ("sending_application", "sending_facility", "receiving_application", "receiving_facility",
              "patient_id_authority", "processing_id")


def _record(context: WebContext, name: str) -> config_repo.DestinationRecord:
    return or_404(lambda: destinations_service(context).record_of(name))


# --------------------------------------------------------------------------- the form


@dataclass
class DestinationForm:
    """The destination form as typed (never holding a secret) and its errors by element id."""

    kind: str = "dicom"
    values: dict[str, str] = field(default_factory=dict)
    checks: set[str] = field(default_factory=set)  # ticked checkboxes: default, tls, verify_tls, ...
    outputs: set[str] = field(default_factory=lambda: set(DEFAULT_OUTPUTS))
    notify: set[str] = field(default_factory=lambda: set(NOTIFY_EVENTS))
    stored_secret: dict[str, bool] = field(default_factory=dict)  # password/token: a stored one exists
    errors: dict[str, list[str]] = field(default_factory=dict)

    def v(self, key: str) -> str:
        return self.values.get(key, "")

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key if key in _FORM_KEYS else "form", []).append(message)

    @property
    def notification(self) -> bool:
        """An HL7 or FHIR destination: told about results, sent none."""
        return self.kind in ("hl7", "fhir")

    @property
    def http(self) -> bool:
        """A DICOMweb or FHIR destination: a URL with credentials."""
        return self.kind in ("dicomweb", "fhir")

    @property
    def sockets(self) -> bool:
        """A DICOM or HL7 destination: host, port and optional TLS."""
        return self.kind in ("dicom", "hl7")

    @classmethod
    def blank(cls, kind: str) -> "DestinationForm":
        checks = {"tls-check_hostname", "verify_tls"}
        return cls(kind=kind, values={"timeout_seconds": "30", "max_pdu": "1048576", "auth-type": "none",
                                      "not_performed": "none", "sending_application": "DICOM_NODE",
                                      "processing_id": "P"}, checks=checks)

    @classmethod
    def from_destination(cls, destination: Destination) -> "DestinationForm":
        values = {"name": destination.name, "timeout_seconds": f"{destination.timeout_seconds:g}"}
        checks = {"default"} if destination.default else set()
        secrets: dict[str, bool] = {}
        form = cls(kind=destination.type, values=values, checks=checks)
        if isinstance(destination, (HL7Destination, FhirDestination)):
            form.notify = set(destination.notify)
        else:
            values["not_performed"] = destination.not_performed
            form.outputs = set(destination.outputs)
            if destination.outline_low_confidence:
                checks.add("outline_low_confidence")
        if isinstance(destination, (DicomDestination, HL7Destination)):
            values.update(host=destination.host, port=str(destination.port))
            if isinstance(destination, DicomDestination):
                values.update(ae_title=destination.ae_title, calling_ae_title=destination.calling_ae_title or "",
                              max_pdu=str(destination.max_pdu))
            else:
                values.update({key: getattr(destination, key) or "" for key in _HL7_TEXTS})
            tls = destination.tls
            if tls is not None:
                checks.add("tls")
                values.update({"tls-ca_certificates": str(tls.ca_certificates or ""),
                               "tls-certificate": str(tls.certificate or ""),
                               "tls-private_key": str(tls.private_key or "")})
            if tls is None or tls.check_hostname:
                checks.add("tls-check_hostname")
        else:
            values.update(url=destination.url, ca_certificates=str(destination.ca_certificates or ""))
            if isinstance(destination, FhirDestination):
                values["patient_id_system"] = destination.patient_id_system or ""
            values["auth-type"] = destination.auth.type
            values["auth-username"] = getattr(destination.auth, "username", "")
            secrets = {"password": hasattr(destination.auth, "password"), "token": hasattr(destination.auth, "token")}
            if destination.verify_tls:
                checks.add("verify_tls")
        form.stored_secret = secrets
        return form


def _checked(form: FormData, key: str) -> bool:
    return (form.get(key) or [""])[0] in ("on", "true", "1")


def parse_destination_form(form: FormData, *, kind: str, name: str | None,
                           stored: Destination | None) -> tuple[DestinationForm, dict[str, Any]]:
    """The form as typed (secrets left out) and the definition it describes (blank secrets: keep stored)."""

    def text(key: str) -> str:
        return (form.get(key) or [""])[0].strip()

    state = DestinationForm(kind=kind, outputs={o for o in form.get("outputs", []) if o},
                            notify={e for e in form.get("notify", []) if e})
    keys = ["name", "timeout_seconds"] + ([] if state.notification else ["not_performed"])
    if state.sockets:
        keys += ["host", "port", "tls-ca_certificates", "tls-certificate", "tls-private_key"]
        keys += ["ae_title", "calling_ae_title", "max_pdu"] if kind == "dicom" else list(_HL7_TEXTS)
    else:
        keys += ["url", "auth-type", "auth-username", "ca_certificates"] + (
            ["patient_id_system"] if kind == "fhir" else [])
    state.values = {key: text(key) for key in keys}
    if name is not None:
        state.values["name"] = name
    state.checks = {key for key in ("default", "outline_low_confidence", "tls", "tls-check_hostname", "verify_tls")
                    if _checked(form, key)}
    if stored is not None and stored.type in ("dicomweb", "fhir"):
        auth = getattr(stored, "auth")
        state.stored_secret = {"password": hasattr(auth, "password"), "token": hasattr(auth, "token")}
    v = state.values
    data: dict[str, Any] = {"type": kind, "name": v["name"], "default": "default" in state.checks}
    if state.notification:
        data["notify"] = sorted(state.notify)
    else:
        data.update(outputs=sorted(state.outputs), not_performed=v["not_performed"] or "none",
                    outline_low_confidence="outline_low_confidence" in state.checks)
    if v["timeout_seconds"]:
        data["timeout_seconds"] = v["timeout_seconds"]
    if state.sockets:
        data.update(host=v["host"], port=v["port"] or None)
        if kind == "dicom":
            data.update(ae_title=v["ae_title"], calling_ae_title=v["calling_ae_title"] or None)
            if v["max_pdu"]:
                data["max_pdu"] = v["max_pdu"]
        else:
            data.update({key: v[key] or None for key in _HL7_TEXTS if key != "processing_id"})
            data["processing_id"] = v["processing_id"] or "P"
            if not v["sending_application"]:
                del data["sending_application"]
        if "tls" in state.checks:
            data["tls"] = {"ca_certificates": v["tls-ca_certificates"] or None,
                           "certificate": v["tls-certificate"] or None, "private_key": v["tls-private_key"] or None,
                           "check_hostname": "tls-check_hostname" in state.checks}
    else:
        auth_kind = v["auth-type"] or "none"
        auth: dict[str, Any] = {"type": auth_kind}
        if auth_kind == "basic":
            auth.update(username=v["auth-username"], password=(form.get("auth-password") or [""])[0])
        elif auth_kind == "bearer":
            auth["token"] = (form.get("auth-token") or [""])[0]
        data.update(url=v["url"], auth=auth, verify_tls="verify_tls" in state.checks,
                    ca_certificates=v["ca_certificates"] or None)
        if kind == "fhir":
            data["patient_id_system"] = v["patient_id_system"] or None
    return state, data


def _place(state: DestinationForm, errors: Sequence[FieldError]) -> None:
    for location, message in errors:
        parts = [str(p) for p in location if not isinstance(p, int)]
        key = "-".join(parts) if parts else "form"
        if parts[:1] in (["outputs"], ["notify"]):
            key = parts[0]
        state.error(key, message)


def _form_page(request: Request, context: WebContext, state: DestinationForm, *, original: str | None,
               record: config_repo.DestinationRecord | None = None, test: TestOutcome | None = None,
               status_code: int = 200, sent_recent: str | None = None) -> Response:
    stats = config_repo.destination_delivery_stats(context.sessions).get(original or "") if original else None
    used_by = config_repo.rules_using_destination(context.sessions, original) if original else []
    return render(request, "destination_form.html", status_code=status_code, form=state, original=original,
                  record=record, test=test, stats=stats, used_by=used_by, all_outputs=_OUTPUTS,
                  notify_events=NOTIFY_CHOICES, kind_labels=KIND_LABELS,
                  not_performed_choices=NOT_PERFORMED_CHOICES, sent_recent=sent_recent,
                  calling_ae_title=context.settings.delivery.calling_ae_title or context.settings.dicom.ae_title)



# --------------------------------------------------------------------------- pages


_DONE = {"created": "Destination {} created.", "updated": "Destination {} saved.", "deleted": "Destination {} deleted."}


@router.get("/destinations", include_in_schema=False)
def destinations_page(
    request: Request, q: str = Query("", max_length=200),
    kind: str = Query("", pattern="^(|dicom|dicomweb|hl7|fhir)$"),
    done: str = Query(""), destination: str = Query("", max_length=64),
    principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context),
) -> Response:
    records = config_repo.list_destination_records(context.sessions)
    total = len(records)
    if q:
        needle = q.lower()
        records = [r for r in records if needle in r.destination.name.lower() or needle in r.destination.peer.lower()]
    if kind:
        records = [r for r in records if r.destination.type == kind]
    message = _DONE[done].format(destination) if done in _DONE and destination else None
    return render(request, "destinations.html", records=records, total=total, q=q, kind=kind, message=message,
                  kind_labels=KIND_LABELS,
                  stats=config_repo.destination_delivery_stats(context.sessions))


@router.get("/destinations/new", include_in_schema=False)
def new_destination_page(
    request: Request, type: str = Query("dicom", pattern=_KIND_PATTERN),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    return _form_page(request, context, DestinationForm.blank(type), original=None)


def _save_from_form(request: Request, context: WebContext, principal: Principal, form: FormData,
                    original: str | None) -> Response:
    record = None if original is None else _record(context, original)
    kind = (form.get("type") or ["dicom"])[0]
    if kind not in KINDS:
        raise HTTPException(422, f"type must be one of {', '.join(KINDS)}, got {kind[:20]!r}")
    stored = record.destination if record else None
    state, data = parse_destination_form(form, kind=kind, name=original, stored=stored)

    def refused(exc: Refused) -> Response:
        if exc.status == 409:
            state.error("name", exc.message)
        else:
            _place(state, exc.errors)
            moved = secret_moved(data, stored)
            if moved is not None:
                state.stored_secret[moved.secret] = False  # no "(unchanged)": it has to be typed again
        return _form_page(request, context, state, original=original, record=record, status_code=exc.status)

    return form_save(destinations_service(context), request, principal, data, original=original, refused=refused,
                     done=lambda saved, created: f"/destinations?done={'created' if created else 'updated'}"
                                                 f"&destination={quote(saved.name)}")


@router.post("/destinations", include_in_schema=False)
def create_destination_submit(
    request: Request, form: FormData = Depends(submitted_form), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _save_from_form(request, context, principal, form, None)


@router.get("/destinations/{name}", include_in_schema=False)
def destination_page(
    request: Request, name: str, principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    record = _record(context, name)
    return _form_page(request, context, DestinationForm.from_destination(record.destination), original=name,
                      record=record)


@router.post("/destinations/{name}", include_in_schema=False)
def update_destination_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    return _save_from_form(request, context, principal, form, name)


@router.post("/destinations/{name}/delete", include_in_schema=False)
def delete_destination_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    or_404(lambda: destinations_service(context).delete(name, actor(request, principal)))
    return RedirectResponse(f"/destinations?done=deleted&destination={quote(name)}", status_code=303)


@router.post("/destinations/{name}/test", include_in_schema=False)
def test_destination_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the stored destination's connection; the result is shown on its page."""
    record = _record(context, name)
    state = DestinationForm.from_destination(record.destination)
    try:
        outcome = destinations_service(context).test(record.destination, actor(request, principal))
    except UnusableTlsFiles as exc:
        _place(state, exc.errors)
        failed = TestOutcome(False, f"not run: {exc}", 0.0, "not run")
        return _form_page(request, context, state, original=name, record=record, test=failed, status_code=422)
    return _form_page(request, context, state, original=name, record=record, test=outcome)


@router.post("/destinations/{name}/send-recent", include_in_schema=False)
def send_recent_submit(
    request: Request, name: str, hours: float = Form(24.0), principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Send the destination the results of the last ``hours`` it never had; the outcome is shown on its page."""
    record = _record(context, name)
    state = DestinationForm.from_destination(record.destination)
    try:
        targets = resend_recent(context.sessions, name, hours=hours, now=context.clock(),
                                actor=actor(request, principal), delivery_max_attempts=context.settings.delivery.max_attempts)
    except StudyActionRefused as refused:
        return _form_page(request, context, state, original=name, record=record, status_code=refused.status,
                          sent_recent=refused.message)
    said = (f"The results of {len(targets)} job(s) of the last {hours:g} hours will be sent at the node's next sweep."
            if targets else f"Nothing to send: no result of the last {hours:g} hours that {name} did not have.")
    return _form_page(request, context, state, original=name, record=record, sent_recent=said)


class SendRecentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hours: float = Field(24.0, gt=0, le=MAX_RECENT_HOURS, description="How far back")


class SendRecentOut(BaseModel):
    destination: str
    hours: float
    jobs: list[int] = Field(description="Jobs whose results are sent")
    deliveries: list[int]


@router.post("/api/v1/destinations/{name}/send-recent", tags=["destinations"], response_model=SendRecentOut,
             responses={404: {"description": "No destination of that name"}})
def api_send_recent(
    request: Request, name: str, body: SendRecentIn | None = None,
    principal: Principal = Depends(require(Role.OPERATOR)), context: WebContext = Depends(get_context),
) -> SendRecentOut:
    """Send the destination (typically just added) the results of the last ``hours`` that it never had; they go
    at the node's next sweep."""
    wanted = body or SendRecentIn()
    _record(context, name)
    try:
        targets = resend_recent(context.sessions, name, hours=wanted.hours, now=context.clock(),
                                actor=actor(request, principal, api=True),
                                delivery_max_attempts=context.settings.delivery.max_attempts)
    except StudyActionRefused as refused:
        raise HTTPException(refused.status, refused.message) from None
    return SendRecentOut(destination=name, hours=wanted.hours, jobs=[t.job_id for t in targets],
                         deliveries=[t.delivery_id for t in targets])


# --------------------------------------------------------------------------- API

_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/DicomDestination"}, {"$ref": "#/components/schemas/DicomWebDestination"},
    {"$ref": "#/components/schemas/HL7Destination"}, {"$ref": "#/components/schemas/FhirDestination"}],
    "discriminator": {"propertyName": "type"}}}}}}
_ERRORS = {404: {"description": "No destination of that name"},
           409: {"description": "The name is taken, or rules still send to the destination"},
           422: {"description": "Invalid definition: `errors` lists each field (e.g. `port`, `auth.password`)"}}


class ConnectionTestResult(BaseModel):
    """The answer of ``POST /api/v1/destinations/{name}/test``."""

    destination: str
    kind: Literal["dicom", "dicomweb", "hl7", "fhir"]
    method: str
    ok: bool
    detail: str
    round_trip_ms: float


@router.get("/api/v1/destinations", tags=["destinations"], response_model=list[Destination])
def api_list_destinations(
    principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Response:
    """Every destination, by name (secrets shown as ``**********``)."""
    return JSONResponse([redacted(d) for d in config_repo.list_destinations(context.sessions)])


@router.post("/api/v1/destinations", tags=["destinations"], status_code=201, response_model=Destination,
             openapi_extra=_BODY, responses=_ERRORS)
def api_create_destination(
    request: Request, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return api_save(destinations_service(context), request, principal, body, None)


@router.get("/api/v1/destinations/{name}", tags=["destinations"], response_model=Destination, responses=_ERRORS)
def api_get_destination(
    name: str, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Response:
    return JSONResponse(redacted(_record(context, name).destination))


@router.put("/api/v1/destinations/{name}", tags=["destinations"], response_model=Destination, openapi_extra=_BODY,
            responses=_ERRORS)
def api_update_destination(
    request: Request, name: str, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Replace the destination; a password or token left out, empty or ``**********`` keeps the stored one."""
    return api_save(destinations_service(context), request, principal, body, name)


@router.delete("/api/v1/destinations/{name}", tags=["destinations"], status_code=204, responses=_ERRORS)
def api_delete_destination(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return api_delete(destinations_service(context), request, principal, name)


@router.post("/api/v1/destinations/{name}/test", tags=["destinations"], response_model=ConnectionTestResult,
             responses=_ERRORS)
def api_test_destination(
    request: Request, name: str, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ConnectionTestResult | Response:
    """C-ECHO (DICOM), QIDO-RS (DICOMweb), an MLLP connection (HL7, nothing sent) or ``GET /metadata`` (FHIR)
    to the stored destination; ``ok`` false explains why in ``detail``."""
    destination = _record(context, name).destination
    try:
        outcome = destinations_service(context).test(destination, actor(request, principal, api=True))
    except Refused as exc:
        return refused_json(exc)
    return ConnectionTestResult(destination=name, kind=destination.type, method=outcome.method, ok=outcome.ok,
                                detail=outcome.detail, round_trip_ms=outcome.round_trip_ms)
