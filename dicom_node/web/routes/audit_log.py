"""The audit log, read-only: the ``/audit`` page and ``GET /api/v1/audit`` (admin only).

Why: a hospital must be able to answer "who changed this, when, from where, and what was
it before?". Entries are written by :func:`dicom_node.web.auth.audit_event` (and the CLI);
nothing here changes or deletes them, and the database refuses UPDATE/DELETE anyway.
Each change is shown as a side-by-side before/after table with the changed keys marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from dicom_node.db import audit
from dicom_node.db.audit import AuditView
from dicom_node.db.models import Role
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render

__all__ = ["DiffRow", "diff_rows", "router"]

router = APIRouter()

PAGE_SIZE = 50
_MISSING = object()
_TEXT_MAX = 20_000


@dataclass(frozen=True)
class DiffRow:
    """One key of a change: its value before and after as pretty JSON ('' when absent), and whether it changed."""

    key: str
    before: str
    after: str
    changed: bool


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted keys (lists stay whole), so a rule's conditions diff key by key."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, name))
        else:
            flat[name] = item
    return flat


def _shown(value: Any) -> str:
    if value is _MISSING:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def diff_rows(before: Any, after: Any) -> list[DiffRow]:
    """Before and after side by side, key by key; a value that is not an object is one row with key ''."""
    if before is None and after is None:
        return []
    if isinstance(before, (dict, type(None))) and isinstance(after, (dict, type(None))):
        old, new = _flatten(before or {}), _flatten(after or {})
        keys = list(old) + [k for k in new if k not in old]
        return [DiffRow(key, _shown(old.get(key, _MISSING)), _shown(new.get(key, _MISSING)),
                        old.get(key, _MISSING) != new.get(key, _MISSING)) for key in sorted(keys)]
    return [DiffRow("", _shown(_MISSING if before is None else before), _shown(_MISSING if after is None else after),
                    before != after)]


# --------------------------------------------------------------------------- API


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="User name, or anonymous / system / cli.")
    action: str = Field(description="For example login, user.update, rule.create, job.retry.")
    target_kind: str | None
    target: str | None
    remote_addr: str | None
    detail: str | None
    before: Any = Field(description="The state before the change (JSON), if any.")
    after: Any = Field(description="The state after the change (JSON), if any.")

    @classmethod
    def of(cls, entry: AuditView) -> "AuditEntryOut":
        return cls(id=entry.id, at=entry.at, actor=entry.actor, action=entry.action, target_kind=entry.target_kind,
                   target=entry.target, remote_addr=entry.remote_addr, detail=entry.detail, before=entry.before,
                   after=entry.after)


class AuditPage(BaseModel):
    total: int = Field(description="Entries matching the filters.")
    limit: int
    offset: int
    entries: list[AuditEntryOut] = Field(description="Newest first.")


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


@router.get("/api/v1/audit", tags=["audit"], response_model=AuditPage)
def api_audit(
    actor: str | None = Query(None, max_length=_TEXT_MAX, description="Exactly this actor."),
    action: str | None = Query(None, max_length=_TEXT_MAX, description="Actions starting with this, e.g. `rule.`."),
    target_kind: str | None = Query(None, max_length=_TEXT_MAX),
    text: str | None = Query(None, max_length=_TEXT_MAX, description="In target, detail or before/after."),
    since: datetime | None = Query(None, description="From this time (inclusive; no zone: UTC)."),
    until: datetime | None = Query(None, description="Before this time (exclusive; no zone: UTC)."),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> AuditPage:
    """The audit log, newest first, filtered; read-only (entries can never be changed or deleted)."""
    filters = {"actor": actor, "action": action, "target_kind": target_kind, "text": text,
               "since": _utc(since), "until": _utc(until)}
    entries = audit.list_entries(context.sessions, **filters, limit=limit, offset=offset)
    return AuditPage(total=audit.count_entries(context.sessions, **filters), limit=limit, offset=offset,
                     entries=[AuditEntryOut.of(e) for e in entries])


# --------------------------------------------------------------------------- page


def _parse_day(value: str, name: str, errors: dict[str, str], *, end: bool) -> datetime | None:
    """A date (YYYY-MM-DD, whole UTC day; ``end``: up to its end) or a full ISO time; errors go to ``errors``."""
    value = value.strip()
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return start + timedelta(days=1) if end else start
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        errors[name] = f"{value[:40]!r} is not a date (YYYY-MM-DD)"
        return None


@router.get("/audit", include_in_schema=False)
def audit_page(
    request: Request,
    actor: str = Query("", max_length=_TEXT_MAX),
    action: str = Query("", max_length=_TEXT_MAX),
    target_kind: str = Query("", max_length=_TEXT_MAX),
    text: str = Query("", max_length=_TEXT_MAX),
    since: str = Query("", max_length=100),
    until: str = Query("", max_length=100),
    page: int = Query(1, ge=1, le=1_000_000),
    context: WebContext = Depends(get_context),
    principal: Principal = Depends(require(Role.ADMIN)),
) -> Response:
    errors: dict[str, str] = {}
    start = _parse_day(since, "since", errors, end=False)
    stop = _parse_day(until, "until", errors, end=True)
    form = {"actor": actor, "action": action, "target_kind": target_kind, "text": text, "since": since,
            "until": until}
    filters = {"actor": actor or None, "action": action or None, "target_kind": target_kind or None,
               "text": text or None, "since": start, "until": stop}
    total = 0 if errors else audit.count_entries(context.sessions, **filters)
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(page, pages)
    entries = [] if errors else audit.list_entries(context.sessions, **filters, limit=PAGE_SIZE,
                                                   offset=(page - 1) * PAGE_SIZE)
    kept = {k: v for k, v in form.items() if v}

    def page_url(number: int) -> str:
        return "/audit?" + urlencode({**kept, "page": number})

    return render(request, "audit.html", status_code=422 if errors else 200,
                  entries=[(e, diff_rows(e.before, e.after)) for e in entries], form=form, errors=errors,
                  any_filter=bool(kept), total=total, page=page, pages=pages, page_url=page_url,
                  target_kinds=audit.target_kinds(context.sessions))
