"""Faults in the distributed mode: the broker restarted, the database restarted, a worker killed.

The node runs as in production across machines: ``dicom-node serve`` with
``queue.broker_url`` on Redis, ``database_url`` on PostgreSQL and no embedded worker,
plus separate ``dicom-node worker`` processes running the slow test model of
:mod:`pipeline_setup`; a real Orthanc is the PACS. Redis and PostgreSQL are private
instances (:mod:`private_servers`) so that they can be restarted without touching the
servers other tests use. What must hold after each fault: every acknowledged instance
is indexed and on disk, every job ends ``succeeded``, and the PACS holds each job's
results exactly once (one SEG series and one SR series of one instance each).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from acking_sender import read_acks, read_failures, start_sender
from crash_trials import check_spool
from peers import LOCALHOST, Orthanc, PostgresNode, WorkerProcess, wait_for
from pipeline_setup import delivered_once, pipeline_settings, result_series_in_pacs, small_ct
from private_servers import PostgresServer, RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the module; each test has a database of its own on it."""
    server = PostgresServer(label="private-postgres").start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", label="private-redis").start()
    yield server
    server.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", aet="PACS", label="pacs").start()
    yield server
    server.stop()


class Deployment:
    """The node, its workers and its peers for one test; :meth:`close` stops what was started."""

    def __init__(self, tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer, pacs: Orthanc,
                 bundle: Path, inference_delay_seconds: float) -> None:
        self.tmp_path = tmp_path
        self.pacs = pacs
        database_url = postgres.create_database(f"fault_{uuid.uuid4().hex[:12]}")
        settings = {
            **pipeline_settings(tmp_path / "config", bundle=bundle, destination_port=pacs.dicom_port,
                                inference_delay_seconds=inference_delay_seconds, worker_queues=()),
            "database_url": database_url,
            "queue.broker_url": redis_server.url,
        }
        self.node = PostgresNode(tmp_path / "node", database_url=database_url, overrides=settings, label="node")
        self.workers: list[WorkerProcess] = []

    def start_worker(self, label: str) -> WorkerProcess:
        """``dicom-node worker --queues gpu,io``, returned once its model is loaded."""
        worker = WorkerProcess(self.node, self.tmp_path, label)
        self.workers.append(worker)
        wait_for(f"{label} to load its model", lambda: "loaded bundle" in worker.log(), timeout=120)
        return worker

    def jobs(self) -> list[tuple[Any, ...]]:
        """(id, study UID, state, attempts, error) of every job."""
        return self.node.query(
            "SELECT j.id, s.study_instance_uid, j.state, j.attempts, j.error FROM jobs j"
            " JOIN studies s ON s.id = j.study_id ORDER BY j.id")

    def wait_until_all_delivered(self, jobs: int, timeout: float) -> None:
        """Every one of ``jobs`` jobs ended (fail at once if one ended otherwise than succeeded) and was delivered."""

        def probe() -> bool:
            rows = self.jobs()
            ended = [row for row in rows if row[2] in ("succeeded", "dead", "cancelled", "not_applicable", "held")]
            assert all(row[2] == "succeeded" for row in ended), rows
            delivered = self.node.query("SELECT count(*) FROM deliveries WHERE state = 'delivered'")[0][0]
            return len(ended) == jobs and delivered == jobs

        wait_for(f"{jobs} job(s) to succeed and be delivered", probe, timeout=timeout, interval=0.5)

    def results_problems(self) -> list[str]:
        """What the PACS holds that is not each job's results exactly once."""
        problems = []
        for job_id, study_uid, *_ in self.jobs():
            expected = {str(kind): str(series) for kind, series in self.node.query(
                "SELECT kind, series_instance_uid FROM result_objects WHERE job_id = ?", [job_id])}
            if set(expected) != {"SEG", "SR"}:
                problems.append(f"job {job_id} recorded results {expected}, expected a SEG and an SR")
            problems += [f"job {job_id}: {p}" for p in delivered_once(result_series_in_pacs(self.pacs, study_uid),
                                                                      expected)]
        return problems

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.node.close()


@pytest.fixture
def deployment_factory(tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer, pacs: Orthanc,
                       slow_bundle: Path) -> Iterator[Any]:
    made: list[Deployment] = []

    def make(inference_delay_seconds: float) -> Deployment:
        deployment = Deployment(tmp_path, postgres, redis_server, pacs, slow_bundle, inference_delay_seconds)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.close()


