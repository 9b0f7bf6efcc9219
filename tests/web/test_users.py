"""Users and API tokens: the admin pages and the REST API, against the real app and database."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from dicom_node.db import audit, users
from dicom_node.db.models import Role
from dicom_node.ingest import utc_now
from tests.web.conftest import PASSWORD, LoggedIn, WebEnv, make_web_env

NEW_PASSWORD = "a brand new passphrase"


def _csrf_of_login_page(client) -> str:  # type: ignore[no-untyped-def]
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]


def _can_log_in(web: WebEnv, username: str, password: str) -> bool:
    client = web.client()
    answer = client.post("/login", data={"username": username, "password": password,
                                          "csrf_token": _csrf_of_login_page(client)})
    return answer.status_code == 303


def _entries(web: WebEnv, action: str) -> list[audit.AuditView]:
    return audit.list_entries(web.sessions, action=action)


# --------------------------------------------------------------------------- users pages


def test_users_page_lists_every_user_with_role_state_and_times_and_filters(web: WebEnv, admin: LoggedIn) -> None:
    users.update_user(web.sessions, "viewer", now=utc_now(), disabled=True)
    page = admin.client.get("/users")
    assert page.status_code == 200
    rows = re.findall(r'<tr>\s*<td><a href="/users/([^"]+)">', page.text)
    assert rows == ["admin", "operator", "viewer"]
    assert '<span class="badge disabled">disabled</span>' in page.text
    assert page.text.count('<span class="badge enabled">enabled</span>') == 2
    assert "(you)" in page.text  # the admin sees which row is theirs
    # admin logged in just now: a last-login time is shown; operator never did: '-'
    admin_row = page.text.split('href="/users/admin"')[1].split("</tr>")[0]
    operator_row = page.text.split('href="/users/operator"')[1].split("</tr>")[0]
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</td>\s*</tr>|<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</td>\s*$",
                     admin_row.strip())
    assert operator_row.strip().endswith("<td>-</td>")

    only_disabled = admin.client.get("/users?state=disabled").text
    assert re.findall(r'<td><a href="/users/([^"]+)">', only_disabled) == ["viewer"]
    only_ops = admin.client.get("/users?role=operator").text
    assert re.findall(r'<td><a href="/users/([^"]+)">', only_ops) == ["operator"]
    nothing = admin.client.get("/users?q=nobody-like-this").text
    assert "No user matches these filters" in nothing


def test_create_user_through_the_form_hashes_the_password_and_audits_without_it(web: WebEnv, admin: LoggedIn) -> None:
    assert admin.client.get("/users/new").status_code == 200
    answer = admin.post("/users", {"username": "dr.who@site-1", "role": "operator", "password": NEW_PASSWORD,
                                   "password2": NEW_PASSWORD})
    assert answer.status_code == 303 and answer.headers["location"] == "/users/dr.who@site-1?done=created"
    detail = admin.client.get(answer.headers["location"])
    assert detail.status_code == 200 and "User created." in detail.text
    stored = users.password_hash_of(web.sessions, "dr.who@site-1")
    assert stored is not None and stored[0].role is Role.OPERATOR and stored[1].startswith("$argon2id$")
    assert _can_log_in(web, "dr.who@site-1", NEW_PASSWORD)
    [entry] = _entries(web, "user.create")
    assert entry.actor == "admin" and entry.target == "dr.who@site-1" and entry.target_kind == "user"
    assert entry.after["role"] == "operator" and entry.after["disabled"] is False
    assert "password" not in str(entry.after) and "argon2" not in str(entry.after)
    assert entry.remote_addr == "testclient"


_BAD_USER_FORMS = [
    ({"username": "bad name!", "password": NEW_PASSWORD, "password2": NEW_PASSWORD}, 422, "username",
     "must be 1-64 characters: letters, digits"),
    ({"username": "admin\n", "password": NEW_PASSWORD, "password2": NEW_PASSWORD}, 422, "username",
     "must be 1-64 characters"),
    ({"username": "new", "password": NEW_PASSWORD, "password2": NEW_PASSWORD}, 422, "username", "is reserved"),
    ({"username": "carol", "password": "short", "password2": "short"}, 422, "password",
     "password must have at least 10 characters"),
    ({"username": "carol", "password": NEW_PASSWORD, "password2": NEW_PASSWORD + "x"}, 422, "password2",
     "the two passwords differ"),
    ({"username": "carol", "role": "root", "password": NEW_PASSWORD, "password2": NEW_PASSWORD}, 422, "role",
     "is not one of worker, sender, viewer, operator, admin"),
    ({"username": "operator", "password": NEW_PASSWORD, "password2": NEW_PASSWORD}, 409, "username",
     "already exists"),
]


def test_create_user_form_shows_what_is_wrong_next_to_the_field(web: WebEnv, admin: LoggedIn) -> None:
    for form, status, field, message in _BAD_USER_FORMS:
        answer = admin.post("/users", {"role": "viewer", **form})
        assert answer.status_code == status, form
        text = answer.text.replace("&#39;", "'")
        assert message in text, form
        # the message sits in the field's label, which is marked invalid
        label = text.split(f'name="{field}"')[0].rsplit("<label", 1)[1]
        assert 'class="invalid"' in label, form
        assert users.get_user(web.sessions, form["username"]) is None or form["username"] == "operator"
    assert _entries(web, "user.create") == []


def test_role_change_disable_enable_and_password_reset_end_the_users_sessions(web: WebEnv, admin: LoggedIn) -> None:
    operator = web.login("operator")
    answer = admin.post("/users/operator", {"change": "role", "role": "viewer"})
    assert answer.status_code == 303 and answer.headers["location"] == "/users/operator?done=role"
    assert users.get_user(web.sessions, "operator").role is Role.VIEWER  # type: ignore[union-attr]
    assert operator.client.get("/api/v1/me").status_code == 401

    operator = web.login("operator")
    assert admin.post("/users/operator", {"change": "disable"}).headers["location"] == "/users/operator?done=disable"
    assert operator.client.get("/api/v1/me").status_code == 401
    assert not _can_log_in(web, "operator", PASSWORD)
    assert "badge disabled" in admin.client.get("/users/operator").text
    assert admin.post("/users/operator", {"change": "enable"}).headers["location"] == "/users/operator?done=enable"

    operator = web.login("operator")
    short = admin.post("/users/operator", {"change": "password", "password": "short", "password2": "short"})
    assert short.status_code == 422 and "at least 10 characters" in short.text
    assert operator.client.get("/api/v1/me").status_code == 200  # a refused change ends nothing
    reset = admin.post("/users/operator", {"change": "password", "password": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert reset.headers["location"] == "/users/operator?done=password"
    assert operator.client.get("/api/v1/me").status_code == 401
    assert _can_log_in(web, "operator", NEW_PASSWORD) and not _can_log_in(web, "operator", PASSWORD)

    updates = list(reversed(_entries(web, "user.update")))
    assert [(e.before.get("role"), e.after.get("role"), e.before["disabled"], e.after["disabled"], e.detail)
            for e in updates] == [
        ("operator", "viewer", False, False, None),
        ("viewer", "viewer", False, True, None),
        ("viewer", "viewer", True, False, None),
        ("viewer", "viewer", False, False, "password reset"),
    ]
    for entry in updates:
        assert "argon2" not in str(entry.before) + str(entry.after) and "password_hash" not in str(entry.after)

    same = admin.post("/users/operator", {"change": "role", "role": "viewer"})
    assert same.headers["location"] == "/users/operator?done=unchanged"
    assert len(_entries(web, "user.update")) == 4  # nothing changed, nothing audited


def test_the_last_enabled_admin_cannot_disable_or_demote_themselves(web: WebEnv, admin: LoggedIn) -> None:
    for form in ({"change": "disable"}, {"change": "role", "role": "operator"}):
        answer = admin.post("/users/admin", form)
        assert answer.status_code == 409
        assert "is the last enabled admin" in answer.text.replace("&#39;", "'")
    assert users.get_user(web.sessions, "admin").role is Role.ADMIN  # type: ignore[union-attr]
    assert admin.client.get("/api/v1/me").status_code == 200  # still logged in: nothing happened
    api = admin.send("PATCH", "/api/v1/users/admin", json={"disabled": True})
    assert api.status_code == 409 and "last enabled admin" in api.json()["detail"]
    assert _entries(web, "user.update") == []

    # With a second admin it is allowed, and demoting yourself sends you to the login page.
    users.update_user(web.sessions, "operator", now=utc_now(), role=Role.ADMIN)
    answer = admin.post("/users/admin", {"change": "role", "role": "viewer"})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert users.get_user(web.sessions, "admin").role is Role.VIEWER  # type: ignore[union-attr]
    # ...and now operator is the last admin: the same rule protects them.
    with pytest.raises(users.LastAdmin):
        users.update_user(web.sessions, "operator", now=utc_now(), disabled=True)


def test_unknown_user_page_is_404(admin: LoggedIn) -> None:
    assert admin.client.get("/users/nobody").status_code == 404
    assert admin.post("/users/nobody", {"change": "disable"}).status_code == 404
    assert admin.post("/users/viewer", {"change": "explode"}).status_code == 422


# --------------------------------------------------------------------------- users API


def test_users_api_create_get_list_and_patch(web: WebEnv) -> None:
    client = web.client()
    auth = {"Authorization": f"Bearer {web.token('admin')}"}
    created = client.post("/api/v1/users", headers=auth,
                          json={"username": "robot", "role": "operator", "password": NEW_PASSWORD})
    assert created.status_code == 201
    body = created.json()
    assert body["username"] == "robot" and body["role"] == "operator" and body["disabled"] is False
    assert "password" not in body and "password_hash" not in body

    assert client.get("/api/v1/users/robot", headers=auth).json()["role"] == "operator"
    assert client.get("/api/v1/users/ghost", headers=auth).status_code == 404
    names = [u["username"] for u in client.get("/api/v1/users", headers=auth).json()]
    assert names == ["admin", "operator", "robot", "viewer"]
    ops = client.get("/api/v1/users?role=operator", headers=auth).json()
    assert [u["username"] for u in ops] == ["operator", "robot"]

    taken = client.post("/api/v1/users", headers=auth, json={"username": "robot", "password": NEW_PASSWORD})
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]
    bad = client.post("/api/v1/users", headers=auth, json={"username": "x y", "password": "short"})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"username", "password"}
    unknown_field = client.post("/api/v1/users", headers=auth,
                                json={"username": "z", "password": NEW_PASSWORD, "password_hash": "$argon2id$x"})
    assert unknown_field.status_code == 422  # no way to smuggle a hash in

    patched = client.patch("/api/v1/users/robot", headers=auth, json={"role": "viewer", "disabled": True})
    assert patched.status_code == 200 and patched.json()["role"] == "viewer" and patched.json()["disabled"] is True
    assert client.patch("/api/v1/users/ghost", headers=auth, json={"disabled": True}).status_code == 404
    bad_role = client.patch("/api/v1/users/robot", headers=auth, json={"role": "root"})
    assert bad_role.status_code == 422 and bad_role.json()["errors"][0]["field"] == "role"

    actions = [(e.action, e.actor, e.detail) for e in audit.list_entries(web.sessions, action="user.")]
    assert actions == [("user.update", "admin", "(API token)"), ("user.create", "admin", "(API token)")]


# --------------------------------------------------------------------------- API tokens


def test_token_created_on_the_page_is_shown_once_and_works_until_revoked(web: WebEnv, admin: LoggedIn) -> None:
    created = admin.post("/tokens", {"username": "operator", "name": "nightly export", "expires_days": "30"})
    assert created.status_code == 201
    token = re.search(r'id="new-token"[^>]*value="(dnt_[^"]+)"', created.text)
    assert token, "the new token is not in a copy-friendly field"
    secret = token.group(1)
    assert 'data-copy="new-token"' in created.text and "shown only this once" in created.text

    client = web.client()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert me.json() == {"username": "operator", "role": "operator", "via": "token"}

    listing = admin.client.get("/tokens")
    assert secret not in listing.text and secret[:12] in listing.text  # only the prefix is ever shown again
    [view] = users.list_api_tokens(web.sessions)
    row = listing.text.split(f"<td class=\"num\">{view.id}</td>")[1].split("</tr>")[0]
    assert "nightly export" in row and "badge active" in row and re.search(r"\d{4}-\d\d-\d\d", row)
    assert view.expires_at is not None and timedelta(days=29.9) < view.expires_at - view.created_at < timedelta(days=30.1)
    assert view.last_used_at is not None  # the call above used it

    revoked = admin.post(f"/tokens/{view.id}/revoke")
    assert revoked.status_code == 303 and revoked.headers["location"] == "/tokens?done=revoked"
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert "badge revoked" in admin.client.get("/tokens?state=revoked").text
    assert "No token matches" in admin.client.get("/tokens?state=active").text
    assert admin.post("/tokens/999/revoke").status_code == 404

    [made] = _entries(web, "token.create")
    assert made.after["user"] == "operator" and made.after["name"] == "nightly export"
    assert secret not in str(made.after) and made.after["prefix"] == secret[:12]
    [gone] = _entries(web, "token.revoke")
    assert gone.before["revoked_at"] is None and gone.after["revoked_at"] is not None
    admin.post(f"/tokens/{view.id}/revoke")
    assert len(_entries(web, "token.revoke")) == 1  # revoking again changes (and audits) nothing


def test_token_form_refuses_bad_input_with_field_messages(web: WebEnv, admin: LoggedIn) -> None:
    cases = [
        ({"username": "operator", "name": "", "expires_days": ""}, 422, "the name must be 1-64 characters"),
        ({"username": "operator", "name": "x" * 65, "expires_days": ""}, 422, "the name must be 1-64 characters"),
        ({"username": "operator", "name": "ok", "expires_days": "soon"}, 422, "is not a number of days"),
        ({"username": "operator", "name": "ok", "expires_days": "-1"}, 422, "expiry must be more than 0"),
        ({"username": "ghost", "name": "ok", "expires_days": ""}, 422, "no user"),
    ]
    for form, status, message in cases:
        answer = admin.post("/tokens", form)
        assert answer.status_code == status, form
        assert message in answer.text and "field-error" in answer.text, form
    users.update_user(web.sessions, "viewer", now=utc_now(), disabled=True)
    disabled = admin.post("/tokens", {"username": "viewer", "name": "ok"})
    assert disabled.status_code == 409 and "is disabled" in disabled.text.replace("&#39;", "'")
    assert users.list_api_tokens(web.sessions) == [] and _entries(web, "token.create") == []


def test_tokens_api_create_list_revoke_and_expiry(web: WebEnv) -> None:
    client = web.client()
    auth = {"Authorization": f"Bearer {web.token('admin')}"}
    created = client.post("/api/v1/tokens", headers=auth, json={"username": "viewer", "name": "dashboards",
                                                                 "expires_days": 7})
    assert created.status_code == 201
    body = created.json()
    assert body["token"].startswith("dnt_") and body["prefix"] == body["token"][:12] and body["state"] == "active"
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['token']}"}).status_code == 200

    # An expired token (made directly in the database) is listed as expired and refused.
    _, old = users.create_api_token(web.sessions, "viewer", "old", now=utc_now() - timedelta(days=10),
                                    expires_at=utc_now() - timedelta(days=1))
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    listed = client.get("/api/v1/tokens?username=viewer", headers=auth).json()
    assert [(t["name"], t["state"]) for t in listed] == [("dashboards", "active"), ("old", "expired")]
    assert all("token" not in t for t in listed)
    assert [t["name"] for t in client.get("/api/v1/tokens?state=expired", headers=auth).json()] == ["old"]

    assert client.delete(f"/api/v1/tokens/{body['id']}", headers=auth).status_code == 204
    assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {body['token']}"}).status_code == 401
    assert client.delete("/api/v1/tokens/4242", headers=auth).status_code == 404
    bad = client.post("/api/v1/tokens", headers=auth, json={"username": "nobody", "name": "", "expires_days": 0})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"username", "name", "expires_days"}


def test_disabling_a_user_stops_their_tokens_and_enabling_restores_them(web: WebEnv, admin: LoggedIn) -> None:
    token = web.token("operator")
    client = web.client()
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    admin.post("/users/operator", {"change": "disable"})
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    admin.post("/users/operator", {"change": "enable"})
    assert client.get("/api/v1/me", headers=headers).status_code == 200


def test_user_detail_page_shows_their_tokens_and_history(web: WebEnv, admin: LoggedIn) -> None:
    admin.post("/tokens", {"username": "viewer", "name": "kiosk"})
    admin.post("/users/viewer", {"change": "role", "role": "operator"})
    page = admin.client.get("/users/viewer")
    assert "kiosk" in page.text and 'action="/tokens/1/revoke"' in page.text
    assert "user.update" in page.text  # history from the audit log
    revoke = admin.post("/tokens/1/revoke", {"back": "user"})
    assert revoke.headers["location"] == "/users/viewer?done=revoked"


def test_users_work_on_postgresql_too(tmp_path, database_url: str) -> None:  # type: ignore[no-untyped-def]
    web = make_web_env(tmp_path, database_url)
    admin = web.login("admin")
    assert admin.post("/users", {"username": "pg-user", "role": "viewer", "password": NEW_PASSWORD,
                                 "password2": NEW_PASSWORD}).status_code == 303
    assert admin.post("/users/admin", {"change": "disable"}).status_code == 409
    assert admin.post("/tokens", {"username": "pg-user", "name": "t" * 64}).status_code == 201
    assert [t.name for t in users.list_api_tokens(web.sessions, state="active", now=utc_now())] == ["t" * 64]
