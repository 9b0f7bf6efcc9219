"""The audit log: every login, configuration change and manual action, append-only.

Why: a hospital must be able to answer "who changed this routing rule, when, and what
was it before?". Entries are only ever inserted (the database's triggers refuse
UPDATE and DELETE, see migration 0003) and carry the state before and after as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import AuditEntry

__all__ = ["AuditView", "add_entry", "count_entries", "list_entries", "record", "target_kinds"]


@dataclass(frozen=True)
class AuditView:
    id: int
    at: datetime
    actor: str
    action: str
    target_kind: str | None
    target: str | None
    before: Any
    after: Any
    remote_addr: str | None
    detail: str | None


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True, ensure_ascii=False)


def record(
    sessions: sessionmaker[Session],
    *,
    at: datetime,
    actor: str,
    action: str,
    target_kind: str | None = None,
    target: str | None = None,
    before: Any = None,
    after: Any = None,
    remote_addr: str | None = None,
    detail: str | None = None,
) -> int:
    """Append one entry; returns its id. ``before``/``after`` are anything JSON can hold."""
    with sessions.begin() as session:
        entry = add_entry(session, at=at, actor=actor, action=action, target_kind=target_kind, target=target,
                          before=before, after=after, remote_addr=remote_addr, detail=detail)
        session.flush()
        return int(entry.id)


def add_entry(
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    target_kind: str | None = None,
    target: str | None = None,
    before: Any = None,
    after: Any = None,
    remote_addr: str | None = None,
    detail: str | None = None,
) -> AuditEntry:
    """Add one entry to ``session``'s transaction, for a change that must be audited in the same commit
    as itself (retention marks a study and audits it at once); :func:`record` otherwise."""
    # Cut to the column sizes: PostgreSQL refuses longer values, and an entry must never be lost.
    entry = AuditEntry(at=at, actor=actor[:64], action=action[:64],
                       target_kind=None if target_kind is None else target_kind[:32],
                       target=None if target is None else target[:255], before=_json(before),
                       after=_json(after), remote_addr=None if remote_addr is None else remote_addr[:64],
                       detail=detail)
    session.add(entry)
    return entry


def _aware(value: datetime | None) -> datetime | None:
    """A filter bound; a naive one is taken as UTC (the database stores UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


_FILTERS = ("actor", "action", "target_kind", "target", "since", "until", "text")


def _filtered(query: Any, *, actor: str | None = None, action: str | None = None, target_kind: str | None = None,
              target: str | None = None, since: datetime | None = None, until: datetime | None = None,
              text: str | None = None) -> Any:
    """Filters are matched literally: '%' and '_' in them are no wildcards (autoescape)."""
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if target:
        query = query.where(AuditEntry.target == target)
    if action:
        query = query.where(AuditEntry.action.startswith(action, autoescape=True))
    if target_kind:
        query = query.where(AuditEntry.target_kind == target_kind)
    if since is not None:
        query = query.where(AuditEntry.at >= _aware(since))
    if until is not None:
        query = query.where(AuditEntry.at < _aware(until))
    if text:
        query = query.where(or_(*(column.icontains(text, autoescape=True) for column in (
            AuditEntry.target, AuditEntry.detail, AuditEntry.before, AuditEntry.after))))
    return query


def list_entries(
    sessions: sessionmaker[Session],
    *,
    actor: str | None = None,
    action: str | None = None,
    target_kind: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    text: str | None = None,
    limit: int = 200,
    offset: int = 0,
) -> list[AuditView]:
    """Entries newest first.

    ``action`` matches a prefix (``rule.`` gives every rule change), ``target`` exactly,
    ``text`` anywhere in the target, the detail or the before/after JSON (case-insensitive);
    ``since`` is inclusive, ``until`` exclusive.
    """
    query = _filtered(select(AuditEntry), actor=actor, action=action, target_kind=target_kind, target=target,
                      since=since, until=until, text=text)
    with sessions() as session:
        rows = session.execute(query.order_by(AuditEntry.id.desc()).limit(limit).offset(offset)).scalars()
        return [
            AuditView(id=e.id, at=e.at, actor=e.actor, action=e.action, target_kind=e.target_kind, target=e.target,
                      before=None if e.before is None else json.loads(e.before),
                      after=None if e.after is None else json.loads(e.after),
                      remote_addr=e.remote_addr, detail=e.detail)
            for e in rows
        ]


def count_entries(sessions: sessionmaker[Session], **filters: Any) -> int:
    """How many entries ``list_entries`` with the same filters would give without a limit."""
    unknown = set(filters) - set(_FILTERS)
    if unknown:
        raise TypeError(f"unknown audit filters: {', '.join(sorted(unknown))}")
    query = _filtered(select(func.count(AuditEntry.id)), **filters)
    with sessions() as session:
        return int(session.execute(query).scalar_one())


def target_kinds(sessions: sessionmaker[Session]) -> list[str]:
    """The target kinds that occur in the log (for the filter's choices)."""
    with sessions() as session:
        query = select(AuditEntry.target_kind).where(AuditEntry.target_kind.is_not(None)).distinct()
        return sorted(str(kind) for kind in session.execute(query).scalars())
