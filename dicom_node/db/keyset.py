"""Keyset pages and capped counts: how the studies, jobs and deliveries lists stay flat as the database grows.

Why: a list that skips ``offset`` rows reads them all, and a list that counts every match on each page
scans them all, so both grew with the history (issue 26). A keyset page continues from the last row
shown (its :class:`Cursor`) down an index in the list's order and stops after one page; the count
stops at :data:`COUNT_CAP`. The lists (:mod:`dicom_node.db.study_views` by ``(last_received_at, id)``,
:mod:`dicom_node.db.job_views` by ``id``) share these, so that their cursors and counts behave alike.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, func, literal, select, tuple_
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session

from dicom_node.db.models import UTCDateTime

__all__ = ["COUNT_CAP", "Cursor", "Keyset", "KeysetRows", "Page", "capped_count"]

T = TypeVar("T")

#: The lists count matching rows up to this many; beyond it they say "10,000+" (``total_exact`` false) unless
#: exact counting is asked for. Counting every match costs a scan of them all on each page (0.1 s per
#: 100,000 rows on SQLite).
COUNT_CAP = 10_000


@dataclass(frozen=True)
class Cursor:
    """A position in a list ordered newest first by ``(at, id)`` (``at`` None: by ``id`` alone): the page
    after it holds the rows below, the page before it those above. Sent as an opaque token."""

    at: datetime | None
    id: int

    def token(self) -> str:
        at = "" if self.at is None else self.at.astimezone(timezone.utc).isoformat()
        return base64.urlsafe_b64encode(f"{at}|{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str, what: str = "studies", *, timed: bool = True) -> Cursor:
        """The cursor a :meth:`token` names, of a list ordered by time and id (``timed``) or by id; ValueError
        naming the list (``what``) and the token when it is not one."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            at, separator, row_id = raw.partition("|")
            if not separator:
                raise ValueError("no '|'")
            if not timed:
                if at:
                    raise ValueError("a cursor of another list")
                return cls(None, int(row_id))
            when = datetime.fromisoformat(at)
            if when.tzinfo is None:
                raise ValueError("no time zone")
            return cls(when, int(row_id))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{what} cursor {token[:80]!r} is not one this node gave ({exc})") from None


def capped_count(session: Session, query: Select[Any], cap: int | None) -> tuple[int, bool]:
    """(rows ``query`` selects, exact): counted up to ``cap`` + 1 rows (None: all of them)."""
    if cap is None:
        return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0), True
    found = int(session.scalar(select(func.count()).select_from(query.limit(cap + 1).subquery())) or 0)
    return (cap, False) if found > cap else (found, True)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list (studies, jobs, deliveries); ``total`` is exact when ``total_exact``, else a lower
    bound (the cap). ``next_cursor`` / ``previous_cursor``: the pages of older / newer items (None: none)."""

    items: list[T]
    total: int
    limit: int
    offset: int
    total_exact: bool = True
    next_cursor: str | None = None
    previous_cursor: str | None = None


@dataclass(frozen=True)
class KeysetRows:
    """One page of rows, newest first, with the cursors of the pages below (older) and above (newer)."""

    rows: list[Row[Any]]
    next_cursor: str | None
    previous_cursor: str | None


@dataclass(frozen=True)
class Keyset:
    """A list's order, newest first: by ``(time_column, id_column)``, or by ``id_column`` alone; ``cursor_of``
    reads a page row's :class:`Cursor`. ``what`` names the list in errors."""

    id_column: Any
    cursor_of: Callable[[Row[Any]], Cursor]
    time_column: Any = None
    what: str = "studies"

    def parse(self, token: str) -> Cursor:
        return Cursor.parse(token, self.what, timed=self.time_column is not None)

    def _key(self) -> ColumnElement[Any]:
        return self.id_column if self.time_column is None else tuple_(self.time_column, self.id_column)

    def _value(self, cursor: Cursor) -> ColumnElement[Any]:
        if self.time_column is None:
            return literal(cursor.id)
        return tuple_(literal(cursor.at, UTCDateTime()), literal(cursor.id))

    def _order(self, newest_first: bool) -> Sequence[ColumnElement[Any]]:
        columns = [c for c in (self.time_column, self.id_column) if c is not None]
        return [c.desc() for c in columns] if newest_first else columns

    def page(self, session: Session, query: Select[Any], *, limit: int, offset: int = 0, after: str | None = None,
             before: str | None = None) -> KeysetRows:
        """One page of ``query`` (its conditions set, no order): below the cursor ``after``, above ``before``, or
        ``offset`` rows down from the newest (older clients; its cost grows with the offset). ValueError names
        a cursor this node did not give."""
        if after:
            rows = session.execute(query.where(self._key() < self._value(self.parse(after)))
                                   .order_by(*self._order(True)).limit(limit + 1)).all()
            more_after, more_before = len(rows) > limit, True
            rows = rows[:limit]
        elif before:
            rows = session.execute(query.where(self._key() > self._value(self.parse(before)))
                                   .order_by(*self._order(False)).limit(limit + 1)).all()
            more_after, more_before = True, len(rows) > limit
            rows = list(reversed(rows[:limit]))
        else:
            rows = session.execute(query.order_by(*self._order(True)).limit(limit + 1).offset(offset)).all()
            more_after, more_before = len(rows) > limit, offset > 0
            rows = rows[:limit]
        return KeysetRows(
            rows=list(rows),
            next_cursor=self.cursor_of(rows[-1]).token() if rows and more_after else None,
            previous_cursor=self.cursor_of(rows[0]).token() if rows and more_before else None,
        )
