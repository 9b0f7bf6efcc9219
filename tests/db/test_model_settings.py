"""Admins' enabled/disabled setting of registry models, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine

from dicom_node.db import model_settings
from dicom_node.db.session import make_session_factory

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)
SEG = "chest-ct-segmentation"


def test_set_and_read_back_with_before_and_after(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    assert model_settings.model_settings(sessions) == {} and model_settings.disabled_models(sessions) == set()
    before, after = model_settings.set_model_enabled(sessions, SEG, False, note="  bad masks <b>reported</b>  ",
                                                     by="admin", now=NOW)
    assert before.enabled and before.note is None and before.updated_by is None  # never changed: enabled
    assert (after.enabled, after.note, after.updated_by, after.updated_at) == (
        False, "bad masks <b>reported</b>", "admin", NOW)
    assert model_settings.disabled_models(sessions) == {SEG}
    stored = model_settings.model_settings(sessions)
    assert list(stored) == [SEG] and stored[SEG] == after
    assert stored[SEG].updated_at == NOW and stored[SEG].updated_at.tzinfo is not None

    later = NOW + timedelta(hours=1)
    before, after = model_settings.set_model_enabled(sessions, SEG, True, note="", by="other-admin", now=later)
    assert (before.enabled, before.note, before.updated_by) == (False, "bad masks <b>reported</b>", "admin")
    assert (after.enabled, after.note, after.updated_by, after.updated_at) == (True, None, "other-admin", later)
    assert before.audit_state() == {"enabled": False, "note": "bad masks <b>reported</b>"}
    assert model_settings.disabled_models(sessions) == set()
    assert model_settings.setting_of(model_settings.model_settings(sessions), SEG).updated_by == "other-admin"
    assert model_settings.setting_of({}, "never-touched").enabled


def test_note_and_id_limits(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    longest = "x" * model_settings.NOTE_MAX
    _, after = model_settings.set_model_enabled(sessions, SEG, False, note=longest, by="admin", now=NOW)
    assert after.note == longest
    with pytest.raises(ValueError, match="note is 501 characters long; at most 500"):
        model_settings.set_model_enabled(sessions, SEG, True, note="y" * 501, by="admin", now=NOW)
    with pytest.raises(ValueError, match="1 to 64 characters"):
        model_settings.set_model_enabled(sessions, "m" * 65, False, note=None, by="admin", now=NOW)
    assert model_settings.disabled_models(sessions) == {SEG}  # refused changes left nothing behind
    assert model_settings.model_settings(sessions)[SEG].note == longest
