"""A node database with a known history, for the dashboard and metrics tests.

Everything goes through the node's own code: generated CT series are stored by the
real :class:`~dicom_node.ingest.IngestService` (spool + indexer) inside recorded
associations, studies complete with ``repo.complete_due_studies``, are routed with
``jobs.record_routing``, and jobs and deliveries move through ``db.jobs``. What
happened is summed up in :class:`Scenario`, so tests can compare what the UI and
``/metrics`` say with what was done.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import jobs, repo, workers
from dicom_node.db.models import AssociationOutcome
from dicom_node.ingest import IngestService, StoreRequest
from dicom_node.indexer import InstanceIndexer
from dicom_node.routing import JobSpec, RoutingDecision, RuleOutcome
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

#: Study roles of the scenario, each one generated series; "old_done" was received three hours ago.
ROLES = ("done", "failed", "in_progress", "retrying", "ignored", "waiting", "old_done")
#: Error text with markup in it: pages must show it escaped.
HOSTILE_ERROR = "VolumeError: <script>alert('x')</script> slices are not parallel"
STAGES = {"load": 0.2, "model_load": 0.01, "inference": 1.5, "encoding": 0.3, "outbox": 0.02}


def make_series(directory: Path, count: int = len(ROLES), slices: int = 4) -> list[GeneratedSeries]:
    """``count`` tiny CT series (different seeds, so different studies)."""
    geometry = SeriesGeometry(rows=32, columns=32, slices=slices, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    return [generate_ct_series(directory / f"s{i}", geometry=geometry, seed=500 + i) for i in range(count)]


def body_of(path: Path) -> tuple[bytes, pydicom.Dataset]:
    """The dataset as a C-STORE carries it (no preamble, no file meta), and the dataset."""
    dataset = pydicom.dcmread(path)
    copied = copy.deepcopy(dataset)
    copied.file_meta = FileMetaDataset()
    copied.preamble = None
    buffer = io.BytesIO()
    dcmwrite(buffer, copied, implicit_vr=False, little_endian=True)
    return buffer.getvalue(), dataset


@dataclass
class Scenario:
    """What :func:`build_scenario` did."""

    now: datetime
    uids: dict[str, str] = field(default_factory=dict)  # role -> Study Instance UID
    instances: int = 0
    bytes: int = 0
    instances_at: dict[datetime, int] = field(default_factory=dict)  # receive time -> instances then
    done_at: dict[str, datetime] = field(default_factory=dict)  # role -> when its last result was done
    job_ids: dict[str, int] = field(default_factory=dict)
    refused_status: int = 0  # the C-STORE status the refused instance got


def build_scenario(settings: Settings, sessions: sessionmaker[Session], series: list[GeneratedSeries],
                   now: datetime) -> Scenario:
    """Receive, route and process seven studies (see ROLES), plus one refused instance, one rejected
    association, one online and one offline worker."""
    scenario = Scenario(now=now)
    engine = sessions.kw["bind"]
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    clock_value = [now]
    ingest = IngestService(spool=Spool(settings.spool_dir), quarantine_dir=settings.quarantine_dir, sessions=sessions,
                           indexer=indexer, duplicate_policy="keep", min_free_bytes=0, clock=lambda: clock_value[0])

    def receive(role: str, generated: GeneratedSeries, at: datetime) -> None:
        clock_value[0] = at
        association = repo.open_association(sessions, calling_ae_title="PACS", called_ae_title="DICOM_NODE",
                                            peer_address="127.0.0.1", peer_port=104, tls=False, now=at)
        size = 0
        for path in generated.paths:
            body, dataset = body_of(path)
            outcome = ingest.store(StoreRequest(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID),
                                                "1.2.840.10008.1.2.1", "PACS", association), body)
            assert outcome.status == 0, outcome
            size += len(body)
        repo.close_association(sessions, association, outcome=AssociationOutcome.RELEASED, now=at,
                               instances_stored=len(generated.paths), instances_failed=0, bytes_received=size)
        ingest.association_finished(association)
        scenario.uids[role] = generated.study_uid
        scenario.instances += len(generated.paths)
        scenario.bytes += size
        scenario.instances_at[at] = scenario.instances_at.get(at, 0) + len(generated.paths)

    by_role = dict(zip(ROLES, series))
    recent, old = now - timedelta(minutes=10), now - timedelta(hours=3)
    for role in ROLES:
        if role != "waiting":
            receive(role, by_role[role], old if role == "old_done" else recent)
    completed = repo.complete_due_studies(sessions, now=now - timedelta(minutes=9), quiet_seconds=0,
                                          max_wait_seconds=86400)
    assert len(completed) == len(ROLES) - 1
    ids = {uid: study_id for study_id, uid in jobs.studies_to_route(sessions)}

    def route(role: str, *pipelines: str, at: datetime) -> list[int]:
        series_uid = by_role[role].series_uid
        decision = RoutingDecision(
            jobs=tuple(JobSpec(pipeline=p, series_instance_uid=series_uid, rule="ct", priority=0,
                               destinations=("pacs",)) for p in pipelines),
            outcomes=(RuleOutcome(rule="ct", matched=bool(pipelines), reasons=() if pipelines else ("not CT",)),),
        )
        return jobs.record_routing(sessions, ids[scenario.uids[role]], decision, now=at, max_attempts=3)

    def succeed(job_id: int, at: datetime, destinations: list[str]) -> list[int]:
        assert jobs.claim_job(sessions, job_id, worker="gpu-1:42", now=at, lease_seconds=300) is not None
        return jobs.finish_job(sessions, job_id, now=at + timedelta(seconds=2), stage_seconds=STAGES, summary={},
                               results=[], destinations=destinations, delivery_max_attempts=5)

    at = now - timedelta(minutes=8)
    [job] = route("done", "chest-seg", at=at)
    [delivery] = succeed(job, at, ["pacs"])
    assert jobs.claim_delivery(sessions, delivery, now=at + timedelta(seconds=3), lease_seconds=60)
    jobs.finish_delivery(sessions, delivery, now=at + timedelta(seconds=4), objects_sent=2)
    scenario.done_at["done"] = at + timedelta(seconds=4)
    scenario.job_ids["done"] = job

    [job] = route("failed", "chest-seg", at=at)
    assert jobs.claim_job(sessions, job, worker="gpu-1:42", now=at, lease_seconds=300)
    assert jobs.fail_job(sessions, job, now=at + timedelta(seconds=1), error=HOSTILE_ERROR, retryable=False) == "dead"
    scenario.job_ids["failed"] = job

    [job] = route("in_progress", "nodule-det", at=at)  # stays queued
    scenario.job_ids["in_progress"] = job

    [job] = route("retrying", "chest-seg", at=at)
    [delivery] = succeed(job, at, ["pacs"])
    assert jobs.claim_delivery(sessions, delivery, now=at + timedelta(seconds=3), lease_seconds=60)
    state, _ = jobs.fail_delivery(sessions, delivery, now=at + timedelta(seconds=4),
                                  error="C-STORE to pacs: association rejected", retryable=True,
                                  backoff_initial_seconds=60, backoff_max_seconds=600)
    assert state == "failed"
    scenario.job_ids["retrying"] = job

    assert route("ignored", at=at) == []

    old_at = old + timedelta(minutes=2)
    [job] = route("old_done", "chest-seg", at=old_at)
    succeed(job, old_at, [])
    scenario.done_at["old_done"] = old_at + timedelta(seconds=2)
    scenario.job_ids["old_done"] = job

    receive("waiting", by_role["waiting"], now - timedelta(minutes=1))  # not complete yet

    clock_value[0] = now - timedelta(minutes=1)
    refused = ingest.store(StoreRequest("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", "PACS", None),
                           b"\x08\x00garbage")
    assert refused.status != 0
    scenario.refused_status = refused.status
    repo.open_association(sessions, calling_ae_title="EVIL", called_ae_title="DICOM_NODE", peer_address="10.9.9.9",
                          peer_port=4000, tls=False, now=now - timedelta(minutes=2),
                          reject_reason="calling AE title 'EVIL' is not in the allow-list")
    workers.upsert_worker(sessions, name="gpu-1:42", queues=["gpu"], device="cuda:0 (Test GPU)",
                          started_at=now - timedelta(hours=1), now=now,
                          models={"chest-seg": {"state": "loaded", "device": "cuda:0", "error": None, "version": "1"}})
    workers.upsert_worker(sessions, name="gone:7", queues=["io"], device=None, started_at=now - timedelta(hours=2),
                          now=now - timedelta(minutes=10), models={})
    indexer.stop()
    return scenario
