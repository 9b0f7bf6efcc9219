"""Migration 0007: a stored built-in rule that still counts instances is rewritten to count slices."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, select, update

import dicom_node.db
from dicom_node.db import config_repo
from dicom_node.db.models import RoutingRuleRow
from dicom_node.db.session import current_revision, make_engine, make_session_factory, upgrade
from dicom_node.routing import RangeCondition, Rule, default_rules

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def engine_at_0006(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine, "0006")
    yield engine
    engine.dispose()


def downgrade(engine: Engine, revision: str) -> None:
    """Alembic's downgrade on ``engine`` (the node itself only ever upgrades)."""
    config = Config()
    config.set_main_option("script_location", str(Path(dicom_node.db.__file__).parent / "migrations"))
    config.attributes["engine"] = engine
    command.downgrade(config, revision)


def old_default() -> Rule:
    """The built-in rule as releases before 0007 installed it (instance_count >= 10)."""
    [rule] = default_rules()
    conditions = [RangeCondition(attribute="instance_count", min=10) if isinstance(c, RangeCondition) else c
                  for c in rule.conditions]
    return rule.model_copy(update={"conditions": conditions})


def definitions(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(select(RoutingRuleRow.name, RoutingRuleRow.definition)).all())


def test_0007_rewrites_the_untouched_built_in_rule_and_downgrade_restores_it(engine_at_0006: Engine) -> None:
    sessions = make_session_factory(engine_at_0006)
    mine = Rule(name="mine", pipelines=["x"], conditions=[{"attribute": "instance_count", "min": 10}])  # type: ignore[list-item]
    config_repo.upsert_rules(sessions, [old_default(), mine], source="built-in", now=NOW)
    before = definitions(engine_at_0006)

    upgrade(engine_at_0006, "0007")
    assert current_revision(engine_at_0006) == "0007"
    assert [r.rule for r in config_repo.list_rule_records(sessions)] == [*default_rules(), mine]
    assert definitions(engine_at_0006)["mine"] == before["mine"]  # only ct-default is the node's own
    assert definitions(engine_at_0006)["ct-default"] == default_rules()[0].model_dump_json(by_alias=True)

    downgrade(engine_at_0006, "0006")
    assert definitions(engine_at_0006) == before


def test_0007_leaves_a_ct_default_an_admin_changed(engine_at_0006: Engine) -> None:
    sessions = make_session_factory(engine_at_0006)
    changed = old_default().model_copy(update={"priority": 5})
    config_repo.upsert_rules(sessions, [changed], source="ui", now=NOW)
    upgrade(engine_at_0006, "0007")
    assert config_repo.list_rules(sessions) == [changed]


def test_0007_leaves_an_unreadable_definition_alone(engine_at_0006: Engine) -> None:
    sessions = make_session_factory(engine_at_0006)
    config_repo.upsert_rules(sessions, [old_default()], source="built-in", now=NOW)
    with engine_at_0006.begin() as connection:
        connection.execute(update(RoutingRuleRow).values(definition="{not json"))
    upgrade(engine_at_0006, "0007")
    assert definitions(engine_at_0006) == {"ct-default": "{not json"}
