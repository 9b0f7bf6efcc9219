"""Destinations in the admin UI and the REST API: list with delivery statistics, edit, delete, test connection.

Why: admins add and change where results go (a PACS by C-STORE, a DICOMweb server by
STOW-RS) and need to see at a glance whether deliveries get through. Definitions are
the same pydantic types the senders use (:mod:`dicom_node.destinations`), validated
when saved with each error placed at its field. Secrets (a basic-auth password, a
bearer token) never leave the server: pages show "(unchanged)" and keep the stored
value when the field is left blank, the API answers ``**********`` and takes that
(or nothing) back as "keep the stored secret", and the audit log stores the
definition redacted. A stored secret is only ever sent to the server it was entered
for: a save that moves the URL to another scheme, host or port must carry the secret
again (422 at ``auth.password``/``auth.token``, audited as ``destination.secret_refused``).
TLS files (CA bundle, client certificate and key) must load when the definition is saved
and before a test runs (422 naming the field, the path and what is wrong). "Test
connection" runs a C-ECHO (DICOM) or a QIDO-RS request (DICOMweb) with the destination's
own AE titles, TLS settings and credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError

from dicom_node.db import config_repo
from dicom_node.db.models import Role
from dicom_node.destinations import ALL_OUTPUTS, DEFAULT_OUTPUTS, Destination, DicomDestination, DicomWebDestination
from dicom_node.tls_files import destination_tls_problems
from dicom_node.web.auth import Principal, audit_event, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.routes.rules import FieldError, FormData, invalid_response, submitted_form

__all__ = ["MASK", "NOT_PERFORMED_CHOICES", "TestOutcome", "merge_secrets", "redacted", "router", "secret_moved",
           "test_destination", "validate_destination"]

logger = logging.getLogger(__name__)

router = APIRouter()

#: How a secret is shown (pydantic's SecretStr text); sent back, it means "keep the stored secret".
MASK = "**********"
#: A connection test waits at most this long, whatever the destination's own timeout.
TEST_TIMEOUT_SECONDS = 15.0
MAX_TEXT = 2000
_SOURCE = "ui"
_DESTINATION = TypeAdapter(Destination)
_KINDS = ("dicom", "dicomweb")
_AUTH_KINDS = ("none", "basic", "bearer")
_OUTPUTS = sorted(ALL_OUTPUTS)
#: The choices of ``not_performed`` as the form offers them: (value, label).
NOT_PERFORMED_CHOICES = (("none", "nothing"), ("sr", "'AI analysis not performed' SR"))

#: Form inputs that have an error slot of their own; other errors go to the top of the form.
_FORM_KEYS = frozenset({
    "name", "type", "default", "outputs", "not_performed", "timeout_seconds", "ae_title", "host", "port", "calling_ae_title", "max_pdu",
    "tls", "tls-ca_certificates", "tls-certificate", "tls-private_key", "tls-check_hostname", "url", "auth",
    "auth-type", "auth-username", "auth-password", "auth-token", "verify_tls", "ca_certificates",
})


# --------------------------------------------------------------------------- shared by pages and API


def redacted(destination: Destination) -> dict[str, Any]:
    """The definition as JSON with every secret replaced by :data:`MASK` (for pages, API and audit log)."""
    return destination.model_dump(mode="json")


def _origin(url: Any) -> str:
    """``scheme://host:port`` of a URL (default port filled in), the unit a secret is entered for."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return url.strip()
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True)
class SecretMoved:
    """A save that would send the stored secret to another server: which secret, from where, to where."""

    secret: str  # "password" or "token"
    stored_origin: str
    new_origin: str

    @property
    def error(self) -> FieldError:
        what = self.secret
        return (("auth", self.secret),
                f"the URL now points to {self.new_origin} instead of {self.stored_origin}: type the {what} again "
                f"(a stored {what} is only sent to the server it was entered for)")


