"""The studies, jobs and deliveries lists, the dashboard and /metrics stay flat as the database grows (issue 26,
"Growth"): their queries use the indexes of migrations 0010 and 0012 (SQLite's EXPLAIN QUERY PLAN), keyset pages
are stable and complete while studies arrive between two pages, the patient-name search finds what a substring
match finds, and the bounded counts say when they stopped counting. The database is filled by the growth
benchmark's own SQL (bench/growth.py), so that the benchmark measures the data these tests check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from bench.growth import fill
from dicom_node.db import job_views, monitoring, repo, study_views
from dicom_node.db.models import Study
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.db.study_views import StudyCursor, StudyFilters

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty SQLite database (whose query plans the tests read)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'growth.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """Sessions on tests/conftest.py's ``engine``: a migrated, empty SQLite and PostgreSQL database."""
    return make_session_factory(engine)


def _statements(engine: Engine, action: Any) -> list[tuple[str, Any]]:
    """Every SQL statement ``action()`` sends, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def remember(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", remember)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", remember)
    return seen


def _plan(engine: Engine, statement: str, parameters: Any) -> str:
    with engine.connect() as connection:
        return "\n".join(row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement,
                                                                       parameters).all())


def _page_plan(engine: Engine, sessions: sessionmaker[Session], **kwargs: Any) -> str:
    """The query plan of the statement that reads the rows of one studies page."""
    statements = [(s, p) for s, p in _statements(engine, lambda: study_views.list_studies(sessions, **kwargs))
                  if "ORDER BY studies.last_received_at" in s]
    assert len(statements) == 1, statements
    return _plan(engine, *statements[0])


def test_list_and_name_filter_plans_use_the_indexes(sqlite_engine: Engine) -> None:
    engine, sessions = sqlite_engine, make_session_factory(sqlite_engine)
    fill(engine, 2_000, instances=1, days=30, now=NOW)
    first = _page_plan(engine, sessions, limit=50)
    assert "USING INDEX ix_studies_last_received" in first and "TEMP B-TREE" not in first, first
    cursor = study_views.list_studies(sessions, limit=50).next_cursor
    following = _page_plan(engine, sessions, limit=50, after=cursor)
    assert "ix_studies_last_received" in following and "TEMP B-TREE" not in following, following
    previous = _page_plan(engine, sessions, limit=50, before=cursor)
    assert "ix_studies_last_received" in previous and "TEMP B-TREE" not in previous, previous
    named = _page_plan(engine, sessions, filters=StudyFilters(patient_name="family0042"), limit=50)
    assert "studies_patient_name VIRTUAL TABLE" in named and "SCAN studies\n" not in named + "\n", named
    cli = [_plan(engine, *statement) for statement in _statements(engine, lambda: repo.list_studies(sessions, 20))]
    assert "ix_studies_last_received" in cli[0] and "SCAN studies\n" not in cli[0] + "\n", cli  # `studies list`
    assert [s.study_instance_uid for s in repo.list_studies(sessions, 3)] == _uids(
        study_views.list_studies(sessions, limit=3))


def test_dashboard_error_and_throughput_queries_use_the_indexes(sqlite_engine: Engine) -> None:
    engine, sessions = sqlite_engine, make_session_factory(sqlite_engine)
    fill(engine, 2_000, instances=1, days=30, now=NOW)
    plans = [_plan(engine, s, p) for s, p in _statements(engine, lambda: (
        monitoring.recent_errors(sessions), monitoring.throughput(sessions, now=NOW)))]
    text = "\n".join(plans)
    for index in ("ix_jobs_state_changed", "ix_deliveries_state_changed", "ix_associations_outcome_started",
                  "ix_jobs_finished_at", "ix_deliveries_delivered_at"):
        assert index in text, (index, text)
    assert "SCAN jobs\n" not in text + "\n" and "SCAN deliveries\n" not in text + "\n", text


def test_jobs_and_deliveries_pages_use_the_indexes(sqlite_engine: Engine) -> None:
    engine, sessions = sqlite_engine, make_session_factory(sqlite_engine)
    fill(engine, 2_000, instances=1, days=30, now=NOW)
    cursor = job_views.list_jobs(sessions, limit=50).next_cursor
    cases = [
        (lambda: job_views.list_jobs(sessions, limit=50, after=cursor), "jobs",
         "SEARCH jobs USING INTEGER PRIMARY KEY"),
        (lambda: job_views.list_jobs(sessions, state="dead", limit=50), "jobs", "ix_jobs_state_id"),
        (lambda: job_views.list_jobs(sessions, pipeline="chest-seg", limit=50), "jobs", "ix_jobs_pipeline_id"),
        (lambda: job_views.list_deliveries(sessions, limit=50), "deliveries", "SCAN deliveries"),  # by rowid, newest
        (lambda: job_views.list_deliveries(sessions, state="failed", limit=50), "deliveries",
         "ix_deliveries_state_id"),
        (lambda: job_views.list_deliveries(sessions, destination="pacs", limit=50), "deliveries",
         "ix_deliveries_destination_id"),
    ]
    for action, table, index in cases:
        statements = [(s, p) for s, p in _statements(engine, action) if f"ORDER BY {table}.id DESC" in s]
        assert len(statements) == 1, statements
        plan = _plan(engine, *statements[0])
        assert index in plan and "TEMP B-TREE" not in plan, (index, plan)  # one page of an index, no sort


def test_a_metrics_scrape_reads_no_table_that_grows(sqlite_engine: Engine) -> None:
    """Everything /metrics reads: the kept counts (schema 0012) and the workers' heartbeats."""
    engine, sessions = sqlite_engine, make_session_factory(sqlite_engine)
    fill(engine, 2_000, instances=1, days=30, now=NOW)
    plans = "\n".join(_plan(engine, s, p) for s, p in _statements(engine, lambda: monitoring.metrics_snapshot(
        sessions, now=NOW, worker_stale_seconds=60)))
    read = set(re.findall(r"(?:SCAN|SEARCH) (\w+)", plans))
    assert read <= {"metric_counts", "metric_deltas", "worker_status", "anon_1"}, plans


