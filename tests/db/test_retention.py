"""Retention with the real database and real spool/outbox files: what goes, what stays, and why.

The studies (:mod:`tests.db.retention_scenario`) cover each case: finished work (succeeded and
delivered, dead, ignored) goes; a held job, a delivery awaiting its retry and a study not yet
routed stay whatever their age; a recent study stays by age. Every purge is checked against a
dry run first, which must change nothing at all (every row, every file).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from tests.conftest import REPO_ROOT, NodeFactory
from dicom_node.db import jobs
from dicom_node.db import retention as db_retention
from dicom_node.db.models import AuditEntry, Delivery, Instance, Job, ResultObject, Series, Study, StudyEvent
from dicom_node.db.session import make_engine, make_session_factory, upgrade
from dicom_node.housekeeping_cli import purge
from dicom_node.indexer import InstanceIndexer
from dicom_node.recovery import reindex_orphans
from dicom_node.retention import DiskUsage, Retention, RetentionPolicy
from dicom_node.settings import load_settings
from dicom_node.spool import Spool
from tests.db.retention_scenario import BLOCKED, ELIGIBLE, NOW, Env, Scenario, build, database_snapshot, \
    files_snapshot


@dataclass
class FixedDisk:
    """A disk-usage reader that answers a given figure (and remembers which path it was asked about)."""

    total_bytes: int
    used_bytes: int
    asked: list[Path]

    def __call__(self, path: Path) -> DiskUsage:
        self.asked.append(path)
        return DiskUsage(self.total_bytes, self.used_bytes)


def _env(data_dir: Path, database_url: str | None = None) -> Env:
    values: dict[str, object] = {"data_dir": data_dir, "storage.min_free_mb": 0, "storage.fsync": False}
    if database_url:
        values["database_url"] = database_url
    settings = load_settings(None, values)
    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    return Env(settings, make_session_factory(engine))


@pytest.fixture
def env(engine: Engine, tmp_path: Path) -> Env:
    """A node's data directory on SQLite or PostgreSQL."""
    return _env(tmp_path / "node", engine.url.render_as_string(hide_password=False))


@pytest.fixture
def sqlite_env(tmp_path: Path) -> Iterator[Env]:
    """A node's data directory with its default SQLite database (as the CLI finds it from --data-dir)."""
    env = _env(tmp_path / "node")
    yield env
    env.sessions.kw["bind"].dispose()


def _retention(env: Env, policy: RetentionPolicy, disk: FixedDisk | None = None) -> Retention:
    return Retention(env.sessions, spool_dir=env.settings.spool_dir, outbox_dir=env.settings.outbox_dir, policy=policy,
                     clock=lambda: NOW, read_disk=disk or FixedDisk(100, 1, []), fsync=False)


def _instances(env: Env, uid: str) -> int:
    with env.sessions() as session:
        return int(session.scalar(
            select(func.count(Instance.id)).join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id).where(Study.study_instance_uid == uid)) or 0)


def _study(env: Env, uid: str) -> Study:
    with env.sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def _kept_rows(env: Env) -> dict[str, int]:
    """Counts of the rows retention must never delete."""
    with env.sessions() as session:
        return {model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
                for model in (Study, Series, Job, Delivery, ResultObject)}


def _assert_gone(env: Env, scenario: Scenario, name: str) -> None:
    uid = scenario.uids[name]
    assert _instances(env, uid) == 0, f"{name}: instance rows left"
    assert not any((env.settings.spool_dir / p).exists() for p in scenario.spool[name]), f"{name}: spool files left"
    assert not (env.settings.spool_dir / scenario.spool[name][0]).parent.parent.exists(), f"{name}: study folder left"
    assert not any((env.settings.outbox_dir / p).exists() for p in scenario.outbox[name]), f"{name}: outbox files left"
    assert _study(env, uid).purged_at is not None


def _assert_kept(env: Env, scenario: Scenario, name: str) -> None:
    uid = scenario.uids[name]
    assert _instances(env, uid) == len(scenario.spool[name]) == 4, f"{name}: instance rows deleted"
    assert all((env.settings.spool_dir / p).is_file() for p in scenario.spool[name]), f"{name}: spool files deleted"
    assert all((env.settings.outbox_dir / p).is_file() for p in scenario.outbox[name]), f"{name}: outbox files deleted"
    assert _study(env, uid).purged_at is None


