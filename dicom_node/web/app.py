"""``create_app(settings)``: the admin web application, REST API and monitoring endpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from urllib.parse import quote

from dicom_node.indexer import InstanceIndexer
from dicom_node.ingest import IngestService, utc_now
from dicom_node.settings import Settings
from dicom_node.stow_intake import StowIntake
from dicom_node.web.auth import LoginRequired, is_api
from dicom_node.web.client_address import TrustedProxies
from dicom_node.web.context import PasswordVerifier, ReadinessCheck, WebContext, load_or_create_secret
from dicom_node.web.passwords import verify_password as argon2_verify
from dicom_node.web.pages import make_templates, render

__all__ = ["create_app", "create_ops_app"]

logger = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


def _sessions(settings: Settings, sessions: sessionmaker[Session] | None) -> sessionmaker[Session]:
    if sessions is None:
        from dicom_node.db.session import make_engine, make_session_factory

        sessions = make_session_factory(make_engine(settings.resolved_database_url))
    return sessions


def _context(settings: Settings, sessions: sessionmaker[Session], clock: Callable[[], datetime],
             readiness: Sequence[ReadinessCheck], verify_password: PasswordVerifier = argon2_verify,
             stow: StowIntake | None = None) -> WebContext:
    return WebContext(settings=settings, sessions=sessions, clock=clock, secret_key=load_or_create_secret(settings),
                      readiness=tuple(readiness), verify_password=verify_password,
                      proxies=TrustedProxies(settings.web.trusted_proxies), stow=stow)


def _stow_intake(settings: Settings, sessions: sessionmaker[Session], clock: Callable[[], datetime],
                 ingest: IngestService | None) -> StowIntake:
    """STOW-RS into ``ingest`` (the node's own), or into one made here on the same database and spool."""
    if ingest is None:
        indexer = InstanceIndexer(sessions.kw["bind"], settings.completion.reopen_on_late_instances)
        ingest = IngestService.from_settings(settings, sessions, indexer, clock)
    return StowIntake(ingest, sessions, clock, max_request_bytes=settings.web.stow_max_request_mb * 1_048_576,
                      max_requests=settings.web.stow_max_requests)


def create_app(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    clock: Callable[[], datetime] = utc_now,
    readiness: Sequence[ReadinessCheck] = (),
    verify_password: PasswordVerifier = argon2_verify,
    ingest: IngestService | None = None,
) -> FastAPI:
    """The admin app: pages, ``/api/v1`` and (unless ``web.ops_port`` moves them) the monitoring endpoints.

    ``sessions``: the node's database; none opens ``settings.resolved_database_url``.
    ``ingest``: where STOW-RS requests store their instances (the node passes the one its
    DICOM listener uses); none: one is made on the same database and spool.
    ``readiness``: extra checks ``/readyz`` runs (the node adds its DICOM listener).
    ``verify_password``: how login checks a password against its stored hash (argon2id);
    tests pass a wrapper to count the checks.
    """
    from dicom_node.web.routes import ROUTERS, ops

    sessions = _sessions(settings, sessions)
    context = _context(settings, sessions, clock, readiness, verify_password,
                       stow=_stow_intake(settings, sessions, clock, ingest))
    app = FastAPI(
        title="DICOM AI node", version="1", docs_url="/api/docs", redoc_url=None, openapi_url="/api/v1/openapi.json",
        description="Admin API of the DICOM AI node: studies, jobs, deliveries, routing rules, destinations, "
        "models, users, API tokens and the audit log. Authenticate with `Authorization: Bearer <API token>`.",
    )
    app.state.context = context
    app.state.templates = make_templates()
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    for router in ROUTERS:
        app.include_router(router)
    if settings.web.ops_port is None:
        app.include_router(ops.router)
    _install_handlers(app)
    return app


def create_ops_app(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    clock: Callable[[], datetime] = utc_now,
    readiness: Sequence[ReadinessCheck] = (),
) -> FastAPI:
    """Only ``/metrics``, ``/healthz`` and ``/readyz``, for ``web.ops_host``:``web.ops_port``."""
    from dicom_node.web.routes import ops

    app = FastAPI(title="DICOM AI node monitoring", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = _context(settings, _sessions(settings, sessions), clock, readiness)
    app.include_router(ops.router)
    return app


def _install_handlers(app: FastAPI) -> None:
    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Response:  # type: ignore[type-arg]
        response: Response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='/')}", status_code=303)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if is_api(request) or exc.status_code < 400:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return render(request, "error.html", status_code=exc.status_code, status=exc.status_code,
                      message=str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")),
             "message": e.get("msg", "invalid")}
            for e in exc.errors()
        ]
        if is_api(request):
            return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return render(request, "error.html", status_code=422, status=422, message=f"Invalid request: {text}")
