"""Indexing, duplicates, late instances and study completion, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, select, text

from dicom_node.db import repo
from dicom_node.db.models import AssociationOutcome, Instance, Series, Study, StudyState
from dicom_node.db.session import current_revision, head_revision, make_session_factory, upgrade
from dicom_node.header import InstanceHeader
from dicom_node.indexer import IndexRecord, InstanceIndexer

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
CT = "1.2.840.10008.5.1.4.1.1.2"


def header(sop: str, study: str = "1.2.9", series: str = "1.2.9.1", number: int = 1) -> InstanceHeader:
    return InstanceHeader(CT, sop, study, series, "PID-1", "Doe^Jane", "ACC1", "20260301", "Chest", "CT", 2, "Axial", "CHEST", number)


def record(sop: str, at: datetime, association_id: int | None = None, **kwargs: object) -> IndexRecord:
    return IndexRecord(header(sop, **kwargs), "1.2.840.10008.1.2.1", f"x/{sop}.dcm", 100, at, association_id)  # type: ignore[arg-type]


def association(sessions, at: datetime) -> int:  # type: ignore[no-untyped-def]
    return repo.open_association(
        sessions, calling_ae_title="PACS", called_ae_title="NODE", peer_address="127.0.0.1", peer_port=1, tls=False, now=at
    )


def study_row(sessions, uid: str = "1.2.9") -> Study:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def test_migrations_are_idempotent_and_at_head(engine: Engine) -> None:
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0012"


def test_index_creates_study_series_instances_and_counts(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    for n in range(3):
        indexer.index(record(f"1.2.9.1.{n}", T0 + timedelta(seconds=n), number=n))
    indexer.index(record("1.2.9.2.0", T0 + timedelta(seconds=5), series="1.2.9.2"))
    study = study_row(sessions)
    assert study.state == StudyState.RECEIVING.value
    assert study.instance_count == 4 and study.patient_id == "PID-1"
    assert study.first_received_at == T0 and study.last_received_at == T0 + timedelta(seconds=5)
    [summary] = repo.list_studies(sessions)
    assert summary.series_count == 2 and summary.instance_count == 4 and summary.modalities == "CT"


def test_concurrent_indexing_shares_commits_and_loses_nothing(engine: Engine) -> None:
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    errors: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            for n in range(25):
                indexer.index(record(f"1.2.9.{worker}.{n}", T0, series=f"1.2.9.{worker}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Instance)) == 100
        assert connection.scalar(select(Study.instance_count)) == 100
        assert sorted(connection.scalars(select(Series.instance_count))) == [25, 25, 25, 25]


def test_a_bad_record_fails_alone(engine: Engine) -> None:
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    indexer.index(record("1.2.9.1.1", T0))
    good, duplicate = record("1.2.9.1.2", T0), record("1.2.9.1.1", T0)
    indexer._commit([good, duplicate])  # one batch: the unique SOP Instance UID violation must not sink `good`
    assert good.done.is_set() and good.error is None
    assert duplicate.done.is_set() and duplicate.error is not None
    assert study_row(make_session_factory(engine)).instance_count == 2


def test_replace_moves_the_row_and_keeps_one_copy(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    indexer.index(record("1.2.9.1.1", T0))
    again = record("1.2.9.1.1", T0 + timedelta(seconds=1))
    again.replace_existing = True
    again.relative_path = "y/new.dcm"
    indexer.index(again)
    found = repo.find_instance(sessions, "1.2.9.1.1")
    assert found is not None and found.path == "y/new.dcm"
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Instance)) == 1
        assert connection.scalar(select(Instance.duplicates_received)) == 1
    assert study_row(sessions).instance_count == 1


def test_quiet_period_waits_for_the_association_to_be_released(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    assoc = association(sessions, T0)
    indexer.index(record("1.2.9.1.1", T0, assoc))
    complete = lambda now: repo.complete_due_studies(sessions, now=now, quiet_seconds=10, max_wait_seconds=600)  # noqa: E731
    assert complete(T0 + timedelta(seconds=60)) == []  # quiet, but the sender is still connected
    repo.close_association(
        sessions, assoc, outcome=AssociationOutcome.RELEASED, now=T0 + timedelta(seconds=61),
        instances_stored=1, instances_failed=0, bytes_received=100,
    )
    assert complete(T0 + timedelta(seconds=65)) == []  # quiet period runs from the release
    assert complete(T0 + timedelta(seconds=72)) == ["1.2.9"]
    study = study_row(sessions)
    assert study.state == StudyState.COMPLETE.value and study.completed_at == T0 + timedelta(seconds=72)
    kinds = [kind for _, kind, _ in repo.study_events(sessions, "1.2.9")]
    assert kinds == ["first_instance", "complete"]


def test_max_wait_completes_a_study_whose_sender_never_lets_go(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    assoc = association(sessions, T0)
    for n in range(5):
        indexer.index(record(f"1.2.9.1.{n}", T0 + timedelta(seconds=30 * n), assoc))
    complete = lambda now: repo.complete_due_studies(sessions, now=now, quiet_seconds=10, max_wait_seconds=120)  # noqa: E731
    assert complete(T0 + timedelta(seconds=119)) == []
    assert complete(T0 + timedelta(seconds=121)) == ["1.2.9"]
    _, kind, detail = repo.study_events(sessions, "1.2.9")[-1]
    assert kind == "complete" and "max_wait_seconds=120" in (detail or "")


@pytest.mark.parametrize("reopen", [True, False])
def test_late_instances_are_kept_recorded_and_optionally_reopen(engine: Engine, reopen: bool) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=reopen)
    indexer.index(record("1.2.9.1.1", T0))
    assert repo.complete_due_studies(sessions, now=T0 + timedelta(seconds=20), quiet_seconds=10, max_wait_seconds=600)
    late = indexer.index(record("1.2.9.1.2", T0 + timedelta(seconds=30)))
    assert late.late
    study = study_row(sessions)
    assert study.instance_count == 2 and study.late_instance_count == 1
    kinds = [kind for _, kind, _ in repo.study_events(sessions, "1.2.9")]
    if reopen:
        assert study.state == StudyState.RECEIVING.value and kinds[-2:] == ["late_instance", "reopened"]
        # max_wait runs again from the late instance, not from the first one
        assert repo.complete_due_studies(
            sessions, now=T0 + timedelta(seconds=45), quiet_seconds=10, max_wait_seconds=20
        ) == ["1.2.9"]
    else:
        assert study.state == StudyState.COMPLETE.value and kinds[-1] == "late_instance"


def test_interrupted_associations_are_closed_and_their_studies_wait_again(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    assoc = association(sessions, T0)
    indexer.index(record("1.2.9.1.1", T0, assoc))
    restart = T0 + timedelta(hours=1)
    assert repo.interrupt_open_associations(sessions, restart) == 1
    with engine.connect() as connection:
        outcome = connection.execute(text("SELECT outcome FROM associations")).scalar()
    assert outcome == AssociationOutcome.INTERRUPTED.value
    assert repo.complete_due_studies(sessions, now=restart + timedelta(seconds=5), quiet_seconds=10, max_wait_seconds=7200) == []
    assert repo.complete_due_studies(sessions, now=restart + timedelta(seconds=11), quiet_seconds=10, max_wait_seconds=7200) == ["1.2.9"]
