"""``dicom-node studies``: the received studies, their state and their jobs, from the shell.

Why its own module: the study commands read the database only (through the same
views as the web app) and grow with the study actions an admin needs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import job_views, repo
from dicom_node.settings import Settings

__all__ = ["add_commands", "list_studies", "run"]


def add_commands(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``studies`` (the list, as ``studies`` or ``studies list``) and its actions to the CLI parser;
    ``common`` adds the options every command that reads the settings has (``--config``, ``--data-dir``)."""
    studies = commands.add_parser("studies", help="received studies: list them, act on one")
    common(studies)
    _list_options(studies)
    actions = studies.add_subparsers(dest="studies_command")
    listing = actions.add_parser("list", help="list received studies and their state (the default)")
    common(listing)
    _list_options(listing)


def _list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--limit", type=int, default=500)


def run(settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    """Run the ``studies`` sub-command ``args`` names (the list when none); returns the exit code."""
    command = getattr(args, "studies_command", None) or "list"
    if command == "list":
        return list_studies(sessions, as_json=args.json, limit=args.limit)
    raise AssertionError(f"unhandled studies command {command}")


def list_studies(sessions: sessionmaker[Session], *, as_json: bool, limit: int) -> int:
    """Print the newest ``limit`` studies (a table, or JSON with ``as_json``); returns the exit code."""
    studies = repo.list_studies(sessions, limit=limit)
    job_counts = job_views.job_counts_by_study(sessions, [s.study_instance_uid for s in studies])
    if as_json:
        rows = [
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                "accession_number": s.accession_number,
                "study_date": s.study_date,
                "modalities": s.modalities.split(",") if s.modalities else [],
                "state": s.state,
                "series": s.series_count,
                "instances": s.instance_count,
                "late_instances": s.late_instance_count,
                "first_received_at": s.first_received_at.isoformat(),
                "last_received_at": s.last_received_at.isoformat(),
                "completed_at": s.completed_at.isoformat() if s.completed_at else None,
                "jobs": job_counts.get(s.study_instance_uid, {}),
            }
            for s in studies
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print("no studies received yet")
        return 0
    header = (f"{'STATE':<10} {'SERIES':>6} {'IMAGES':>7} {'MOD':<8} {'FIRST RECEIVED (UTC)':<20} "
              f"{'COMPLETED (UTC)':<20} {'JOBS':<24} STUDY INSTANCE UID")
    print(header)
    for s in studies:
        completed = f"{s.completed_at:%Y-%m-%d %H:%M:%S}" if s.completed_at else "-"
        counts = job_counts.get(s.study_instance_uid, {})
        print(
            f"{s.state:<10} {s.series_count:>6} {s.instance_count:>7} {s.modalities[:8]:<8} "
            f"{s.first_received_at:%Y-%m-%d %H:%M:%S}  {completed:<20} {_job_summary(counts):<24} "
            f"{s.study_instance_uid}"
        )
    held = sum(1 for s in studies if job_counts.get(s.study_instance_uid, {}).get("held"))
    if held:
        print(f"\n{held} study(ies) have results HELD (judged implausible, not sent) waiting for an operator: "
              "see `dicom-node jobs list --state held`, then `dicom-node jobs release|discard JOB_ID`")
    return 0


#: Job states in the order ``studies`` lists them: what needs a person first.
_JOB_STATE_ORDER = ("held", "dead", "failed", "running", "queued", "succeeded", "released", "not_applicable",
                    "discarded", "cancelled")


def _job_summary(counts: dict[str, int]) -> str:
    """"1 held, 2 succeeded" (held and dead in capitals: they need a person), "-" without jobs."""
    order = {state: i for i, state in enumerate(_JOB_STATE_ORDER)}
    parts = [f"{n} {state.upper() if state in ('held', 'dead') else state.replace('_', ' ')}"
             for state, n in sorted(counts.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))]
    return ", ".join(parts) or "-"