def secret_moved(data: Any, stored: Destination | None) -> SecretMoved | None:
    """Whether ``data`` keeps (blank or masked) a stored secret while its URL moves to another scheme, host or
    port: the stored secret must not follow an edited URL to a server it was never meant for."""
    if not isinstance(data, dict) or not isinstance(stored, DicomWebDestination):
        return None
    auth = data.get("auth")
    if not isinstance(auth, dict) or auth.get("type") != stored.auth.type:
        return None
    if _origin(data.get("url")) == _origin(stored.url):
        return None
    for name in ("password", "token"):
        if getattr(stored.auth, name, None) is not None and auth.get(name) in (None, "", MASK):
            return SecretMoved(name, _origin(stored.url), _origin(data.get("url")))
    return None


def merge_secrets(data: Any, stored: Destination | None) -> Any:
    """``data`` with blank or masked secrets replaced by the stored ones (same auth kind and same server only:
    see :func:`secret_moved`)."""
    if not isinstance(data, dict) or not isinstance(stored, DicomWebDestination):
        return data
    auth = data.get("auth")
    if not isinstance(auth, dict) or auth.get("type") != stored.auth.type:
        return data
    if _origin(data.get("url")) != _origin(stored.url):
        return data
    merged = dict(auth)
    for name in ("password", "token"):
        secret = getattr(stored.auth, name, None)
        if secret is not None and merged.get(name) in (None, "", MASK):
            merged[name] = secret.get_secret_value()
    return {**data, "auth": merged}


def _location(location: Sequence[str | int]) -> tuple[str | int, ...]:
    """pydantic's location without the union tags (``dicomweb.auth.basic.password`` -> ``auth.password``)."""
    parts = list(location)
    if parts and parts[0] in _KINDS:
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] == "auth" and parts[1] in _AUTH_KINDS:
        parts = [parts[0], *parts[2:]]
    return tuple(parts)


def _message(error: Mapping[str, Any]) -> str:
    kind, message = str(error.get("type", "")), str(error.get("msg", "invalid"))
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, str | int | float) and not isinstance(value, bool) and kind != "missing":
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return f"{message} (got {shown})"
    return message


def validate_destination(data: Any, *, stored: Destination | None) -> tuple[Destination | None, list[FieldError]]:
    """The destination ``data`` describes (blank/masked secrets taken from ``stored``), or its problems.

    Locations are the model's fields without the union tags (``port``, ``tls.certificate``,
    ``auth.password``), so pages and API name the same field. Refused besides the model's
    own rules: a stored secret kept while the URL moves to another server
    (:func:`secret_moved`), and TLS files on the node that are not what their field says
    (:func:`dicom_node.tls_files.destination_tls_problems`).
    """
    if not isinstance(data, dict):
        return None, [((), f"a destination must be a JSON object, got {type(data).__name__}")]
    long = [key for key in ("url", "host", "name") if isinstance(data.get(key), str) and len(data[key]) > MAX_TEXT]
    if long:
        return None, [((key,), f"{key} is {len(data[key])} characters long; at most {MAX_TEXT} are allowed")
                      for key in long]
    moved = secret_moved(data, stored)
    try:
        destination = _DESTINATION.validate_python(merge_secrets(data, stored))
    except ValidationError as exc:
        errors = _model_errors(exc)
        if moved is not None:
            errors = [moved.error, *(e for e in errors if e[0] != moved.error[0])]
        return None, errors
    errors = [*([moved.error] if moved is not None else []), *destination_tls_problems(destination)]
    return (None, errors) if errors else (destination, [])


def _model_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors at the definition's own field names."""
    errors: list[FieldError] = []
    for error in exc.errors():
        location = _location(error["loc"])
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):  # no or an unknown "type"
            given = error["input"].get("type") if isinstance(error["input"], dict) else None
            auth = location[:1] == ("auth",)
            location = ("auth", "type") if auth else ("type",)
            kinds = _AUTH_KINDS if auth else _KINDS
            errors.append((location, f"{'.'.join(location)} must be one of {', '.join(kinds)} (got {given!r})"))
        else:
            errors.append((location, _message(error)))
    return errors


