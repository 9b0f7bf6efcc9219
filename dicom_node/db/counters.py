"""The counts the database keeps as rows change (migration 0012): read them, and fold PostgreSQL's deltas.

Why: ``/metrics`` and the queue depths need how many studies, jobs and deliveries are in each state,
how many associations ended, instances and bytes they stored, refused instances, failed delivery
attempts and the stage times of finished jobs. Counting the rows on every scrape cost a scan of the
whole history; triggers (migration 0012, whose docstring says what each metric counts) keep these
numbers in ``metric_counts`` in the same transaction as the change they count, whichever process or
tool made it, so a reader reads a few dozen rows and the numbers survive restarts.

On PostgreSQL the triggers append to ``metric_deltas`` instead (transactions never wait on a shared
counter row); :func:`read` adds both in one statement, so it is exact at any time, and :func:`fold`
(the node every few seconds) moves the deltas into the counts, so that there are only a few to add.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy import func, literal_column, select, text, union_all
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import MetricCount, MetricDelta

__all__ = ["FOLD_INTERVAL_SECONDS", "Counts", "fold", "read"]

logger = logging.getLogger(__name__)

#: How often the node folds PostgreSQL's deltas into the counts (SQLite has none).
FOLD_INTERVAL_SECONDS = 10.0
#: Only one folder at a time (pg_try_advisory_xact_lock key): a second one skips its turn.
_FOLD_LOCK = 0x6D657472  # "metr"


class Counts:
    """The kept counts, by metric: ``of(metric)`` -> ``{labels: value}`` (labels: the metric's label values)."""

    def __init__(self, rows: dict[tuple[str, str, str, str], int]) -> None:
        self._by_metric: dict[str, dict[tuple[str, ...], int]] = defaultdict(dict)
        for (metric, *labels), value in rows.items():
            self._by_metric[metric][tuple(labels)] = value

    def of(self, metric: str, labels: int = 1) -> dict[tuple[str, ...], int]:
        """``{(label1, ..., label<labels>): value}`` of ``metric``."""
        return {key[:labels]: value for key, value in self._by_metric.get(metric, {}).items()}

    def labelled(self, metric: str) -> dict[str, int]:
        """``{label1: value}`` of a metric with one label."""
        return {key[0]: value for key, value in self.of(metric).items()}

    def total(self, metric: str) -> int:
        """The value of a metric without labels (0 when nothing was counted yet)."""
        return sum(self._by_metric.get(metric, {}).values())


def read(session: Session, metrics: tuple[str, ...] | None = None) -> Counts:
    """The kept counts (of ``metrics``, or all), the folded ones and the deltas not yet folded added up in
    one statement (one snapshot: a fold running beside it is seen whole or not at all)."""
    keys = ("metric", "label1", "label2", "label3")
    counted = select(*(getattr(MetricCount, k) for k in keys), MetricCount.value.label("value"))
    pending = select(*(getattr(MetricDelta, k) for k in keys), MetricDelta.delta.label("value"))
    if metrics is not None:
        counted = counted.where(MetricCount.metric.in_(metrics))
        pending = pending.where(MetricDelta.metric.in_(metrics))
    both = union_all(counted, pending).subquery()
    columns = [both.c[k] for k in keys]
    rows = session.execute(select(*columns, func.sum(both.c.value)).group_by(*columns)).all()
    return Counts({(str(m), str(a), str(b), str(c)): int(v) for m, a, b, c, v in rows})


def fold(sessions: sessionmaker[Session]) -> int:
    """Move PostgreSQL's pending deltas into the counts (one short transaction); how many were folded.

    Nothing to do on SQLite (its triggers add to the counts directly). A fold running elsewhere at the
    same time makes this one skip its turn rather than wait."""
    with sessions.begin() as session:
        if session.get_bind().dialect.name != "postgresql":
            return 0
        if not session.scalar(select(func.pg_try_advisory_xact_lock(literal_column(str(_FOLD_LOCK))))):
            return 0
        moved = session.execute(text(
            "WITH moved AS (DELETE FROM metric_deltas RETURNING metric, label1, label2, label3, delta), "
            "folded AS (INSERT INTO metric_counts (metric, label1, label2, label3, value) "
            "SELECT metric, label1, label2, label3, sum(delta) FROM moved GROUP BY metric, label1, label2, label3 "
            "ON CONFLICT (metric, label1, label2, label3) DO UPDATE SET value = metric_counts.value + excluded.value) "
            "SELECT count(*) FROM moved")).scalar()
    if moved:
        logger.debug("folded %d metric deltas", moved)
    return int(moved or 0)
