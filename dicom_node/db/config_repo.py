"""Routing rules and destinations as stored in the database (validated on the way in and out).

Why: admins edit rules and destinations from YAML files, the CLI and (later) the web
UI; the database holds the one current set, and every write validates the definition
with the same pydantic types the router and the senders use, so a malformed rule is
refused when saved rather than discovered when a study arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import TypeAdapter
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Delivery, DeliveryState, DestinationRow, RoutingRuleRow, Study
from dicom_node.destinations import NOTIFICATION_KINDS, Destination
from dicom_node.routing import Rule, load_stored_rule

__all__ = [
    "ConfigNotFound",
    "DeliveryStats",
    "DestinationRecord",
    "NameTaken",
    "RuleRecord",
    "create_destination",
    "default_destination_names",
    "delete_destination",
    "delete_rule",
    "destination_delivery_stats",
    "get_destination",
    "get_destination_record",
    "get_rule",
    "list_destination_records",
    "list_destinations",
    "list_rule_records",
    "list_rules",
    "move_rule",
    "notification_destinations",
    "reorder_rules",
    "resolve_destination_names",
    "rule_count",
    "rules_using_destination",
    "save_rule",
    "set_rule_enabled",
    "study_id_for_uid",
    "update_destination",
    "upsert_destination",
    "upsert_rules",
]

logger = logging.getLogger(__name__)

_DESTINATION = TypeAdapter(Destination)


def list_rules(sessions: sessionmaker[Session]) -> list[Rule]:
    """Every stored rule in evaluation order (the order they were imported or added).

    A rule stored before its regex was checked for RE2 loads too (see
    :func:`dicom_node.routing.load_stored_rule`): it never matches, and says why.
    """
    with sessions() as session:
        rows = session.execute(select(RoutingRuleRow.definition).order_by(RoutingRuleRow.position,
                                                                          RoutingRuleRow.id)).all()
    return [load_stored_rule(r[0]) for r in rows]


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


def default_destination_names(sessions: sessionmaker[Session], *, notification: bool = False) -> list[str]:
    """The destinations flagged default: of result objects, or (``notification``) those told about results."""
    with sessions() as session:
        return _default_names(session, notification)


def _default_names(session: Session, notification: bool) -> list[str]:
    kinds = DestinationRow.kind.in_(sorted(NOTIFICATION_KINDS))
    rows = session.execute(
        select(DestinationRow.name).where(DestinationRow.is_default.is_(True), kinds if notification else ~kinds)
        .order_by(DestinationRow.name)
    ).all()
    return [str(r[0]) for r in rows]


def resolve_destination_names(sessions: sessionmaker[Session], wanted: list[str] | str) -> list[str]:
    """The result destinations (DICOM, DICOMweb) a job's ``destinations`` field means now: ``"default"`` (every
    such destination flagged default) or the listed names that still exist (a name removed since is skipped with
    a warning). Notification destinations (HL7, FHIR) the rule names are told by
    :func:`dicom_node.db.notifications.notify_when_delivered` instead."""
    if wanted == "default":
        return default_destination_names(sessions)
    with sessions() as session:
        kinds = {str(name): str(kind) for name, kind in session.execute(select(DestinationRow.name, DestinationRow.kind))}
    missing = [name for name in wanted if name not in kinds]
    if missing:
        logger.warning("routing asked for unknown destination(s) %s; they are skipped", ", ".join(missing))
    return [name for name in wanted if name in kinds and kinds[name] not in NOTIFICATION_KINDS]


def notification_destinations(session: Session, wanted: list[str] | str) -> list[Destination]:
    """The notification destinations (HL7, FHIR) a job's ``destinations`` field means now, inside ``session``:
    those flagged default for ``"default"``, else the listed ones that exist."""
    names = _default_names(session, True) if wanted == "default" else list(wanted)
    rows = session.execute(
        select(DestinationRow.name, DestinationRow.definition)
        .where(DestinationRow.name.in_(names), DestinationRow.kind.in_(sorted(NOTIFICATION_KINDS)))
    ).all()
    found = {name: _DESTINATION.validate_json(definition) for name, definition in rows}
    return [found[name] for name in names if name in found]


def delete_destination(sessions: sessionmaker[Session], name: str) -> bool:
    with sessions.begin() as session:
        return bool(session.execute(delete(DestinationRow).where(DestinationRow.name == name)).rowcount)


# --------------------------------------------------------------------------- editing one at a time (UI, API)


class NameTaken(ValueError):
    """Another rule or destination already has this name (the API answers 409)."""


class ConfigNotFound(KeyError):
    """No rule or destination has this name (the API answers 404)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class RuleRecord:
    """A stored rule with where it stands and where it came from."""

    rule: Rule
    position: int
    source: str
    updated_at: datetime