def _add_study(sessions: sessionmaker[Session], number: int, at: datetime) -> None:
    with sessions.begin() as session:
        session.add(Study(study_instance_uid=f"2.25.{number}", patient_name=f"NEW^{number}", state="receiving",
                          instance_count=1, late_instance_count=0, first_received_at=at, last_received_at=at,
                          receiving_since=at, last_activity_at=at, state_changed_at=at))


def _uids(page: study_views.StudyPage) -> list[str]:
    return [item.study_instance_uid for item in page.items]


def test_keyset_pages_are_complete_and_stable_while_studies_arrive(engine: Engine,
                                                                   sessions: sessionmaker[Session]) -> None:
    fill(engine, 230, instances=1, days=2, now=NOW)
    with sessions.begin() as session:  # ties: five studies received in the same microsecond, across a page edge
        tied = session.scalars(select(Study.id).order_by(Study.id.desc()).limit(60)).all()[47:52]
        session.execute(update(Study).where(Study.id.in_(tied)).values(last_received_at=NOW - timedelta(hours=3)))
    expected = [uid for (uid,) in sessions().execute(
        select(Study.study_instance_uid).order_by(Study.last_received_at.desc(), Study.id.desc())).all()]
    seen: list[str] = []
    pages: list[study_views.StudyPage] = []
    cursor: str | None = None
    while True:
        page = study_views.list_studies(sessions, limit=25, after=cursor)
        pages.append(page)
        seen += _uids(page)
        _add_study(sessions, len(pages), NOW + timedelta(minutes=len(pages)))  # arrives between two pages
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == expected  # every study once, in order: none skipped, none twice, despite 10 arrivals
    assert len(pages) == 10 and len(pages[-1].items) == 230 - 9 * 25
    assert pages[0].previous_cursor is None and all(p.previous_cursor for p in pages[1:])
    # back from the last page: the same pages (the arrivals are above the first one)
    back = pages[-1]
    for earlier in reversed(pages[:-1]):
        back = study_views.list_studies(sessions, limit=25, before=back.previous_cursor)
        assert _uids(back) == _uids(earlier)
    assert back.previous_cursor is not None  # studies arrived above the first page since
    newest = study_views.list_studies(sessions, limit=25, before=back.previous_cursor)
    assert _uids(newest) == [f"2.25.{n}" for n in range(10, 0, -1)] and newest.previous_cursor is None
    # an offset page (older clients) is the same page
    assert _uids(study_views.list_studies(sessions, limit=25, offset=10 + 50)) == _uids(pages[2])


