"""``dicom-node users ...`` and ``dicom-node tokens ...``: accounts and API tokens from the shell.

There is no default password: the first admin is created here (``users create NAME --admin``),
after which admins can manage users in the web app too. Changes go through the same
:class:`dicom_node.config_service.UsersService` as the web app (the same checks and
messages), audited with the actor ``cli``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service import CLI, Refused, UsersService
from dicom_node.config_service.users import user_json
from dicom_node.db import users
from dicom_node.db.models import Role
from dicom_node.ingest import utc_now
from dicom_node.settings import Settings

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


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run a ``users`` or ``tokens`` sub-command; errors print one line and return 1."""
    try:
        return _run(_sessions(settings), args)
    except Refused as exc:
        print(f"dicom-node: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the passwords typed differ
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1


def _run(sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    service = UsersService(sessions, clock=utc_now)
    if args.command == "users":
        if args.sub == "create":
            users.validate_username(args.username)  # before asking for a password
            role = Role.ADMIN if args.admin else Role(args.role)
            user = service.create_user(CLI, username=args.username, role=role,
                                       password=_password(args.password_stdin))
            print(f"created {role.value} {user.username}")
            return 0
        if args.sub == "list":
            rows = [user_json(u) for u in users.list_users(sessions)]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for row in rows:
                    state = "disabled" if row["disabled"] else "enabled"
                    print(f"{row['username']:<24} {row['role']:<9} {state:<9} last login {row['last_login_at'] or '-'}")
            return 0
        change: dict[str, Any] = {"set-role": {"role": getattr(args, "role", None)}, "disable": {"disabled": True},
                                  "enable": {"disabled": False}}.get(args.sub) or {}
        if args.sub == "set-password":
            if users.get_user(sessions, args.username) is None:  # before asking for a password
                raise Refused.not_found(f"no user {args.username!r}")
            change = {"password": _password(args.password_stdin)}
        after, _ = service.update_user(CLI, args.username, **change)
        print(f"{args.sub}: {args.username} ({after.role.value}, {'disabled' if after.disabled else 'enabled'})")
        return 0

    if args.sub == "create":
        view, token = service.create_token(CLI, username=args.username, name=args.name,
                                           expires_days=args.expires_days)
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
    revoked = service.revoke_token(CLI, args.token_id)
    print(f"revoked token {revoked.id} ({revoked.name}) of {revoked.username}")
    return 0
