"""What the security and permission tests share: the app's routes, real objects to fill path
parameters with, and a snapshot of the whole database to prove a refused request changed nothing.

Routes are read from the app itself (``iter_route_contexts``), so routes other areas add are
covered without anyone editing these tests (the permission matrix still asks for a table entry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import audit, config_repo, jobs, users
from dicom_node.db.models import Base, Role, Series, Study, StudyState
from dicom_node.destinations import DicomDestination
from dicom_node.ingest import utc_now
from dicom_node.routing import DEMO_PIPELINES, JobSpec, Rule, RoutingDecision, RuleOutcome
from dicom_node.web.passwords import hash_password

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
#: Patient identifiers of the seeded study: no anonymous answer may contain any of them.
PATIENT_ID = "PID-SECRET-4711"
PATIENT_NAME = "DOE^JANE^SECRETNAME"
ACCESSION = "ACC-SEC-99"
STUDY_UID = "1.2.826.0.1.3680043.99.4711"
SERIES_UID = STUDY_UID + ".1"
IDENTIFIERS = (PATIENT_ID, PATIENT_NAME, "SECRETNAME", ACCESSION, STUDY_UID)
TARGET_USER = "target-user"


def app_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path template) the app serves; HEAD and mounts (``/static``) left out."""
    found: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        if not route.methods or not route.path:  # a Mount (static files) has no methods
            continue
        for method in route.methods - {"HEAD"}:
            found.add((method, route.path))
    return sorted(found, key=lambda mp: (mp[1], mp[0]))


@dataclass
class Seeded:
    """Real objects of every kind a path parameter can name."""

    study_id: int
    job_id: int
    delivery_id: int
    token_id: int
    audit_id: int
    rule: str = "sec-rule"
    destination: str = "sec-dest"
    model: str = DEMO_PIPELINES[0]
    username: str = TARGET_USER
    unknown_params: set[str] = field(default_factory=set)

    def value(self, name: str, path: str) -> str:
        """A plausible value for path parameter ``name`` of ``path`` (an existing object where one exists)."""
        by_name = {
            "study_instance_uid": STUDY_UID, "study_uid": STUDY_UID, "uid": STUDY_UID,
            "series_instance_uid": SERIES_UID, "series_uid": SERIES_UID, "sop_instance_uid": SERIES_UID + ".1",
            "path": f"job-{self.job_id}/sr-{SERIES_UID}.9.dcm",  # a result file in the job's outbox folder
            "job_id": str(self.job_id), "delivery_id": str(self.delivery_id), "token_id": str(self.token_id),
            "entry_id": str(self.audit_id), "audit_id": str(self.audit_id), "study_id": str(self.study_id),
            "username": self.username, "user": self.username,
            "rule": self.rule, "rule_name": self.rule,
            "destination": self.destination, "destination_name": self.destination, "dest": self.destination,
            "model": self.model, "model_id": self.model, "model_name": self.model, "pipeline": self.model,
        }
        if name in by_name:
            return by_name[name]
        by_area = [("/rules", self.rule, str(self.job_id)), ("/destinations", self.destination, "1"),
                   ("/models", self.model, "1"), ("/users", self.username, "1"),
                   ("/tokens", str(self.token_id), str(self.token_id)), ("/jobs", str(self.job_id), str(self.job_id)),
                   ("/deliveries", str(self.delivery_id), str(self.delivery_id)),
                   ("/studies", STUDY_UID, str(self.study_id)), ("/audit", str(self.audit_id), str(self.audit_id))]
        for prefix, named, numbered in by_area:
            if path.removeprefix("/api/v1").startswith(prefix):
                if name == "name":
                    return named
                if name == "id":
                    return numbered
        self.unknown_params.add(f"{name} in {path}")
        return "1"

    def fill(self, path: str) -> str:
        return re.sub(r"\{([^}:]+)(:[^}]*)?\}", lambda m: self.value(m.group(1), path), path)


def seed(sessions: sessionmaker[Session]) -> Seeded:
    """A study with patient identifiers, a job with a delivery, a rule, a destination, a spare user with a token."""
    now = utc_now()
    t0 = now - timedelta(hours=1)
    with sessions.begin() as session:
        study = Study(study_instance_uid=STUDY_UID, patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                      accession_number=ACCESSION, study_date="20260501", study_description="CT CHEST",
                      state=StudyState.COMPLETE.value, instance_count=12, late_instance_count=0,
                      first_received_at=t0, last_received_at=t0, receiving_since=t0, last_activity_at=t0,
                      completed_at=t0, state_changed_at=t0)
        session.add(study)
        session.flush()
        session.add(Series(study_id=study.id, series_instance_uid=SERIES_UID, modality="CT", series_number=1,
                           series_description="AXIAL", body_part_examined="CHEST", instance_count=12,
                           first_received_at=t0, last_received_at=t0))
        study_id = int(study.id)
    config_repo.upsert_destination(
        sessions, DicomDestination(name="sec-dest", ae_title="SEC_PACS", host="127.0.0.1", port=9, timeout_seconds=1),
        source="test", now=now)
    config_repo.upsert_rules(sessions, [Rule(name="sec-rule", pipelines=[DEMO_PIPELINES[0]], destinations=["sec-dest"])],
                             source="test", now=now)
    decision = RoutingDecision(
        jobs=(JobSpec(pipeline=DEMO_PIPELINES[0], series_instance_uid=SERIES_UID, rule="sec-rule", priority=0,
                      destinations=["sec-dest"]),),
        outcomes=(RuleOutcome(rule="sec-rule", matched=True, reasons=("test",)),))
    [job_id] = jobs.record_routing(sessions, study_id, decision, now=t0, max_attempts=3)
    jobs.claim_job(sessions, job_id, worker="test", now=t0, lease_seconds=60)
    [delivery_id] = jobs.finish_job(sessions, job_id, now=t0, stage_seconds={"infer": 1.0}, summary={},
                                    results=[], destinations=["sec-dest"], delivery_max_attempts=3)
    users.create_user(sessions, TARGET_USER, hash_password("target user password"), Role.VIEWER, now=now)
    token, _ = users.create_api_token(sessions, TARGET_USER, "spare", now=now)
    audit_id = audit.record(sessions, at=now, actor="system", action="test.seed", target_kind="study",
                            target=STUDY_UID)
    return Seeded(study_id=study_id, job_id=job_id, delivery_id=delivery_id, token_id=token.id, audit_id=audit_id)


def db_snapshot(sessions: sessionmaker[Session]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to compare before and after a request that must change nothing."""
    snapshot: dict[str, list[tuple[Any, ...]]] = {}
    with sessions() as session:
        for table in Base.metadata.sorted_tables:
            rows = session.execute(select(table)).all()
            snapshot[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return snapshot

