"""Users, browser sessions, API tokens and login attempts as stored in the database.

Why: the web app and the REST API decide who may do what from these rows alone, so
that a restart, a second web process or a revoked token behave the same everywhere.
Secrets never reach the database in the clear: passwords are stored as argon2 hashes
(:mod:`dicom_node.web.passwords` makes them), session and API tokens as SHA-256.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import ApiToken, LoginAttempt, Role, User, WebSession

__all__ = [
    "ApiTokenView",
    "LastAdmin",
    "Principal",
    "RESERVED_USERNAMES",
    "UserExists",
    "UserView",
    "claim_login_attempt",
    "create_api_token",
    "create_session",
    "create_user",
    "delete_session",
    "end_user_sessions",
    "get_api_token",
    "get_user",
    "list_api_tokens",
    "list_users",
    "password_hash_of",
    "recent_login_failures",
    "resolve_api_token",
    "resolve_session",
    "revoke_api_token",
    "settle_login_attempt",
    "update_user",
    "validate_username",
    "withdraw_login_attempt",
]

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
API_TOKEN_PREFIX = "dnt_"
#: Names a user may not take: the audit log's non-user actors (``config-file``: a file imported at the node's
#: start), and a path of the users pages.
RESERVED_USERNAMES = frozenset({"anonymous", "system", "cli", "config-file", "new"})
TOKEN_NAME_MAX = 64


class UserExists(ValueError):
    """A user of that name already exists."""


class LastAdmin(ValueError):
    """The change would leave no enabled admin (nobody could manage users in the web app)."""


def _shown(value: str, limit: int = 64) -> str:
    """``value`` quoted for an error message, cut short so a huge input does not make a huge message."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    role: Role
    disabled: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True)
class Principal:
    """Who is making a request, and how they proved it."""

    user_id: int
    username: str
    role: Role
    via: str  # "session" or "token"
    csrf_token: str | None = None  # sessions only: state-changing requests must echo it

    def allows(self, required: Role) -> bool:
        """Whether this principal passes a check for ``required`` (see :meth:`Role.admits`)."""
        return required.admits(self.role)


