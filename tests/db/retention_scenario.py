"""Studies in every situation retention must tell apart, with real spool and outbox files.

Each study is a generated CT series received through the node's own ingest path
(:func:`tests.web.studies_fixtures.ingest`: spool + index, inside a recorded association),
and its jobs and deliveries are moved with the functions the router and workers use. Result
objects and preview pictures are real files in the outbox, where the worker writes them.

``NOW`` is the tests' present: most studies' last activity is 40 days before it, ``recent``'s
two days before it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs, repo
from dicom_node.db.models import Base
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from tests.web.studies_fixtures import complete_and_route, deliver, fail_job_dead, finish_checked, ingest, run_job, \
    write_study

NOW = datetime(2026, 3, 20, 9, 0, tzinfo=timezone.utc)
OLD = NOW - timedelta(days=40)
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

#: name -> (hours after OLD it was received; None: two days before NOW), seed of its series.
STUDIES: dict[str, tuple[float | None, int]] = {
    "done": (0, 31),        # job succeeded, results delivered: eligible
    "dead": (1, 32),        # job dead, nothing to send: eligible (dead work is finished work)
    "ignored": (2, 33),     # no rule matched: eligible
    "held": (3, 34),        # results held for an operator: kept
    "retrying": (4, 35),    # delivery failed, awaiting its next attempt: kept
    "unrouted": (5, 36),    # complete, not yet routed: kept
    "recent": (None, 37),   # done, but only two days old: kept by age
}
ELIGIBLE = ("done", "dead", "ignored")
BLOCKED = ("held", "retrying", "unrouted")


@dataclass
class Env:
    """What the scenario needs of a node: its settings (data_dir) and its database."""

    settings: Settings
    sessions: sessionmaker[Session]


@dataclass
class Scenario:
    uids: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, list[int]] = field(default_factory=dict)
    deliveries: dict[str, list[int]] = field(default_factory=dict)
    #: Outbox-relative paths of each study's result objects and previews.
    outbox: dict[str, list[str]] = field(default_factory=dict)
    #: Spool-relative paths of each study's instances.
    spool: dict[str, list[str]] = field(default_factory=dict)


def _results(env: Env, job_id: int) -> tuple[list[jobs.ResultSpec], dict[str, Any], list[str]]:
    """A SEG result object and a preview (png + facts) written to the outbox as the worker writes them."""
    outbox = Spool(env.settings.outbox_dir, fsync=False)
    sop = f"2.25.{uuid.uuid4().int}"
    seg = f"job-{job_id}/seg-{sop}.dcm"
    preview = {"png": f"job-{job_id}/preview.png", "facts": f"job-{job_id}/preview.json"}
    outbox.write(seg, [b"\0" * 128 + b"DICM" + os.urandom(2048)])
    outbox.write(preview["png"], [b"\x89PNG\r\n\x1a\n" + os.urandom(512)])
    outbox.write(preview["facts"], [b'{"slice": 1}'])
    spec = jobs.ResultSpec("SEG", SEG_CLASS, sop, f"2.25.{uuid.uuid4().int}", seg)
    summary = {"kind": "segmentation", "volumes_ml": {"lung": 1000.0}, "preview": preview}
    return [spec], summary, [seg, preview["png"], preview["facts"]]


def build(env: Env, work_dir: Path, only: tuple[str, ...] | None = None) -> Scenario:
    """Receive and process the studies of :data:`STUDIES` (or ``only`` those), oldest first."""
    scenario = Scenario()
    sessions = env.sessions
    for name, (hours, seed) in STUDIES.items():
        if only is not None and name not in only:
            continue
        at = NOW - timedelta(days=2) if hours is None else OLD + timedelta(hours=hours)
        paths = write_study(work_dir / name, seed=seed, patient_id=f"P-{name}", patient_name=f"Test^{name}",
                            accession=f"A{seed}", study_date="20260210", description=f"retention {name}")
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        uid, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        scenario.uids[name], scenario.series[name] = uid, series
        ingest(env, paths, calling_ae="PACS_A", at=at)  # type: ignore[arg-type]  # Env has what ingest reads
        scenario.spool[name] = _spool_paths(sessions, uid)
        scenario.outbox[name] = []
        step = at + timedelta(minutes=1)
        if name == "unrouted":
            assert uid in repo.complete_due_studies(sessions, now=step, quiet_seconds=0, max_wait_seconds=3600)
            continue
        job_ids = complete_and_route(sessions, uid, series, [] if name == "ignored" else ["seg"], at=step)
        scenario.jobs[name] = job_ids
        scenario.deliveries[name] = []
        if name == "ignored":
            continue
        job_id = job_ids[0]
        if name == "dead":
            fail_job_dead(sessions, job_id, at=step + timedelta(minutes=1), error="series incomplete: 3 of 4 slices")
            continue
        results, summary, files = _results(env, job_id)
        scenario.outbox[name] = files
        if name == "held":
            finish_checked(sessions, job_id, at=step + timedelta(minutes=1), state="held", results=results,
                           summary=summary, checks={"plausibility": {"plausible": False, "reasons": ["lung 0 ml"]}},
                           events=[("job_held", f"job {job_id}: results judged implausible")])
            continue
        delivered = run_job(sessions, job_id, at=step + timedelta(minutes=1), stages={"load": 0.5, "inference": 2.0},
                            summary=summary, results=results)
        scenario.deliveries[name] = delivered
        if name == "retrying":
            assert jobs.claim_delivery(sessions, delivered[0], now=step + timedelta(minutes=2), lease_seconds=60)
            state, _ = jobs.fail_delivery(sessions, delivered[0], now=step + timedelta(minutes=3),
                                          error="association rejected", retryable=True, backoff_initial_seconds=5,
                                          backoff_max_seconds=600)
            assert state == "failed"
        else:
            deliver(sessions, delivered[0], at=step + timedelta(minutes=2))
    return scenario


def _spool_paths(sessions: sessionmaker[Session], uid: str) -> list[str]:
    from dicom_node.db.models import Instance, Series, Study

    with sessions() as session:
        return [str(p) for p in session.scalars(
            select(Instance.path).join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == uid).order_by(Instance.id))]


def database_snapshot(sessions: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, for "nothing changed" assertions."""
    with sessions() as session:
        return {table.name: sorted((tuple(row) for row in session.execute(table.select())), key=repr)
                for table in Base.metadata.sorted_tables}


def files_snapshot(root: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every file under ``root`` but the SQLite database's own files."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file() and ".db" not in p.name)
