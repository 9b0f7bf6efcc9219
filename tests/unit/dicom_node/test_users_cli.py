"""``dicom-node users ...`` and ``dicom-node tokens ...``: accounts and API tokens from the shell.

The first admin and a token are made by real subprocesses (as an operator runs them, the
password on standard input); the rest runs the same entry point in-process, which is faster.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.app.cli import main
from dicom_node.db import audit, users
from dicom_node.db.models import Role, User
from dicom_node.db.session import make_engine, make_session_factory
from dicom_node.ingest import utc_now
from dicom_node.settings import load_settings


def _cli(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS --data-dir DATA_DIR`` in a process of its own, on the node's database there (created
    first, as the node's start or ``db upgrade`` does: the user commands never create one)."""
    if not (data_dir / "dicom-node.db").is_file():
        assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
    return subprocess.run([sys.executable, "-m", "dicom_node", *args, "--data-dir", str(data_dir)],
                          input=stdin, capture_output=True, text=True, timeout=120)


def _sessions(data_dir: Path):  # type: ignore[no-untyped-def]
    settings = load_settings(None, {"data_dir": data_dir})
    return make_session_factory(make_engine(settings.resolved_database_url))


def _run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, data_dir: Path, *args: str,
         stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    if not (data_dir / "dicom-node.db").is_file():
        assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()  # what came before (``_cli``'s ``db upgrade``) is not this command's output
    code = main([*args, "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_first_admin_from_the_shell_and_a_short_password_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    created = _cli(tmp_path, "users", "create", "chief", "--admin", "--password-stdin",
                   stdin="a long admin password\n")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "created admin chief"
    sessions = _sessions(tmp_path)
    with sessions() as session:
        stored = session.execute(select(User.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and "a long admin password" not in stored

    short = _cli(tmp_path, "users", "create", "shorty", "--password-stdin", stdin="tiny\n")
    assert short.returncode == 1
    assert short.stderr.strip() == "dicom-node: password must have at least 10 characters"
    assert users.get_user(sessions, "shorty") is None

    code, secret, err = _run(capsys, monkeypatch, tmp_path, "tokens", "create", "chief", "--name", "backup job",
                             "--expires-days", "2")
    assert code == 0 and secret.strip().startswith("dnt_") and "shown only now" in err
    principal = users.resolve_api_token(sessions, secret.strip(), now=utc_now())
    assert principal is not None and principal.role is Role.ADMIN and principal.username == "chief"

    actions = [(e.actor, e.action) for e in audit.list_entries(sessions)]
    assert actions == [("cli", "token.create"), ("cli", "user.create")]


def test_list_set_role_disable_enable_and_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        return _run(capsys, monkeypatch, tmp_path, *args, stdin=stdin)

    assert run("users", "create", "boss", "--admin", "--password-stdin", stdin="boss password 1\n")[0] == 0
    assert run("users", "create", "ann", "--role", "operator", "--password-stdin", stdin="ann password 12\n")[0] == 0
    code, out, _ = run("users", "list", "--json")
    assert code == 0
    assert [(u["username"], u["role"], u["disabled"]) for u in json.loads(out)] == [
        ("ann", "operator", False), ("boss", "admin", False)]

    assert run("users", "set-role", "ann", "viewer")[1].strip() == "set-role: ann (viewer, enabled)"
    assert run("users", "disable", "ann")[1].strip() == "disable: ann (viewer, disabled)"
    code, out, _ = run("users", "list")
    assert code == 0 and "ann" in out and "disabled" in out and "boss" in out
    assert run("users", "enable", "ann")[0] == 0

    code, _, err = run("users", "disable", "boss")
    assert code == 1 and "is the last enabled admin" in err  # the same rule as in the web app
    code, _, err = run("users", "set-role", "ghost", "admin")
    assert code == 1 and err.strip() == "dicom-node: no user 'ghost'"
    code, _, err = run("users", "create", "ann", "--password-stdin", stdin="another password\n")
    assert code == 1 and "already exists" in err
    code, _, err = run("users", "create", "bad name", "--password-stdin", stdin="another password\n")
    assert code == 1 and "must be 1-64 characters" in err

    code, secret, _ = run("tokens", "create", "ann", "--name", "monitoring")
    assert code == 0 and secret.strip().startswith("dnt_")
    code, out, _ = run("tokens", "list", "--json")
    [listed] = json.loads(out)
    assert (listed["user"], listed["name"], listed["revoked"]) == ("ann", "monitoring", False)
    assert secret.strip() not in out and listed["prefix"] == secret.strip()[:12]
    assert run("tokens", "revoke", str(listed["id"]))[1].strip() == f"revoked token {listed['id']} (monitoring) of ann"
    assert json.loads(run("tokens", "list", "--json")[1])[0]["revoked"] is True
    code, _, err = run("tokens", "revoke", "99")
    assert code == 1 and "no API token 99" in err

    sessions = _sessions(tmp_path)
    assert users.resolve_api_token(sessions, secret.strip(), now=utc_now()) is None
    changes = [e.action for e in audit.list_entries(sessions)]
    assert changes == ["token.revoke", "token.create", "user.update", "user.update", "user.update",
                       "user.create", "user.create"]  # the web app's actions: one service audits both
    role_change = audit.list_entries(sessions, action="user.update")[-1]
    assert (role_change.before["role"], role_change.after["role"]) == ("operator", "viewer")
    assert "password" not in json.dumps(role_change.after)
