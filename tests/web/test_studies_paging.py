"""``/api/v1/studies`` and ``/studies`` by cursor (keyset pages) and with bounded counts, on a database
the growth benchmark fills (bench/growth.py); older clients' ``offset`` pages still work."""

from __future__ import annotations

import html
import re
from datetime import datetime, timezone
from pathlib import Path

from bench.growth import fill
from dicom_node.db import study_views
from tests.web.conftest import make_web_env

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)


def test_api_pages_by_cursor_and_offset_still_works(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    fill(env.sessions.kw["bind"], 130, instances=1, days=2, now=NOW)
    client, headers = env.client(), {"Authorization": f"Bearer {env.token('viewer')}"}
    seen: list[str] = []
    params: dict[str, object] = {"limit": 40}
    while True:
        page = client.get("/api/v1/studies", params=params, headers=headers).json()
        assert page["total"] == 130 and page["total_exact"] is True and page["offset"] == 0
        seen += [item["study_instance_uid"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": 40, "after": page["next_cursor"]}
    assert len(seen) == len(set(seen)) == 130
    by_offset = client.get("/api/v1/studies", params={"limit": 40, "offset": 80}, headers=headers).json()
    assert [i["study_instance_uid"] for i in by_offset["items"]] == seen[80:120] and by_offset["offset"] == 80
    bad = client.get("/api/v1/studies", params={"after": "bm90IGEgY3Vyc29y"}, headers=headers)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "after"
    assert "'bm90IGEgY3Vyc29y' is not one this node gave" in bad.text


def test_counts_stop_at_the_cap_unless_exact_is_asked(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    fill(env.sessions.kw["bind"], study_views.COUNT_CAP + 20, instances=1, days=30, now=NOW)
    client, headers = env.client(), {"Authorization": f"Bearer {env.token('viewer')}"}
    capped = client.get("/api/v1/studies", params={"limit": 1}, headers=headers).json()
    assert (capped["total"], capped["total_exact"]) == (study_views.COUNT_CAP, False)
    exact = client.get("/api/v1/studies", params={"limit": 1, "count": "exact"}, headers=headers).json()
    assert (exact["total"], exact["total_exact"]) == (study_views.COUNT_CAP + 20, True)
    page = env.login("viewer").client.get("/studies", params={"limit": 5}).text
    assert "(10,000+)" in page and "5 of 10,000+" in page
    older = re.search(r'href="(/studies\?[^"]*after=[^"]+)">Older</a>', page)
    assert older and "Newer</a>" not in page
    second = env.login("viewer").client.get(html.unescape(older.group(1))).text
    assert "Newer</a>" in second and "Older</a>" in second
