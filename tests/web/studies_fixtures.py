"""Studies for the web tests, received through the node's own ingest path, and jobs moved through their states.

Why: the studies pages and the preview must be tested on what the node really stores.
Every study here is a generated CT series whose files go through ``IngestService.store``
(spool + index, as the SCP does for each C-STORE) inside a recorded association; jobs,
results and deliveries are moved with the same ``dicom_node.db.jobs`` functions the
router and the workers use.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs, repo
from dicom_node.db.models import AssociationOutcome, Study
from dicom_node.indexer import InstanceIndexer
from dicom_node.ingest import IngestService, StoreRequest
from dicom_node.routing import JobSpec, RoutingDecision
from dicom_node.spool import Spool
from tests.web.conftest import WebEnv
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, simple_body_phantom, write_series

T0 = datetime(2026, 3, 20, 9, 0, tzinfo=timezone.utc)
GEOMETRY = SeriesGeometry(rows=32, columns=32, slices=4, pixel_spacing=(8.0, 8.0), slice_spacing=5.0)



def write_study(out_dir: Path, *, seed: int, patient_id: str, patient_name: str, accession: str, study_date: str,
                description: str, geometry: SeriesGeometry = GEOMETRY) -> list[Path]:
    """A generated CT series with the given identification, written as DICOM files."""
    datasets = ct_series_datasets(
        simple_body_phantom(geometry, seed), geometry, seed=seed, patient_id=patient_id, patient_name=patient_name,
        accession_number=accession, study_description=description,
    )
    for ds in datasets:
        ds.StudyDate = study_date
    return write_series(datasets, out_dir)


def _body(path: Path) -> tuple[bytes, str, str, str]:
    """(dataset bytes without file meta, transfer syntax, SOP class, SOP instance) of a Part 10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", f"{path} has no meta group length"
    end = 144 + struct.unpack("<I", data[140:144])[0]
    meta: dict[int, str] = {}
    at = 144
    while at < end:
        group, element, vr = struct.unpack("<HH2s", data[at:at + 6])
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            length, header = struct.unpack("<I", data[at + 8:at + 12])[0], 12
        else:
            length, header = struct.unpack("<H", data[at + 6:at + 8])[0], 8
        meta[element] = data[at + header:at + header + length].rstrip(b"\0 ").decode("ascii", "replace")
        at += header + length
    return data[end:], meta[0x0010], meta[0x0002], meta[0x0003]


def ingest(env: WebEnv, paths: list[Path], *, calling_ae: str, at: datetime) -> None:
    """Receive ``paths`` as one association from ``calling_ae``, through the node's ingest service."""
    engine = env.sessions.kw["bind"]
    service = IngestService(
        spool=Spool(env.settings.spool_dir, fsync=False), quarantine_dir=env.settings.quarantine_dir,
        sessions=env.sessions, indexer=InstanceIndexer(engine, reopen_on_late_instances=True),
        duplicate_policy="keep_first", min_free_bytes=0, clock=lambda: at,
    )
    association = repo.open_association(env.sessions, calling_ae_title=calling_ae, called_ae_title="DICOM_NODE",
                                        peer_address="127.0.0.1", peer_port=104, tls=False, now=at)
    for path in paths:
        body, syntax, sop_class, sop = _body(path)
        outcome = service.store(StoreRequest(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax_uid=syntax,
                                             calling_ae_title=calling_ae, association_id=association), body)
        assert outcome.status == 0, f"{path}: {outcome}"
    repo.close_association(env.sessions, association, outcome=AssociationOutcome.RELEASED, now=at,
                           instances_stored=len(paths), instances_failed=0, bytes_received=1)


def complete_and_route(sessions: sessionmaker[Session], study_uid: str, series_uid: str, pipelines: list[str],
                       *, at: datetime) -> list[int]:
    """Complete the study and route it to ``pipelines`` (one job each) as the router would."""
    assert study_uid in repo.complete_due_studies(sessions, now=at, quiet_seconds=0, max_wait_seconds=3600)
    study_id = _study_id(sessions, study_uid)
    decision = RoutingDecision(jobs=tuple(
        JobSpec(pipeline=p, series_instance_uid=series_uid, rule=f"rule-{p}", priority=0, destinations="default")
        for p in pipelines), outcomes=())
    return jobs.record_routing(sessions, study_id, decision, now=at + timedelta(seconds=1), max_attempts=2)


def _study_id(sessions: sessionmaker[Session], study_uid: str) -> int:
    with sessions() as session:
        found = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    assert found is not None, f"study {study_uid} was not indexed"
    return int(found)


def run_job(sessions: sessionmaker[Session], job_id: int, *, at: datetime, stages: dict[str, float],
            summary: dict[str, object] | None = None, results: list[jobs.ResultSpec] | None = None,
            destinations: tuple[str, ...] = ("pacs",)) -> list[int]:
    """Claim and finish a job as a worker does; returns the new delivery ids."""
    claim = jobs.claim_job(sessions, job_id, worker="gpu-1:42", now=at, lease_seconds=60)
    assert claim is not None
    return jobs.finish_job(sessions, job_id, now=at + timedelta(seconds=sum(stages.values())), stage_seconds=stages,
                           summary=summary or {"kind": "segmentation", "volumes_ml": {"lung": 1234.5}},
                           results=results or [], destinations=list(destinations), delivery_max_attempts=2)


def fail_job_dead(sessions: sessionmaker[Session], job_id: int, *, at: datetime, error: str) -> None:
    assert jobs.claim_job(sessions, job_id, worker="gpu-1:42", now=at, lease_seconds=60) is not None
    assert jobs.fail_job(sessions, job_id, now=at + timedelta(seconds=3), error=error, retryable=False,
                         stage_seconds={"load": 0.25}) == "dead"


def fail_delivery(sessions: sessionmaker[Session], delivery_id: int, *, at: datetime, error: str) -> str:
    assert jobs.claim_delivery(sessions, delivery_id, now=at, lease_seconds=60) is not None
    state, _ = jobs.fail_delivery(sessions, delivery_id, now=at + timedelta(seconds=2), error=error, retryable=False,
                                  backoff_initial_seconds=1, backoff_max_seconds=10)
    return state


def deliver(sessions: sessionmaker[Session], delivery_id: int, *, at: datetime) -> None:
    assert jobs.claim_delivery(sessions, delivery_id, now=at, lease_seconds=60) is not None
    jobs.finish_delivery(sessions, delivery_id, now=at + timedelta(seconds=2), objects_sent=2)


def finish_checked(sessions: sessionmaker[Session], job_id: int, *, at: datetime, state: str,
                   checks: dict[str, object], events: list[tuple[str, str]],
                   results: list[jobs.ResultSpec] | None = None, deliveries: list[jobs.DeliverySpec] | None = None,
                   summary: dict[str, object] | None = None, stages: dict[str, float] | None = None) -> list[int]:
    """Claim and finish a job as the worker does after its checks (``state``: not_applicable, held, or
    succeeded), with the checks' records and timeline events; returns the new delivery ids."""
    stages = stages or {"load": 0.5, "applicability": 0.12}
    assert jobs.claim_job(sessions, job_id, worker="gpu-1:42", now=at, lease_seconds=60) is not None
    created = jobs.finish_job(sessions, job_id, now=at + timedelta(seconds=sum(stages.values())), stage_seconds=stages,
                              summary=summary, results=results or [], deliveries=deliveries or [],
                              delivery_max_attempts=2, state=state, checks=checks, events=events)
    assert created is not None, f"job {job_id} was not running"
    return created
