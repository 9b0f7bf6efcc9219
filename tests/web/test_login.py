"""Logging in and out through the real form, sessions and API tokens."""

from __future__ import annotations

from tests.web.conftest import WebEnv


def test_anonymous_page_redirects_to_login_and_api_says_401(web: WebEnv) -> None:
    client = web.client()
    page = client.get("/?view=today")
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/%3Fview%3Dtoday"
    api = client.get("/api/v1/me")
    assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer"


def test_login_sets_a_hardened_cookie_and_logout_ends_the_session(web: WebEnv) -> None:
    client = web.client()
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    answer = client.post("/login", data={"username": "admin", "password": "correct horse battery",
                                          "csrf_token": csrf, "next": "/studies"})
    assert answer.status_code == 303 and answer.headers["location"] == "/studies"
    cookie = answer.headers["set-cookie"]
    assert "dicom_node_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert client.get("/api/v1/me").json() == {"username": "admin", "role": "admin", "via": "session"}
    logged_in = web.login("admin")
    assert logged_in.post("/logout").status_code == 303
    assert logged_in.client.get("/api/v1/me").status_code == 401


def test_wrong_password_and_unknown_user_get_the_same_answer(web: WebEnv) -> None:
    client = web.client()
    csrf = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
    wrong = client.post("/login", data={"username": "admin", "password": "nope nope nope", "csrf_token": csrf})
    unknown = client.post("/login", data={"username": "mallory", "password": "nope nope nope", "csrf_token": csrf})
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong user name or password." in wrong.text and "Wrong user name or password." in unknown.text


def test_api_token_authenticates_without_csrf(web: WebEnv) -> None:
    token = web.token("operator")
    client = web.client()
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["via"] == "token"
    assert client.get("/api/v1/me", headers={"Authorization": "Bearer dnt_forged"}).status_code == 401


def test_unknown_page_gets_the_html_error_page_and_unknown_api_path_json(admin) -> None:  # type: ignore[no-untyped-def]
    page = admin.client.get("/no-such-page")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"] and "Not found" in page.text
    api = admin.client.get("/api/v1/no-such-thing")
    assert api.status_code == 404 and api.json() == {"detail": "Not Found"}
