"""Fixtures for the web app: a real database (SQLite, or PostgreSQL where a test asks), users of
every role, and logged-in HTTP clients that carry their session cookie and CSRF token."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import users
from dicom_node.db.models import Role
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.ingest import utc_now
from dicom_node.settings import Settings, load_settings
from dicom_node.web.app import create_app
from dicom_node.web.passwords import hash_password

PASSWORD = "correct horse battery"
ROLES = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class WebEnv:
    """A web app on a real database, and what tests need to talk to it."""

    app: FastAPI
    settings: Settings
    sessions: sessionmaker[Session]
    data_dir: Path

    def client(self) -> TestClient:
        return TestClient(self.app, base_url="http://testserver", follow_redirects=False)

    def login(self, username: str, password: str = PASSWORD) -> "LoggedIn":
        """A client logged in through the real login form; ``.csrf`` is its session's CSRF token."""
        client = self.client()
        page = client.get("/login")
        token = _CSRF_INPUT.search(page.text)
        assert token, "login page has no CSRF field"
        answer = client.post("/login", data={"username": username, "password": password,
                                              "csrf_token": token.group(1), "next": "/"})
        assert answer.status_code == 303, f"login of {username} failed: {answer.status_code} {answer.text[:300]}"
        home = client.get("/")
        csrf = _CSRF_INPUT.search(home.text)
        assert csrf, "logged-in page has no CSRF field"
        return LoggedIn(client, csrf.group(1))

    def token(self, username: str) -> str:
        return users.create_api_token(self.sessions, username, f"test-{username}", now=utc_now())[1]


@dataclass
class LoggedIn:
    client: TestClient
    csrf: str

    def post(self, url: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """POST a form with the session's CSRF token."""
        return self.client.post(url, data={**(data or {}), "csrf_token": self.csrf}, **kwargs)

    def send(self, method: str, url: str, **kwargs: Any) -> Any:
        """Any request with the CSRF header (JSON API calls from the browser)."""
        headers = {**kwargs.pop("headers", {}), "X-CSRF-Token": self.csrf}
        return self.client.request(method, url, headers=headers, **kwargs)


@functools.cache
def _password_hash() -> str:
    """One argon2 hash of PASSWORD per test session (each hash costs about 0.25 s)."""
    return hash_password(PASSWORD)


def make_web_env(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> WebEnv:
    values: dict[str, Any] = {"data_dir": tmp_path, "storage.min_free_mb": 0}
    if database_url:
        values["database_url"] = database_url
    values.update(overrides)
    settings = load_settings(None, values)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    for role in ROLES:
        users.create_user(sessions, role.value, _password_hash(), role, now=utc_now())
    return WebEnv(app=create_app(settings, sessions=sessions), settings=settings, sessions=sessions, data_dir=tmp_path)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebEnv]:
    """The web app on SQLite with the users viewer, operator and admin (password ``PASSWORD``)."""
    yield make_web_env(tmp_path)


@pytest.fixture
def admin(web: WebEnv) -> LoggedIn:
    return web.login("admin")


@pytest.fixture
def operator(web: WebEnv) -> LoggedIn:
    return web.login("operator")


@pytest.fixture
def viewer(web: WebEnv) -> LoggedIn:
    return web.login("viewer")
