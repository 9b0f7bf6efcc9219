"""``dicom-node users ...`` and ``dicom-node tokens ...``: accounts and API tokens from the shell.

There is no default password: the first admin is created here (``users create NAME --admin``),
after which admins can manage users in the web app too. Every change is audited with
the actor ``cli``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import audit, users
from dicom_node.db.models import Role
from dicom_node.ingest import utc_now
from dicom_node.settings import Settings
from dicom_node.web.passwords import check_password_policy, hash_password

__all__ = ["add_commands", "run"]


def add_commands(commands: Any, common: Any) -> None:
    """Add the ``users`` and ``tokens`` sub-commands to the CLI parser."""
    users_parser = commands.add_parser("users", help="web and API user accounts")
    sub = users_parser.add_subparsers(dest="sub", required=True)
    create = sub.add_parser("create", help="create a user (asks for the password)")
    common(create)
    create.add_argument("username")
    role = create.add_mutually_exclusive_group()
    role.add_argument("--admin", action="store_true", help="shorthand for --role admin")
    role.add_argument("--role", choices=[r.value for r in Role], default=Role.VIEWER.value)
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    listing = sub.add_parser("list", help="list users")
    common(listing)
    listing.add_argument("--json", action="store_true")
    set_role = sub.add_parser("set-role", help="change a user's role (ends their sessions)")
    common(set_role)
    set_role.add_argument("username")
    set_role.add_argument("role", choices=[r.value for r in Role])
    for name, text in (("disable", "disable a user (ends their sessions)"), ("enable", "enable a user")):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("username")
    password = sub.add_parser("set-password", help="set a user's password (ends their sessions)")
    common(password)
    password.add_argument("username")
    password.add_argument("--password-stdin", action="store_true")

    tokens_parser = commands.add_parser("tokens", help="API tokens for automation")
    tsub = tokens_parser.add_subparsers(dest="sub", required=True)
    tcreate = tsub.add_parser("create", help="create an API token (printed once)")
    common(tcreate)
    tcreate.add_argument("username")
    tcreate.add_argument("--name", required=True, help="what the token is for")
    tcreate.add_argument("--expires-days", type=float, help="expires after this many days (default: never)")
    tlist = tsub.add_parser("list", help="list API tokens")
    common(tlist)
    tlist.add_argument("--json", action="store_true")
    trevoke = tsub.add_parser("revoke", help="revoke an API token")
    common(trevoke)
    trevoke.add_argument("token_id", type=int)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ValueError("the passwords differ")
    return first


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from dicom_node.db.session import open_sessions

    return open_sessions(settings.resolved_database_url, migrate=True)


def _user_json(user: users.UserView) -> dict[str, Any]:
    return {"username": user.username, "role": user.role.value, "disabled": user.disabled,
            "created_at": user.created_at.isoformat(),
            "last_login_at": user.last_login_at.isoformat() if user.last_login_at else None}


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run a ``users`` or ``tokens`` sub-command; errors print one line and return 1."""
    try:
        return _run(_sessions(settings), args)
    except (ValueError, LookupError) as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1


def _run(sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    now = utc_now()

    def log(action: str, target_kind: str, target: str, before: Any = None, after: Any = None) -> None:
        audit.record(sessions, at=now, actor="cli", action=action, target_kind=target_kind, target=target,
                     before=before, after=after)

    if args.command == "users":
        if args.sub == "create":
            users.validate_username(args.username)
            role = Role.ADMIN if args.admin else Role(args.role)
            password = check_password_policy(_password(args.password_stdin))
            user = users.create_user(sessions, args.username, hash_password(password), role, now=now)
            log("user.create", "user", user.username, after=_user_json(user))
            print(f"created {role.value} {user.username}")
            return 0
        if args.sub == "list":
            rows = [_user_json(u) for u in users.list_users(sessions)]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for row in rows:
                    state = "disabled" if row["disabled"] else "enabled"
                    print(f"{row['username']:<24} {row['role']:<9} {state:<9} last login {row['last_login_at'] or '-'}")
            return 0
        before = users.get_user(sessions, args.username)
        if before is None:
            raise LookupError(f"no user {args.username!r}")
        if args.sub == "set-role":
            after = users.update_user(sessions, args.username, now=now, role=Role(args.role))
        elif args.sub in ("disable", "enable"):
            after = users.update_user(sessions, args.username, now=now, disabled=args.sub == "disable")
        else:  # set-password
            password = check_password_policy(_password(args.password_stdin))
            after = users.update_user(sessions, args.username, now=now, password_hash=hash_password(password))
        assert after is not None
        log(f"user.{args.sub}", "user", args.username, before=_user_json(before), after=_user_json(after))
        print(f"{args.sub}: {args.username} ({after.role.value}, {'disabled' if after.disabled else 'enabled'})")
        return 0

    if args.sub == "create":
        expires = now + timedelta(days=args.expires_days) if args.expires_days else None
        view, token = users.create_api_token(sessions, args.username, args.name, now=now, expires_at=expires)
        log("token.create", "token", f"{view.id} {view.name}", after={"user": view.username, "name": view.name,
                                                                      "prefix": view.prefix})
        print(token)
        print(f"token {view.id} for {view.username} ({view.name}); it is shown only now", file=sys.stderr)
        return 0
    if args.sub == "list":
        tokens = users.list_api_tokens(sessions)
        rows = [{"id": t.id, "user": t.username, "name": t.name, "prefix": t.prefix,
                 "created_at": t.created_at.isoformat(),
                 "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                 "expires_at": t.expires_at.isoformat() if t.expires_at else None,
                 "revoked": t.revoked_at is not None} for t in tokens]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['id']:>4} {r['user']:<20} {r['name']:<24} {r['prefix']}… "
                      f"{'revoked' if r['revoked'] else 'active'}")
        return 0
    revoked = users.revoke_api_token(sessions, args.token_id, now=now)
    if revoked is None:
        raise LookupError(f"no API token {args.token_id}")
    log("token.revoke", "token", f"{revoked.id} {revoked.name}")
    print(f"revoked token {revoked.id} ({revoked.name}) of {revoked.username}")
    return 0
