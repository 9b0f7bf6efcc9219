"""Server-rendered pages: the Jinja2 environment (autoescaped) and the one render helper."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from dicom_node.web.urls import path_segment, study_path

__all__ = ["make_templates", "render"]

TEMPLATES_DIR = Path(__file__).parent / "templates"

#: Navigation: (path, label, least role). Items the user's role cannot open are not shown.
NAVIGATION: tuple[tuple[str, str, str], ...] = (
    ("/", "Dashboard", "viewer"),
    ("/studies", "Studies", "viewer"),
    ("/rules", "Routing rules", "viewer"),
    ("/destinations", "Destinations", "viewer"),
    ("/models", "Models", "viewer"),
    ("/audit", "Audit log", "admin"),
    ("/users", "Users", "admin"),
)


def _when(value: datetime | None) -> str:
    """UTC timestamp as 'YYYY-MM-DD HH:MM:SS' ('-' for none)."""
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    """A duration for people: 850 ms, 4.2 s, 3 min 5 s."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    return f"{int(value // 60)} min {int(value % 60)} s"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.autoescape = True
    env.filters["when"] = _when
    env.filters["seconds"] = _seconds
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    env.filters["segment"] = path_segment  # one URL path segment; Jinja's urlencode leaves "/" alone
    env.globals["study_url"] = study_path
    env.globals["navigation"] = NAVIGATION
    env.globals["role_level"] = {"viewer": 1, "operator": 2, "admin": 3}
    return templates


def render(request: Request, name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """Render ``name`` with the request's principal and CSRF token available to the template."""
    principal = getattr(request.state, "principal", None)
    values.setdefault("principal", principal)
    values.setdefault("csrf_token", principal.csrf_token if principal is not None else None)
    response = request.app.state.templates.TemplateResponse(request, name, values, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"  # pages may show patient identifiers
    return response
