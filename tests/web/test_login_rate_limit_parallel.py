"""The login rate limit holds under parallel attempts: a burst of wrong passwords sent at once gets at most
``limit`` password checks; the rest are answered 429 without one.

Real parallel HTTP requests (threads released together by a barrier) against the app on
a real uvicorn server and a real database (SQLite and PostgreSQL). The checks are counted
through the app's own seam, ``create_app(verify_password=...)``, wrapping the real argon2
verifier (whose ~0.25 s per check is what gave a burst time to slip past a count-then-record
limit: 30 parallel attempts used to be checked 17 times against a limit of 5).
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicom_node.db import audit
from dicom_node.web.app import create_app
from dicom_node.web.passwords import verify_password
from tests.web.conftest import make_web_env
from tests.web.live_server import LoginForm, live_server

ATTEMPTS = 30


class CountingVerifier:
    """The real password check, counting how often it runs (from any thread)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, password_hash: str | None, password: str) -> bool:
        with self._lock:
            self.calls += 1
        return verify_password(password_hash, password)


@pytest.mark.parametrize(("spread", "max_failures", "checks"), [
    ("one user name", 5, 5),            # limit: login_max_failures per user name
    ("one address", 2, 8),              # limit: 4 x login_max_failures per address, across user names
])
def test_a_parallel_burst_of_wrong_passwords_is_checked_at_most_limit_times(
    tmp_path: Path, database_url: str, spread: str, max_failures: int, checks: int
) -> None:
    env = make_web_env(tmp_path, database_url, **{"web.login_max_failures": max_failures,
                                                  "web.login_window_seconds": 600})
    verifier = CountingVerifier()
    app = create_app(env.settings, sessions=env.sessions, verify_password=verifier)
    names = ["operator"] * ATTEMPTS if spread == "one user name" else [f"guess-{i}" for i in range(ATTEMPTS)]
    with live_server(app) as base_url:
        form = LoginForm.open(base_url)
        start = threading.Barrier(ATTEMPTS)

        def attempt(name: str) -> int:
            start.wait(timeout=60)
            return form.submit(name, "wrong password!").status_code

        with ThreadPoolExecutor(ATTEMPTS) as pool:
            statuses = Counter(pool.map(attempt, names))
        burst_checks = verifier.calls
        # Attempts racing each other may count one another as failures (never fewer than there are), so a burst
        # can get fewer than `checks`; afterwards, one at a time, exactly the rest of the allowance is checked.
        later = [form.submit(names[0] if spread == "one user name" else f"later-{i}", "wrong password!").status_code
                 for i in range(checks + 1)]
        right = form.submit("operator" if spread == "one user name" else "admin", "correct horse battery")

    assert burst_checks <= checks, f"{spread}: {burst_checks} password checks in a burst, limit {checks}"
    assert statuses == Counter({401: burst_checks, 429: ATTEMPTS - burst_checks}), statuses
    assert later == [401] * (checks - burst_checks) + [429] * (burst_checks + 1), later
    assert right.status_code == 429, "the right password is refused too while the limit holds"
    assert verifier.calls == checks
    assert len(audit.list_entries(env.sessions, action="login.failed")) == checks
    assert len(audit.list_entries(env.sessions, action="login.rate_limited")) == ATTEMPTS + 2
