"""A job whose model ran is encoded by the worker's encoder thread while the next job's model runs.

A small chest CT phantom is received through the node's ingest path and routed to two
jobs of the threshold segmentation bundle (one held by its plausibility rule), which
``workers.pipeline.run_job`` runs with a real worker context on SQLite. The encoder is
kept busy by work handed to it first (an event to wait for), so the tests see each
job between its model and its objects: still ``running``, lease renewed, claim held,
nothing in the outbox or the database - and then finished exactly once. Also when the
job was taken over (its lease expired: the worker was presumed dead) or handed back
(the worker stopped) while its objects waited for the encoder.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.db import config_repo, jobs
from dicom_node.db.models import Delivery, Job
from dicom_node.destinations import DicomDestination
from dicom_node.ingest import utc_now
from dicom_node.model_catalog import ModelEntry
from dicom_node.queue import CeleryQueue
from dicom_node.work_in_flight import hand_back_unfinished
from tests.unit.workers.model_fixtures import write_threshold_bundle
from tests.web.conftest import WebEnv, make_web_env
from tests.web.studies_fixtures import T0, complete_and_route
from tests.web.test_preview import received
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from workers.celery_app import make_celery_app
from workers.context import WorkerContext, build_worker_context
from workers.models.registry import ModelRegistry
from workers.pipeline import run_job

SEGMENTER, STRICT = "threshold-seg", "threshold-seg-strict"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small chest CT (40 slices of 80x80 at 5 x 4.4 x 4.4 mm)."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(40, 80, 80), spacing_mm=(5.0, 4.4, 4.4),
                                                   nodule_count=(1, 1), nodule_diameter_mm=(15.0, 15.0)), seed=77)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("chest") / "case", seed=77)
    return sorted(series_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """The threshold bundle, and the same with a plausibility rule it always breaks (its job is held)."""
    bundle = write_threshold_bundle(tmp_path_factory.mktemp("threshold") / "bundle", spacing_mm=(5.0, 5.0, 5.0),
                                    roi_size=(32, 32, 16))
    plain = {"kind": "segmentation", "format": "monai_bundle", "path": str(bundle), "version": "0.1.0"}
    return ModelRegistry((ModelEntry.model_validate({"id": SEGMENTER, **plain}),
                          ModelEntry.model_validate({"id": STRICT, **plain, "plausibility": {
                              "volumes_ml": {"bone": {"max": 1.0}}}})),
                         base_dir=bundle.parent, source="encoder hand-off test models")


def environment(tmp_path: Path, pending: int) -> WebEnv:
    env = make_web_env(tmp_path, **{"worker.pending_encodes": pending})
    config_repo.upsert_destination(env.sessions, DicomDestination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=11112, default=True), source="test", now=T0)
    return env


def worker(env: WebEnv, registry: ModelRegistry, name: str) -> WorkerContext:
    return build_worker_context(env.settings, env.sessions, CeleryQueue(make_celery_app("memory://")), registry,
                                worker_name=name)


def busy(context: WorkerContext) -> threading.Event:
    """Keep the context's encoder busy until the returned event is set."""
    gate = threading.Event()
    assert context.encoder is not None
    context.encoder.submit(gate.wait)
    return gate


def one_job_waiting_for_the_encoder(tmp_path: Path, files: list[Path], registry: ModelRegistry, name: str,
                                    ) -> tuple[WebEnv, int, WorkerContext, threading.Event]:
    """A study routed to the threshold model, whose job ran on worker ``name`` and waits for its busy encoder:
    the environment, the job, the worker and the event that frees its encoder."""
    env = environment(tmp_path, pending=2)
    study, series = received(env, files)
    [job_id] = complete_and_route(env.sessions, study, series, [SEGMENTER], at=T0 + timedelta(minutes=1))
    context = worker(env, registry, name)
    gate = busy(context)
    assert run_job(context, job_id) == "running"
    return env, job_id, context, gate


def job_row(env: WebEnv, job_id: int) -> tuple[str, str | None, object, dict[str, float] | None]:
    """(state, worker, lease_expires_at, stage_seconds) of a job."""
    with env.sessions() as session:
        state, on, lease, stages = session.execute(
            select(Job.state, Job.worker, Job.lease_expires_at, Job.stage_seconds).where(Job.id == job_id)).one()
    return state, on, lease, None if stages is None else json.loads(stages)


def destinations_of(env: WebEnv, job_id: int) -> list[str]:
    with env.sessions() as session:
        return list(session.scalars(select(Delivery.destination).where(Delivery.job_id == job_id)))


