"""The permission matrix: every route of the app x every principal, against an explicit table.

The table below is the access policy written down independently of the code (viewer: read;
operator: + retry/cancel jobs, re-send deliveries and results, re-process studies, test connections; admin: + routing rules,
destinations, models, users, API tokens, audit log; worker: a GPU worker's account, which reads series over
DICOMweb and uploads results into the outbox, and nothing else; sender: a PACS's or script's account, which
pushes studies in by STOW-RS, and nothing else - operators and admins may push too). The test fails when the app has a route
the table lacks or the table names a route the app lacks, so a new route cannot ship without
someone deciding who may use it.

TO ADD A ROUTE: add ``("METHOD", "/path/{param}"): "worker" | "sender" | "viewer" | "operator" | "admin" |
"public"`` (or "worker-only": the worker role itself, no other; "any": anybody signed in, of any role)
to ``POLICY``. If its path parameter has a new name, teach ``Seeded.value`` in
``tests/web/security_support.py`` which seeded object to use (the CSRF test fails until then).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from dicom_node.db import audit, users
from dicom_node.db.models import Role
from dicom_node.ingest import utc_now
from dicom_node.web.passwords import hash_password
from tests.web.conftest import PASSWORD, ROLES, LoggedIn, WebEnv
from tests.web.security_support import STATE_CHANGING, app_routes, seed

W, S, V, O, A = "worker", "sender", "viewer", "operator", "admin"
#: Anybody signed in, whatever the role (``require(None)``).
ANY = "any"
#: The worker role itself and no other (``require(Role.WORKER, only=True)``): result uploads.
WORKER_ONLY = "worker-only"
#: "public": anybody, logged in or not. "login": the login form, which has its own CSRF check
#: (a post without the login-form cookie is refused with 403 for everybody, never redirected).
POLICY: dict[tuple[str, str], str] = {
    # login, monitoring, API docs (FastAPI's docs describe the API and hold no data: public by design)
    ("GET", "/login"): "public",
    ("POST", "/login"): "login",
    ("POST", "/logout"): V,
    ("GET", "/api/v1/me"): ANY,  # a GPU worker or a STOW-RS sender checks its token with it
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "public",
    ("GET", "/api/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/api/v1/openapi.json"): "public",
    # dashboard
    ("GET", "/"): V,
    ("GET", "/dashboard/live"): V,
    ("GET", "/api/v1/dashboard"): V,
    ("GET", "/api/v1/workers"): V,
    # studies, jobs, deliveries
    ("GET", "/studies"): V,
    ("GET", "/studies/{study_instance_uid}"): V,
    ("GET", "/studies/{study_instance_uid}/live"): V,
    ("GET", "/studies/{study_instance_uid}/preview.png"): V,
    ("GET", "/api/v1/studies"): V,
    ("GET", "/api/v1/studies/{study_instance_uid}"): V,
    ("GET", "/api/v1/studies/{study_instance_uid}/preview.png"): V,
    ("GET", "/api/v1/studies/{study_instance_uid}/record"): A,  # carries the study's audit entries
    ("GET", "/api/v1/jobs"): V,
    ("GET", "/api/v1/deliveries"): V,
    ("GET", "/api/v1/jobs/{job_id}"): V,
    ("GET", "/api/v1/jobs/{job_id}/preview.png"): V,
    ("GET", "/jobs/{job_id}/preview.png"): V,
    ("POST", "/jobs/{job_id}/retry"): O,
    ("POST", "/jobs/{job_id}/cancel"): O,
    ("POST", "/jobs/{job_id}/release"): O,
    ("POST", "/jobs/{job_id}/discard"): O,
    ("POST", "/deliveries/{delivery_id}/retry"): O,
    ("POST", "/api/v1/jobs/{job_id}/retry"): O,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): O,
    ("POST", "/api/v1/jobs/{job_id}/release"): O,
    ("POST", "/api/v1/jobs/{job_id}/discard"): O,
    ("POST", "/api/v1/deliveries/{delivery_id}/retry"): O,
    # re-send a study's results, re-process it (issue 24): operators, like the job actions
    ("GET", "/studies/{study_instance_uid}/resend"): O,
    ("POST", "/studies/{study_instance_uid}/resend"): O,
    ("POST", "/studies/{study_instance_uid}/reprocess"): O,
    ("POST", "/api/v1/studies/{study_instance_uid}/resend"): O,
    ("POST", "/api/v1/studies/{study_instance_uid}/reprocess"): O,
    # routing rules: read by all, changed by admins. Testing a rule (stored or draft) makes the node read
    # and evaluate a study on demand: admins, the role that edits rules (issue 20).
    ("GET", "/rules"): V,
    ("GET", "/rules/new"): A,
    ("POST", "/rules"): A,
    ("POST", "/rules/test"): A,  # the new-rule form's draft
    ("GET", "/rules/{name}"): V,
    ("POST", "/rules/{name}"): A,
    ("GET", "/rules/{name}/test"): A,  # the stored rule
    ("POST", "/rules/{name}/test"): A,  # the edit form's draft
    ("POST", "/rules/{name}/delete"): A,
    ("POST", "/rules/{name}/enable"): A,
    ("POST", "/rules/{name}/disable"): A,
    ("POST", "/rules/{name}/move"): A,
    ("GET", "/api/v1/rules"): V,
    ("POST", "/api/v1/rules"): A,
    ("PUT", "/api/v1/rules/order"): A,
    ("POST", "/api/v1/rules/test"): A,  # any definition, i.e. a draft
    ("GET", "/api/v1/rules/{name}"): V,
    ("PUT", "/api/v1/rules/{name}"): A,
    ("DELETE", "/api/v1/rules/{name}"): A,
    ("POST", "/api/v1/rules/{name}/test"): A,  # the stored rule
    # destinations: read by all, connection test by operators, changes by admins
    ("GET", "/destinations"): V,
    ("GET", "/destinations/new"): A,
    ("POST", "/destinations"): A,
    ("GET", "/destinations/{name}"): V,
    ("POST", "/destinations/{name}"): A,
    ("POST", "/destinations/{name}/delete"): A,
    ("POST", "/destinations/{name}/test"): O,
    ("POST", "/destinations/{name}/send-recent"): O,
    ("GET", "/api/v1/destinations"): V,
    ("POST", "/api/v1/destinations"): A,
    ("GET", "/api/v1/destinations/{name}"): V,
    ("PUT", "/api/v1/destinations/{name}"): A,
    ("DELETE", "/api/v1/destinations/{name}"): A,
    ("POST", "/api/v1/destinations/{name}/test"): O,
    ("POST", "/api/v1/destinations/{name}/send-recent"): O,
    # models
    ("GET", "/models"): V,
    ("GET", "/api/v1/models"): V,
    ("GET", "/api/v1/models/{model_id}"): V,
    ("POST", "/models/{model_id}/enable"): A,
    ("POST", "/models/{model_id}/disable"): A,
    ("PUT", "/api/v1/models/{model_id}"): A,
    # users, API tokens, audit log: admins only
    ("GET", "/users"): A,
    ("GET", "/users/new"): A,
    ("POST", "/users"): A,
    ("GET", "/users/{username}"): A,
    ("POST", "/users/{username}"): A,
    ("GET", "/tokens"): A,
    ("POST", "/tokens"): A,
    ("POST", "/tokens/{token_id}/revoke"): A,
    ("GET", "/api/v1/users"): A,
    ("POST", "/api/v1/users"): A,
    ("GET", "/api/v1/users/{username}"): A,
    ("PATCH", "/api/v1/users/{username}"): A,
    ("GET", "/api/v1/tokens"): A,
    ("POST", "/api/v1/tokens"): A,
    ("DELETE", "/api/v1/tokens/{token_id}"): A,
    ("GET", "/audit"): A,
    ("GET", "/api/v1/audit"): A,
    # DICOMweb reads (issue 26): GPU workers fetch their series; viewers read everything anyway
    ("GET", "/api/v1/dicomweb/studies"): W,
    ("GET", "/api/v1/dicomweb/series"): W,
    ("GET", "/api/v1/dicomweb/studies/{study_instance_uid}/series"): W,
    ("GET", "/api/v1/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}"): W,
    ("GET", "/api/v1/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/instances"): W,
    ("GET", "/api/v1/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"): W,
    # STOW-RS (issue 26): PACS and scripts push studies in; operators may too (it makes jobs run, as re-processing)
    ("POST", "/api/v1/dicomweb/studies"): S,
    ("POST", "/api/v1/dicomweb/studies/{study_instance_uid}"): S,
    # results uploaded by GPU workers into the node's outbox: worker accounts only (no person places results)
    ("PUT", "/api/v1/outbox/{path:path}"): WORKER_ONLY,
    ("DELETE", "/api/v1/outbox/{path:path}"): WORKER_ONLY,
}


@dataclass
class Principal:
    """Who sends a request: nobody, a browser session of a role, or an API token of a role."""

    label: str
    role: Role | None
    kind: str  # anonymous, session, bearer, bad-bearer
    session: LoggedIn | None = None
    token: str | None = None
    client: TestClient | None = None


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    requests: int = 0


def _expectation(least: str, principal: Principal, path: str) -> str:
    if least == "login":
        return "login-form"
    if least == "public":
        return "allowed"
    if principal.role is None:
        return "401" if path.startswith("/api/") else "to-login"
    if least == WORKER_ONLY:
        return "allowed" if principal.role is Role.WORKER else "403"
    if least == ANY:
        return "allowed"
    return "allowed" if Role(least).admits(principal.role) else "403"


def _verdict(answer: Any) -> str:
    location = answer.headers.get("location", "")
    if answer.status_code in (302, 303, 307) and location.startswith("/login?next="):
        return "to-login"  # what the app answers an anonymous page request (logout's plain /login is not)
    if answer.status_code == 401:
        return "401"
    if answer.status_code == 403:
        return "login-form" if "The login form expired" in answer.text else "403"
    return "allowed"


def test_policy_table_lists_exactly_the_apps_routes(web: WebEnv) -> None:
    served = set(app_routes(web.app))
    missing = sorted(served - set(POLICY), key=lambda mp: (mp[1], mp[0]))
    stale = sorted(set(POLICY) - served, key=lambda mp: (mp[1], mp[0]))
    assert not missing, f"routes without an entry in POLICY (decide their least role): {missing}"
    assert not stale, f"POLICY names routes the app does not have: {stale}"


def test_permission_matrix(web: WebEnv) -> None:
    seeded = seed(web.sessions)
    raw = TestClient(web.app, follow_redirects=False, raise_server_exceptions=False)
    principals = [Principal("anonymous", None, "anonymous", client=raw),
                  Principal("bad token", None, "bad-bearer", token="dnt_not-a-real-token", client=raw)]
    for role in ROLES:
        session = web.login(role.value)
        principals.append(Principal(f"{role.value} session", role, "session", session=session,
                                    client=_checked_client(web, session)))
    for role in ROLES:
        principals.append(Principal(f"{role.value} token", role, "bearer", token=web.token(role.value), client=raw))
    # A worker account has API tokens only (its login is refused: test_worker_accounts_cannot_log_in).
    users.create_user(web.sessions, "worker", hash_password(PASSWORD), Role.WORKER, now=utc_now())
    principals.append(Principal("worker token", Role.WORKER, "bearer", token=web.token("worker"), client=raw))
    users.create_user(web.sessions, "sender", hash_password(PASSWORD), Role.SENDER, now=utc_now())
    principals.append(Principal("sender token", Role.SENDER, "bearer", token=web.token("sender"), client=raw))

    routes = [r for r in app_routes(web.app) if r in POLICY]
    # Reads first, destructive requests last, so that fewer allowed requests meet an object already deleted.
    routes.sort(key=lambda mp: (mp[0] != "GET", mp[0] == "DELETE" or mp[1].endswith("/delete"), mp[1]))
    outcome = Outcome()
    for method, path in routes:
        url = seeded.fill(path)
        for principal in principals:
            if principal.kind in ("bearer", "bad-bearer") and not path.startswith("/api/"):
                continue
            _check(web, outcome, method, path, url, POLICY[(method, path)], principal)

    per_route = Counter(p for _, p in routes)
    print(f"\npermission matrix: {len(routes)} routes ({len(per_route)} paths) x {len(principals)} principals "
          f"(tokens only on /api routes) = {outcome.requests} requests; statuses {dict(sorted(outcome.statuses.items()))}")
    if outcome.not_found:
        print("allowed but 404 (object gone or never there; counted as allowed):\n  " + "\n  ".join(outcome.not_found))
    assert not outcome.failures, "permission matrix mismatches:\n" + "\n".join(outcome.failures)
    assert not outcome.crashes, "server errors:\n" + "\n".join(outcome.crashes)
    assert outcome.requests >= len(routes) * 5


def test_worker_accounts_cannot_log_in(web: WebEnv) -> None:
    """A GPU worker's account (and a STOW-RS sender's) proves itself with API tokens only: the login form refuses
    it, right password or not, and says so in the audit log; its token still works."""
    users.create_user(web.sessions, "gpu-1", hash_password(PASSWORD), Role.WORKER, now=utc_now())
    client = web.client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert token
    answer = client.post("/login", data={"username": "gpu-1", "password": PASSWORD, "csrf_token": token.group(1),
                                         "next": "/"}, follow_redirects=False)
    assert answer.status_code != 303 and "Wrong user name or password" in answer.text
    assert client.get("/api/v1/me").status_code == 401
    failed = [e for e in audit.list_entries(web.sessions) if e.action == "login.failed" and e.target == "gpu-1"]
    assert [e.detail for e in failed] == ["worker accounts use API tokens only"]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {web.token('gpu-1')}"})
    assert me.status_code == 200 and me.json()["role"] == "worker"
    users.create_user(web.sessions, "pacs-push", hash_password(PASSWORD), Role.SENDER, now=utc_now())
    answer = client.post("/login", data={"username": "pacs-push", "password": PASSWORD, "csrf_token": token.group(1),
                                         "next": "/"}, follow_redirects=False)
    assert answer.status_code != 303 and "Wrong user name or password" in answer.text
    failed = [e for e in audit.list_entries(web.sessions) if e.action == "login.failed" and e.target == "pacs-push"]
    assert [e.detail for e in failed] == ["sender accounts use API tokens only"]


def _checked_client(web: WebEnv, session: LoggedIn) -> TestClient:
    client = TestClient(web.app, follow_redirects=False, raise_server_exceptions=False)
    client.cookies = session.client.cookies
    return client


def _check(web: WebEnv, outcome: Outcome, method: str, path: str, url: str, least: str, who: Principal) -> None:
    headers: dict[str, str] = {}
    if who.kind in ("bearer", "bad-bearer"):
        headers["Authorization"] = f"Bearer {who.token}"
    if who.kind == "session" and method in STATE_CHANGING:
        assert who.session is not None
        headers["X-CSRF-Token"] = who.session.csrf
    assert who.client is not None
    answer = who.client.request(method, url, headers=headers)
    outcome.requests += 1
    outcome.statuses[answer.status_code] += 1
    expected, got = _expectation(least, who, path), _verdict(answer)
    if got != expected:
        outcome.failures.append(f"{method} {path} as {who.label}: expected {expected}, got {answer.status_code} "
                                f"{answer.headers.get('location', '')} {answer.text[:120]!r}")
    if answer.status_code >= 500:
        outcome.crashes.append(f"{method} {url} as {who.label}: {answer.status_code}")
    if got == "allowed" and answer.status_code == 404:
        outcome.not_found.append(f"{method} {url} as {who.label}")
    if who.kind == "session" and method in STATE_CHANGING and who.client.get("/api/v1/me").status_code == 401:
        assert who.role is not None  # this request ended the session (logout): log in again
        who.session = web.login(who.role.value)
        who.client = _checked_client(web, who.session)
