"""Who is asking and may they: sessions, API tokens, roles, CSRF, login rate limits, auditing.

Every route depends on :func:`require` with the least role it needs; nothing else in
the app decides access. A browser proves itself with a signed, HttpOnly, SameSite
session cookie and must echo its session's CSRF token (form field ``csrf_token`` or
header ``X-CSRF-Token``) on every state-changing request; automation sends
``Authorization: Bearer <API token>`` and needs no CSRF token (no cookie is involved).
Pages answer an anonymous visitor with a redirect to the login page, the API with 401.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Depends, HTTPException, Request, Response
from itsdangerous import BadSignature, Signer

from dicom_node.db import audit, users
from dicom_node.db.models import Role
from dicom_node.db.users import Principal
from dicom_node.web.client_address import request_client_address
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.urls import request_target

__all__ = [
    "CSRF_FIELD",
    "LOGIN_CSRF_COOKIE",
    "SESSION_COOKIE",
    "LoginRequired",
    "LoginResult",
    "Principal",
    "audit_event",
    "client_address",
    "current_principal",
    "login",
    "logout",
    "require",
]

SESSION_COOKIE = "dicom_node_session"
LOGIN_CSRF_COOKIE = "dicom_node_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """A page was asked for without a valid session: the app redirects to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def _signer(context: WebContext, purpose: str) -> Signer:
    return Signer(context.secret_key, salt=f"dicom-node.{purpose}")