def test_a_cursor_the_node_did_not_give_is_refused_by_name() -> None:
    token = StudyCursor(NOW, 42).token()
    assert StudyCursor.parse(token) == StudyCursor(NOW, 42)
    with pytest.raises(ValueError, match="studies cursor 'bm90IGEgY3Vyc29y' is not one this node gave"):
        StudyCursor.parse("bm90IGEgY3Vyc29y")  # base64 of "not a cursor"


def test_counts_are_bounded_and_say_so(engine: Engine, sessions: sessionmaker[Session]) -> None:
    fill(engine, 240, instances=1, days=1, now=NOW)  # one every 6 minutes, the last at NOW: 11 in the last hour
    exact = study_views.list_studies(sessions, limit=5, count_cap=None)
    assert (exact.total, exact.total_exact) == (240, True)
    capped = study_views.list_studies(sessions, limit=5, count_cap=100)
    assert (capped.total, capped.total_exact) == (100, False) and _uids(capped) == _uids(exact)
    assert study_views.list_studies(sessions, limit=5, count_cap=240).total_exact
    windows = {"hour": timedelta(hours=1), "day": timedelta(days=1, minutes=1)}
    full = monitoring.study_counts(sessions, now=NOW, windows=windows, cap=1_000)
    assert full["day"].complete and full["day"].received == 240 and full["hour"].received == 11
    # i % 100: 0 ignored, 1 receiving, 2 dead job, 3 held job, 4 failed delivery, 5 queued job; the rest done
    assert vars(full["day"]) == {"complete": True, "received": 240, "receiving": 3, "waiting": 3, "in_progress": 3,
                                 "done": 240 - 17, "held": 3, "failed": 3, "ignored": 2}
    bounded = monitoring.study_counts(sessions, now=NOW, windows=windows, cap=50)
    assert bounded["hour"] == full["hour"] and bounded["hour"].complete
    assert not bounded["day"].complete and bounded["day"].received == 50


def test_patient_name_search_matches_a_substring_search(engine: Engine, sessions: sessionmaker[Session]) -> None:
    fill(engine, 300, instances=1, days=3, now=NOW)
    odd = {1: "O'BRIEN^ANNE", 2: 'QUOTE"D^NAME', 3: "PER%CENT^X", 4: "MÜLLER^JÖRG", 5: None}
    with sessions.begin() as session:
        for study_id, name in odd.items():
            session.execute(update(Study).where(Study.id == study_id).values(patient_name=name))
        session.execute(update(Study).where(Study.id == 7).values(patient_name="RENAMED^PERSON"))
    names = dict(sessions().execute(select(Study.study_instance_uid, Study.patient_name)).all())
    for text in ("family0042", "AMILY004", "'bri", 'e"d^', "r%c", "müller", "renamed", "FAMILY0007^", "ly", "x",
                 "nobody here"):
        page = study_views.list_studies(sessions, StudyFilters(patient_name=text), limit=500)
        expected = {uid for uid, name in names.items() if name and text.lower() in name.lower()}
        if text == "müller" and engine.dialect.name == "sqlite":  # SQLite's lower() folds ASCII only (as before)
            expected = set()
        assert set(_uids(page)) == expected and page.total == len(expected), text
    old_name = study_views.list_studies(sessions, StudyFilters(patient_name="FAMILY0007^GIVEN"), limit=500)
    assert "1.2.826.0.1.3680043.10.511.7" not in _uids(old_name)  # the trigger replaced the old name
    if engine.dialect.name == "postgresql":  # the trigram index is there to serve the LIKE
        with engine.connect() as connection:
            assert connection.exec_driver_sql(
                "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_studies_patient_name_trgm'").first()


def test_0010_indexes_the_names_of_studies_received_before_it_and_downgrades(database_url: str) -> None:
    from alembic import command

    from dicom_node.db.session import _alembic_config

    engine = make_engine(database_url)
    try:
        upgrade(engine, "0009")
        fill(engine, 50, instances=1, days=1, now=NOW)  # studies received before the upgrade
        upgrade(engine)
        sessions = make_session_factory(engine)
        named = study_views.list_studies(sessions, StudyFilters(patient_name="family0042"))
        assert _uids(named) == ["1.2.826.0.1.3680043.10.511.42"]
        command.downgrade(_alembic_config(engine), "0009")
        upgrade(engine)  # and up again: nothing of 0010 was left behind
        assert _uids(study_views.list_studies(sessions, StudyFilters(patient_name="family0042"))) == _uids(named)
    finally:
        engine.dispose()