@dataclass(frozen=True)
class TestOutcome:
    """A connection test's result, as shown and audited."""

    ok: bool
    detail: str
    seconds: float
    method: str

    @property
    def round_trip_ms(self) -> float:
        return round(self.seconds * 1000, 1)


def test_destination(context: WebContext, destination: Destination) -> TestOutcome:
    """C-ECHO a DICOM destination, or QIDO-RS a DICOMweb one; never raises for network trouble."""
    timeout = min(destination.timeout_seconds, TEST_TIMEOUT_SECONDS)
    if isinstance(destination, DicomDestination):
        from dicom_node.scu import echo

        calling = context.settings.delivery.calling_ae_title or context.settings.dicom.ae_title
        ok, detail, seconds = echo(destination, calling, timeout)
        return TestOutcome(ok, detail, seconds, "C-ECHO")
    from dicom_node.stow import check_dicomweb

    ok, detail, seconds = check_dicomweb(destination, timeout)
    return TestOutcome(ok, detail, seconds, "QIDO-RS GET /studies?limit=1")


def _or_404(context: WebContext, name: str) -> config_repo.DestinationRecord:
    record = config_repo.get_destination_record(context.sessions, name)
    if record is None:
        raise HTTPException(404, f"no destination named {name!r}")
    return record


class UnusableTlsFiles(Exception):
    """The destination's TLS files cannot be loaded, so no connection test was run: ``problems`` by field."""

    def __init__(self, problems: list[FieldError]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def _run_test(request: Request, context: WebContext, principal: Principal, destination: Destination) -> TestOutcome:
    """Test and audit; raises :class:`UnusableTlsFiles` (audited too) instead of trying with broken TLS files."""
    problems: list[FieldError] = list(destination_tls_problems(destination))
    if problems:
        audit_event(context, request, principal, "destination.test", target_kind="destination",
                    target=destination.name, after={"ok": False, "method": "not run", "detail": str(
                        UnusableTlsFiles(problems))}, detail="not run: unusable TLS files")
        raise UnusableTlsFiles(problems)
    outcome = test_destination(context, destination)
    audit_event(context, request, principal, "destination.test", target_kind="destination", target=destination.name,
                after={"ok": outcome.ok, "method": outcome.method, "round_trip_ms": outcome.round_trip_ms,
                       "detail": outcome.detail},
                detail=f"{'ok' if outcome.ok else 'failed'} in {outcome.round_trip_ms:g} ms")
    return outcome


def _audit_secret_refused(request: Request, context: WebContext, principal: Principal, name: str,
                          moved: SecretMoved) -> None:
    """Record that a save was refused because it would have sent the stored secret to another server."""
    audit_event(context, request, principal, "destination.secret_refused", target_kind="destination", target=name,
                before={"url_origin": moved.stored_origin}, after={"url_origin": moved.new_origin},
                detail=f"not saved: the URL moved from {moved.stored_origin} to {moved.new_origin} "
                       f"without a new {moved.secret}")


def _delete(request: Request, context: WebContext, principal: Principal, name: str) -> None:
    """Delete ``name``; 404 unknown, 409 while rules send to it by name."""
    record = _or_404(context, name)
    users = config_repo.rules_using_destination(context.sessions, name)
    if users:
        raise HTTPException(409, f"destination {name!r} is used by routing rule(s) {', '.join(users)}; "
                                 "change those rules first")
    if not config_repo.delete_destination(context.sessions, name):
        raise HTTPException(404, f"no destination named {name!r}")
    audit_event(context, request, principal, "destination.delete", target_kind="destination", target=name,
                before=redacted(record.destination))


# --------------------------------------------------------------------------- the form


@dataclass
class DestinationForm:
    """The destination form as typed (never holding a secret) and its errors by element id."""

    kind: str = "dicom"
    values: dict[str, str] = field(default_factory=dict)
    checks: set[str] = field(default_factory=set)  # ticked checkboxes: default, tls, verify_tls, ...
    outputs: set[str] = field(default_factory=lambda: set(DEFAULT_OUTPUTS))
    stored_secret: dict[str, bool] = field(default_factory=dict)  # password/token: a stored one exists
    errors: dict[str, list[str]] = field(default_factory=dict)

    def v(self, key: str) -> str:
        return self.values.get(key, "")

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key if key in _FORM_KEYS else "form", []).append(message)

    @classmethod
    def blank(cls, kind: str) -> "DestinationForm":
        checks = {"tls-check_hostname", "verify_tls"}
        return cls(kind=kind, values={"timeout_seconds": "30", "max_pdu": "1048576", "auth-type": "none",
                                      "not_performed": "none"}, checks=checks)

    @classmethod
    def from_destination(cls, destination: Destination) -> "DestinationForm":
        values = {"name": destination.name, "timeout_seconds": f"{destination.timeout_seconds:g}",
                  "not_performed": destination.not_performed}
        checks = {"default"} if destination.default else set()
        secrets: dict[str, bool] = {}
        if isinstance(destination, DicomDestination):
            values.update(ae_title=destination.ae_title, host=destination.host, port=str(destination.port),
                          calling_ae_title=destination.calling_ae_title or "", max_pdu=str(destination.max_pdu))
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
            values["auth-type"] = destination.auth.type
            values["auth-username"] = getattr(destination.auth, "username", "")
            secrets = {"password": hasattr(destination.auth, "password"), "token": hasattr(destination.auth, "token")}
            if destination.verify_tls:
                checks.add("verify_tls")
        return cls(kind=destination.type, values=values, checks=checks, outputs=set(destination.outputs),
                   stored_secret=secrets)


