"""Security of the web app and its auth foundation, tested against the real app and a real database.

CSRF on every state-changing route (found by reading the app's routes, so new ones are
covered automatically), login CSRF, session fixation, cookie flags, login rate limiting,
password storage, hostile input, anonymous access and the append-only audit log.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from itsdangerous import Signer
from markupsafe import escape
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from dicom_node.db import audit, users
from dicom_node.db.models import ApiToken, AuditEntry, User, WebSession
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.settings import load_settings
from dicom_node.web.app import create_app
from dicom_node.web.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from tests.web.conftest import PASSWORD, LoggedIn, WebEnv, make_web_env
from tests.web.security_support import IDENTIFIERS, STATE_CHANGING, app_routes, db_snapshot, seed
from tests.web.test_permissions import POLICY, WORKER_ONLY

SCRIPT = "<script>alert(1)</script>"
ESCAPED_SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"
SQL = "' OR 1=1 --"
ESCAPED_SQL = "&#39; OR 1=1 --"
HUGE = "x" * 10_240
#: GET routes anybody may open; every other GET needs a login. FastAPI's API docs are public by
#: design: they describe the API and hold no data.
PUBLIC_GETS = {"/login", "/healthz", "/readyz", "/metrics", "/api/docs", "/api/v1/openapi.json",
               "/docs/oauth2-redirect"}
_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def _login_form(client: TestClient) -> str:
    match = _CSRF_INPUT.search(client.get("/login").text)
    assert match
    return match.group(1)


def _log_in(client: TestClient, username: str, password: str = PASSWORD) -> int:
    return int(client.post("/login", data={"username": username, "password": password,
                                           "csrf_token": _login_form(client)}).status_code)


def _session_cookie(response) -> str:  # type: ignore[no-untyped-def]
    match = re.search(rf"{SESSION_COOKIE}=([^;]+)", response.headers.get("set-cookie", ""))
    assert match, response.headers
    return match.group(1).strip('"')


def _with_cookie(web: WebEnv, value: str) -> TestClient:
    client = web.client()
    client.cookies.set(SESSION_COOKIE, value)
    return client


# --------------------------------------------------------------------------- CSRF


def _csrf_refused(answer) -> bool:  # type: ignore[no-untyped-def]
    return answer.status_code == 403 and "CSRF token missing or wrong" in answer.text


def test_every_state_changing_route_refuses_a_missing_or_wrong_csrf_token_before_changing_anything(
    web: WebEnv,
) -> None:
    seeded = seed(web.sessions)
    admin = web.login("admin")
    other_session = web.login("viewer")  # a valid CSRF token, but of another session
    routes = [(m, p) for m, p in app_routes(web.app) if m in STATE_CHANGING and p != "/login"]
    assert {("POST", "/logout"), ("POST", "/users"), ("POST", "/users/{username}"), ("POST", "/tokens"),
            ("POST", "/tokens/{token_id}/revoke"), ("PATCH", "/api/v1/users/{username}"),
            ("DELETE", "/api/v1/tokens/{token_id}")} <= set(routes)
    print(f"\nCSRF: {len(routes)} state-changing routes x 5 forged variants")

    before = db_snapshot(web.sessions)
    for method, path in routes:
        url = seeded.fill(path)
        forged: list[tuple[str, Callable[[], object]]] = [
            ("no token, form body", lambda: admin.client.request(method, url, data={"name": "x", "username": "x"})),
            ("no token, JSON body", lambda: admin.client.request(method, url, json={"name": "x"})),
            ("wrong form token", lambda: admin.client.request(method, url, data={"csrf_token": "forged"})),
            ("wrong non-ASCII header", lambda: admin.client.request(
                method, url, headers={"X-CSRF-Token": "forged-é".encode()})),
            ("other session's token", lambda: admin.client.request(
                method, url, headers={"X-CSRF-Token": other_session.csrf})),
        ]
        for label, send in forged:
            answer = send()
            assert _csrf_refused(answer), f"{method} {path} ({label}): {answer.status_code} {answer.text[:200]}"
    assert db_snapshot(web.sessions) == before, "a request without a valid CSRF token changed the database"
    assert seeded.unknown_params == set(), f"give these path parameters a seeded value: {seeded.unknown_params}"

    # With the right token the same requests pass the CSRF check (whatever the route then decides).
    checked = TestClient(web.app, follow_redirects=False, raise_server_exceptions=False)
    checked.cookies = admin.client.cookies
    csrf, crashed = admin.csrf, []
    for method, path in routes:
        url = seeded.fill(path)
        if method == "POST" and not path.startswith("/api/"):
            answer = checked.post(url, data={"csrf_token": csrf})
        else:
            answer = checked.request(method, url, headers={"X-CSRF-Token": csrf})
        assert not _csrf_refused(answer), f"{method} {path} refused with the right CSRF token"
        if POLICY.get((method, path)) != WORKER_ONLY:  # result uploads: worker accounts only, never an admin
            assert answer.status_code != 403, f"{method} {path}: admin got 403: {answer.text[:200]}"
        if answer.status_code >= 500:
            crashed.append(f"{method} {path}: {answer.status_code}")
        if checked.get("/api/v1/me").status_code == 401:  # the request logged us out (logout, own role...)
            again = web.login("admin")
            checked.cookies, csrf = again.client.cookies, again.csrf
    assert crashed == [], f"routes that crash on an empty request: {crashed}"


def test_api_tokens_need_no_csrf_token(web: WebEnv) -> None:
    client = web.client()
    answer = client.post("/api/v1/tokens", headers={"Authorization": f"Bearer {web.token('admin')}"},
                         json={"username": "viewer", "name": "no csrf needed"})
    assert answer.status_code == 201


def test_login_form_needs_its_own_csrf_cookie_and_token(web: WebEnv) -> None:
    credentials = {"username": "admin", "password": PASSWORD}
    bare = web.client()
    assert bare.post("/login", data={**credentials, "csrf_token": "anything"}).status_code == 403
    assert bare.post("/login", data=credentials).status_code == 403

    # A token from one browser's login page does not work in another browser (no cookie there).
    mine, theirs = web.client(), web.client()
    token = _login_form(mine)
    refused = theirs.post("/login", data={**credentials, "csrf_token": token})
    assert refused.status_code == 403 and "The login form expired" in refused.text
    theirs.get("/login")  # they have their own cookie now, but not the token that goes with it
    assert theirs.post("/login", data={**credentials, "csrf_token": token}).status_code == 403
    assert mine.post("/login", data={**credentials, "csrf_token": "wrong-é"}).status_code == 403  # non-ASCII: no 500

    with web.sessions() as session:
        assert session.execute(select(WebSession)).first() is None  # no refused attempt made a session
    assert mine.post("/login", data={**credentials, "csrf_token": token}).status_code == 303


# --------------------------------------------------------------------------- sessions


def _login_carrying(web: WebEnv, cookie: str, username: str = "admin"):  # type: ignore[no-untyped-def]
    """Log in through the form in a browser whose session cookie is ``cookie`` (planted or left over)."""
    client = web.client()
    token = _login_form(client)
    client.cookies.set(SESSION_COOKIE, cookie)
    return client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token})


def test_a_session_cookie_from_before_login_is_never_the_one_used_after(web: WebEnv) -> None:
    # An attacker's own valid session cookie, planted in the victim's browser before the victim logs in.
    attacker = web.client()
    assert _log_in(attacker, "viewer") == 303
    planted = attacker.cookies[SESSION_COOKIE]
    answer = _login_carrying(web, planted)
    assert answer.status_code == 303
    fresh = _session_cookie(answer)
    assert fresh != planted
    assert _with_cookie(web, planted).get("/api/v1/me").status_code == 401  # the planted session is dead
    assert attacker.get("/api/v1/me").status_code == 401
    assert _with_cookie(web, fresh).get("/api/v1/me").json()["username"] == "admin"

    # An arbitrary (unsigned) attacker-chosen value is ignored and replaced.
    assert _with_cookie(web, "attacker-chosen-value").get("/api/v1/me").status_code == 401
    assert _session_cookie(_login_carrying(web, "attacker-chosen-value")) != "attacker-chosen-value"

    # Logging in again with the previous session's cookie ends that session.
    again = _login_carrying(web, fresh)
    assert again.status_code == 303 and _session_cookie(again) != fresh
    assert _with_cookie(web, fresh).get("/api/v1/me").status_code == 401
    assert _with_cookie(web, _session_cookie(again)).get("/api/v1/me").status_code == 200


def test_logout_ends_the_session_on_the_server(web: WebEnv, admin: LoggedIn) -> None:
    cookie = admin.client.cookies[SESSION_COOKIE]
    assert admin.post("/logout").status_code == 303
    replay = _with_cookie(web, cookie)
    assert replay.get("/api/v1/me").status_code == 401
    page = replay.get("/users")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    with web.sessions() as session:
        assert session.execute(select(WebSession)).first() is None


@pytest.mark.parametrize("change", ["password", "role", "disable"])
def test_changing_password_role_or_disabling_ends_the_users_sessions(web: WebEnv, admin: LoggedIn, change: str) -> None:
    operator = web.login("operator")
    form = {"password": {"change": "password", "password": "another long one", "password2": "another long one"},
            "role": {"change": "role", "role": "viewer"}, "disable": {"change": "disable"}}[change]
    assert admin.post("/users/operator", form).status_code == 303
    assert operator.client.get("/api/v1/me").status_code == 401
    with web.sessions() as session:
        rows = session.execute(select(WebSession).join(User, User.id == WebSession.user_id)
                               .where(User.username == "operator")).all()
    assert rows == []
    assert admin.client.get("/api/v1/me").status_code == 200  # only the changed user's sessions end


def test_cookies_are_httponly_samesite_and_secure_when_configured(tmp_path: Path) -> None:
    for secure in (False, True):
        web = make_web_env(tmp_path / str(secure), **{"web.secure_cookies": secure})
        # Behind the TLS proxy that secure_cookies is for, the browser speaks https (it keeps Secure cookies from http).
        client = TestClient(web.app, base_url="https://testserver" if secure else "http://testserver",
                            follow_redirects=False)
        login_page = client.get("/login")
        csrf_cookie = login_page.headers["set-cookie"]
        assert f"{LOGIN_CSRF_COOKIE}=" in csrf_cookie and "HttpOnly" in csrf_cookie
        assert "SameSite=strict" in csrf_cookie and "Path=/login" in csrf_cookie
        answer = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                             "csrf_token": _CSRF_INPUT.search(login_page.text).group(1)})  # type: ignore[union-attr]
        session_cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
        assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie and "Path=/" in session_cookie
        assert ("Secure" in session_cookie) is secure and ("Secure" in csrf_cookie) is secure


def test_a_tampered_or_foreign_cookie_is_treated_as_anonymous(web: WebEnv, admin: LoggedIn, tmp_path: Path) -> None:
    good = admin.client.cookies[SESSION_COOKIE]
    token, signature = good.rsplit(".", 1)
    tampered = [f"{token}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}",  # signature changed
                f"{token[:-1]}{'x' if token[-1] != 'x' else 'y'}.{signature}",  # token changed
                token]  # signature dropped
    foreign_key = Signer(b"k" * 48, salt="dicom-node.session").sign(token).decode()  # another node's key
    for value in (*tampered, foreign_key):
        client = _with_cookie(web, value)
        assert client.get("/api/v1/me").status_code == 401, value
        page = client.get("/users")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/users"
    assert _with_cookie(web, good).get("/api/v1/me").status_code == 200


# --------------------------------------------------------------------------- login rate limiting


def test_login_is_rate_limited_per_user_even_with_the_right_password(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.login_max_failures": 3, "web.login_window_seconds": 600})
    now = [datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)]
    app = create_app(env.settings, sessions=env.sessions, clock=lambda: now[0])
    attacker = TestClient(app, follow_redirects=False, client=("198.51.100.7", 40000))
    for _ in range(3):
        assert _log_in(attacker, "operator", "wrong password") == 401
    blocked = attacker.post("/login", data={"username": "operator", "password": PASSWORD,
                                            "csrf_token": _login_form(attacker)})
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "600"
    assert "Too many failed logins" in blocked.text
    assert SESSION_COOKIE not in blocked.headers.get("set-cookie", "")
    # The user is protected from every address; another user from another address is not affected.
    elsewhere = TestClient(app, follow_redirects=False, client=("192.0.2.20", 40001))
    assert _log_in(elsewhere, "operator") == 429
    assert _log_in(elsewhere, "viewer") == 303
    [limited, *_] = audit.list_entries(env.sessions, action="login.rate_limited")
    assert limited.target == "operator" and limited.remote_addr == "192.0.2.20"
    assert len(audit.list_entries(env.sessions, action="login.rate_limited")) == 2
    assert len(audit.list_entries(env.sessions, action="login.failed")) == 3
    # Once the window has passed, the right password works again.
    now[0] += timedelta(seconds=601)
    assert _log_in(TestClient(app, follow_redirects=False), "operator") == 303


def test_login_is_rate_limited_per_address_across_user_names(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.login_max_failures": 1})
    spray = TestClient(env.app, follow_redirects=False, client=("203.0.113.9", 40000))
    for name in ("alice", "bob", "carol", "dave"):  # 4 x login_max_failures from one address
        assert _log_in(spray, name, "password123") == 401
    assert _log_in(spray, "admin") == 429
    assert _log_in(TestClient(env.app, follow_redirects=False, client=("192.0.2.1", 1)), "admin") == 303


# --------------------------------------------------------------------------- stored secrets


def test_passwords_are_argon2id_hashes_and_tokens_are_stored_hashed(web: WebEnv, admin: LoggedIn) -> None:
    admin.post("/users", {"username": "formuser", "role": "viewer", "password": "form password 1",
                          "password2": "form password 1"})
    token = web.token("viewer")
    with web.sessions() as session:
        hashes = dict(session.execute(select(User.username, User.password_hash)).all())
        stored_tokens = session.execute(select(ApiToken.token_hash, ApiToken.prefix)).all()
        session_hashes = session.execute(select(WebSession.token_hash)).scalars().all()
    assert set(hashes) == {"admin", "operator", "viewer", "formuser"}
    for name, value in hashes.items():
        assert value.startswith("$argon2id$"), name
        assert PASSWORD not in value and "form password 1" not in value
    assert all(token not in h and len(h) == 64 for h, _ in stored_tokens)
    assert token[:12] in {p for _, p in stored_tokens}
    cookie_token = admin.client.cookies[SESSION_COOKIE].rsplit(".", 1)[0]
    assert session_hashes and cookie_token not in session_hashes


def test_a_fresh_database_has_no_user_until_the_cli_creates_an_admin(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path, "storage.min_free_mb": 0})
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    app = create_app(settings, sessions=sessions)
    assert users.list_users(sessions) == []
    client = TestClient(app, follow_redirects=False)
    for name, password in (("admin", "admin"), ("admin", "password"), ("admin", "")):
        assert _log_in(client, name, password) == 401, (name, password)
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "users", "create", "chief", "--admin", "--password-stdin",
         "--data-dir", str(tmp_path)],
        input="first admin password\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _log_in(client, "chief", "first admin password") == 303
    assert client.get("/api/v1/me").json()["role"] == "admin"


# --------------------------------------------------------------------------- hostile input


def _no_raw_script(page: str, *, expect_escaped: bool = True) -> None:
    assert SCRIPT not in page and "<script>alert" not in page
    if expect_escaped:
        assert ESCAPED_SCRIPT in page


def test_hostile_user_names_are_refused_with_a_clear_message_and_shown_escaped(web: WebEnv, admin: LoggedIn) -> None:
    for hostile in (SCRIPT, SQL, HUGE):
        answer = admin.post("/users", {"username": hostile, "role": "viewer", "password": "long enough 1",
                                       "password2": "long enough 1"})
        assert answer.status_code == 422
        assert "must be 1-64 characters: letters, digits" in html.unescape(answer.text)
        _no_raw_script(answer.text, expect_escaped=hostile == SCRIPT)
        api = admin.send("POST", "/api/v1/users", json={"username": hostile, "password": "long enough 1"})
        assert api.status_code == 422 and api.json()["errors"][0]["field"] == "username"
        assert len(api.json()["errors"][0]["message"]) < 300  # a 10 kB input does not make a 10 kB message
    assert [u.username for u in users.list_users(web.sessions)] == ["admin", "operator", "viewer"]
    for path in ("/users?q=" + SCRIPT, "/tokens?user=" + SCRIPT):
        page = admin.client.get(path)
        assert page.status_code == 200
        _no_raw_script(page.text)
    missing = admin.client.get("/users/<script>alert(1)")  # in the path: the 404 page names it, escaped
    assert missing.status_code == 404 and "&lt;script&gt;alert(1)" in missing.text and "<script>alert" not in missing.text


def test_hostile_token_names_are_stored_verbatim_and_always_shown_escaped(web: WebEnv, admin: LoggedIn) -> None:
    created = admin.post("/tokens", {"username": "viewer", "name": SCRIPT})
    assert created.status_code == 201
    _no_raw_script(created.text)
    assert admin.post("/tokens", {"username": "viewer", "name": SQL}).status_code == 201
    api = admin.send("POST", "/api/v1/tokens", json={"username": "viewer", "name": SCRIPT + SQL})
    assert api.status_code == 201 and api.json()["name"] == SCRIPT + SQL
    huge = admin.post("/tokens", {"username": "viewer", "name": HUGE})
    assert huge.status_code == 422 and "the name must be 1-64 characters (it has 10240)" in huge.text
    assert admin.send("POST", "/api/v1/tokens", json={"username": "viewer", "name": HUGE}).status_code == 422

    assert [t.name for t in users.list_api_tokens(web.sessions)] == [SCRIPT, SQL, SCRIPT + SQL]
    for path in ("/tokens", "/users/viewer", "/audit", "/audit?text=" + SCRIPT.replace("<", "%3C")):
        page = admin.client.get(path)
        assert page.status_code == 200, path
        _no_raw_script(page.text)
        assert ESCAPED_SQL in page.text, path


def test_audit_filters_accept_any_text_and_echo_it_escaped(web: WebEnv, admin: LoggedIn) -> None:
    audit.record(web.sessions, at=datetime.now(timezone.utc), actor="cli", action="rule.update",
                 target_kind="rule", target=SCRIPT, detail=SQL, before={"x": SCRIPT}, after={"x": SQL})
    for hostile in (SCRIPT, SQL, HUGE):
        for name in ("actor", "action", "target_kind", "text"):
            page = admin.client.get("/audit", params={name: hostile})
            assert page.status_code == 200, (name, hostile[:20])
            assert SCRIPT not in page.text
            if hostile != HUGE:
                assert f'value="{escape(hostile)}"' in page.text, (name, hostile)
            api = admin.client.get("/api/v1/audit", params={name: hostile})
            assert api.status_code == 200
    found = admin.client.get("/api/v1/audit", params={"text": SQL}).json()
    assert found["total"] == 1 and found["entries"][0]["target"] == SCRIPT  # stored verbatim, found by text
    page = admin.client.get("/audit", params={"text": SQL})
    _no_raw_script(page.text)
    assert len(re.findall(r'<tr id="entry-', page.text)) == 1


# --------------------------------------------------------------------------- anonymous visitors


def test_anonymous_visitors_get_a_redirect_or_401_and_no_data(web: WebEnv) -> None:
    seeded = seed(web.sessions)
    client = web.client()
    gets = [p for m, p in app_routes(web.app) if m == "GET"]
    assert PUBLIC_GETS <= set(gets), PUBLIC_GETS - set(gets)
    for path in gets:
        url = seeded.fill(path)
        answer = client.get(url)
        for identifier in IDENTIFIERS:
            assert identifier not in answer.text, f"anonymous GET {url} shows {identifier}"
        if path in PUBLIC_GETS:
            assert answer.status_code in (200, 303), f"public {url}: {answer.status_code}"
            continue
        if path.startswith("/api/"):
            assert answer.status_code == 401, f"anonymous GET {url}: {answer.status_code}"
            assert answer.json() == {"detail": "authentication required: log in or send an API token"}
        else:
            assert answer.status_code == 303, f"anonymous GET {url}: {answer.status_code}"
            assert answer.headers["location"].startswith("/login?next=")
            assert answer.content == b""
    print(f"\nanonymous: {len(gets)} GET routes checked, {len(PUBLIC_GETS)} public")


# --------------------------------------------------------------------------- audit log in the database


def test_the_database_refuses_to_update_or_delete_audit_entries(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    entry_id = audit.record(sessions, at=datetime.now(timezone.utc), actor="admin", action="rule.delete",
                            target_kind="rule", target="r1", before={"name": "r1"})
    for statement in (f"UPDATE audit_log SET actor = 'mallory' WHERE id = {entry_id}",
                      f"DELETE FROM audit_log WHERE id = {entry_id}", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            with engine.begin() as connection:
                connection.execute(text(statement))
    with pytest.raises(DBAPIError, match="append-only"):
        with sessions.begin() as session:
            session.delete(session.get(AuditEntry, entry_id))
    [kept] = audit.list_entries(sessions)
    assert (kept.id, kept.actor, kept.before) == (entry_id, "admin", {"name": "r1"})
    engine.dispose()
