"""``dicom-node studies``: the received studies, their state and their jobs, from the shell.

Why its own module: the study commands read the database only (through the same
views as the web app) and grow with the study actions an admin needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import repo, study_states
from dicom_node.settings import Settings
from dicom_node.study_status import NO_DESTINATION

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
    from dicom_node import housekeeping_cli

    housekeeping_cli.add_commands(actions, common)  # purge (retention), export (the study's record)
    resend = actions.add_parser("resend", help="send a study's results again (to a destination added later too)")
    common(resend)
    resend.add_argument("study_uid", help="Study Instance UID")
    resend.add_argument("--destination", help="only to this destination (default: those the job's rule names now)")
    resend.add_argument("--job", type=int, dest="job_id", help="only this job's results")
    reprocess = actions.add_parser("reprocess", help="evaluate the rules again and run their models again on a "
                                                     "study (new results in new series; the earlier ones superseded)")
    common(reprocess)
    reprocess.add_argument("study_uid", help="Study Instance UID")
    reprocess.add_argument("--model", action="append", dest="models", default=[],
                           help="only this model (repeat for several; default: every model the rules ask for)")


def _list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--limit", type=int, default=500)


def run(settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    """Run the ``studies`` sub-command ``args`` names (the list when none); returns the exit code."""
    command = getattr(args, "studies_command", None) or "list"
    if command == "list":
        return list_studies(sessions, as_json=args.json, limit=args.limit)
    from dicom_node import housekeeping_cli

    if command in housekeeping_cli.COMMANDS:
        return housekeeping_cli.run(settings, sessions, args)
    if command in ("resend", "reprocess"):
        return _study_action(settings, sessions, args)
    raise AssertionError(f"unhandled studies command {command}")


def list_studies(sessions: sessionmaker[Session], *, as_json: bool, limit: int) -> int:
    """Print the newest ``limit`` studies (a table, or JSON with ``as_json``); returns the exit code.

    ``state`` is the shown state (:mod:`dicom_node.study_status`, as on the web pages) with its
    ``reason``; ``stored_state`` is how far routing went (receiving, complete, routed, ignored).
    """
    studies = repo.list_studies(sessions, limit=limit)
    statuses = study_states.study_statuses_by_uid(sessions, [s.study_instance_uid for s in studies])
    job_counts = {uid: status.job_counts for uid, status in statuses.items()}
    if as_json:
        rows = [
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                "accession_number": s.accession_number,
                "study_date": s.study_date,
                "modalities": s.modalities.split(",") if s.modalities else [],
                "state": statuses[s.study_instance_uid].state,
                "reason": statuses[s.study_instance_uid].reason,
                "stored_state": s.state,
                "series": s.series_count,
                "instances": s.instance_count,
                "late_instances": s.late_instance_count,
                "first_received_at": s.first_received_at.isoformat(),
                "last_received_at": s.last_received_at.isoformat(),
                "completed_at": s.completed_at.isoformat() if s.completed_at else None,
                "jobs": job_counts.get(s.study_instance_uid, {}),
                "deliveries": statuses[s.study_instance_uid].delivery_counts,
            }
            for s in studies
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print("no studies received yet")
        return 0
    header = (f"{'STATE':<11} {'SERIES':>6} {'IMAGES':>7} {'MOD':<8} {'FIRST RECEIVED (UTC)':<20} "
              f"{'COMPLETED (UTC)':<20} {'JOBS':<24} STUDY INSTANCE UID / REASON")
    print(header)
    for s in studies:
        completed = f"{s.completed_at:%Y-%m-%d %H:%M:%S}" if s.completed_at else "-"
        status = statuses[s.study_instance_uid]
        counts = job_counts.get(s.study_instance_uid, {})
        print(
            f"{status.state.upper() if status.needs_person else status.state:<11} {s.series_count:>6} "
            f"{s.instance_count:>7} {s.modalities[:8]:<8} {s.first_received_at:%Y-%m-%d %H:%M:%S}  {completed:<20} "
            f"{_job_summary(counts):<24} {s.study_instance_uid}\n{'':<11} {status.reason}"
        )
    failed = sum(1 for status in statuses.values() if status.state == "failed")
    if failed:
        print(f"\n{failed} study(ies) FAILED (a job or delivery is dead, or a job was cancelled): the reason names it; "
              "retry with `dicom-node jobs retry JOB_ID`, re-send or re-process the study (`dicom-node studies -h`)")
    held = sum(1 for s in studies if job_counts.get(s.study_instance_uid, {}).get("held"))
    if held:
        print(f"\n{held} study(ies) have results HELD (judged implausible, not sent) waiting for an operator: "
              "see `dicom-node jobs list --state held`, then `dicom-node jobs release|discard JOB_ID`")
    unsent = sum(1 for status in statuses.values() if status.state == "held" and NO_DESTINATION in status.reason)
    if unsent:
        print(f"\n{unsent} study(ies) have results that were never sent ({NO_DESTINATION}): add a destination, "
              "then `dicom-node studies resend STUDY_UID`")
    return 0


def _study_action(settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    """``studies resend`` / ``studies reprocess`` through the same service as the web page; audited as ``cli``."""
    from datetime import datetime, timezone

    from dicom_node.config_service.base import CLI
    from dicom_node.study_actions import StudyActionRefused, reprocess_study, resend_results

    now = datetime.now(timezone.utc)
    try:
        if args.studies_command == "resend":
            resent = resend_results(sessions, args.study_uid, now=now, actor=CLI, destination=args.destination,
                                    job_id=args.job_id, delivery_max_attempts=settings.delivery.max_attempts)
        else:
            reprocessed = reprocess_study(sessions, settings.spool_dir, args.study_uid, now=now, actor=CLI,
                                          models=args.models, job_max_attempts=settings.routing.job_max_attempts)
    except StudyActionRefused as refused:
        print(f"dicom-node: {refused.message}", file=sys.stderr)
        return 1
    if args.studies_command == "resend":
        for target in resent.targets:
            print(f"job {target.job_id} ({target.pipeline}) -> {target.destination}: delivery {target.delivery_id} "
                  f"{'created' if target.created else 'due again'}")
        for line in resent.skipped:
            print(f"skipped: {line}")
        print("the node sends them within seconds; follow them with `dicom-node jobs list` or on the study page")
        return 0
    for rerun in reprocessed.reruns:
        if rerun.job_id is None:
            print(f"{rerun.pipeline} on {rerun.series_instance_uid}: not run again: {rerun.skipped}")
        else:
            replaces = f", replaces job {rerun.supersedes_job_id}" if rerun.supersedes_job_id else ""
            print(f"{rerun.pipeline} on {rerun.series_instance_uid}: job {rerun.job_id}{replaces}")
    print("the node queues the new jobs within seconds; their results go out as new series")
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
