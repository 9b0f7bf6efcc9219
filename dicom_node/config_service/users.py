"""Users and API tokens: validated, changed and audited in one place for the web pages, the API and the CLI.

Audited as ``user.create``, ``user.update``, ``token.create`` and ``token.revoke``. Password
hashes never leave the database layer: audit entries carry the user's name, role and
state only, and an API token only its id, name and first characters (the token itself
is returned once, to the caller that created it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service.base import Actor, FieldError, Refused, record_change
from dicom_node.db import users
from dicom_node.db.models import Role
from dicom_node.db.users import ApiTokenView, UserView
from dicom_node.web.passwords import check_password_policy, hash_password

__all__ = ["MAX_EXPIRY_DAYS", "UsersService", "token_json", "token_state", "user_json"]

logger = logging.getLogger(__name__)

MAX_EXPIRY_DAYS = 3650


def user_json(user: UserView) -> dict[str, Any]:
    """What the audit log and the API show of a user (never the password hash)."""
    return {"username": user.username, "role": user.role.value, "disabled": user.disabled,
            "created_at": user.created_at.isoformat(),
            "last_login_at": user.last_login_at.isoformat() if user.last_login_at else None}


def token_state(token: ApiTokenView, now: datetime) -> str:
    """active, revoked or expired."""
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


def token_json(token: ApiTokenView) -> dict[str, Any]:
    """What the audit log keeps of a token (never the token itself)."""
    return {"id": token.id, "user": token.username, "name": token.name, "prefix": token.prefix,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None}


def _role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise Refused.invalid("request", [(("role",), f"role {str(value)[:64]!r} is not one of "
                                                      f"{', '.join(r.value for r in Role)}")]) from None


def _password_problems(password: str, repeated: str | None) -> list[FieldError]:
    try:
        check_password_policy(password)
    except ValueError as exc:
        return [(("password",), str(exc))]
    if repeated is not None and repeated != password:
        return [(("password2",), "the two passwords differ")]
    return []


class UsersService:
    """Create and change users and API tokens, each change audited with the state before and after."""

    def __init__(self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime]) -> None:
        self.sessions = sessions
        self.clock = clock

    def _record(self, actor: Actor, action: str, target_kind: str, target: str, **states: Any) -> None:
        record_change(self.sessions, self.clock(), actor, action, target_kind=target_kind, target=target, **states)

    def create_user(self, actor: Actor, *, username: str, role: str | Role, password: str,
                    repeated: str | None = None) -> UserView:
        """Validate and add a user (``user.create``). Refused 422 naming each bad field, 409 for a taken name."""
        errors: list[FieldError] = []
        try:
            users.validate_username(username)
        except ValueError as exc:
            errors.append((("username",), str(exc)))
        try:
            _role(role)
        except Refused as exc:
            errors += exc.errors
        errors += _password_problems(password, repeated)
        if errors:
            raise Refused.invalid("request", errors)
        try:
            user = users.create_user(self.sessions, username, hash_password(password), _role(role), now=self.clock())
        except users.UserExists as exc:
            raise Refused.conflict(str(exc), ("username",)) from None
        self._record(actor, "user.create", "user", user.username, after=user_json(user))
        return user

    def update_user(self, actor: Actor, username: str, *, role: str | Role | None = None,
                    disabled: bool | None = None, password: str | None = None,
                    repeated: str | None = None) -> tuple[UserView, bool]:
        """Change role / enabled state / password: (the user, whether anything changed); audited ``user.update``.

        Refused 404 for an unknown user, 422 for a bad role or password, 409 when the last enabled admin would be
        disabled or demoted.
        """
        before = users.get_user(self.sessions, username)
        if before is None:
            raise Refused.not_found(f"no user {username!r}")
        new_role = None if role is None else _role(role)
        new_hash = None
        if password is not None:
            problems = _password_problems(password, repeated)
            if problems:
                raise Refused.invalid("request", problems)
            new_hash = hash_password(password)
        try:
            after = users.update_user(self.sessions, username, now=self.clock(), role=new_role, disabled=disabled,
                                      password_hash=new_hash)
        except users.LastAdmin as exc:
            raise Refused.conflict(str(exc)) from None
        if after is None:  # deleted meanwhile
            raise Refused.not_found(f"no user {username!r}")
        changed = user_json(before) != user_json(after) or new_hash is not None
        if changed:
            self._record(actor, "user.update", "user", username, before=user_json(before), after=user_json(after),
                         detail="password reset" if new_hash is not None else None)
        return after, changed

    def create_token(self, actor: Actor, *, username: str, name: str,
                     expires_days: float | None) -> tuple[ApiTokenView, str]:
        """A new API token for ``username``: (its record, the token - shown once); audited ``token.create``."""
        errors: list[FieldError] = []
        user = users.get_user(self.sessions, username)
        if user is None:
            errors.append((("username",), f"no user {username[:64]!r}"))
        if not name.strip() or len(name.strip()) > users.TOKEN_NAME_MAX:
            errors.append((("name",), f"the name must be 1-{users.TOKEN_NAME_MAX} characters "
                                      f"(it has {len(name.strip())})"))
        if expires_days is not None and not 0 < expires_days <= MAX_EXPIRY_DAYS:
            errors.append((("expires_days",), f"expiry must be more than 0 and at most {MAX_EXPIRY_DAYS} days "
                                              f"(got {expires_days:g})"))
        if errors:
            raise Refused.invalid("request", errors)
        assert user is not None
        if user.disabled:
            raise Refused.conflict(f"user {username!r} is disabled: enable them before giving them a token",
                                   ("username",))
        now = self.clock()
        expires_at = None if expires_days is None else now + timedelta(days=expires_days)
        try:
            view, token = users.create_api_token(self.sessions, username, name, now=now, expires_at=expires_at)
        except LookupError as exc:
            raise Refused.invalid("request", [(("username",), str(exc))]) from None
        self._record(actor, "token.create", "token", f"{view.id} {view.name}", after=token_json(view))
        return view, token

    def revoke_token(self, actor: Actor, token_id: int) -> ApiTokenView:
        """Revoke a token (revoking it again changes nothing); audited ``token.revoke``."""
        before = users.get_api_token(self.sessions, token_id)
        if before is None:
            raise Refused.not_found(f"no API token {token_id}")
        after = users.revoke_api_token(self.sessions, token_id, now=self.clock())
        assert after is not None
        if before.revoked_at is None:
            self._record(actor, "token.revoke", "token", f"{after.id} {after.name}", before=token_json(before),
                         after=token_json(after))
        return after