@dataclass(frozen=True)
class ApiTokenView:
    id: int
    username: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_username(username: str) -> str:
    """The user name, or ``ValueError`` saying why it is not acceptable."""
    if not _USERNAME.fullmatch(username):
        raise ValueError(
            f"user name {_shown(username)} must be 1-64 characters: letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    if username.lower() in RESERVED_USERNAMES:
        raise ValueError(f"user name {username!r} is reserved; choose another")
    return username


def _view(user: User) -> UserView:
    return UserView(
        id=user.id, username=user.username, role=Role(user.role), disabled=user.disabled,
        created_at=user.created_at, updated_at=user.updated_at, last_login_at=user.last_login_at,
    )


def create_user(
    sessions: sessionmaker[Session], username: str, password_hash: str, role: Role, *, now: datetime
) -> UserView:
    """Add a user; ``UserExists`` when the name is taken."""
    validate_username(username)
    with sessions.begin() as session:
        if session.execute(select(User.id).where(User.username == username)).first() is not None:
            raise UserExists(f"user {username!r} already exists")
        user = User(username=username, password_hash=password_hash, role=Role(role).value, disabled=False,
                    created_at=now, updated_at=now)
        session.add(user)
        session.flush()
        return _view(user)


def get_user(sessions: sessionmaker[Session], username: str) -> UserView | None:
    with sessions() as session:
        user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
        return None if user is None else _view(user)


def password_hash_of(sessions: sessionmaker[Session], username: str) -> tuple[UserView, str] | None:
    """The user and their stored password hash (for the login check), or None."""
    with sessions() as session:
        user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
        return None if user is None else (_view(user), user.password_hash)


def list_users(
    sessions: sessionmaker[Session], *, role: Role | None = None, disabled: bool | None = None,
    search: str | None = None,
) -> list[UserView]:
    """Users by name; optionally only one role, only enabled/disabled ones, or names containing ``search``."""
    query = select(User).order_by(User.username)
    if role is not None:
        query = query.where(User.role == Role(role).value)
    if disabled is not None:
        query = query.where(User.disabled.is_(disabled))
    if search:
        query = query.where(User.username.contains(search, autoescape=True))
    with sessions() as session:
        return [_view(u) for u in session.execute(query).scalars()]


def update_user(
    sessions: sessionmaker[Session],
    username: str,
    *,
    now: datetime,
    role: Role | None = None,
    disabled: bool | None = None,
    password_hash: str | None = None,
    last_login_at: datetime | None = None,
) -> UserView | None:
    """Change a user's role, disabled flag, password or last login; None when there is no such user.

    Disabling a user or changing their password or role ends their browser sessions.
    ``LastAdmin`` when the change would leave no enabled admin (then nothing changes).
    """
    with sessions.begin() as session:
        user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if user is None:
            return None
        was_active_admin = user.role == Role.ADMIN.value and not user.disabled
        will_be_admin = (Role(role).value if role is not None else user.role) == Role.ADMIN.value
        will_be_disabled = user.disabled if disabled is None else disabled
        if was_active_admin and (not will_be_admin or will_be_disabled):
            # Lock the enabled admins (PostgreSQL) so two admins cannot demote each other at once.
            others = session.execute(
                select(User.id).where(User.role == Role.ADMIN.value, User.disabled.is_(False), User.id != user.id)
                .with_for_update()
            ).all()
            if not others:
                raise LastAdmin(f"{username!r} is the last enabled admin: make another user admin before "
                                "disabling or demoting them")
        security_change = False
        if role is not None and Role(role).value != user.role:
            user.role, security_change = Role(role).value, True
        if disabled is not None and disabled != user.disabled:
            user.disabled, security_change = disabled, True
        if password_hash is not None:
            user.password_hash, security_change = password_hash, True
        if last_login_at is not None:
            user.last_login_at = last_login_at
        if security_change:
            user.updated_at = now
            session.execute(delete(WebSession).where(WebSession.user_id == user.id))
        return _view(user)


# --------------------------------------------------------------------------- browser sessions


def create_session(
    sessions: sessionmaker[Session], user_id: int, *, now: datetime, lifetime: timedelta, remote_addr: str | None
) -> tuple[str, str]:
    """A new session for the user: (token for the cookie, CSRF token). Expired sessions are purged."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with sessions.begin() as session:
        session.execute(delete(WebSession).where(WebSession.expires_at < now))
        session.add(WebSession(token_hash=_sha256(token), user_id=user_id, csrf_token=csrf, created_at=now,
                               last_seen_at=now, expires_at=now + lifetime, remote_addr=remote_addr))
    return token, csrf


def resolve_session(sessions: sessionmaker[Session], token: str, *, now: datetime) -> Principal | None:
    """The principal of a live session token (not expired, user enabled), or None."""
    with sessions.begin() as session:
        row = session.execute(
            select(WebSession, User).join(User, User.id == WebSession.user_id)
            .where(WebSession.token_hash == _sha256(token))
        ).first()
        if row is None:
            return None
        web_session, user = row
        if web_session.expires_at <= now or user.disabled:
            return None
        if (now - web_session.last_seen_at).total_seconds() > 60:
            web_session.last_seen_at = now
        return Principal(user_id=user.id, username=user.username, role=Role(user.role), via="session",
                         csrf_token=web_session.csrf_token)


def delete_session(sessions: sessionmaker[Session], token: str) -> None:
    with sessions.begin() as session:
        session.execute(delete(WebSession).where(WebSession.token_hash == _sha256(token)))


def end_user_sessions(sessions: sessionmaker[Session], user_id: int) -> int:
    with sessions.begin() as session:
        return int(session.execute(delete(WebSession).where(WebSession.user_id == user_id)).rowcount or 0)


# --------------------------------------------------------------------------- login attempts


def claim_login_attempt(
    sessions: sessionmaker[Session], username: str, remote_addr: str | None, *, now: datetime, since: datetime
) -> tuple[int, int, int]:
    """Record a login attempt as failed *before* its password is checked; (its id, failures for the user
    name, failures from the address) since ``since``, this attempt included.

    Why first: counting and then recording lets N parallel attempts all see the same
    count and all get their password checked. Here the row is committed before the
    count, in its own transaction, so the attempt committed k-th sees at least k
    failures (on SQLite and PostgreSQL alike): at most ``limit`` attempts of a burst
    see a count within the limit. Settle the attempt with :func:`settle_login_attempt`
    (it succeeded) or :func:`withdraw_login_attempt` (refused without a check).
    """
    with sessions.begin() as session:
        attempt = LoginAttempt(at=now, username=username[:64], remote_addr=remote_addr, succeeded=False)
        session.add(attempt)
        session.flush()
        attempt_id = int(attempt.id)
    by_user, by_addr = recent_login_failures(sessions, username=username, remote_addr=remote_addr, since=since)
    return attempt_id, by_user, by_addr


def settle_login_attempt(sessions: sessionmaker[Session], attempt_id: int) -> None:
    """Mark a claimed attempt as the successful login it turned out to be (it no longer counts as a failure)."""
    with sessions.begin() as session:
        session.execute(update(LoginAttempt).where(LoginAttempt.id == attempt_id).values(succeeded=True))


def withdraw_login_attempt(sessions: sessionmaker[Session], attempt_id: int) -> None:
    """Forget a claimed attempt that was refused by the rate limit before any password check."""
    with sessions.begin() as session:
        session.execute(delete(LoginAttempt).where(LoginAttempt.id == attempt_id))


def recent_login_failures(
    sessions: sessionmaker[Session], *, username: str, remote_addr: str | None, since: datetime
) -> tuple[int, int]:
    """(failures for this user name, failures from this address) since ``since``."""
    with sessions() as session:
        base = select(func.count(LoginAttempt.id)).where(LoginAttempt.at >= since, LoginAttempt.succeeded.is_(False))
        by_user = int(session.execute(base.where(LoginAttempt.username == username[:64])).scalar_one())
        by_addr = 0
        if remote_addr is not None:
            by_addr = int(session.execute(base.where(LoginAttempt.remote_addr == remote_addr)).scalar_one())
        return by_user, by_addr


# --------------------------------------------------------------------------- API tokens


def create_api_token(
    sessions: sessionmaker[Session], username: str, name: str, *, now: datetime, expires_at: datetime | None = None
) -> tuple[ApiTokenView, str]:
    """A new API token for the user: (its record, the token itself - shown once, never stored).

    ``ValueError`` for a bad name, ``LookupError`` for an unknown user.
    """
    if not name.strip() or len(name.strip()) > TOKEN_NAME_MAX:
        raise ValueError(f"token name must be 1-{TOKEN_NAME_MAX} characters; {_shown(name)} has {len(name.strip())}")
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as session:
        user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if user is None:
            raise LookupError(f"no user {username!r}")
        row = ApiToken(user_id=user.id, name=name.strip(), token_hash=_sha256(token), prefix=token[:12],
                       created_at=now, expires_at=expires_at)
        session.add(row)
        session.flush()
        return _token_view(row, user.username), token


def _token_view(row: ApiToken, username: str) -> ApiTokenView:
    return ApiTokenView(id=row.id, username=username, name=row.name, prefix=row.prefix, created_at=row.created_at,
                        last_used_at=row.last_used_at, expires_at=row.expires_at, revoked_at=row.revoked_at)


def list_api_tokens(
    sessions: sessionmaker[Session], *, username: str | None = None, state: str | None = None,
    now: datetime | None = None,
) -> list[ApiTokenView]:
    """Tokens, oldest first; optionally one user's, and only ``state`` active / revoked / expired (needs ``now``)."""
    query = select(ApiToken, User.username).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id)
    if username:
        query = query.where(User.username == username)
    if state == "revoked":
        query = query.where(ApiToken.revoked_at.is_not(None))
    elif state in ("active", "expired"):
        if now is None:
            raise ValueError(f"listing {state} tokens needs the current time")
        query = query.where(ApiToken.revoked_at.is_(None))
        if state == "active":
            query = query.where((ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now))
        else:
            query = query.where(ApiToken.expires_at <= now)
    elif state:
        raise ValueError(f"token state {state!r} is not one of active, revoked, expired")
    with sessions() as session:
        return [_token_view(t, name) for t, name in session.execute(query).all()]