def _rule_record(row: RoutingRuleRow) -> RuleRecord:
    return RuleRecord(rule=load_stored_rule(row.definition), position=row.position, source=row.source,
                      updated_at=row.updated_at)


def _ordered_rule_rows(session: Session) -> list[RoutingRuleRow]:
    return list(session.scalars(select(RoutingRuleRow).order_by(RoutingRuleRow.position, RoutingRuleRow.id)))


def list_rule_records(sessions: sessionmaker[Session]) -> list[RuleRecord]:
    """Every stored rule with its position, source and last change, in evaluation order."""
    with sessions() as session:
        return [_rule_record(row) for row in _ordered_rule_rows(session)]


def get_rule(sessions: sessionmaker[Session], name: str) -> RuleRecord | None:
    """The rule called ``name`` (exact, case-sensitive), or None."""
    with sessions() as session:
        row = session.scalars(select(RoutingRuleRow).where(RoutingRuleRow.name == name)).one_or_none()
        return None if row is None else _rule_record(row)


def save_rule(
    sessions: sessionmaker[Session], rule: Rule, *, original_name: str | None, source: str, now: datetime
) -> tuple[RuleRecord | None, RuleRecord]:
    """Create (``original_name`` None) or replace the rule called ``original_name``; (before, after).

    A new rule goes last. Replacing keeps the rule's position; when ``rule.name``
    differs from ``original_name`` the rule is renamed. NameTaken when the (new) name
    belongs to another rule; ConfigNotFound when ``original_name`` does not exist.
    """
    definition = rule.model_dump_json(by_alias=True)
    with sessions.begin() as session:
        clash = session.scalars(select(RoutingRuleRow).where(RoutingRuleRow.name == rule.name)).one_or_none()
        if original_name is None:
            if clash is not None:
                raise NameTaken(f"a routing rule named {rule.name!r} already exists")
            last = session.execute(select(func.coalesce(func.max(RoutingRuleRow.position), -1))).scalar_one()
            row = RoutingRuleRow(name=rule.name, position=int(last) + 1, definition=definition, source=source,
                                 updated_at=now)
            session.add(row)
            session.flush()
            return None, _rule_record(row)
        row = session.scalars(select(RoutingRuleRow).where(RoutingRuleRow.name == original_name)).one_or_none()
        if row is None:
            raise ConfigNotFound(f"no routing rule named {original_name!r}")
        if clash is not None and clash.id != row.id:
            raise NameTaken(f"cannot rename {original_name!r} to {rule.name!r}: a routing rule with that name exists")
        before = _rule_record(row)
        row.name, row.definition, row.source, row.updated_at = rule.name, definition, source, now
        session.flush()
        return before, _rule_record(row)


def set_rule_enabled(
    sessions: sessionmaker[Session], name: str, enabled: bool, *, source: str, now: datetime
) -> tuple[RuleRecord, RuleRecord]:
    """Enable or disable the rule called ``name``; (before, after). ConfigNotFound if there is none."""
    with sessions.begin() as session:
        row = session.scalars(select(RoutingRuleRow).where(RoutingRuleRow.name == name)).one_or_none()
        if row is None:
            raise ConfigNotFound(f"no routing rule named {name!r}")
        before = _rule_record(row)
        if before.rule.enabled != enabled:
            row.definition = before.rule.model_copy(update={"enabled": enabled}).model_dump_json(by_alias=True)
            row.source, row.updated_at = source, now
        session.flush()
        return before, _rule_record(row)