def _checked(form: FormData, key: str) -> bool:
    return (form.get(key) or [""])[0] in ("on", "true", "1")


def parse_destination_form(form: FormData, *, kind: str, name: str | None,
                           stored: Destination | None) -> tuple[DestinationForm, dict[str, Any]]:
    """The form as typed (secrets left out) and the definition it describes (blank secrets: keep stored)."""

    def text(key: str) -> str:
        return (form.get(key) or [""])[0].strip()

    state = DestinationForm(kind=kind, outputs={o for o in form.get("outputs", []) if o})
    keys = ["name", "timeout_seconds", "not_performed"] + (
        ["ae_title", "host", "port", "calling_ae_title", "max_pdu", "tls-ca_certificates", "tls-certificate",
         "tls-private_key"] if kind == "dicom" else ["url", "auth-type", "auth-username", "ca_certificates"])
    state.values = {key: text(key) for key in keys}
    if name is not None:
        state.values["name"] = name
    state.checks = {key for key in ("default", "tls", "tls-check_hostname", "verify_tls") if _checked(form, key)}
    if isinstance(stored, DicomWebDestination):
        state.stored_secret = {"password": hasattr(stored.auth, "password"), "token": hasattr(stored.auth, "token")}
    v = state.values
    data: dict[str, Any] = {"type": kind, "name": v["name"], "default": "default" in state.checks,
                            "outputs": sorted(state.outputs), "not_performed": v["not_performed"] or "none"}
    if v["timeout_seconds"]:
        data["timeout_seconds"] = v["timeout_seconds"]
    if kind == "dicom":
        data.update(ae_title=v["ae_title"], host=v["host"], port=v["port"] or None,
                    calling_ae_title=v["calling_ae_title"] or None)
        if v["max_pdu"]:
            data["max_pdu"] = v["max_pdu"]
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
    return state, data