def test_dry_run_lists_what_the_purge_then_deletes_and_changes_nothing(env: Env, tmp_path: Path) -> None:
    scenario = build(env, tmp_path / "studies")
    retention = _retention(env, RetentionPolicy(keep_days=30))
    rows, files = database_snapshot(env.sessions), files_snapshot(env.settings.data_dir)

    dry = retention.run(actor="cli", dry_run=True)

    assert [c.study_instance_uid for c in dry.plan.selected] == [scenario.uids[n] for n in ELIGIBLE]  # oldest first
    why = {s.study_instance_uid: "; ".join(s.why) for s in dry.plan.skipped}
    assert set(why) == {scenario.uids[n] for n in BLOCKED}
    assert f"job {scenario.jobs['held'][0]} (seg) is held" in why[scenario.uids["held"]]
    assert (f"delivery {scenario.deliveries['retrying'][0]} to pacs is failed, awaiting its next attempt"
            in why[scenario.uids["retrying"]])
    assert why[scenario.uids["unrouted"]] == "complete, not yet routed"
    assert dry.plan.kept == 1  # recent
    done = dry.plan.selected[0]
    assert (done.footprint.instances, done.result_files) == (4, 3)
    assert done.bytes == done.footprint.instance_bytes + sum(
        (env.settings.outbox_dir / p).stat().st_size for p in scenario.outbox["done"])
    assert not dry.purged and not dry.finished
    assert database_snapshot(env.sessions) == rows, "the dry run changed the database"
    assert files_snapshot(env.settings.data_dir) == files, "the dry run changed files"

    kept_before = _kept_rows(env)
    report = retention.run(actor="cli", dry_run=False, detail="os user tester")

    assert [p.study_instance_uid for p in report.purged] == [c.study_instance_uid for c in dry.plan.selected]
    assert [(p.instances, p.instance_files, p.result_files) for p in report.purged] == [(4, 4, 3), (4, 4, 0),
                                                                                         (4, 4, 0)]
    assert report.purged[0].bytes == done.bytes
    for name in ELIGIBLE:
        _assert_gone(env, scenario, name)
    for name in (*BLOCKED, "recent"):
        _assert_kept(env, scenario, name)
    assert _kept_rows(env) == kept_before, "retention deleted rows of the record"
    with env.sessions() as session:
        paths = set(session.scalars(select(ResultObject.path)))
        events = session.execute(select(Study.study_instance_uid, StudyEvent.detail).join(Study)
                                 .where(StudyEvent.kind == "purged")).all()
        entries = session.scalars(select(AuditEntry).where(AuditEntry.action == "study.purge")).all()
    assert set(scenario.outbox["done"][:1]) <= paths  # the result rows keep the path they had
    assert {uid for uid, _ in events} == {scenario.uids[n] for n in ELIGIBLE}
    detail = dict(events)[scenario.uids["done"]]
    assert "more than 30 day(s) ago" in detail and "4 instance(s) and 3 result/preview file(s) deleted" in detail
    assert f"({done.bytes} bytes); ordered by cli" in detail
    assert sorted(e.target for e in entries) == sorted(scenario.uids[n] for n in ELIGIBLE)
    assert {e.actor for e in entries} == {"cli"} and all("os user tester" in (e.detail or "") for e in entries)
    assert json.loads(entries[0].after)["instances"] == 4

    again = retention.run(actor="cli")
    assert not again.plan.selected and not again.purged and again.plan.kept == 1


