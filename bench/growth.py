"""Growth benchmark: do the studies, jobs and deliveries lists, the patient-name filter, the dashboard and
/metrics stay flat as the database grows? One command fills a fresh database with 10k, 100k and 1M studies
and times each query.

For each size it builds a new SQLite database (and PostgreSQL with ``--postgres URL``: an empty
database the bench may fill and empty), migrated by the node's own migrations, and fills it with
plain SQL (``INSERT ... SELECT`` from a generated row range, a few seconds per 100k studies):
every study with one series, ``--instances`` instances (2 by default), its sender's association and,
unless ignored or still receiving, one job (with its stage times) with a SEG result and one delivery.
Studies arrive at a steady ``--per-day`` (500 a day, ending now; so the dashboard's hour and day hold the
same studies at every size and only the history grows), ids growing with time as the node writes them; one
in 100 is ignored, one in 100 receiving, and one in 100 each has a dead job, a held job, a failed delivery or
a queued job; the rest are done. Patient names come from a pool of 5,000 (``FAMILY0042^GIVEN``).

Then it prints the median of ``--repeat`` (7) timings of, through the node's own functions:

* ``list``: the first page of ``/studies`` (50, newest first, with its count of matching studies);
* ``list p2``: the next page (by its cursor where the node has keyset pages, else ``offset=50``);
* ``list deep``: the page 20,000 rows down (offset; by cursor where the node has them: the time does
  not depend on how deep);
* ``name``: the first page of the patient-name filter (one family name of the pool, 1 in 5,000);
* ``dashboard``: everything ``GET /api/v1/dashboard`` reads (counts over the last hour and day,
  queue depths, throughput, errors, workers);
* ``counts all``: the dashboard's study counts with a window holding every study (the case "all rows are
  recent", which took 2.5 s for 100k studies before the counts were bounded);
* ``metrics``: a ``/metrics`` scrape (the text Prometheus reads) of a running web process; ``metrics 1st``:
  the first scrape of a new process (before schema 0012 it read every finished job's stage times then);
* ``jobs``, ``jobs p2``, ``jobs dead``: the first page of ``/api/v1/jobs`` (100, newest first, with results
  and deliveries, its count), the next page (by cursor where the node has keyset pages, else ``offset``),
  the first page of dead jobs; ``deliveries``, ``deliv failed``: the same of ``/api/v1/deliveries``;

followed by SQLite's ``EXPLAIN QUERY PLAN`` of the list and the name filter, to show which index each uses.

    python bench/growth.py [--sizes 10000,100000,1000000] [--repeat 7] [--instances 2] [--per-day 500]
                           [--postgres postgresql+psycopg://user@host/db] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from dicom_node.db import monitoring, study_views  # noqa: E402
from dicom_node.db.session import make_engine, make_session_factory, upgrade  # noqa: E402
from dicom_node.settings import load_settings  # noqa: E402
from dicom_node.web.context import WebContext  # noqa: E402
from dicom_node.web.routes.dashboard import dashboard_data  # noqa: E402
from dicom_node.web.routes.ops import NodeCollector  # noqa: E402

#: Rows inserted per statement while filling (one transaction each).
CHUNK = 100_000
#: Size of the pool of patient family names.
NAMES = 5_000
#: Stage times of every job that ran (JSON, as workers record them).
STAGES = '{"load": 0.4, "applicability": 0.05, "model_load": 0.01, "inference": 12.5, "encoding": 0.8, "outbox": 0.02}'

# --------------------------------------------------------------------------- fill

#: {table: (columns, SELECT list over ``i``, the study number 1..N)}; :SPAN_US, :BASE and the rest are bound.
#: ``{ts}`` is the study's receive time as the node stores it (naive UTC, microseconds).
_ROWS: dict[str, tuple[str, str]] = {
    "associations": (
        "id, calling_ae_title, called_ae_title, peer_address, peer_port, tls, started_at, ended_at, outcome, "
        "instances_stored, instances_failed, bytes_received",
        "(i - 1) / :per_assoc + 1, 'PACS_' || (i % 4), 'DICOM_NODE', '10.0.0.' || (i % 4), 104, FALSE, {ts}, {ts}, 'released', "
        ":per_assoc * :instances, 0, :per_assoc * :instances * 524288",
    ),
    "studies": (
        "id, study_instance_uid, patient_id, patient_name, accession_number, study_date, study_description, state, "
        "instance_count, late_instance_count, first_received_at, last_received_at, receiving_since, "
        "last_activity_at, completed_at, state_changed_at",
        "i, '1.2.826.0.1.3680043.10.511.' || i, 'P' || (i % 300000), "
        "'FAMILY' || substr('0000' || (i % :names), -4) || '^GIVEN', 'A' || i, '20260101', 'CT CHEST', "
        "CASE i % 100 WHEN 0 THEN 'ignored' WHEN 1 THEN 'receiving' ELSE 'routed' END, :instances, 0, "
        "{ts}, {ts}, {ts}, {ts}, CASE i % 100 WHEN 1 THEN NULL ELSE {ts} END, {ts}",
    ),
    "series": (
        "id, study_id, series_instance_uid, modality, series_number, series_description, body_part_examined, "
        "instance_count, first_received_at, last_received_at",
        "i, i, '1.2.826.0.1.3680043.10.511.' || i || '.1', 'CT', 1, 'AXIAL', 'CHEST', :instances, {ts}, {ts}",
    ),
    "association_studies": ("association_id, study_id", "(i - 1) / :per_assoc + 1, i"),
    "jobs": (
        "id, study_id, series_instance_uid, pipeline, rule, destinations, priority, state, attempts, max_attempts, "
        "error, created_at, queued_at, started_at, finished_at, state_changed_at, generation, stage_seconds",
        "i, i, '1.2.826.0.1.3680043.10.511.' || i || '.1', 'chest-seg', 'ct-chest', '\"default\"', 0, "
        "CASE i % 100 WHEN 2 THEN 'dead' WHEN 3 THEN 'held' WHEN 5 THEN 'queued' ELSE 'succeeded' END, "
        "CASE i % 100 WHEN 5 THEN 0 ELSE 1 END, 3, CASE i % 100 WHEN 2 THEN 'VolumeError: series has a gap' END, "
        "{ts}, {ts}, {ts}, CASE i % 100 WHEN 5 THEN NULL ELSE {ts} END, {ts}, 1, "
        "CASE i % 100 WHEN 5 THEN NULL ELSE :stages END",
    ),
    "result_objects": (
        "id, job_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid, path, created_at",
        "i, i, 'SEG', '1.2.840.10008.5.1.4.1.1.66.4', '1.2.826.0.1.3680043.10.512.' || i, "
        "'1.2.826.0.1.3680043.10.512.' || i || '.9', 'out/' || i || '/seg.dcm', {ts}",
    ),
    "deliveries": (
        "id, job_id, destination, state, attempts, max_attempts, objects_sent, created_at, delivered_at, "
        "state_changed_at, next_attempt_at, error",
        "i, i, 'pacs', CASE i % 100 WHEN 4 THEN 'failed' ELSE 'delivered' END, 1, 10, 1, {ts}, "
        "CASE i % 100 WHEN 4 THEN NULL ELSE {ts} END, {ts}, CASE i % 100 WHEN 4 THEN {ts} END, "
        "CASE i % 100 WHEN 4 THEN 'association rejected' END",
    ),
}
#: Which studies (by ``i % 100``) have a row in each table (all when absent).
_WHERE = {
    "associations": "i % :per_assoc = 1 OR :per_assoc = 1",
    "jobs": "i % 100 NOT IN (0, 1)",
    "result_objects": "i % 100 NOT IN (0, 1, 2, 5)",
    "deliveries": "i % 100 NOT IN (0, 1, 2, 3, 5)",
}
#: Instances: ``instances`` per study, ids (i - 1) * instances + k.
_INSTANCES = (
    "id, series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, instance_number, path, size_bytes, "
    "received_at, association_id, late, duplicates_received",
    "(i - 1) * :instances + :k, i, '1.2.826.0.1.3680043.10.511.' || i || '.1.' || :k, "
    "'1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', :k, 'spool/' || i || '/' || :k || '.dcm', 524288, {ts}, (i - 1) / :per_assoc + 1, FALSE, 0",
)


def _timestamp_sql(dialect: str) -> str:
    """SQL for study ``i``'s receive time, stored as the node's UTCDateTime stores it on ``dialect``."""
    if dialect == "sqlite":
        # naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff', like SQLAlchemy writes it (compared as text)
        return ("(strftime('%Y-%m-%d %H:%M:%S', :base + (i * :step_us) / 1000000, 'unixepoch') || '.' || "
                "substr('000000' || ((i * :step_us) % 1000000), -6))")
    return "(to_timestamp(:base + (i * :step_us) / 1000000.0) AT TIME ZONE 'UTC')"


def _range_sql(dialect: str, rest: str) -> str:
    """``rest`` (an INSERT ... SELECT ... FROM n) over the numbers :lo to :hi, in ``dialect``."""
    if dialect == "sqlite":
        return f"WITH RECURSIVE n(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM n WHERE i < :hi) {rest}"
    rest = rest.replace("substr('0000' || (i % :names), -4)", "lpad((i % :names)::text, 4, '0')")
    return rest.replace(" FROM n", " FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS n(i)")


def fill(engine: Engine, studies: int, *, instances: int, days: float, now: datetime) -> float:
    """Insert ``studies`` studies (see the module docstring), received evenly over the ``days`` before ``now``
    (the last at ``now``), into the empty, migrated database; seconds taken."""
    dialect = engine.dialect.name
    ts = _timestamp_sql(dialect)
    step_us = int(days * 86_400 * 1_000_000) // studies
    base = now - timedelta(microseconds=step_us * studies)
    params: dict[str, Any] = {"base": int(base.timestamp()), "step_us": step_us, "names": NAMES,
                              "instances": instances, "per_assoc": 100, "stages": STAGES}
    started = time.perf_counter()
    for lo in range(1, studies + 1, CHUNK):
        hi = min(studies, lo + CHUNK - 1)
        with engine.begin() as connection:
            if dialect == "sqlite":
                connection.exec_driver_sql("PRAGMA synchronous=OFF")
            for table, (columns, values) in _ROWS.items():
                where = _WHERE.get(table, "1 = 1")
                sql = f"INSERT INTO {table} ({columns}) SELECT {values.format(ts=ts)} FROM n WHERE {where}"
                connection.execute(text(_range_sql(dialect, sql)), {**params, "lo": lo, "hi": hi})
            columns, values = _INSTANCES
            for k in range(1, instances + 1):
                sql = f"INSERT INTO instances ({columns}) SELECT {values.format(ts=ts)} FROM n"
                connection.execute(text(_range_sql(dialect, sql)), {**params, "lo": lo, "hi": hi, "k": k})
    with engine.begin() as connection:
        if dialect == "sqlite":
            connection.exec_driver_sql("ANALYZE")
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        else:  # the rows carry their ids: move the sequences past them, so that the node can add rows
            for table in [*(t for t in _ROWS if t != "association_studies"), "instances"]:
                connection.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                           f"(SELECT max(id) FROM {table}))")
            connection.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


# --------------------------------------------------------------------------- measure


def median_ms(action: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``action`` in milliseconds, after one untimed warm-up run."""
    action()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _page(sessions: sessionmaker[Session], filters: study_views.StudyFilters, **kwargs: Any) -> Any:
    return study_views.list_studies(sessions, filters, limit=50, **kwargs)