def _place(state: DestinationForm, errors: Sequence[FieldError]) -> None:
    for location, message in errors:
        parts = [str(p) for p in location if not isinstance(p, int)]
        key = "-".join(parts) if parts else "form"
        if parts[:1] == ["outputs"]:
            key = "outputs"
        state.error(key, message)


def _form_page(request: Request, context: WebContext, state: DestinationForm, *, original: str | None,
               record: config_repo.DestinationRecord | None = None, test: TestOutcome | None = None,
               status_code: int = 200) -> Response:
    stats = config_repo.destination_delivery_stats(context.sessions).get(original or "") if original else None
    used_by = config_repo.rules_using_destination(context.sessions, original) if original else []
    return render(request, "destination_form.html", status_code=status_code, form=state, original=original,
                  record=record, test=test, stats=stats, used_by=used_by, all_outputs=_OUTPUTS,
                  not_performed_choices=NOT_PERFORMED_CHOICES,
                  calling_ae_title=context.settings.delivery.calling_ae_title or context.settings.dicom.ae_title)


# --------------------------------------------------------------------------- pages


_DONE = {"created": "Destination {} created.", "updated": "Destination {} saved.", "deleted": "Destination {} deleted."}


@router.get("/destinations", include_in_schema=False)
def destinations_page(
    request: Request, q: str = Query("", max_length=200), kind: str = Query("", pattern="^(|dicom|dicomweb)$"),
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
                  stats=config_repo.destination_delivery_stats(context.sessions))


@router.get("/destinations/new", include_in_schema=False)
def new_destination_page(
    request: Request, type: str = Query("dicom", pattern="^(dicom|dicomweb)$"),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    return _form_page(request, context, DestinationForm.blank(type), original=None)


def _save_from_form(request: Request, context: WebContext, principal: Principal, form: FormData,
                    original: str | None) -> Response:
    record = None if original is None else _or_404(context, original)
    kind = (form.get("type") or ["dicom"])[0]
    if kind not in _KINDS:
        raise HTTPException(422, f"type must be one of {', '.join(_KINDS)}, got {kind[:20]!r}")
    stored = record.destination if record else None
    state, data = parse_destination_form(form, kind=kind, name=original, stored=stored)
    destination, errors = validate_destination(data, stored=stored)
    _place(state, errors)
    if destination is None:
        moved = secret_moved(data, stored)
        if moved is not None:
            state.stored_secret[moved.secret] = False  # no "(unchanged)": it has to be typed again
            _audit_secret_refused(request, context, principal, original or "", moved)
        return _form_page(request, context, state, original=original, record=record, status_code=422)
    try:
        if original is None:
            config_repo.create_destination(context.sessions, destination, source=_SOURCE, now=context.clock())
        else:
            config_repo.update_destination(context.sessions, destination, source=_SOURCE, now=context.clock())
    except config_repo.NameTaken as exc:
        state.error("name", str(exc))
        return _form_page(request, context, state, original=original, record=record, status_code=409)
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    audit_event(context, request, principal, "destination.create" if stored is None else "destination.update",
                target_kind="destination", target=destination.name,
                before=redacted(stored) if stored is not None else None, after=redacted(destination))
    done = "created" if stored is None else "updated"
    return RedirectResponse(f"/destinations?done={done}&destination={quote(destination.name)}", status_code=303)


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
    record = _or_404(context, name)
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
    _delete(request, context, principal, name)
    return RedirectResponse(f"/destinations?done=deleted&destination={quote(name)}", status_code=303)


@router.post("/destinations/{name}/test", include_in_schema=False)
def test_destination_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the stored destination's connection; the result is shown on its page."""
    record = _or_404(context, name)
    state = DestinationForm.from_destination(record.destination)
    try:
        outcome = _run_test(request, context, principal, record.destination)
    except UnusableTlsFiles as exc:
        _place(state, exc.problems)
        failed = TestOutcome(False, f"not run: {exc}", 0.0, "not run")
        return _form_page(request, context, state, original=name, record=record, test=failed, status_code=422)
    return _form_page(request, context, state, original=name, record=record, test=outcome)


# --------------------------------------------------------------------------- API

_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/DicomDestination"}, {"$ref": "#/components/schemas/DicomWebDestination"}],
    "discriminator": {"propertyName": "type"}}}}}}
