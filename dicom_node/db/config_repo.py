"""Routing rules and destinations as stored in the database (validated on the way in and out).

Why: admins edit rules and destinations from YAML files, the CLI and (later) the web
UI; the database holds the one current set, and every write validates the definition
with the same pydantic types the router and the senders use, so a malformed rule is
refused when saved rather than discovered when a study arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import TypeAdapter
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import DestinationRow, RoutingRuleRow
from dicom_node.destinations import Destination
from dicom_node.routing import Rule

__all__ = [
    "default_destination_names",
    "delete_destination",
    "delete_rule",
    "get_destination",
    "list_destinations",
    "list_rules",
    "rule_count",
    "upsert_destination",
    "upsert_rules",
]

_DESTINATION = TypeAdapter(Destination)


def list_rules(sessions: sessionmaker[Session]) -> list[Rule]:
    """Every stored rule in evaluation order (the order they were imported or added)."""
    with sessions() as session:
        rows = session.execute(select(RoutingRuleRow.definition).order_by(RoutingRuleRow.position,
                                                                          RoutingRuleRow.id)).all()
    return [Rule.model_validate_json(r[0]) for r in rows]


def rule_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.execute(select(func.count(RoutingRuleRow.id))).scalar_one())


def upsert_rules(sessions: sessionmaker[Session], rules: Sequence[Rule], *, source: str, now: datetime) -> None:
    """Insert or replace rules by name, keeping the given order after the existing rules."""
    with sessions.begin() as session:
        next_position = int(session.execute(select(func.coalesce(func.max(RoutingRuleRow.position), -1))).scalar_one())
        for rule in rules:
            row = session.execute(select(RoutingRuleRow).where(RoutingRuleRow.name == rule.name)).scalar_one_or_none()
            if row is None:
                next_position += 1
                session.add(RoutingRuleRow(name=rule.name, position=next_position, definition=rule.model_dump_json(
                    by_alias=True), source=source, updated_at=now))
            else:
                row.definition = rule.model_dump_json(by_alias=True)
                row.source = source
                row.updated_at = now


def delete_rule(sessions: sessionmaker[Session], name: str) -> bool:
    with sessions.begin() as session:
        return bool(session.execute(delete(RoutingRuleRow).where(RoutingRuleRow.name == name)).rowcount)


def upsert_destination(
    sessions: sessionmaker[Session], destination: Destination, *, source: str, now: datetime
) -> None:
    """Insert or replace a destination by name."""
    definition = _DESTINATION.dump_json(destination, context={"reveal_secrets": True}).decode()
    with sessions.begin() as session:
        row = session.execute(
            select(DestinationRow).where(DestinationRow.name == destination.name)
        ).scalar_one_or_none()
        if row is None:
            session.add(DestinationRow(name=destination.name, kind=destination.type, is_default=destination.default,
                                       definition=definition, source=source, updated_at=now))
        else:
            row.kind, row.is_default, row.definition = destination.type, destination.default, definition
            row.source, row.updated_at = source, now


def list_destinations(sessions: sessionmaker[Session]) -> list[Destination]:
    with sessions() as session:
        rows = session.execute(select(DestinationRow.definition).order_by(DestinationRow.name)).all()
    return [_DESTINATION.validate_json(r[0]) for r in rows]


def get_destination(sessions: sessionmaker[Session], name: str) -> Destination | None:
    with sessions() as session:
        row = session.execute(select(DestinationRow.definition).where(DestinationRow.name == name)).first()
    return None if row is None else _DESTINATION.validate_json(row[0])


def default_destination_names(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        rows = session.execute(
            select(DestinationRow.name).where(DestinationRow.is_default.is_(True)).order_by(DestinationRow.name)
        ).all()
    return [str(r[0]) for r in rows]


def delete_destination(sessions: sessionmaker[Session], name: str) -> bool:
    with sessions.begin() as session:
        return bool(session.execute(delete(DestinationRow).where(DestinationRow.name == name)).rowcount)