def _has_cursor() -> bool:
    import inspect

    return "after" in inspect.signature(study_views.list_studies).parameters


def measure(sessions: sessionmaker[Session], *, now: datetime, days: float, repeat: int, data_dir: Path
            ) -> dict[str, float]:
    """``{query: median ms}`` of the module docstring's queries on a filled database."""
    every = study_views.StudyFilters()
    name = study_views.StudyFilters(patient_name="family0042")
    settings = load_settings(None, {"data_dir": data_dir})
    context = WebContext(settings=settings, sessions=sessions, clock=lambda: now, secret_key=b"bench")
    figures = {"list": median_ms(lambda: _page(sessions, every), repeat)}
    if _has_cursor():
        first = _page(sessions, every)
        figures["list p2"] = median_ms(lambda: _page(sessions, every, after=first.next_cursor), repeat)
        deep = _page(sessions, every, offset=19_950).next_cursor
        if deep is not None:
            figures["list deep"] = median_ms(lambda: _page(sessions, every, after=deep), repeat)
    else:
        figures["list p2"] = median_ms(lambda: _page(sessions, every, offset=50), repeat)
        figures["list deep"] = median_ms(lambda: _page(sessions, every, offset=20_000), repeat)
    figures["name"] = median_ms(lambda: _page(sessions, name), repeat)
    figures["dashboard"] = median_ms(lambda: dashboard_data(context), repeat)
    figures["counts all"] = median_ms(lambda: monitoring.study_counts(
        sessions, now=now, windows={"all": timedelta(days=days + 1)}), repeat)
    registry = _metrics_registry(context)
    figures["metrics"] = median_ms(lambda: generate_latest(registry), repeat)
    figures["metrics 1st"] = median_ms(lambda: generate_latest(_metrics_registry(context)), repeat)
    figures.update(_list_pages(sessions, repeat))
    return figures


