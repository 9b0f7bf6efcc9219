"""``dicom-node studies``: the received studies, their state and their jobs, from the shell.

Why its own module: the study commands read the database only (through the same
views as the web app) and grow with the study actions an admin needs.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import job_views, repo

__all__ = ["list_studies"]


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
