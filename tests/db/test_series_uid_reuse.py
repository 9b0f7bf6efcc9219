"""A Series or SOP Instance UID reused by a second study, through the indexer, on SQLite and PostgreSQL.

Issue 20, item 6: study A (patient P1, series S), then study B (patient P2, the same S).
B ended "ignored: the study has no series" and A's series held files of two patients.
Now each study has its own series row and files, both are routed, both timelines warn
naming the other study, and every lookup of a series is by study and UID.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from dicom_node.conductor import Conductor
from dicom_node.db import config_repo, repo
from dicom_node.db.models import Instance, Series, Study
from dicom_node.db.session import make_session_factory
from dicom_node.db.uid_reuse import SERIES_UID_REUSED, SOP_INSTANCE_UID_REUSED
from dicom_node.header import InstanceHeader
from dicom_node.indexer import IndexRecord, InstanceIndexer
from dicom_node.routing import default_rules
from dicom_node.study_store import AmbiguousSeries, FileStudyStore

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_A, STUDY_B, SERIES = "1.2.9", "1.2.8", "1.2.7.1"


def record(sop: str, study: str, patient: str, at: datetime, series: str = SERIES) -> IndexRecord:
    header = InstanceHeader(CT, sop, study, series, patient, f"Doe^{patient}", None, "20260301", "Chest CT", "CT", 2,
                            "Axial", "CHEST", int(sop.rsplit(".", 1)[-1]))
    return IndexRecord(header, "1.2.840.10008.1.2.1", f"{study}/{series}/{sop}.dcm", 100, at, None)


class RecordingQueue:
    """The conductor's queue, keeping the ids it was given (no broker needed to test routing)."""

    def __init__(self) -> None:
        self.jobs: list[int] = []

    def enqueue_job(self, job_id: int) -> None:
        self.jobs.append(job_id)

    def enqueue_delivery(self, delivery_id: int) -> None:
        raise AssertionError(f"no delivery expected, got {delivery_id}")


def events(sessions, study_uid: str, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [detail or "" for _, k, detail in repo.study_events(sessions, study_uid) if k == kind]


def series_of(engine: Engine, study_uid: str) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(  # type: ignore[misc]
            select(Series.series_instance_uid, Series.instance_count).join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_uid))]


def test_a_series_uid_reused_by_another_study_is_kept_apart_and_both_are_routed(engine: Engine, tmp_path: Path) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    for n in range(10):
        indexer.index(record(f"1.2.9.5.{n}", STUDY_A, "P1", T0 + timedelta(seconds=n)))
    for n in range(12):  # interleaved with two more of A: the cache must not mix the studies either
        indexer.index(record(f"1.2.8.5.{n}", STUDY_B, "P2", T0 + timedelta(seconds=20 + n)))
        if n in (3, 7):
            indexer.index(record(f"1.2.9.5.{10 + n}", STUDY_A, "P1", T0 + timedelta(seconds=20 + n)))

    assert series_of(engine, STUDY_A) == [(SERIES, 12)]
    assert series_of(engine, STUDY_B) == [(SERIES, 12)]
    with engine.connect() as connection:
        owners = dict(connection.execute(
            select(Instance.sop_instance_uid, Study.study_instance_uid)
            .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)).all())
    assert {sop for sop, study in owners.items() if study == STUDY_B} == {f"1.2.8.5.{n}" for n in range(12)}
    assert [s.instance_count for s in repo.list_studies(sessions)] == [12, 12]

    [warning_a] = events(sessions, STUDY_A, SERIES_UID_REUSED)
    [warning_b] = events(sessions, STUDY_B, SERIES_UID_REUSED)
    assert f"Series Instance UID {SERIES} of this study is also used by study {STUDY_B}" in warning_a
    assert f"Series Instance UID {SERIES} of this study is also used by study {STUDY_A}" in warning_b
    assert not any(p in warning_a + warning_b for p in ("P1", "P2", "Doe"))  # UIDs only, no patient identifiers

    store = FileStudyStore(sessions, tmp_path)
    assert store.series_files(SERIES, study_instance_uid=STUDY_B) == [
        tmp_path / f"{STUDY_B}/{SERIES}/1.2.8.5.{n}.dcm" for n in range(12)]
    assert len(store.series_files(SERIES, study_instance_uid=STUDY_A)) == 12
    with pytest.raises(AmbiguousSeries, match=f"series {SERIES} is in 2 studies"):
        store.series_files(SERIES)

    config_repo.upsert_rules(sessions, default_rules(), source="test", now=T0)
    assert sorted(repo.complete_due_studies(sessions, now=T0 + timedelta(minutes=5), quiet_seconds=10,
                                            max_wait_seconds=600)) == [STUDY_B, STUDY_A]
    queue = RecordingQueue()
    conductor = Conductor(sessions, tmp_path, queue, lambda: T0 + timedelta(minutes=5), job_max_attempts=3)
    conductor.route_complete_studies()
    assert {s.study_instance_uid: s.state for s in repo.list_studies(sessions)} == {STUDY_A: "routed",
                                                                                   STUDY_B: "routed"}
    assert len(queue.jobs) == 4  # both demo pipelines, on each study's own series


