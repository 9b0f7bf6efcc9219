"""``dicom-node studies purge`` (retention on demand, with a dry run) and ``dicom-node studies export`` (one
study's record as JSON for an incident report).

Why a module of its own: the bodies of these two sub-commands of ``studies``
(:mod:`dicom_node.studies_cli` adds them) print what retention and the record builder
decided; the decisions live in :mod:`dicom_node.retention` and
:mod:`dicom_node.db.study_record`, which the node and the web API use too. Both commands
are audited as ``cli`` with the operating-system user in the entry's detail.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import audit
from dicom_node.db.study_record import record_json, study_record
from dicom_node.retention import DiskUsageReader, Retention, RetentionPolicy, RetentionReport, disk_usage, format_bytes
from dicom_node.settings import Settings

__all__ = ["COMMANDS", "add_commands", "export", "purge", "run"]

#: The ``studies`` sub-commands this module runs.
COMMANDS = ("purge", "export")
CLI_ACTOR = "cli"


def add_commands(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``purge`` and ``export`` to the ``studies`` sub-commands ``actions``."""
    purging = actions.add_parser(
        "purge", help="delete the files of finished studies (retention); --dry-run shows what would go",
        description="Delete the received instances (and, with retention.delete_results, the results) of finished "
                    "studies older than N days or, oldest first, while the disk is too full. The study's record "
                    "stays. Without options the configured retention settings apply. A study still receiving, not "
                    "yet routed, or with a job or delivery not finished is never deleted (the output says why).")
    common(purging)
    purging.add_argument("--older-than-days", type=float, metavar="N",
                         help="studies whose last activity is more than N days ago (default: retention.keep_days)")
    purging.add_argument("--disk-below-percent", type=float, metavar="P",
                         help="oldest first until the data disk is at most P%% used "
                              "(default: retention.max_disk_used_percent)")
    purging.add_argument("--dry-run", action="store_true", help="print what would be deleted; change nothing")
    exporting = actions.add_parser(
        "export", help="one study's complete record as JSON (timeline, jobs, deliveries, audit) for an incident report")
    common(exporting)
    exporting.add_argument("study_instance_uid", metavar="STUDY_UID")
    exporting.add_argument("--output", type=Path, help="file to write (default: standard output)")


