"""Which address the app records and rate-limits: X-Forwarded-For is believed only from web.trusted_proxies.

The app runs on the node's real uvicorn server (``WebServer``): before, uvicorn itself
rewrote the peer from ``X-Forwarded-For`` for connections from 127.0.0.1, so anyone who
could reach the port through a local hop picked a fresh address for every login guess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from dicom_node.db import audit
from dicom_node.db.models import WebSession
from dicom_node.settings import load_settings
from dicom_node.web.client_address import TrustedProxies, forwarded_client
from tests.web.conftest import PASSWORD, make_web_env
from tests.web.live_server import LoginForm, live_server

PROXIES = TrustedProxies(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"])


@pytest.mark.parametrize(("peer", "headers", "client"), [
    ("203.0.113.5", ["198.51.100.9"], "203.0.113.5"),  # not a proxy: the header is ignored
    ("192.0.2.1", [], "192.0.2.1"),  # a proxy without the header is the client
    ("192.0.2.1", ["198.51.100.9"], "198.51.100.9"),
    ("192.0.2.1", ["6.6.6.6, 198.51.100.9"], "198.51.100.9"),  # left of the first untrusted hop: forgeable
    ("192.0.2.1", ["198.51.100.9, 10.1.2.3", "10.9.9.9"], "198.51.100.9"),  # a chain of proxies, two headers
    ("192.0.2.1", ["10.1.2.3, 10.9.9.9"], "10.1.2.3"),  # nothing but proxies: the farthest one
    ("192.0.2.1", ["198.51.100.9, unknown"], "192.0.2.1"),  # garbage stops the walk at the proxy that sent it
    ("192.0.2.1", ["198.51.100.9:4711"], "198.51.100.9"),  # with a port
    ("192.0.2.1", ['"[2001:db9::7]:443"'], "2001:db9::7"),
    ("::ffff:192.0.2.1", ["198.51.100.9"], "198.51.100.9"),  # IPv4-mapped peer
    ("2001:db8::5", ["2001:db9::7"], "2001:db9::7"),
    ("testclient", ["198.51.100.9"], "testclient"),  # not an address at all: kept, never trusted
    (None, ["198.51.100.9"], None),
])
def test_forwarded_client(peer: str | None, headers: list[str], client: str | None) -> None:
    assert forwarded_client(peer, headers, PROXIES) == client


def test_no_trusted_proxies_means_the_header_is_never_read() -> None:
    assert forwarded_client("127.0.0.1", ["198.51.100.9"], TrustedProxies([])) == "127.0.0.1"


def test_a_trusted_proxy_that_is_not_an_address_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match="web.trusted_proxies entry 'proxy.example' is not an IP address"):
        load_settings(None, {"web.trusted_proxies": ["10.0.0.1", "proxy.example"]})
    assert load_settings(None, {"web.trusted_proxies": [" 10.0.0.0/8 "]}).web.trusted_proxies == ["10.0.0.0/8"]


def test_a_forged_x_forwarded_for_neither_escapes_the_rate_limit_nor_reaches_the_audit_log(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.login_max_failures": 1})  # 4 failures per address, across user names
    with live_server(env.app) as base_url:
        form = LoginForm.open(base_url)
        statuses = [form.submit(f"guess-{i}", "wrong password!", {"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                    for i in range(1, 7)]
    assert statuses == [401] * 4 + [429] * 2
    failed = audit.list_entries(env.sessions, action="login.failed")
    assert {e.remote_addr for e in failed} == {"127.0.0.1"}


def test_behind_a_trusted_proxy_the_forwarded_client_is_recorded_and_limited(tmp_path: Path) -> None:
    env = make_web_env(tmp_path, **{"web.login_max_failures": 2, "web.trusted_proxies": ["127.0.0.1"]})
    alice = {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}  # the left part was written by the client: ignored
    bob = {"X-Forwarded-For": "198.51.100.8"}
    with live_server(env.app) as base_url:
        form = LoginForm.open(base_url)
        spray = [form.submit(f"guess-{i}", "wrong password!", alice).status_code for i in range(9)]
        other = form.submit("viewer", PASSWORD, bob)
    assert spray == [401] * 8 + [429]  # 4 x login_max_failures from one forwarded address
    assert other.status_code == 303, "another client behind the same proxy is not limited"
    assert {e.remote_addr for e in audit.list_entries(env.sessions, action="login.failed")} == {"198.51.100.7"}
    [login] = [e for e in audit.list_entries(env.sessions, action="login") if e.action == "login"]
    assert login.actor == "viewer" and login.remote_addr == "198.51.100.8"
    with env.sessions() as session:
        assert session.scalars(select(WebSession.remote_addr)).all() == ["198.51.100.8"]