def reorder_rules(sessions: sessionmaker[Session], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Put the rules in the order of ``names``, which must name every stored rule once; (before, after).

    ValueError naming the missing, unknown or repeated names otherwise (nothing changes).
    Order decides among rules of equal priority (see :func:`dicom_node.routing.evaluate`).
    """
    with sessions.begin() as session:
        rows = _ordered_rule_rows(session)
        before = [row.name for row in rows]
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        unknown = sorted(set(names) - set(before))
        missing = [n for n in before if n not in set(names)]
        problems = []
        if repeated:
            problems.append(f"named more than once: {', '.join(repeated)}")
        if unknown:
            problems.append(f"unknown: {', '.join(unknown)}")
        if missing:
            problems.append(f"missing: {', '.join(missing)}")
        if problems:
            raise ValueError("the new order must name every routing rule exactly once; " + "; ".join(problems))
        by_name = {row.name: row for row in rows}
        for position, name in enumerate(names):
            by_name[name].position = position
        return before, list(names)


def move_rule(
    sessions: sessionmaker[Session], name: str, direction: Literal["up", "down"]
) -> tuple[list[str], list[str]]:
    """Swap the rule called ``name`` with its neighbour above or below; (order before, order after).

    At the top (up) or bottom (down) nothing changes. ConfigNotFound if there is no such rule.
    """
    with sessions.begin() as session:
        rows = _ordered_rule_rows(session)
        before = [row.name for row in rows]
        if name not in before:
            raise ConfigNotFound(f"no routing rule named {name!r}")
        index = before.index(name)
        other = index - 1 if direction == "up" else index + 1
        if 0 <= other < len(rows):
            rows[index], rows[other] = rows[other], rows[index]
        for position, row in enumerate(rows):  # also repairs duplicate positions left by older imports
            row.position = position
        return before, [row.name for row in rows]


@dataclass(frozen=True)
class DestinationRecord:
    """A stored destination with where it came from."""

    destination: Destination
    source: str
    updated_at: datetime


def list_destination_records(sessions: sessionmaker[Session]) -> list[DestinationRecord]:
    """Every destination (secrets included: callers redact them), by name."""
    with sessions() as session:
        rows = session.execute(select(DestinationRow.definition, DestinationRow.source, DestinationRow.updated_at)
                               .order_by(DestinationRow.name)).all()
    return [DestinationRecord(_DESTINATION.validate_json(d), s, u) for d, s, u in rows]


def get_destination_record(sessions: sessionmaker[Session], name: str) -> DestinationRecord | None:
    with sessions() as session:
        row = session.execute(select(DestinationRow.definition, DestinationRow.source, DestinationRow.updated_at)
                              .where(DestinationRow.name == name)).first()
    return None if row is None else DestinationRecord(_DESTINATION.validate_json(row[0]), row[1], row[2])


def create_destination(sessions: sessionmaker[Session], destination: Destination, *, source: str,
                       now: datetime) -> None:
    """Add a new destination; NameTaken if the name is in use."""
    if get_destination(sessions, destination.name) is not None:
        raise NameTaken(f"a destination named {destination.name!r} already exists")
    upsert_destination(sessions, destination, source=source, now=now)


def update_destination(sessions: sessionmaker[Session], destination: Destination, *, source: str,
                       now: datetime) -> Destination:
    """Replace the destination of the same name; returns the definition before. ConfigNotFound if none."""
    before = get_destination(sessions, destination.name)
    if before is None:
        raise ConfigNotFound(f"no destination named {destination.name!r}")
    upsert_destination(sessions, destination, source=source, now=now)
    return before


def rules_using_destination(sessions: sessionmaker[Session], name: str) -> list[str]:
    """Names of the rules that send results to the destination ``name`` by name."""
    return [r.name for r in list_rules(sessions) if r.destinations != "default" and name in r.destinations]


@dataclass(frozen=True)
class DeliveryStats:
    """What happened to the deliveries to one destination (all time)."""

    counts: dict[str, int] = field(default_factory=dict)  # delivery state -> number
    last_delivered_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None

    def count(self, state: str) -> int:
        return self.counts.get(state, 0)

    @property
    def waiting(self) -> int:
        """Pending, sending, or failed and waiting for the next attempt."""
        return sum(self.count(s.value) for s in (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED))


def destination_delivery_stats(sessions: sessionmaker[Session]) -> dict[str, DeliveryStats]:
    """Per destination name: deliveries by state, the last success and the last error (from ``deliveries``)."""
    with sessions() as session:
        counts = session.execute(
            select(Delivery.destination, Delivery.state, func.count(Delivery.id))
            .group_by(Delivery.destination, Delivery.state)
        ).all()
        delivered = dict(session.execute(
            select(Delivery.destination, func.max(Delivery.delivered_at)).group_by(Delivery.destination)
        ).all())
        failing = (Delivery.error.is_not(None), Delivery.state != DeliveryState.DELIVERED.value)
        latest = (
            select(Delivery.destination.label("destination"), func.max(Delivery.state_changed_at).label("at"))
            .where(*failing)
            .group_by(Delivery.destination)
            .subquery()
        )
        errors = {
            name: (error, at)
            for name, error, at in session.execute(
                select(Delivery.destination, Delivery.error, Delivery.state_changed_at)
                .join(latest, (latest.c.destination == Delivery.destination) & (latest.c.at == Delivery.state_changed_at))
                .where(*failing)
                .order_by(Delivery.id)
            ).all()
        }
    by_name: dict[str, dict[str, int]] = {}
    for name, state, number in counts:
        by_name.setdefault(str(name), {})[str(state)] = int(number)
    return {
        name: DeliveryStats(counts=states, last_delivered_at=delivered.get(name),
                            last_error=errors.get(name, (None, None))[0], last_error_at=errors.get(name, (None, None))[1])
        for name, states in by_name.items()
    }


def study_id_for_uid(sessions: sessionmaker[Session], study_instance_uid: str) -> int | None:
    """The database id of a received study (for the rule tester), or None."""
    with sessions() as session:
        found = session.execute(select(Study.id).where(Study.study_instance_uid == study_instance_uid)).scalar()
    return None if found is None else int(found)