def run(settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    if args.studies_command == "purge":
        return purge(settings, sessions, older_than_days=args.older_than_days,
                     disk_below_percent=args.disk_below_percent, dry_run=args.dry_run)
    return export(sessions, args.study_instance_uid, output=args.output)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME (a container): the uid still says who
        return f"uid {os.getuid()}"


def purge(settings: Settings, sessions: sessionmaker[Session], *, older_than_days: float | None = None,
          disk_below_percent: float | None = None, dry_run: bool = False, read_disk: DiskUsageReader = disk_usage,
          clock: Callable[[], datetime] = _now, out: TextIO | None = None) -> int:
    """Run retention once (``cli``) and print what went, or with ``dry_run`` what would go; returns the exit code
    (2: no limit given or configured, or a limit out of range)."""
    out = out or sys.stdout
    configured = settings.retention
    given = older_than_days is not None or disk_below_percent is not None
    try:
        policy = RetentionPolicy(
            keep_days=older_than_days if given else configured.keep_days,
            max_disk_used_percent=disk_below_percent if given else configured.max_disk_used_percent,
            delete_results=configured.delete_results)
    except ValueError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    if not policy.active:
        print("dicom-node: nothing to purge by: give --older-than-days N and/or --disk-below-percent P, or set "
              "retention.keep_days / retention.max_disk_used_percent", file=sys.stderr)
        return 2
    retention = Retention(sessions, spool_dir=settings.spool_dir, outbox_dir=settings.outbox_dir, policy=policy,
                          clock=clock, read_disk=read_disk, fsync=settings.storage.fsync)
    report = retention.run(actor=CLI_ACTOR, dry_run=dry_run, detail=f"os user {_os_user()}")
    print_report(report, out)
    return 0


def print_report(report: RetentionReport, out: TextIO) -> None:
    """The plan and what became of it, as ``studies purge`` prints it."""
    plan = report.plan
    verb = "would delete" if report.dry_run else "deleted"
    print(f"retention: {plan.policy.describe()}" + (" - DRY RUN, nothing is changed" if report.dry_run else ""),
          file=out)
    if plan.disk is not None:
        print(f"disk: {plan.disk.percent:.1f}% of {format_bytes(plan.disk.total_bytes)} used", file=out)
    if plan.unfinished:
        done = "would be finished" if report.dry_run else f"{len(report.finished)} finished"
        print(f"interrupted purges: {len(plan.unfinished)} ({done}): "
              + ", ".join(u.study_instance_uid for u in plan.unfinished), file=out)
    if plan.selected:
        print(f"\n{verb.upper()}:", file=out)
        print(f"  {'INSTANCES':>9} {'RESULTS':>7} {'SIZE':>10}  {'LAST ACTIVITY (UTC)':<19}  STUDY INSTANCE UID / WHY",
              file=out)
        changed = {s.study_instance_uid for s in report.changed}
        for c in plan.selected:
            kept = " - KEPT: changed since the plan" if c.study_instance_uid in changed else ""
            print(f"  {c.footprint.instances:>9} {c.result_files:>7} {format_bytes(c.bytes):>10}  "
                  f"{c.footprint.last_activity_at:%Y-%m-%d %H:%M:%S}  {c.study_instance_uid}{kept}\n"
                  f"  {'':>9} {'':>7} {'':>10}  {'':<19}  {c.reason}", file=out)
    if plan.skipped:
        print("\nSKIPPED (unfinished work):", file=out)
        for s in plan.skipped:
            when = f"{s.last_activity_at:%Y-%m-%d %H:%M:%S}" if s.last_activity_at else "-"
            print(f"  {when}  {s.study_instance_uid}: {'; '.join(s.why)}", file=out)
    if report.dry_run:
        studies = len(plan.selected)
        instances = sum(c.footprint.instances for c in plan.selected)
        size = plan.freed_bytes
    else:
        studies = len(report.purged)
        instances = sum(p.instances for p in report.purged)
        size = sum(p.bytes for p in report.purged)
    print(f"\ntotal: {verb} {studies} study(ies), {instances} instance(s), {format_bytes(size)} ({size} bytes); "
          f"skipped {len(plan.skipped)}; {plan.kept} other study(ies) within the limits", file=out)
    if plan.disk is not None and plan.policy.max_disk_used_percent is not None:
        after = plan.disk_percent_after
        note = "" if after is not None and after <= plan.policy.max_disk_used_percent else \
            " - still above the limit: nothing else may be deleted"
        print(f"disk after: about {after:.1f}% used{note}", file=out)


def export(sessions: sessionmaker[Session], study_instance_uid: str, *, output: Path | None = None,
           clock: Callable[[], datetime] = _now, out: TextIO | None = None) -> int:
    """Write the study's record (``--output`` file, else standard output) and audit ``study.export``; 1 when the
    study is unknown or the file cannot be written."""
    now = clock()
    record = study_record(sessions, study_instance_uid, now=now, exported_by=CLI_ACTOR)
    if record is None:
        print(f"dicom-node: study {study_instance_uid} is not known to this node", file=sys.stderr)
        return 1
    text = record_json(record)
    where = "standard output" if output is None else str(output)

    def audited() -> None:
        audit.record(sessions, at=now, actor=CLI_ACTOR, action="study.export", target_kind="study",
                     target=study_instance_uid, detail=f"record ({record['format']}) to {where}; os user {_os_user()}")

    if output is None:
        audited()
        (out or sys.stdout).write(text)
        return 0
    try:
        _write_atomically(output, text, before_rename=audited)
    except OSError as exc:
        print(f"dicom-node: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"study {study_instance_uid}: record written to {output} ({len(record['jobs'])} job(s), "
          f"{len(record['deliveries'])} delivery(ies), {len(record['audit'])} audit entry(ies))",
          file=out or sys.stdout)
    return 0


def _write_atomically(path: Path, text: str, *, before_rename: Callable[[], None]) -> None:
    """Write ``text`` to ``path`` through a temporary file in its folder (a reader never sees half a record);
    ``before_rename`` runs once the bytes are written (the audit: no record leaves without its entry)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        before_rename()
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
