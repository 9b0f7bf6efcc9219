"""Users and API tokens: the admin pages (``/users``, ``/tokens``) and the REST API (``/api/v1/users``, ``/api/v1/tokens``).

Everything here needs the admin role. Pages and API parse the request and call
:class:`dicom_node.config_service.UsersService` (as ``dicom-node users`` does), which
validates, changes the database and writes the audit log (``user.create``,
``user.update``, ``token.create``, ``token.revoke``). Password hashes never leave the
database layer. An API token is shown once, in the answer that created it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dicom_node.config_service import Refused
from dicom_node.config_service.users import MAX_EXPIRY_DAYS, token_state
from dicom_node.db import audit, users
from dicom_node.db.models import Role
from dicom_node.db.users import ApiTokenView, UserView
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.passwords import MIN_PASSWORD_LENGTH
from dicom_node.web.routes.config_edit import actor, refused_json, users_service

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter()

#: Generous caps on what a form may submit; the service functions give the precise limits.
_FORM_MAX = 20_000

#: Messages after a change, chosen by a fixed code in the redirect (never text from the URL).
DONE_MESSAGES = {
    "created": "User created.",
    "role": "Role changed; the user's sessions were ended.",
    "disable": "User disabled; their sessions were ended and their API tokens stop working.",
    "enable": "User enabled.",
    "password": "Password reset; the user's sessions were ended.",
    "revoked": "API token revoked.",
    "unchanged": "Nothing to change.",
}


# --------------------------------------------------------------------------- API models


class UserOut(BaseModel):
    """A user as the API shows it (no password hash)."""

    username: str
    role: Role
    disabled: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None

    @classmethod
    def of(cls, user: UserView) -> "UserOut":
        return cls(username=user.username, role=user.role, disabled=user.disabled, created_at=user.created_at,
                   updated_at=user.updated_at, last_login_at=user.last_login_at)


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=_FORM_MAX, description="1-64 characters: letters, digits, '.', '_', '@', '-'.")
    role: Role = Role.VIEWER
    password: str = Field(max_length=_FORM_MAX, description=f"At least {MIN_PASSWORD_LENGTH} characters.")


class UserPatch(BaseModel):
    """Only the fields given change. Any change ends the user's browser sessions."""

    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None
    password: str | None = Field(default=None, max_length=_FORM_MAX, description="A new password.")


class TokenOut(BaseModel):
    """An API token's record; the token itself is only in the answer that created it."""

    id: int
    username: str
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    state: Literal["active", "revoked", "expired"]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: ApiTokenView, now: datetime) -> "TokenOut":
        return cls(id=token.id, username=token.username, name=token.name, prefix=token.prefix,
                   state=token_state(token, now), created_at=token.created_at, last_used_at=token.last_used_at,
                   expires_at=token.expires_at, revoked_at=token.revoked_at)  # type: ignore[arg-type]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=_FORM_MAX, description="The user the token acts as (with their role).")
    name: str = Field(max_length=_FORM_MAX, description=f"What it is for, 1-{users.TOKEN_NAME_MAX} characters.")
    expires_days: float | None = Field(default=None, description="Expires after this many days; none: never.")


class TokenCreated(TokenOut):
    token: str = Field(description="The token: send it as `Authorization: Bearer <token>`. Shown only now.")


# --------------------------------------------------------------------------- API


@router.get("/api/v1/users", tags=["users"], response_model=list[UserOut])
def api_list_users(
    role: Role | None = None, disabled: bool | None = None, search: str | None = Query(None, max_length=_FORM_MAX),
    context: WebContext = Depends(get_context), principal: Principal = Depends(require(Role.ADMIN)),
) -> list[UserOut]:
    """Users by name; filter by role, disabled, or a part of the name."""
    return [UserOut.of(u) for u in users.list_users(context.sessions, role=role, disabled=disabled, search=search)]


@router.post("/api/v1/users", tags=["users"], status_code=201, response_model=UserOut,
             responses={409: {"description": "the name is taken"}, 422: {"description": "invalid name/password"}})