def test_redis_restarted_mid_job_loses_no_job(deployment_factory: Any, redis_server: RedisServer,
                                              tmp_path: Path) -> None:
    """The broker dies with a job running and others queued, and comes back empty.

    The worker has reserved two messages (its two threads: a job and a delivery); the
    third job's message waits in Redis and is lost with it.
    """
    deployment = deployment_factory(inference_delay_seconds=3.0)
    node = deployment.node.start()
    deployment.start_worker("worker-1")
    for seed in (91, 92, 95):
        assert node.storescu(small_ct(tmp_path, seed=seed).paths).returncode == 0
    wait_for("one job running and two queued", lambda: sorted(
        row[2] for row in deployment.jobs()) == ["queued", "queued", "running"], timeout=90)

    redis_server.restart(down_seconds=1.0)  # the messages it held (waiting and unacknowledged) are gone

    deployment.wait_until_all_delivered(jobs=3, timeout=120)
    assert not deployment.results_problems()
    assert [row[3] for row in deployment.jobs()] == [1, 1, 1]  # no inference ran twice


def test_postgres_restarted_mid_push_loses_no_acknowledged_instance(
        deployment_factory: Any, postgres: PostgresServer, tmp_path: Path) -> None:
    """The database crashes while a PACS sends a series; the PACS re-sends what was refused."""
    deployment = deployment_factory(inference_delay_seconds=0.0)
    node = deployment.node.start()
    deployment.start_worker("worker-1")
    series = small_ct(tmp_path, seed=93, slices=60)  # 6 s at 0.1 s per instance: the restart falls inside
    files, sources = series.paths, dict(zip(series.sop_instance_uids, series.paths))
    acks = tmp_path / "push.acks"
    sender = start_sender(files, host=LOCALHOST, port=node.port, called_ae=node.ae_title, acks=acks,
                          calling_ae="PUSH", interval_seconds=0.1, log=tmp_path / "push-sender.log")
    wait_for("a quarter of the series acknowledged", lambda: len(read_acks(acks)) >= len(files) // 4
             or sender.poll() is not None, timeout=60, interval=0.01)

    postgres.restart(down_seconds=1.0)

    sender.wait(timeout=120)
    acknowledged, refused = read_acks(acks), read_failures(acks)
    assert len(acknowledged) + len(refused) <= len(files)
    print(f"pushed {len(files)}: {len(acknowledged)} acknowledged, refused: {refused}")
    assert len(acknowledged) >= len(files) // 4 and refused, "the restart did not fall in the middle of the push"
    # While the index is down the node answers "out of resources" (try again), never "unexpected error".
    assert {status for _, status in refused} <= {"0xA700", "no response"}, refused
    order = {uid: n for n, uid in enumerate(series.sop_instance_uids)}
    first_refused = min(order[uid] for uid, _ in refused)
    assert any(order[uid] > first_refused for uid in acknowledged), "the push did not resume after the restart"

    remaining = [path for uid, path in sources.items() if uid not in set(acknowledged)]
    retry_acks = tmp_path / "retry.acks"
    retry = start_sender(remaining, host=LOCALHOST, port=node.port, called_ae=node.ae_title, acks=retry_acks,
                         calling_ae="PUSH", log=tmp_path / "retry-sender.log")
    assert retry.wait(timeout=120) == 0, (tmp_path / "retry-sender.log").read_text()

    check = check_spool(node, sources, acknowledged + read_acks(retry_acks), study_uid=series.study_uid)
    assert not check.problems, check.problems
    assert check.indexed == set(sources)
    deployment.wait_until_all_delivered(jobs=1, timeout=120)
    assert node.query("SELECT instance_count FROM studies") == [(len(files),)]
    assert not deployment.results_problems()


def test_a_worker_killed_mid_job_loses_nothing_and_delivers_once(deployment_factory: Any, tmp_path: Path) -> None:
    """kill -9 the only worker while it runs a job; another worker finishes it after the lease."""
    deployment = deployment_factory(inference_delay_seconds=3.0)
    node = deployment.node.start()
    first = deployment.start_worker("worker-1")
    assert node.storescu(small_ct(tmp_path, seed=94).paths).returncode == 0
    wait_for("the job to run", lambda: node.query("SELECT 1 FROM jobs WHERE state = 'running'"), timeout=60)
    first.kill9()
    deployment.start_worker("worker-2")

    deployment.wait_until_all_delivered(jobs=1, timeout=120)
    [(_, _, state, attempts, error)] = deployment.jobs()
    assert (state, attempts) == ("succeeded", 2), error
    assert not deployment.results_problems()
