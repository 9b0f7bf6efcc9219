"""The audit log page and API: newest first, filters, paging, before/after diffs, read-only."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone

from fastapi.routing import iter_route_contexts

from dicom_node.db import audit
from dicom_node.web.routes.audit_log import PAGE_SIZE, DiffRow, diff_rows
from tests.web.conftest import LoggedIn, WebEnv

DAY1 = datetime(2026, 5, 1, 9, 30, tzinfo=timezone.utc)
DAY2 = datetime(2026, 5, 2, 23, 59, tzinfo=timezone.utc)
DAY3 = datetime(2026, 5, 3, 0, 0, tzinfo=timezone.utc)


def _seed(web: WebEnv) -> tuple[int, int, int]:
    """Three entries on three days: (rule.create, rule.update, destination.test) ids."""
    record = audit.record
    create = record(web.sessions, at=DAY1, actor="alice", action="rule.create", target_kind="rule", target="ct-chest",
           after={"name": "ct-chest", "pipeline": "lung"}, remote_addr="10.0.0.1")
    update = record(web.sessions, at=DAY2, actor="bob", action="rule.update", target_kind="rule", target="ct-chest",
           before={"name": "ct-chest", "pipeline": "lung", "when": {"modality": "CT", "body_part": "CHEST"}},
           after={"name": "ct-chest", "pipeline": "lung-v2", "when": {"modality": "CT", "body_part": "CHEST"},
                  "priority": 5},
           remote_addr="10.0.0.2")
    test = record(web.sessions, at=DAY3, actor="alice", action="destination.test", target_kind="destination",
                  target="pacs", detail="C-ECHO 100% ok_now")
    return create, update, test


def _entry_ids(page_html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr id="entry-(\d+)">', page_html)]


def test_page_shows_entries_newest_first_with_who_when_what_target_and_address(web: WebEnv, admin: LoggedIn) -> None:
    create, update, _ = _seed(web)
    page = admin.client.get("/audit")
    assert page.status_code == 200
    ids = _entry_ids(page.text)
    assert ids == sorted(ids, reverse=True) and len(ids) == 4  # the seeds and admin's login
    row = page.text.split(f'<tr id="entry-{update}">')[1].split(f'<tr id="entry-{create}">')[0]
    for shown in ("2026-05-02 23:59:00", "bob", "rule.update", "ct-chest", "10.0.0.2"):
        assert shown in row, shown


def test_changed_keys_are_highlighted_side_by_side(web: WebEnv, admin: LoggedIn) -> None:
    _, update, _ = _seed(web)
    row = admin.client.get("/audit").text.split(f'<tr id="entry-{update}">')[1].split("</details>")[0]
    cells = re.findall(r'<tr class="(changed|same)">\s*<td class="mono">([^<]*)</td>\s*'
                       r'<td><pre class="before">([^<]*)</pre></td>\s*<td><pre class="after">([^<]*)</pre></td>', row)
    assert cells == [
        ("same", "name", "ct-chest", "ct-chest"),
        ("changed", "pipeline", "lung", "lung-v2"),
        ("changed", "priority", "", "5"),
        ("same", "when.body_part", "CHEST", "CHEST"),
        ("same", "when.modality", "CT", "CT"),
    ]
    assert "2 changed of 5" in row


def test_diff_rows_flattens_objects_and_handles_plain_values() -> None:
    assert diff_rows(None, None) == []
    assert diff_rows(None, {"a": 1}) == [DiffRow("a", "", "1", True)]
    assert diff_rows({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2]}, "c": None}) == [
        DiffRow("a.b", "[\n  1,\n  2\n]", "[\n  1,\n  2\n]", False), DiffRow("c", "", "null", True)]
    assert diff_rows([1], [2]) == [DiffRow("", "[\n  1\n]", "[\n  2\n]", True)]
    assert diff_rows("x", "x") == [DiffRow("", "x", "x", False)]


def test_page_filters_by_actor_action_prefix_kind_text_and_days(web: WebEnv, admin: LoggedIn) -> None:
    create, update, test = _seed(web)
    login = 1  # the admin fixture's login

    def ids(query: str) -> list[int]:
        answer = admin.client.get("/audit?" + query)
        assert answer.status_code == 200, answer.text
        return _entry_ids(answer.text)

    assert ids("actor=alice") == [test, create]
    assert ids("action=rule.") == [update, create]
    assert ids("action=rule.update") == [update]
    assert ids("action=%25") == []  # a '%' is matched literally, not as a wildcard
    assert ids("target_kind=destination") == [test]
    assert ids("text=LUNG-V2") == [update]  # in the after JSON, case-insensitive
    assert ids("text=100%25 ok_") == [test]  # '%' and '_' literally
    assert ids("text=100_") == []
    assert ids("since=2026-05-02&until=2026-05-03") == [test, update]
    assert ids("until=2026-05-02") == [update, create]  # the whole day, 23:59 included
    assert ids("since=2026-05-02&until=2026-05-02") == [update]
    assert ids("actor=alice&target_kind=rule") == [create]
    assert ids("actor=admin&action=login") == [login]
    empty = admin.client.get("/audit?actor=nobody")
    assert "No entry matches these filters" in empty.text and 'value="nobody"' in empty.text

    bad = admin.client.get("/audit?since=yesterday")
    assert bad.status_code == 422 and "is not a date (YYYY-MM-DD)" in html.unescape(bad.text)
    assert _entry_ids(bad.text) == []


def test_page_is_paged_and_the_links_keep_the_filters(web: WebEnv, admin: LoggedIn) -> None:
    for n in range(PAGE_SIZE * 2 + 7):
        audit.record(web.sessions, at=DAY1 + timedelta(minutes=n), actor="cli", action="job.retry",
                     target_kind="job", target=str(n))
    first = admin.client.get("/audit?action=job.")
    assert len(_entry_ids(first.text)) == PAGE_SIZE and "page 1 of 3" in first.text
    assert 'href="/audit?action=job.&amp;page=2"' in first.text
    last = admin.client.get("/audit?action=job.&page=3")
    assert len(_entry_ids(last.text)) == 7 and "Newer" in last.text and "Older" not in last.text
    assert min(_entry_ids(last.text)) == min(_entry_ids(admin.client.get("/audit?action=job.&page=99").text))


def test_api_has_the_same_filters_and_returns_json_values(web: WebEnv, admin: LoggedIn) -> None:
    create, update, test = _seed(web)
    client = web.client()
    auth = {"Authorization": f"Bearer {web.token('admin')}"}
    everything = client.get("/api/v1/audit", headers=auth).json()
    assert everything["total"] == 4 and [e["id"] for e in everything["entries"]] == [test, update, create, 1]
    changed = client.get("/api/v1/audit?action=rule.update", headers=auth).json()["entries"][0]
    assert changed["before"]["when"] == {"modality": "CT", "body_part": "CHEST"} and changed["after"]["priority"] == 5
    assert changed["remote_addr"] == "10.0.0.2" and changed["at"].startswith("2026-05-02T23:59:00")

    def ids(query: str) -> list[int]:
        answer = client.get("/api/v1/audit?" + query, headers=auth)
        assert answer.status_code == 200, answer.text
        return [e["id"] for e in answer.json()["entries"]]

    assert ids("actor=alice") == [test, create]
    assert ids("target_kind=rule&text=lung-v2") == [update]
    assert ids("since=2026-05-02T00:00:00Z&until=2026-05-03T00:00:00Z") == [update]
    assert ids("since=2026-05-02T00:00:00&until=2026-05-04") == [test, update]  # no zone: UTC
    assert ids("limit=2&offset=1") == [update, create]
    bad = client.get("/api/v1/audit?since=tomorrow", headers=auth)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "since"


def test_no_route_can_change_or_delete_audit_entries(web: WebEnv, admin: LoggedIn) -> None:
    audit_routes = [(sorted(r.methods or ()), r.path) for r in iter_route_contexts(web.app.routes)
                    if r.path and ("/audit" in r.path)]
    assert audit_routes and all(methods == ["GET"] for methods, _ in audit_routes), audit_routes
    before = audit.count_entries(web.sessions)
    for method in ("DELETE", "PUT", "PATCH", "POST"):
        for path in ("/audit", "/api/v1/audit", "/api/v1/audit/1"):
            assert admin.send(method, path).status_code in (404, 405), (method, path)
    assert audit.count_entries(web.sessions) == before
