"""Retention: delete the files of finished studies after N days, or oldest first while the disk is too full.

Why: a node keeps every received instance and every result in ``data_dir``; hospitals ask
for a limit. What goes: a study's received instances (spool files and their Instance rows)
and, with ``retention.delete_results``, its result objects and previews (outbox files).
What stays: the study row (``purged_at`` set), its series, jobs, deliveries, events and
audit entries, and the ResultObject rows with their paths - the paths name where each
object was; the UIDs let the node recognise its own results when a PACS sends them back.
A study with unfinished work is never touched (:mod:`dicom_node.db.retention` says which).

A purge is a plan (:func:`plan_retention`: read only, what a dry run prints) and, per
study, three steps: mark (``purged_at`` + audit, guarded), delete the files, delete the
rows + ``purged`` event. A process killed in the middle leaves a marked study without
its event; every run finishes those first (:meth:`Retention.run`). Until then the study
already says ``purged_at``, so nothing points at a missing file without saying why.

The disk is read through a :class:`DiskUsageReader` (``shutil.disk_usage`` by default)
so that the threshold mode can be given any figure.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import retention as db_retention
from dicom_node.db.retention import StudyFootprint, UnfinishedPurge
from dicom_node.settings import RetentionSettings

__all__ = ["Candidate", "DiskUsage", "DiskUsageReader", "Purged", "Retention", "RetentionPlan", "RetentionPolicy",
           "RetentionReport", "Skipped", "disk_usage", "format_bytes", "plan_retention"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskUsage:
    """How full a file system is."""

    total_bytes: int
    used_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    def percent_after(self, freed_bytes: int) -> float:
        """The percentage once ``freed_bytes`` are deleted (an estimate: file systems count in blocks)."""
        return 100.0 * max(0, self.used_bytes - freed_bytes) / self.total_bytes if self.total_bytes else 0.0


class DiskUsageReader(Protocol):
    """Reads how full the file system holding ``path`` is."""

    def __call__(self, path: Path) -> DiskUsage: ...


def disk_usage(path: Path) -> DiskUsage:
    """The file system holding ``path``, as ``shutil.disk_usage`` sees it (used of total)."""
    usage = shutil.disk_usage(path)
    return DiskUsage(total_bytes=usage.total, used_bytes=usage.used)


def format_bytes(count: int) -> str:
    """``1.5 MiB``-style size for people (the exact byte count goes next to it where it matters)."""
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RetentionPolicy:
    """When a finished study's files go: ``keep_days`` after its last activity, and/or oldest first while the
    data disk is more than ``max_disk_used_percent`` full. Neither set: nothing goes."""

    keep_days: float | None = None
    max_disk_used_percent: float | None = None
    delete_results: bool = True

    def __post_init__(self) -> None:
        if self.keep_days is not None and self.keep_days <= 0:
            raise ValueError(f"keep_days must be more than 0, got {self.keep_days}")
        if self.max_disk_used_percent is not None and not 0 < self.max_disk_used_percent < 100:
            raise ValueError(f"max_disk_used_percent must be between 0 and 100, got {self.max_disk_used_percent}")

    @classmethod
    def from_settings(cls, settings: RetentionSettings) -> RetentionPolicy:
        return cls(keep_days=settings.keep_days, max_disk_used_percent=settings.max_disk_used_percent,
                   delete_results=settings.delete_results)

    @property
    def active(self) -> bool:
        return self.keep_days is not None or self.max_disk_used_percent is not None

    def describe(self) -> str:
        parts = []
        if self.keep_days is not None:
            parts.append(f"older than {self.keep_days:g} day(s)")
        if self.max_disk_used_percent is not None:
            parts.append(f"while the disk is more than {self.max_disk_used_percent:g}% used")
        what = "instances and results" if self.delete_results else "instances only"
        return f"{' or '.join(parts) or 'nothing (no limit set)'}; {what}"


@dataclass(frozen=True)
class Candidate:
    """A study the plan deletes, why, and what: its instances and (with results) its existing outbox files."""

    footprint: StudyFootprint
    reason: str
    result_files: int
    result_bytes: int

    @property
    def study_instance_uid(self) -> str:
        return self.footprint.study_instance_uid

    @property
    def bytes(self) -> int:
        return self.footprint.instance_bytes + self.result_bytes


@dataclass(frozen=True)
class Skipped:
    """A study old enough (or needed under disk pressure) that stays, and why."""

    study_instance_uid: str
    last_activity_at: datetime | None
    why: tuple[str, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention run deletes (``selected``, oldest first) and keeps; computed without changing anything."""

    policy: RetentionPolicy
    now: datetime
    selected: list[Candidate]
    skipped: list[Skipped]
    #: Studies with files that no limit reaches (newer than keep_days, and not needed for the disk).
    kept: int
    disk: DiskUsage | None
    #: Purges a killed run left unfinished: every run finishes them first.
    unfinished: list[UnfinishedPurge]

    @property
    def freed_bytes(self) -> int:
        return sum(c.bytes for c in self.selected)

    @property
    def disk_percent_after(self) -> float | None:
        return None if self.disk is None else self.disk.percent_after(self.freed_bytes)