def test_a_sop_instance_uid_reused_by_another_study_is_kept_once_and_recorded_on_both(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    indexer.index(record("1.2.9.5.1", STUDY_A, "P1", T0))
    indexer.index(record("1.2.8.5.1", STUDY_B, "P2", T0))
    existing = repo.find_instance(sessions, "1.2.9.5.1")
    assert existing is not None
    for n in range(3):  # keep_first: the copy that claims study B is discarded, study A keeps its own
        repo.count_duplicate(sessions, existing.id, study_instance_uid=STUDY_B, now=T0 + timedelta(seconds=n))
    repo.count_duplicate(sessions, existing.id, study_instance_uid=STUDY_A, now=T0)  # a plain resend: no warning
    [warning_a] = events(sessions, STUDY_A, SOP_INSTANCE_UID_REUSED)
    [warning_b] = events(sessions, STUDY_B, SOP_INSTANCE_UID_REUSED)
    assert warning_a.startswith(f"SOP Instance UID 1.2.9.5.1 of this study was sent again for study {STUDY_B}")
    assert "discarded" in warning_a
    assert warning_b.startswith(f"SOP Instance UID 1.2.9.5.1 sent for this study is already held by study {STUDY_A}")
    assert series_of(engine, STUDY_A) == [("1.2.7.1", 1)] and series_of(engine, STUDY_B) == [("1.2.7.1", 1)]

    # an instance of a study never seen yet: study A's timeline still says so
    repo.count_duplicate(sessions, existing.id, study_instance_uid="1.2.6", now=T0)
    assert any("study 1.2.6" in w for w in events(sessions, STUDY_A, SOP_INSTANCE_UID_REUSED))


def test_replace_moves_a_reused_sop_instance_to_the_new_study_and_says_so_on_both(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    indexer = InstanceIndexer(engine, reopen_on_late_instances=True)
    indexer.index(record("1.2.9.5.1", STUDY_A, "P1", T0))
    indexer.index(record("1.2.9.5.2", STUDY_A, "P1", T0))
    moved = record("1.2.9.5.1", STUDY_B, "P2", T0 + timedelta(seconds=5), series="1.2.8.1")
    moved.replace_existing = True
    indexer.index(moved)
    assert series_of(engine, STUDY_A) == [(SERIES, 1)] and series_of(engine, STUDY_B) == [("1.2.8.1", 1)]
    assert [s.instance_count for s in repo.list_studies(sessions)] == [1, 1]
    [warning_a] = events(sessions, STUDY_A, SOP_INSTANCE_UID_REUSED)
    [warning_b] = events(sessions, STUDY_B, SOP_INSTANCE_UID_REUSED)
    assert f"was sent again for study {STUDY_B}" in warning_a and "moved" in warning_a
    assert f"was held by study {STUDY_A}" in warning_b and "moved here" in warning_b