_ERRORS = {404: {"description": "No destination of that name"},
           409: {"description": "The name is taken, or rules still send to the destination"},
           422: {"description": "Invalid definition: `errors` lists each field (e.g. `port`, `auth.password`)"}}


class ConnectionTestResult(BaseModel):
    """The answer of ``POST /api/v1/destinations/{name}/test``."""

    destination: str
    kind: Literal["dicom", "dicomweb"]
    method: str
    ok: bool
    detail: str
    round_trip_ms: float


def _api_save(request: Request, context: WebContext, principal: Principal, body: Any,
              original: str | None) -> Response:
    stored = None if original is None else _or_404(context, original).destination
    if original is not None and isinstance(body, dict) and body.get("name", original) != original:
        return invalid_response("destination", [(("name",), f"a destination cannot be renamed ({original!r} to "
                                                            f"{body.get('name')!r}): rules refer to it by name; create "
                                                            "a new one and delete this one")])
    if original is not None and isinstance(body, dict):
        body = {**body, "name": original}
    destination, errors = validate_destination(body, stored=stored)
    if destination is None:
        moved = secret_moved(body, stored)
        if moved is not None:
            _audit_secret_refused(request, context, principal, original or "", moved)
        return invalid_response("destination", errors)
    try:
        if original is None:
            config_repo.create_destination(context.sessions, destination, source="api", now=context.clock())
        else:
            config_repo.update_destination(context.sessions, destination, source="api", now=context.clock())
    except config_repo.NameTaken as exc:
        raise HTTPException(409, str(exc)) from exc
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    audit_event(context, request, principal, "destination.create" if stored is None else "destination.update",
                target_kind="destination", target=destination.name,
                before=redacted(stored) if stored is not None else None, after=redacted(destination))
    return JSONResponse(redacted(destination), status_code=201 if stored is None else 200)


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
    return _api_save(request, context, principal, body, None)


@router.get("/api/v1/destinations/{name}", tags=["destinations"], response_model=Destination, responses=_ERRORS)
def api_get_destination(
    name: str, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Response:
    return JSONResponse(redacted(_or_404(context, name).destination))


@router.put("/api/v1/destinations/{name}", tags=["destinations"], response_model=Destination, openapi_extra=_BODY,
            responses=_ERRORS)
def api_update_destination(
    request: Request, name: str, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Replace the destination; a password or token left out, empty or ``**********`` keeps the stored one."""
    return _api_save(request, context, principal, body, name)


@router.delete("/api/v1/destinations/{name}", tags=["destinations"], status_code=204, responses=_ERRORS)
def api_delete_destination(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    _delete(request, context, principal, name)
    return Response(status_code=204)


@router.post("/api/v1/destinations/{name}/test", tags=["destinations"], response_model=ConnectionTestResult,
             responses=_ERRORS)
def api_test_destination(
    request: Request, name: str, principal: Principal = Depends(require(Role.OPERATOR)),
    context: WebContext = Depends(get_context),
) -> ConnectionTestResult | Response:
    """C-ECHO (DICOM) or QIDO-RS (DICOMweb) the stored destination; ``ok`` false explains why in ``detail``."""
    destination = _or_404(context, name).destination
    try:
        outcome = _run_test(request, context, principal, destination)
    except UnusableTlsFiles as exc:
        return invalid_response("destination: its TLS files cannot be used, so it was not tested", exc.problems)
    return ConnectionTestResult(destination=name, kind=destination.type, method=outcome.method, ok=outcome.ok,
                                detail=outcome.detail, round_trip_ms=outcome.round_trip_ms)
