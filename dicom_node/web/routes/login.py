"""Login and logout pages, and who am I (page and API)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from dicom_node.db.models import Role
from dicom_node.web.auth import (
    Principal,
    current_principal,
    login,
    login_csrf_token,
    logout,
    require,
    set_login_csrf_cookie,
)
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render

router = APIRouter()

_MESSAGES = {
    "invalid": "Wrong user name or password.",
    "rate_limited": "Too many failed logins. Wait a while and try again.",
    "bad_csrf": "The login form expired. Please try again.",
}


def _safe_next(value: str | None) -> str:
    """Only paths on this site (no scheme, no //host) may be redirect targets."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _login_page(request: Request, context: WebContext, *, next_url: str, error: str | None = None,
                username: str = "", status_code: int = 200) -> Response:
    token, cookie = login_csrf_token(request, context)
    response = render(request, "login.html", status_code=status_code, login_csrf=token, next_url=next_url,
                      error=error, username=username, principal=None)
    if cookie is not None:
        set_login_csrf_cookie(response, context, cookie)
    return response


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str | None = None, context: WebContext = Depends(get_context)) -> Response:
    if current_principal(request, context) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, context, next_url=_safe_next(next))


@router.post("/login", include_in_schema=False)
def login_submit(
    request: Request,
    username: str = Form("", max_length=256),
    password: str = Form("", max_length=1024),
    csrf_token: str = Form(""),
    next: str = Form("/"),
    context: WebContext = Depends(get_context),
) -> Response:
    response = RedirectResponse(_safe_next(next), status_code=303)
    result = login(context, request, response, username=username, password=password, csrf_token=csrf_token)
    if result.status == "ok":
        return response
    status = {"invalid": 401, "rate_limited": 429, "bad_csrf": 403}[result.status]
    page = _login_page(request, context, next_url=_safe_next(next), error=_MESSAGES[result.status],
                       username=username[:64], status_code=status)
    if result.retry_after:
        page.headers["Retry-After"] = str(result.retry_after)
    return page


@router.post("/logout", include_in_schema=False)
def logout_submit(
    request: Request, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Response:
    response = RedirectResponse("/login", status_code=303)
    logout(context, request, response, principal)
    return response


@router.get("/api/v1/me", tags=["auth"])
def who_am_i(principal: Principal = Depends(require(None))) -> dict[str, str]:
    """The user behind this request and their role (a GPU worker or a STOW-RS sender checks its token with it)."""
    return {"username": principal.username, "role": principal.role.value, "via": principal.via}