@dataclass(frozen=True)
class Purged:
    """What one purge deleted: files found and removed, and the instance rows."""

    study_instance_uid: str
    reason: str
    instances: int
    instance_files: int
    result_files: int
    bytes: int


@dataclass(frozen=True)
class RetentionReport:
    """A run: its plan, and (unless a dry run) what was purged, finished, and what changed under it."""

    plan: RetentionPlan
    dry_run: bool
    purged: list[Purged] = field(default_factory=list)
    finished: list[Purged] = field(default_factory=list)
    #: Planned studies that were not purged: work started or instances arrived after the plan.
    changed: list[Skipped] = field(default_factory=list)


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` when it lies inside ``root`` (a path from the database is never trusted blindly)."""
    base = root.resolve()
    path = (root / relative).resolve()
    return path if path != base and path.is_relative_to(base) else None


def _existing_size(root: Path, relatives: Iterable[str]) -> tuple[int, int]:
    """(files, bytes) of the ``relatives`` that exist under ``root``."""
    files = size = 0
    for relative in relatives:
        path = _inside(root, relative)
        if path is not None and path.is_file():
            files += 1
            size += path.stat().st_size
    return files, size


def plan_retention(
    sessions: sessionmaker[Session], policy: RetentionPolicy, *, now: datetime, outbox_dir: Path, disk_path: Path,
    read_disk: DiskUsageReader = disk_usage,
) -> RetentionPlan:
    """The studies ``policy`` deletes now, oldest last activity first, and those it must keep, with the reason.

    By age: every study whose last activity is older than ``keep_days``. By disk: when the
    file system of ``disk_path`` is more than ``max_disk_used_percent`` used, further studies,
    oldest first, until the estimate is at or below it. A study with unfinished work is
    skipped with what keeps it, whichever limit reached it. Reads only.
    """
    unfinished = db_retention.unfinished_purges(sessions)
    busy = {u.study_id for u in unfinished}
    studies = [f for f in db_retention.footprints(sessions) if f.study_id not in busy]
    selected: list[Candidate] = []
    skipped: list[Skipped] = []
    reached: set[int] = set()

    def take(footprint: StudyFootprint, reason: str) -> Candidate | None:
        reached.add(footprint.study_id)
        if footprint.blockers:
            skipped.append(Skipped(footprint.study_instance_uid, footprint.last_activity_at, footprint.blockers))
            return None
        files, size = _existing_size(outbox_dir, footprint.result_paths) if policy.delete_results else (0, 0)
        candidate = Candidate(footprint, reason, files, size)
        selected.append(candidate)
        return candidate

    if policy.keep_days is not None:
        cutoff = now - timedelta(days=policy.keep_days)
        for footprint in studies:
            if footprint.last_activity_at < cutoff:
                take(footprint, f"last activity {footprint.last_activity_at:%Y-%m-%d %H:%M} UTC is more than "
                                f"{policy.keep_days:g} day(s) ago")
    disk = None
    if policy.max_disk_used_percent is not None:
        limit = policy.max_disk_used_percent
        disk = read_disk(disk_path)
        freed = sum(c.bytes for c in selected)
        for footprint in studies:
            if disk.percent_after(freed) <= limit:
                break
            if footprint.study_id in reached:
                continue
            candidate = take(footprint, f"disk {disk.percent:.1f}% used, more than {limit:g}%: oldest first")
            freed += candidate.bytes if candidate is not None else 0
    return RetentionPlan(policy=policy, now=now, selected=selected, skipped=skipped,
                         kept=len(studies) - len(reached), disk=disk, unfinished=unfinished)


def _remove_files(root: Path, relatives: Iterable[str], *, fsync: bool) -> tuple[int, int]:
    """Delete ``relatives`` under ``root`` and the folders they leave empty; (files removed, bytes).

    With ``fsync`` the folders are synced before returning, so that the deletions are on disk
    before the rows go (a deletion lost to a power cut would otherwise bring back files that
    start-up recovery indexes again).
    """
    removed = size = 0
    folders: set[Path] = set()
    for relative in relatives:
        path = _inside(root, relative)
        if path is None:
            logger.error("retention: %r is not inside %s; not deleted", relative, root)
            continue
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue  # deleted by an earlier, interrupted run
        removed += 1
        size += length
        folders.add(path.parent)
    base = root.resolve()
    synced: set[Path] = set()
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != base and folder.is_relative_to(base):
            try:
                folder.rmdir()  # only when empty: an instance arriving for the study keeps its folder
            except OSError:
                break
            folder = folder.parent
        synced.add(folder)
    if fsync:
        for folder in synced:
            _sync_directory(folder)
    return removed, size


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Retention:
    """Plans and runs purges on the node's database, spool and outbox; the node runs it every
    ``retention.check_interval_seconds`` (actor ``system``), ``dicom-node studies purge`` on demand (``cli``)."""

    def __init__(self, sessions: sessionmaker[Session], *, spool_dir: Path, outbox_dir: Path, policy: RetentionPolicy,
                 clock: Callable[[], datetime], read_disk: DiskUsageReader = disk_usage, fsync: bool = True) -> None:
        self.sessions = sessions
        self.spool_dir = spool_dir
        self.outbox_dir = outbox_dir
        self.policy = policy
        self.clock = clock
        self.read_disk = read_disk
        self.fsync = fsync
        self._stopping = threading.Event()

    def plan(self, policy: RetentionPolicy | None = None) -> RetentionPlan:
        """What a run with ``policy`` (default: the configured one) would do now; changes nothing."""
        return plan_retention(self.sessions, policy or self.policy, now=self.clock(), outbox_dir=self.outbox_dir,
                              disk_path=self.spool_dir, read_disk=self.read_disk)

    def run(self, *, actor: str, policy: RetentionPolicy | None = None, dry_run: bool = False,
            detail: str | None = None) -> RetentionReport:
        """Finish interrupted purges, then purge what the plan selects (nothing with ``dry_run``).

        ``actor`` is audited as who ordered each purge (``system`` for the node's own runs,
        ``cli`` from the shell); ``detail`` is added to each audit entry (e.g. the OS user).
        """
        policy = policy or self.policy
        plan = self.plan(policy)
        if dry_run:
            return RetentionReport(plan=plan, dry_run=True)
        report = RetentionReport(plan=plan, dry_run=False)
        for unfinished in plan.unfinished:
            if self._stopping.is_set():
                return report
            done = self._delete(unfinished.study_id, unfinished.study_instance_uid, unfinished.purged_at,
                                "finishing an interrupted purge", actor, policy)
            if done is not None:
                report.finished.append(done)
        for candidate in plan.selected:
            if self._stopping.is_set():
                break
            footprint = candidate.footprint
            marked_at = self.clock()
            planned = {"instances": footprint.instances, "result_files": candidate.result_files,
                       "bytes": candidate.bytes, "delete_results": policy.delete_results}
            if not db_retention.mark_purge(self.sessions, footprint, now=marked_at, actor=actor,
                                           reason=candidate.reason, planned=planned, detail=detail):
                report.changed.append(Skipped(footprint.study_instance_uid, None, (
                    "changed since the plan (instances arrived, work started, or another purge took it)",)))
                continue
            done = self._delete(footprint.study_id, footprint.study_instance_uid, marked_at, candidate.reason, actor,
                                policy)
            if done is not None:
                report.purged.append(done)
        if report.purged or report.finished:
            logger.info("retention (%s): purged %d study(ies), finished %d interrupted purge(s), %s freed",
                        actor, len(report.purged), len(report.finished),
                        format_bytes(sum(p.bytes for p in report.purged + report.finished)))
        return report

    def _delete(self, study_id: int, uid: str, purged_at: datetime, reason: str, actor: str,
                policy: RetentionPolicy) -> Purged | None:
        """Steps 2 and 3 of a purge marked at ``purged_at``: the files, then the rows and the event."""
        files = db_retention.purge_files(self.sessions, study_id, purged_at, with_results=policy.delete_results)
        instance_files, instance_bytes = _remove_files(self.spool_dir, (p for p, _ in files.instances),
                                                       fsync=self.fsync)
        result_files, result_bytes = _remove_files(self.outbox_dir, files.results, fsync=self.fsync)
        size = instance_bytes + result_bytes
        detail = (f"{reason}: {len(files.instances)} instance(s) and {result_files} result/preview file(s) deleted, "
                  f"{format_bytes(size)} ({size} bytes); ordered by {actor}")
        if db_retention.finish_purge(self.sessions, study_id, purged_at, now=self.clock(), detail=detail) is None:
            return None  # another run finished it
        logger.info("study %s purged: %s", uid, detail)
        return Purged(uid, reason, len(files.instances), instance_files, result_files, size)

    def request_stop(self) -> None:
        """Stop between two studies (a purge cut short is finished by the next run)."""
        self._stopping.set()
