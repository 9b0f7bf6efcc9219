"""Migration 0005 (series keyed by study) on a database that already holds studies, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from dicom_node.db.models import Instance, Job, Series, Study, StudyEvent
from dicom_node.db.session import current_revision, make_engine, upgrade

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


@pytest.fixture
def engine_at_0004(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine, "0004")
    yield engine
    engine.dispose()


def _study(connection, uid: str) -> int:  # type: ignore[no-untyped-def]
    times = {k: T0 for k in ("first_received_at", "last_received_at", "receiving_since", "last_activity_at",
                             "state_changed_at")}
    return int(connection.execute(insert(Study.__table__).values(
        study_instance_uid=uid, state="routed", instance_count=2, late_instance_count=0, **times)
    ).inserted_primary_key[0])


def test_0005_keeps_every_row_and_lets_a_series_uid_live_in_two_studies(engine_at_0004: Engine) -> None:
    with engine_at_0004.begin() as connection:
        study_a = _study(connection, "1.2.1")
        series_a = connection.execute(insert(Series.__table__).values(
            study_id=study_a, series_instance_uid="1.2.1.1", instance_count=2, first_received_at=T0,
            last_received_at=T0)).inserted_primary_key[0]
        for n in range(2):
            connection.execute(insert(Instance.__table__).values(
                series_id=series_a, sop_instance_uid=f"1.2.1.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"a/{n}.dcm", size_bytes=1, received_at=T0,
                late=False, duplicates_received=0))
        connection.execute(insert(StudyEvent.__table__).values(study_id=study_a, at=T0, kind="routed"))
        connection.execute(insert(Job.__table__).values(
            study_id=study_a, series_instance_uid="1.2.1.1", pipeline="seg", rule="r", destinations="\"default\"",
            priority=0, state="queued", attempts=0, max_attempts=3, created_at=T0, queued_at=T0, state_changed_at=T0))
        study_b = _study(connection, "1.2.2")
        with pytest.raises(IntegrityError):  # before 0005: one row per UID in the whole node
            with connection.begin_nested():
                connection.execute(insert(Series.__table__).values(
                    study_id=study_b, series_instance_uid="1.2.1.1", instance_count=0, first_received_at=T0,
                    last_received_at=T0))

    upgrade(engine_at_0004, "0005")
    assert current_revision(engine_at_0004) == "0005"

    with engine_at_0004.begin() as connection:
        assert connection.scalar(select(func.count()).select_from(Instance.__table__)) == 2  # none cascaded away
        assert connection.scalar(select(func.count()).select_from(Job.__table__)) == 1
        assert connection.scalar(select(Instance.series_id).limit(1)) == series_a
        connection.execute(insert(Series.__table__).values(
            study_id=study_b, series_instance_uid="1.2.1.1", instance_count=0, first_received_at=T0,
            last_received_at=T0))
        with pytest.raises(IntegrityError):  # still one row per UID within a study
            with connection.begin_nested():
                connection.execute(insert(Series.__table__).values(
                    study_id=study_b, series_instance_uid="1.2.1.1", instance_count=0, first_received_at=T0,
                    last_received_at=T0))
    if engine_at_0004.dialect.name == "sqlite":
        with engine_at_0004.connect() as connection:  # the pool's connections enforce foreign keys again
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA foreign_key_check").all() == []