def _same_secret(submitted: str | None, expected: str | None) -> bool:
    """Constant-time comparison that also copes with non-ASCII input (``compare_digest`` on str raises)."""
    if not submitted or not expected:
        return False
    return secrets.compare_digest(submitted.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def client_address(request: Request) -> str | None:
    """The client's address for rate limits, the audit log and sessions: the connecting peer, or what a
    trusted proxy (``web.trusted_proxies``) forwarded (see :mod:`dicom_node.web.client_address`)."""
    return request_client_address(request, get_context(request).proxies)


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def session_token(request: Request, context: WebContext) -> str | None:
    """The session token from the cookie, if its signature is ours."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        return None
    try:
        return _signer(context, "session").unsign(raw).decode()
    except BadSignature:
        return None


def current_principal(request: Request, context: WebContext) -> Principal | None:
    """Who the request comes from: an API token, else a browser session, else nobody."""
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return users.resolve_api_token(context.sessions, header[7:].strip(), now=context.clock())
    token = session_token(request, context)
    if token is None:
        return None
    return users.resolve_session(context.sessions, token, now=context.clock())


async def _submitted_csrf(request: Request) -> str | None:
    token = request.headers.get(CSRF_HEADER)
    if token:
        return token
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def require(role: Role | None, *, only: bool = False) -> Callable[..., Awaitable[Principal]]:
    """FastAPI dependency: the principal, if ``role`` admits it (:meth:`Role.admits`; None: anybody signed in),
    with a valid CSRF token when needed; with ``only``, exactly ``role`` (the outbox uploads of GPU workers: no
    person's account may write results)."""

    async def dependency(request: Request, context: WebContext = Depends(get_context)) -> Principal:
        principal = current_principal(request, context)
        if principal is None:
            if is_api(request):
                raise HTTPException(401, "authentication required: log in or send an API token",
                                    headers={"WWW-Authenticate": "Bearer"})
            raise LoginRequired(request_target(request) if request.method in _SAFE_METHODS else "/")
        if request.method not in _SAFE_METHODS and principal.via == "session":
            submitted = await _submitted_csrf(request)
            if not _same_secret(submitted, principal.csrf_token):
                raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")
        if role is not None and (not principal.allows(role) or (only and principal.role != role)):
            needed = f"the {role.value} role{' itself' if only else ''}"
            raise HTTPException(403, f"this needs {needed}; {principal.username} is {principal.role.value}")
        request.state.principal = principal
        return principal

    dependency.required_role = role  # type: ignore[attr-defined]  # lets tests and docs list each route's role
    dependency.role_only = only  # type: ignore[attr-defined]
    return dependency


def audit_event(
    context: WebContext, request: Request, actor: Principal | str, action: str, *,
    target_kind: str | None = None, target: str | None = None, before: Any = None, after: Any = None,
    detail: str | None = None,
) -> None:
    """Append an audit entry for something a web user did."""
    name = actor if isinstance(actor, str) else actor.username
    via = None if isinstance(actor, str) or actor.via == "session" else "(API token)"
    audit.record(context.sessions, at=context.clock(), actor=name, action=action, target_kind=target_kind,
                 target=target, before=before, after=after, remote_addr=client_address(request),
                 detail=" ".join(part for part in (detail, via) if part) or None)


# --------------------------------------------------------------------------- login / logout


def login_csrf_token(request: Request, context: WebContext) -> tuple[str, str | None]:
    """(token for the login form, signed cookie value to set or None if the cookie already holds it)."""
    raw = request.cookies.get(LOGIN_CSRF_COOKIE)
    if raw:
        try:
            return _signer(context, "login-csrf").unsign(raw).decode(), None
        except BadSignature:
            pass
    token = secrets.token_urlsafe(32)
    return token, _signer(context, "login-csrf").sign(token).decode()


def set_login_csrf_cookie(response: Response, context: WebContext, value: str) -> None:
    response.set_cookie(LOGIN_CSRF_COOKIE, value, httponly=True, samesite="strict",
                        secure=context.settings.web.cookies_secure, path="/login")


@dataclass(frozen=True)
class LoginResult:
    """``status``: ok, invalid (wrong name or password, or disabled), rate_limited, bad_csrf."""

    status: str
    retry_after: int = 0
    principal: Principal | None = None


def login(
    context: WebContext, request: Request, response: Response, *, username: str, password: str, csrf_token: str
) -> LoginResult:
    """Check the login form; on success start a fresh session (never reuse one: no session fixation)."""
    expected, _ = login_csrf_token(request, context)
    if request.cookies.get(LOGIN_CSRF_COOKIE) is None or not _same_secret(csrf_token, expected):
        return LoginResult("bad_csrf")
    now, address, web = context.clock(), client_address(request), context.settings.web
    username = username.strip()[:64]
    # Claim the attempt (as a failure) before counting, so parallel attempts cannot all pass the check.
    attempt, by_user, by_addr = users.claim_login_attempt(
        context.sessions, username, address, now=now, since=now - timedelta(seconds=web.login_window_seconds))
    if by_user > web.login_max_failures or by_addr > 4 * web.login_max_failures:
        users.withdraw_login_attempt(context.sessions, attempt)
        audit_event(context, request, username or "anonymous", "login.rate_limited", target_kind="user",
                    target=username,
                    detail=f"{by_user - 1} failures for the user, {max(by_addr - 1, 0)} from the address")
        return LoginResult("rate_limited", retry_after=int(web.login_window_seconds))
    found = users.password_hash_of(context.sessions, username)
    # A service account (a GPU worker's, a STOW-RS sender's) proves itself with API tokens only: it has no page.
    ok = (context.verify_password(found[1] if found else None, password) and found is not None
          and not found[0].disabled and not found[0].role.is_service)
    if ok:
        users.settle_login_attempt(context.sessions, attempt)
    if not ok or found is None:
        reason = "no such user" if found is None else ("user disabled" if found[0].disabled else
                                                       f"{found[0].role.value} accounts use API tokens only"
                                                       if found[0].role.is_service else "wrong password")
        audit_event(context, request, username or "anonymous", "login.failed", target_kind="user", target=username,
                    detail=reason)
        return LoginResult("invalid")
    old = session_token(request, context)
    if old is not None:
        users.delete_session(context.sessions, old)
    user = found[0]
    token, _csrf = users.create_session(context.sessions, user.id, now=now,
                                        lifetime=timedelta(hours=web.session_hours), remote_addr=address)
    users.update_user(context.sessions, user.username, now=now, last_login_at=now)
    response.set_cookie(SESSION_COOKIE, _signer(context, "session").sign(token).decode(), httponly=True,
                        samesite="lax", secure=web.cookies_secure, max_age=int(web.session_hours * 3600), path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    principal = Principal(user_id=user.id, username=user.username, role=user.role, via="session")
    audit_event(context, request, principal, "login", target_kind="user", target=user.username)
    return LoginResult("ok", principal=principal)


def logout(context: WebContext, request: Request, response: Response, principal: Principal) -> None:
    token = session_token(request, context)
    if token is not None:
        users.delete_session(context.sessions, token)
    response.delete_cookie(SESSION_COOKIE, path="/")
    audit_event(context, request, principal, "logout", target_kind="user", target=principal.username)
