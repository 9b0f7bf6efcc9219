"""The web app on a real uvicorn server (the node's own ``WebServer``), and logging in to it over HTTP.

Why: some behaviour lives in the server, not in the app - which peer address uvicorn
reports, whether it rewrites it from ``X-Forwarded-For`` - and some needs real
parallel requests (the login rate limit). ``TestClient`` shows neither.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from dicom_node.settings import WebTLSSettings
from dicom_node.web.auth import LOGIN_CSRF_COOKIE
from dicom_node.web.server import WebServer
from tests.integration.peers import free_port

_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


@contextmanager
def live_server(app: FastAPI, tls: WebTLSSettings | None = None) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 and a free port (HTTPS with ``tls``); yields its base URL."""
    port = free_port()
    server = WebServer(app, "127.0.0.1", port, name="test-web", tls=tls)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass(frozen=True)
class LoginForm:
    """What a browser holds after opening the login page: the signed CSRF cookie and the form's token."""

    base_url: str
    cookie: str
    token: str

    @classmethod
    def open(cls, base_url: str) -> "LoginForm":
        page = httpx.get(f"{base_url}/login", timeout=30)
        token = _CSRF_INPUT.search(page.text)
        assert page.status_code == 200 and token, f"no login form at {base_url}: {page.status_code}"
        return cls(base_url, page.cookies[LOGIN_CSRF_COOKIE], token.group(1))

    def submit(self, username: str, password: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST the login form (no redirect followed): 303 logged in, 401 wrong, 429 rate limited."""
        with httpx.Client(base_url=self.base_url, cookies={LOGIN_CSRF_COOKIE: self.cookie}, timeout=120,
                          follow_redirects=False) as client:
            return client.post("/login", headers=headers or {},
                               data={"username": username, "password": password, "csrf_token": self.token})
