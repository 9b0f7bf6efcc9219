"""What the rules, destinations and users routes share: parse the request, call the service, render its answer.

Why: the three areas edit named configuration the same way - the service
(:mod:`dicom_node.config_service`) validates, saves and audits; a route only turns a form
or a JSON body into a definition, names the actor, and turns the result or the
:class:`~dicom_node.config_service.Refused` error into a page or a JSON answer. The
skeleton lives here once: the actor of a request, 404 for an unknown name, the API's
save and delete, and the API's error answer (``{"detail": ..., "errors": [{"field": ..., "message": ...}]}``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from dicom_node.config_service import Actor, DestinationsService, Refused, RulesService, UsersService
from dicom_node.config_service.base import AuditedStore, FieldError, dotted
from dicom_node.db.users import Principal
from dicom_node.web.auth import client_address
from dicom_node.web.context import WebContext

__all__ = ["FormData", "actor", "api_delete", "api_save", "destinations_service", "form_save", "one",
           "or_404", "refused_json", "rules_service", "submitted_form", "users_service"]

T = TypeVar("T")

FormData = dict[str, list[str]]


async def submitted_form(request: Request) -> FormData:
    """FastAPI dependency: the submitted form as name -> values (the form is parsed once per request)."""
    form = await request.form()
    return {key: [v for v in form.getlist(key) if isinstance(v, str)] for key in form.keys()}


def one(form: FormData, key: str) -> str:
    """The first value of ``key`` in the form, or ""."""
    values = form.get(key) or [""]
    return values[0]


def actor(request: Request, principal: Principal, *, api: bool = False) -> Actor:
    """The signed-in user as the services record them: pages store ``ui``, the API ``api`` as the source."""
    return Actor(name=principal.username, source="api" if api else "ui", remote_addr=client_address(request),
                 note=None if principal.via == "session" else "(API token)")


def rules_service(context: WebContext) -> RulesService:
    return RulesService(context.sessions, models_file=context.settings.routing.models_file, clock=context.clock)


def destinations_service(context: WebContext) -> DestinationsService:
    settings = context.settings
    return DestinationsService(context.sessions, clock=context.clock,
                               calling_ae_title=settings.delivery.calling_ae_title or settings.dicom.ae_title)


def users_service(context: WebContext) -> UsersService:
    return UsersService(context.sessions, clock=context.clock)


def invalid_json(what: str, errors: list[FieldError]) -> JSONResponse:
    """The API's 422 answer: ``{"detail": "invalid <what>", "errors": [{"field": "conditions.1.regex", ...}]}``."""
    return JSONResponse({"detail": f"invalid {what}",
                         "errors": [{"field": dotted(location), "message": message} for location, message in errors]},
                        status_code=422)


def refused_json(exc: Refused) -> JSONResponse:
    """A refusal as the API answers it: 422 lists each field, 404 and 409 carry one ``detail`` message."""
    if exc.status == 422:
        return invalid_json(exc.what, exc.errors)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


def or_404(lookup: Callable[[], T]) -> T:
    """``lookup()``, with a Refused (404) turned into the app's 404 page or answer."""
    try:
        return lookup()
    except Refused as exc:
        raise HTTPException(exc.status, exc.message) from None


def api_save(service: AuditedStore[Any], request: Request, principal: Principal, body: Any,
             original: str | None) -> Response:
    """POST/PUT of a definition: 201 created / 200 replaced with the stored state, else the refusal."""
    try:
        saved = service.save(body, actor(request, principal, api=True), original=original)
    except Refused as exc:
        return refused_json(exc)
    return JSONResponse(service.state(saved.item), status_code=201 if saved.created else 200)


def api_delete(service: AuditedStore[Any], request: Request, principal: Principal, name: str) -> Response:
    """DELETE of a definition: 204, or 404 / 409 with the reason."""
    try:
        service.delete(name, actor(request, principal, api=True))
    except Refused as exc:
        return refused_json(exc)
    return Response(status_code=204)


def form_save(service: AuditedStore[T], request: Request, principal: Principal, data: Any, *, original: str | None,
              refused: Callable[[Refused], Response], done: Callable[[T, bool], str]) -> Response:
    """A page's save: the service saves and audits; 303 to ``done(item, created)``, or ``refused(error)`` (the
    form again with the errors at their fields; 404 becomes the 404 page)."""
    try:
        saved = service.save(data, actor(request, principal), original=original)
    except Refused as exc:
        if exc.status == 404:
            raise HTTPException(404, exc.message) from None
        return refused(exc)
    return RedirectResponse(done(saved.item, saved.created), status_code=303)