def outbox_files(env: WebEnv, job_id: int) -> list[str]:
    folder = env.settings.outbox_dir / f"job-{job_id}"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_the_next_model_runs_while_the_finished_jobs_objects_wait_for_the_encoder(
    tmp_path: Path, files: list[Path], registry: ModelRegistry
) -> None:
    env = environment(tmp_path, pending=3)
    study, series = received(env, files)
    first, second = complete_and_route(env.sessions, study, series, [SEGMENTER, STRICT], at=T0 + timedelta(minutes=1))
    context = worker(env, registry, "gpu-1")
    assert context.encoder is not None and context.encoder.pending == 3
    gate = busy(context)

    # Both models ran, one after the other in the one job slot, while neither job's objects were made.
    assert [run_job(context, first), run_job(context, second)] == ["running", "running"]
    for job_id in (first, second):
        state, on, lease, stages = job_row(env, job_id)
        assert (state, on, stages) == ("running", "gpu-1", None) and lease is not None
        assert jobs.results_of_job(env.sessions, job_id) == [] and outbox_files(env, job_id) == []
    assert sorted(item for _, item, _ in context.work.unfinished()) == sorted([first, second])
    assert context.job_slots.acquire(timeout=0), "the job slot is free for the next model"
    context.job_slots.release()

    gate.set()
    assert context.encoder.wait_idle(timeout=120)
    assert context.work.unfinished() == []
    done = {job_id: job_row(env, job_id) for job_id in (first, second)}
    assert done[first][0] == "succeeded" and done[second][0] == "held"
    for job_id, (_, _, lease, stages) in done.items():
        assert lease is None and stages is not None and {"inference", "encoding", "outbox", "encoder_wait"} <= set(
            stages)
        results = jobs.results_of_job(env.sessions, job_id)
        assert sorted(r.kind for r in results) == ["SEG", "SR"]
        assert sorted([f"{r.kind.lower()}-{r.sop_instance_uid}.dcm" for r in results]
                      + ["preview.json", "preview.png"]) == outbox_files(env, job_id)
    assert destinations_of(env, first) == ["pacs"]
    assert destinations_of(env, second) == []  # held: sent only once released


def test_a_job_taken_over_while_its_objects_waited_is_finished_once_by_the_worker_that_took_it(
    tmp_path: Path, files: list[Path], registry: ModelRegistry
) -> None:
    env, job_id, stalled, gate = one_job_waiting_for_the_encoder(tmp_path, files, registry, "gpu-stalled")

    # The stalled worker stops renewing the lease (as a killed one would): the job is queued again and runs elsewhere.
    assert jobs.requeue_jobs(env.sessions, now=utc_now() + timedelta(hours=1)) == [job_id]
    other = worker(env, registry, "gpu-2")
    assert run_job(other, job_id) == "running" and other.encoder is not None and other.encoder.wait_idle(120)
    assert job_row(env, job_id)[:2] == ("succeeded", "gpu-2")
    taken = jobs.results_of_job(env.sessions, job_id)
    kept = outbox_files(env, job_id)

    gate.set()  # the stalled worker's encoder gets to the job: not its own any more, so nothing is recorded
    assert stalled.encoder is not None and stalled.encoder.wait_idle(timeout=120)
    assert jobs.results_of_job(env.sessions, job_id) == taken and outbox_files(env, job_id) == kept
    assert "preview.png" in kept  # the job's preview stays: the stalled attempt removes only its own objects
    assert job_row(env, job_id)[:2] == ("succeeded", "gpu-2") and stalled.work.unfinished() == []


def test_a_stopping_worker_hands_back_a_job_whose_objects_were_not_made_in_time(
    tmp_path: Path, files: list[Path], registry: ModelRegistry
) -> None:
    env, job_id, context, gate = one_job_waiting_for_the_encoder(tmp_path, files, registry, "gpu-1")

    context.work.request_stop()
    assert not context.work.wait_finished(0.2), "the job waiting for the encoder is unfinished work of the worker"
    handed = hand_back_unfinished(context.work, env.sessions, context.queue, worker="gpu-1", clock=utc_now,
                                  reason="the test stops the worker")
    assert handed.jobs == [job_id] and job_row(env, job_id)[0] == "queued"
    gate.set()
    assert context.encoder is not None and context.encoder.wait_idle(timeout=120)
    assert job_row(env, job_id)[0] == "queued" and jobs.results_of_job(env.sessions, job_id) == []
    # Its objects were discarded (the job runs again from the start); only the job's preview may stay behind.
    assert not [name for name in outbox_files(env, job_id) if name.endswith(".dcm")]