def get_api_token(sessions: sessionmaker[Session], token_id: int) -> ApiTokenView | None:
    with sessions() as session:
        row = session.execute(select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
                              .where(ApiToken.id == token_id)).first()
        return None if row is None else _token_view(row[0], row[1])


def revoke_api_token(sessions: sessionmaker[Session], token_id: int, *, now: datetime) -> ApiTokenView | None:
    with sessions.begin() as session:
        row = session.execute(select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
                              .where(ApiToken.id == token_id)).first()
        if row is None:
            return None
        token, username = row
        if token.revoked_at is None:
            token.revoked_at = now
        return _token_view(token, username)


def resolve_api_token(sessions: sessionmaker[Session], token: str, *, now: datetime) -> Principal | None:
    """The principal of a valid API token (not revoked or expired, user enabled), or None."""
    if not token.startswith(API_TOKEN_PREFIX):
        return None
    with sessions.begin() as session:
        row = session.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == _sha256(token))
        ).first()
        if row is None:
            return None
        api_token, user = row
        if api_token.revoked_at is not None or user.disabled:
            return None
        if api_token.expires_at is not None and api_token.expires_at <= now:
            return None
        if api_token.last_used_at is None or (now - api_token.last_used_at).total_seconds() > 60:
            session.execute(update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now))
        return Principal(user_id=user.id, username=user.username, role=Role(user.role), via="token")