def api_create_user(
    body: UserCreate, request: Request, context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Any:
    """Create a user with a role and an initial password."""
    try:
        return UserOut.of(users_service(context).create_user(actor(request, principal, api=True),
                                                             username=body.username, role=body.role,
                                                             password=body.password))
    except Refused as exc:
        return refused_json(exc)


@router.get("/api/v1/users/{username}", tags=["users"], response_model=UserOut)
def api_get_user(
    username: str, context: WebContext = Depends(get_context), principal: Principal = Depends(require(Role.ADMIN)),
) -> UserOut:
    user = users.get_user(context.sessions, username)
    if user is None:
        raise HTTPException(404, f"no user {username!r}")
    return UserOut.of(user)


@router.patch("/api/v1/users/{username}", tags=["users"], response_model=UserOut,
              responses={404: {"description": "no such user"},
                         409: {"description": "would disable or demote the last enabled admin"}})
def api_update_user(
    username: str, body: UserPatch, request: Request, context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Any:
    """Change a user's role, disable or enable them, or set a new password."""
    try:
        user, _ = users_service(context).update_user(actor(request, principal, api=True), username, role=body.role,
                                                     disabled=body.disabled, password=body.password)
    except Refused as exc:
        return refused_json(exc)
    return UserOut.of(user)


@router.get("/api/v1/tokens", tags=["tokens"], response_model=list[TokenOut])
def api_list_tokens(
    username: str | None = Query(None, max_length=_FORM_MAX),
    state: Literal["active", "revoked", "expired"] | None = None,
    context: WebContext = Depends(get_context), principal: Principal = Depends(require(Role.ADMIN)),
) -> list[TokenOut]:
    """API tokens, oldest first (never the tokens themselves)."""
    now = context.clock()
    return [TokenOut.of(t, now) for t in users.list_api_tokens(context.sessions, username=username, state=state, now=now)]


@router.post("/api/v1/tokens", tags=["tokens"], status_code=201, response_model=TokenCreated,
             responses={409: {"description": "the user is disabled"}, 422: {"description": "invalid request"}})
def api_create_token(
    body: TokenCreate, request: Request, context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Any:
    """Create an API token for a user; the answer holds the token, which is not shown again."""
    try:
        view, token = users_service(context).create_token(actor(request, principal, api=True),
                                                          username=body.username, name=body.name,
                                                          expires_days=body.expires_days)
    except Refused as exc:
        return refused_json(exc)
    return TokenCreated(**TokenOut.of(view, context.clock()).model_dump(), token=token)


@router.delete("/api/v1/tokens/{token_id}", tags=["tokens"], status_code=204,
               responses={404: {"description": "no such token"}})
def api_revoke_token(
    token_id: int, request: Request, context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    """Revoke a token (it is kept, marked revoked, for the record)."""
    try:
        users_service(context).revoke_token(actor(request, principal, api=True), token_id)
    except Refused as exc:
        return refused_json(exc)
    return Response(status_code=204)


# --------------------------------------------------------------------------- pages


def _users_page(request: Request, context: WebContext, *, role: str, state: str, q: str) -> Response:
    role_filter = role if role in {r.value for r in Role} else ""
    state_filter = state if state in ("enabled", "disabled") else ""
    rows = users.list_users(context.sessions, role=Role(role_filter) if role_filter else None,
                            disabled=None if not state_filter else state_filter == "disabled", search=q or None)
    return render(request, "users.html", users=rows, filters={"role": role_filter, "state": state_filter, "q": q},
                  any_filter=bool(role_filter or state_filter or q), roles=[r.value for r in Role],
                  message=DONE_MESSAGES.get(request.query_params.get("done", "")))


@router.get("/users", include_in_schema=False)
def users_page(
    request: Request, role: str = Query("", max_length=_FORM_MAX), state: str = Query("", max_length=_FORM_MAX),
    q: str = Query("", max_length=_FORM_MAX), context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    return _users_page(request, context, role=role, state=state, q=q)


def _new_user_form(request: Request, *, values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
                   status_code: int = 200) -> Response:
    return render(request, "user_new.html", status_code=status_code, values=values or {"role": "viewer"},
                  errors=errors or {}, roles=[r.value for r in Role], min_password=MIN_PASSWORD_LENGTH)


@router.get("/users/new", include_in_schema=False)
def new_user_page(request: Request, principal: Principal = Depends(require(Role.ADMIN))) -> Response:
    return _new_user_form(request)


@router.post("/users", include_in_schema=False)
def create_user_submit(
    request: Request,
    username: str = Form("", max_length=_FORM_MAX),
    role: str = Form("viewer", max_length=_FORM_MAX),
    password: str = Form("", max_length=_FORM_MAX),
    password2: str = Form("", max_length=_FORM_MAX),
    context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    try:
        user = users_service(context).create_user(actor(request, principal), username=username, role=role,
                                                  password=password, repeated=password2)
    except Refused as exc:
        return _new_user_form(request, values={"username": username, "role": role}, errors=exc.by_field(),
                              status_code=exc.status)
    return RedirectResponse(f"/users/{user.username}?done=created", status_code=303)


def _user_page(request: Request, context: WebContext, username: str, *, errors: dict[str, str] | None = None,
               status_code: int = 200) -> Response:
    user = users.get_user(context.sessions, username)
    if user is None:
        raise HTTPException(404, f"no user {username!r}")
    now = context.clock()
    tokens = users.list_api_tokens(context.sessions, username=username)
    history = audit.list_entries(context.sessions, target_kind="user", target=username, limit=10)
    return render(request, "user_detail.html", status_code=status_code, user=user, roles=[r.value for r in Role],
                  tokens=[(t, token_state(t, now)) for t in tokens], history=history, errors=errors or {},
                  min_password=MIN_PASSWORD_LENGTH, message=DONE_MESSAGES.get(request.query_params.get("done", "")))


@router.get("/users/{username}", include_in_schema=False)
def user_page(
    request: Request, username: str, context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    return _user_page(request, context, username)


@router.post("/users/{username}", include_in_schema=False)
def user_submit(
    request: Request,
    username: str,
    change: str = Form(..., max_length=_FORM_MAX, description="role, disable, enable or password"),
    role: str = Form("", max_length=_FORM_MAX),
    password: str = Form("", max_length=_FORM_MAX),
    password2: str = Form("", max_length=_FORM_MAX),
    context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    changes: dict[str, dict[str, Any]] = {
        "role": {"role": role}, "disable": {"disabled": True}, "enable": {"disabled": False},
        "password": {"password": password, "repeated": password2},
    }
    if change not in changes:
        raise HTTPException(422, f"change {change[:64]!r} is not one of role, disable, enable, password")
    try:
        _, changed = users_service(context).update_user(actor(request, principal), username, **changes[change])
    except Refused as exc:
        if exc.status == 404:
            raise HTTPException(404, exc.message) from None
        return _user_page(request, context, username, errors=exc.by_field(), status_code=exc.status)
    if changed and username == principal.username and change != "enable":
        return RedirectResponse("/login", status_code=303)  # their own sessions just ended
    return RedirectResponse(f"/users/{username}?done={change if changed else 'unchanged'}", status_code=303)


def _tokens_page(request: Request, context: WebContext, *, user: str = "", state: str = "",
                 values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
                 status_code: int = 200) -> Response:
    now = context.clock()
    state_filter = state if state in ("active", "revoked", "expired") else ""
    tokens = users.list_api_tokens(context.sessions, username=user or None, state=state_filter or None, now=now)
    return render(request, "tokens.html", status_code=status_code, tokens=[(t, token_state(t, now)) for t in tokens],
                  users=users.list_users(context.sessions, disabled=False), filters={"user": user, "state": state_filter},
                  any_filter=bool(user or state_filter), values=values or {}, errors=errors or {},
                  max_expiry=MAX_EXPIRY_DAYS, message=DONE_MESSAGES.get(request.query_params.get("done", "")))


@router.get("/tokens", include_in_schema=False)
def tokens_page(
    request: Request, user: str = Query("", max_length=_FORM_MAX), state: str = Query("", max_length=_FORM_MAX),
    context: WebContext = Depends(get_context), principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    return _tokens_page(request, context, user=user, state=state)


@router.post("/tokens", include_in_schema=False)
def create_token_submit(
    request: Request,
    username: str = Form("", max_length=_FORM_MAX),
    name: str = Form("", max_length=_FORM_MAX),
    expires_days: str = Form("", max_length=_FORM_MAX),
    context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    values = {"username": username, "name": name, "expires_days": expires_days}
    days: float | None = None
    if expires_days.strip():
        try:
            days = float(expires_days)
        except ValueError:
            return _tokens_page(request, context, values=values, status_code=422,
                                errors={"expires_days": f"{expires_days[:32]!r} is not a number of days"})
    try:
        view, token = users_service(context).create_token(actor(request, principal), username=username, name=name,
                                                          expires_days=days)
    except Refused as exc:
        return _tokens_page(request, context, values=values, errors=exc.by_field(), status_code=exc.status)
    # 201 with the token in the page (never in a URL): it is shown this once and not stored.
    return render(request, "tokens_created.html", status_code=201, token=token, view=view)


@router.post("/tokens/{token_id}/revoke", include_in_schema=False)
def revoke_token_submit(
    request: Request, token_id: int, back: str = Form("", max_length=_FORM_MAX),
    context: WebContext = Depends(get_context), principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    try:
        revoked = users_service(context).revoke_token(actor(request, principal), token_id)
    except Refused as exc:
        raise HTTPException(exc.status, exc.message) from None
    target = f"/users/{revoked.username}" if back == "user" else "/tokens"
    return RedirectResponse(f"{target}?done=revoked", status_code=303)