def test_disk_threshold_takes_the_oldest_finished_studies_until_the_disk_is_below_it(sqlite_env: Env,
                                                                                     tmp_path: Path) -> None:
    env = sqlite_env
    scenario = build(env, tmp_path / "studies")
    total = 10**9
    policy = RetentionPolicy(max_disk_used_percent=80)
    full = FixedDisk(total, total, [])
    everything = _retention(env, policy, full).plan()
    assert full.asked == [env.settings.spool_dir]
    order = ["done", "dead", "ignored", "recent"]  # every finished study, oldest first: age does not matter here
    assert [c.study_instance_uid for c in everything.selected] == [scenario.uids[n] for n in order]
    assert {s.study_instance_uid for s in everything.skipped} == {scenario.uids[n] for n in BLOCKED}
    size = {n: c.bytes for n, c in zip(order, everything.selected)}
    assert everything.disk_percent_after is not None and everything.disk_percent_after > 80  # cannot get there

    just_over = _retention(env, policy, FixedDisk(total, total * 8 // 10 + size["done"] - 1, [])).plan()
    assert [c.study_instance_uid for c in just_over.selected] == [scenario.uids["done"]]
    assert not just_over.skipped and just_over.kept == 6  # the blocked studies were never reached
    assert just_over.disk_percent_after is not None and just_over.disk_percent_after <= 80

    below = _retention(env, policy, FixedDisk(total, total * 8 // 10, [])).plan()
    assert not below.selected and not below.skipped and below.kept == 7

    needs_recent = FixedDisk(total, total * 8 // 10 + sum(size.values()) - 1, [])
    report = _retention(env, policy, needs_recent).run(actor="system")
    assert [p.study_instance_uid for p in report.purged] == [scenario.uids[n] for n in order]
    assert report.purged[-1].reason == "disk 80.0% used, more than 80%: oldest first"  # recent: by disk, not age
    for name in order:
        _assert_gone(env, scenario, name)
    for name in BLOCKED:
        _assert_kept(env, scenario, name)
    with env.sessions() as session:
        assert set(session.scalars(select(AuditEntry.actor).where(AuditEntry.action == "study.purge"))) == {"system"}


def test_a_purge_killed_between_its_steps_is_finished_by_the_next_run(env: Env, tmp_path: Path) -> None:
    scenario = build(env, tmp_path / "studies", only=("done", "held"))
    uid = scenario.uids["done"]
    footprint = next(f for f in db_retention.footprints(env.sessions) if f.study_instance_uid == uid)
    # Step 1 and half of step 2 of a purge, then the process is killed (-9): nothing else ran.
    assert db_retention.mark_purge(env.sessions, footprint, now=NOW, actor="system", reason="older than 30 days",
                                   planned={"instances": 4})
    for relative in scenario.spool["done"][:2]:
        (env.settings.spool_dir / relative).unlink()
    (env.settings.outbox_dir / scenario.outbox["done"][0]).unlink()

    # The node starts again after the unclean stop: recovery must not index the study's files back.
    indexer = InstanceIndexer(env.sessions.kw["bind"], reopen_on_late_instances=True)
    try:
        assert reindex_orphans(Spool(env.settings.spool_dir, fsync=False), env.sessions, indexer) == 0
    finally:
        indexer.stop()
    assert _instances(env, uid) == 4  # the rows of the files already deleted are still there, marked purged
    assert _study(env, uid).purged_at == NOW
    assert [u.study_instance_uid for u in db_retention.unfinished_purges(env.sessions)] == [uid]

    retention = _retention(env, RetentionPolicy(keep_days=30))
    rows, files = database_snapshot(env.sessions), files_snapshot(env.settings.data_dir)
    dry = retention.run(actor="cli", dry_run=True)
    assert [u.study_instance_uid for u in dry.plan.unfinished] == [uid] and not dry.plan.selected
    assert database_snapshot(env.sessions) == rows and files_snapshot(env.settings.data_dir) == files

    report = retention.run(actor="cli")
    assert [(p.study_instance_uid, p.instances, p.instance_files, p.result_files) for p in report.finished] == [
        (uid, 4, 2, 2)]
    _assert_gone(env, scenario, "done")
    _assert_kept(env, scenario, "held")
    with env.sessions() as session:
        events = session.scalars(select(StudyEvent.detail).join(Study).where(
            StudyEvent.kind == "purged", Study.study_instance_uid == uid)).all()
        audited = session.scalar(select(func.count(AuditEntry.id)).where(AuditEntry.action == "study.purge"))
    assert len(events) == 1 and events[0].startswith("finishing an interrupted purge: 4 instance(s)")
    assert audited == 1  # who ordered it was audited when it was marked
    assert db_retention.unfinished_purges(env.sessions) == []
    again = retention.run(actor="cli")
    assert not again.finished and not again.purged


def test_work_that_starts_after_the_plan_keeps_the_study(env: Env, tmp_path: Path) -> None:
    scenario = build(env, tmp_path / "studies", only=("dead",))
    footprint = db_retention.footprints(env.sessions)[0]
    assert footprint.blockers == ()
    assert jobs.retry_job(env.sessions, scenario.jobs["dead"][0], now=NOW)  # an operator retries it meanwhile
    assert not db_retention.mark_purge(env.sessions, footprint, now=NOW, actor="cli", reason="r", planned={})
    _assert_kept(env, scenario, "dead")
    with env.sessions() as session:
        assert session.scalar(select(func.count(AuditEntry.id)).where(AuditEntry.action == "study.purge")) == 0


def test_cli_purge_prints_candidates_sizes_and_why_others_are_skipped(sqlite_env: Env, tmp_path: Path) -> None:
    env = sqlite_env
    scenario = build(env, tmp_path / "studies")
    rows, files = database_snapshot(env.sessions), files_snapshot(env.settings.data_dir)
    out = io.StringIO()
    assert purge(env.settings, env.sessions, older_than_days=30, dry_run=True, clock=lambda: NOW, out=out) == 0
    text = out.getvalue()
    assert database_snapshot(env.sessions) == rows and files_snapshot(env.settings.data_dir) == files
    assert "DRY RUN, nothing is changed" in text and "WOULD DELETE:" in text
    for name in ELIGIBLE:
        assert scenario.uids[name] in text.split("SKIPPED")[0]
    skipped = text.split("SKIPPED (unfinished work):")[1]
    for name in BLOCKED:
        assert scenario.uids[name] in skipped
    assert "is held: its results wait for an operator" in skipped and "complete, not yet routed" in skipped
    assert scenario.uids["recent"] not in text
    assert "total: would delete 3 study(ies), 12 instance(s)" in text and "skipped 3; 1 other study(ies)" in text

    out = io.StringIO()
    disk = FixedDisk(10**12, 10**12 * 95 // 100, [])
    assert purge(env.settings, env.sessions, disk_below_percent=90, clock=lambda: NOW, out=out, read_disk=disk) == 0
    text = out.getvalue()
    assert "DELETED:" in text and "disk: 95.0% of" in text and "still above the limit" in text
    assert "total: deleted 4 study(ies), 16 instance(s)" in text
    for name in (*ELIGIBLE, "recent"):
        _assert_gone(env, scenario, name)


def test_the_purge_command_line(sqlite_env: Env, tmp_path: Path) -> None:
    """``dicom-node studies purge`` as an admin types it (a separate process, the real clock)."""
    env = sqlite_env
    scenario = build(env, tmp_path / "studies", only=("done", "held"))
    command = [sys.executable, "-m", "dicom_node", "studies", "purge", "--data-dir", str(env.settings.data_dir)]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert refused.returncode == 2 and "nothing to purge by" in refused.stderr
    dry = subprocess.run(command + ["--older-than-days", "30", "--dry-run"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "WOULD DELETE" in dry.stdout and scenario.uids["done"] in dry.stdout
    assert f"{scenario.uids['held']}: job {scenario.jobs['held'][0]} (seg) is held" in dry.stdout
    _assert_kept(env, scenario, "done")
    done = subprocess.run(command + ["--older-than-days", "30"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "total: deleted 1 study(ies), 4 instance(s)" in done.stdout
    _assert_gone(env, scenario, "done")
    _assert_kept(env, scenario, "held")


def test_the_node_applies_retention_periodically_when_enabled(node_factory: NodeFactory, tmp_path: Path) -> None:
    env = _env(tmp_path / "node0")  # where node_factory puts its first node
    scenario = build(env, tmp_path / "studies", only=("done", "held"))
    env.sessions.kw["bind"].dispose()
    node = node_factory(**{"retention.keep_days": 30, "retention.check_interval_seconds": 0.2})
    assert node.retention_loop is not None
    deadline = time.monotonic() + 20
    while _study(env, scenario.uids["done"]).purged_at is None or _instances(env, scenario.uids["done"]):
        assert time.monotonic() < deadline, "the node did not purge the old finished study"
        time.sleep(0.2)
    _assert_gone(env, scenario, "done")
    _assert_kept(env, scenario, "held")
    with env.sessions() as session:
        assert session.scalars(select(AuditEntry.actor).where(AuditEntry.action == "study.purge")).all() == ["system"]


def test_retention_is_off_by_default(node_factory: NodeFactory) -> None:
    node = node_factory()
    assert node.retention_loop is None and not node.retention.policy.active
    assert RetentionPolicy(keep_days=1).describe() == "older than 1 day(s); instances and results"
    with pytest.raises(ValueError, match="max_disk_used_percent must be between 0 and 100, got 100"):
        RetentionPolicy(max_disk_used_percent=100)