def _metrics_registry(context: WebContext) -> CollectorRegistry:
    """A registry with the node's /metrics collector, as a new web process makes it on its first scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(context))
    return registry


def _list_pages(sessions: sessionmaker[Session], repeat: int) -> dict[str, float]:
    """The first page (100, the API's default) of the jobs list, the next one, its dead jobs, and the first
    page of the deliveries list and of its failed ones (by cursor where the node has keyset pages)."""
    import inspect

    from dicom_node.db import job_views

    figures = {"jobs": median_ms(lambda: job_views.list_jobs(sessions, limit=100), repeat)}
    first = job_views.list_jobs(sessions, limit=100)
    if "after" in inspect.signature(job_views.list_jobs).parameters:
        figures["jobs p2"] = median_ms(lambda: job_views.list_jobs(sessions, limit=100, after=first.next_cursor),
                                       repeat)
    else:
        figures["jobs p2"] = median_ms(lambda: job_views.list_jobs(sessions, limit=100, offset=100), repeat)
    figures["jobs dead"] = median_ms(lambda: job_views.list_jobs(sessions, state="dead", limit=100), repeat)
    if hasattr(job_views, "list_deliveries"):  # the node before it had no deliveries list
        figures["deliveries"] = median_ms(lambda: job_views.list_deliveries(sessions, limit=100), repeat)
        figures["deliv failed"] = median_ms(lambda: job_views.list_deliveries(sessions, state="failed", limit=100),
                                            repeat)
    return figures


def fold_counters(engine: Engine) -> None:
    """What the running node does every few seconds: fold PostgreSQL's metric deltas (the bulk fill appended
    them) into the counts; nothing on SQLite, or on a node before the counters."""
    try:
        from dicom_node.db import counters
    except ImportError:
        return
    counters.fold(make_session_factory(engine))


def query_plans(engine: Engine) -> list[str]:
    """SQLite's EXPLAIN QUERY PLAN of the list page and the name filter, as the node issues them."""
    if engine.dialect.name != "sqlite":
        return []
    captured: list[tuple[str, Any]] = []

    def remember(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "FROM studies" in statement and "ORDER BY studies.last_received_at" in statement:
            captured.append((statement, parameters))

    from sqlalchemy import event

    sessions = make_session_factory(engine)
    event.listen(engine, "before_cursor_execute", remember)
    try:
        _page(sessions, study_views.StudyFilters())
        _page(sessions, study_views.StudyFilters(patient_name="family0042"))
    finally:
        event.remove(engine, "before_cursor_execute", remember)
    lines = []
    with engine.connect() as connection:
        for label, (statement, parameters) in zip(("list", "name"), captured):
            plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            lines += [f"  {label}: {row[-1]}" for row in plan]
    return lines


@dataclass
class Run:
    backend: str
    studies: int
    fill_s: float
    figures: dict[str, float]
    plans: list[str]


def run_size(url: str, studies: int, args: argparse.Namespace, data_dir: Path) -> Run:
    engine = make_engine(url)
    try:
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        upgrade(engine)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        days = studies / args.per_day
        fill_s = fill(engine, studies, instances=args.instances, days=days, now=now)
        fold_counters(engine)
        sessions = make_session_factory(engine)
        figures = measure(sessions, now=now + timedelta(seconds=1), days=days, repeat=args.repeat,
                          data_dir=data_dir)
        return Run(engine.dialect.name, studies, fill_s, figures, query_plans(engine))
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="study counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--instances", type=int, default=2, help="instances per study")
    parser.add_argument("--per-day", type=int, default=500, help="studies received per day")
    parser.add_argument("--postgres", help="an empty PostgreSQL database URL to run on as well")
    parser.add_argument("--keep", type=Path, help="keep the SQLite files in this directory")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="growth-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in sizes:
        path = workdir / f"growth-{size}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        urls = [f"sqlite:///{path}"] + ([args.postgres] if args.postgres else [])
        for url in urls:
            run = run_size(url, size, args, workdir)
            runs.append(run)
            print(f"{run.backend:10} {size:>9,} studies  filled in {run.fill_s:6.1f} s  "
                  + "  ".join(f"{k} {v:7.1f} ms" for k, v in run.figures.items()), flush=True)
            for line in run.plans:
                print(line, flush=True)
        if args.keep is None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    print()
    keys = list(dict.fromkeys(k for run in runs for k in run.figures))
    print(f"{'backend':10} {'studies':>9} " + " ".join(f"{k:>11}" for k in keys) + "   (median ms)")
    for run in runs:
        print(f"{run.backend:10} {run.studies:>9,} " + " ".join(f"{run.figures.get(k, float('nan')):11.1f}"
                                                             for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
