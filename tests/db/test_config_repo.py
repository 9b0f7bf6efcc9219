"""Rules and destinations stored in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine

from dicom_node.db import config_repo
from dicom_node.db.session import make_session_factory
from dicom_node.destinations import BasicAuth, DicomDestination, DicomWebDestination
from dicom_node.routing import Rule, default_rules

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def test_destinations_round_trip_with_their_secrets(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    web = DicomWebDestination(name="archive", url="https://pacs.example/dicom-web",
                              auth=BasicAuth(username="node", password="s3cret"), outputs=frozenset({"SR"}))
    pacs = DicomDestination(name="pacs", ae_title="PACS", host="10.0.0.5", port=104, default=True)
    config_repo.upsert_destination(sessions, web, source="test", now=NOW)
    config_repo.upsert_destination(sessions, pacs, source="test", now=NOW)
    stored = config_repo.get_destination(sessions, "archive")
    assert isinstance(stored, DicomWebDestination)
    assert stored.auth.password.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert stored.outputs == frozenset({"SR"})
    assert config_repo.default_destination_names(sessions) == ["pacs"]
    changed = pacs.model_copy(update={"default": False})
    config_repo.upsert_destination(sessions, changed, source="cli", now=NOW)
    assert config_repo.default_destination_names(sessions) == []
    assert config_repo.delete_destination(sessions, "archive") and not config_repo.delete_destination(sessions, "x")
    assert [d.name for d in config_repo.list_destinations(sessions)] == ["pacs"]


def test_rules_keep_their_order_and_are_replaced_by_name(engine: Engine) -> None:
    sessions = make_session_factory(engine)
    [default] = default_rules()
    other = Rule(name="mr", pipelines=["x"], conditions=[{"attribute": "modality", "in": ["MR"]}])  # type: ignore[list-item]
    config_repo.upsert_rules(sessions, [default, other], source="file", now=NOW)
    config_repo.upsert_rules(sessions, [default.model_copy(update={"enabled": False})], source="ui", now=NOW)
    stored = config_repo.list_rules(sessions)
    assert [r.name for r in stored] == ["ct-default", "mr"] and not stored[0].enabled
    assert stored[1] == other
    assert config_repo.delete_rule(sessions, "mr") and config_repo.rule_count(sessions) == 1
