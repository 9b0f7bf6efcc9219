"""What the dashboard, ``/metrics`` and ``/readyz`` read: aggregates over studies, jobs, deliveries,
associations, ingest errors and workers, all computed from the database.

Why from the database: it is the source of truth and the one thing every process
shares (the queue may be ``memory://`` inside the node or Redis between machines),
so queue depths, throughput and errors mean the same in the embedded and the
distributed mode, and survive restarts.

Study outcome: the state a study is *shown* in (receiving, waiting, in_progress, done, held,
failed, ignored; :mod:`dicom_node.study_status` says what each means and which wins), computed
in SQL by :func:`dicom_node.db.study_states.shown_state_sql`, the expression the studies
list filters with, so the dashboard's counts are the numbers of studies the list shows.

The dashboard counts the studies *first received* in a window by their outcome now,
so ``received = receiving + waiting + in_progress + done + held + failed + ignored``.

Cost: these run on every dashboard refresh and scrape. Time windows over the two
big, ever-growing tables (instances, studies) are found through the primary key
(:func:`_first_id_since`: a binary search, ids grow with the receive time) rather
than by scanning them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from dicom_node.db import counters
from dicom_node.db.models import (
    AssociationOutcome,
    AssociationProtocol,
    AssociationRecord,
    Delivery,
    DeliveryState,
    IngestError,
    Instance,
    Job,
    JobState,
    Study,
    WorkerStatus,
    json_object,
)
from dicom_node.db.study_states import shown_state_sql
from dicom_node.db.study_views import source_label
from dicom_node.study_status import SHOWN_STATES

__all__ = [
    "OUTCOMES",
    "STUDY_COUNT_CAP",
    "DatabaseStatus",
    "MetricsSnapshot",
    "QueueDepth",
    "RecentError",
    "StudyCounts",
    "Throughput",
    "database_status",
    "job_briefs",
    "metrics_snapshot",
    "normalise_reject_reason",
    "queue_depths",
    "recent_errors",
    "study_counts",
    "throughput",
]

logger = logging.getLogger(__name__)

#: Study outcomes (shown states), in the order the dashboard shows them.
OUTCOMES = SHOWN_STATES

#: Job states that end a job's work: counted as done for the study.
_FINISHED_JOB = (JobState.SUCCEEDED.value, JobState.NOT_APPLICABLE.value, JobState.RELEASED.value,
                 JobState.DISCARDED.value)
#: Job and delivery states the dashboard lists as errors (besides held jobs).
_ERROR_JOB = (JobState.FAILED.value, JobState.DEAD.value)
_ERROR_DELIVERY = (DeliveryState.FAILED.value, DeliveryState.DEAD.value)
#: The dashboard works out the shown state of at most this many studies per refresh (the newest of its widest
#: window); a window holding more is counted over its newest ones and marked incomplete ("5,000+").
#: Why: each study's state is a handful of index lookups (about 25 us on SQLite), so a day holding 100,000
#: studies took 2.5 s per refresh; 5,000 stay under 0.15 s whatever the size of the database.
STUDY_COUNT_CAP = 5_000


# --------------------------------------------------------------------------- helpers


def _first_id_since(session: Session, id_column: InstrumentedAttribute[int],
                    time_column: InstrumentedAttribute[datetime], since: datetime) -> int | None:
    """The smallest id whose row has ``time_column >= since``, by binary search on the primary key.

    Rows are written in time order, so time grows with the id; the search costs
    about log2(ids) index lookups instead of a scan. Rows written out of order
    (a replaced duplicate instance keeps its old id) may be missed - a few, for a
    dashboard figure. None when no row is that new.
    """
    # two scalar subqueries: SQLite answers min() or max() alone from the key, both at once by a full scan
    low, high = session.execute(select(select(func.min(id_column)).scalar_subquery(),
                                       select(func.max(id_column)).scalar_subquery())).one()
    if high is None:
        return None
    newest = session.scalar(select(time_column).where(id_column == high))
    if newest is None or newest < since:
        return None
    low, high = int(low), int(high)

    def new_enough(x: int) -> bool:
        at = session.scalar(select(time_column).where(id_column >= x).order_by(id_column).limit(1))
        return at is not None and at >= since

    while low < high:
        middle = (low + high) // 2
        if new_enough(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _window_filter(id_column: InstrumentedAttribute[int], time_column: InstrumentedAttribute[datetime],
                   first_id: int | None, since: datetime) -> ColumnElement[bool]:
    if first_id is None:
        return time_column >= since
    return (id_column >= first_id) & (time_column >= since)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- study outcomes


@dataclass
class _StudyOutcome:
    id: int
    outcome: str  # the shown state
    first_received_at: datetime
    finished_at: datetime | None = None  # last job finish or delivery (read for done studies only)


def _study_outcomes(session: Session, condition: ColumnElement[bool], *, finish_times: bool = False,
                    newest: int | None = None) -> list[_StudyOutcome]:
    """Outcome of every study matching ``condition`` (one query; only the ``newest`` ones by id when given),
    and with ``finish_times`` when each done one finished: its current jobs' last finish or its last
    delivery (two grouped queries)."""
    query = select(Study.id, shown_state_sql(), Study.first_received_at).where(condition)
    if newest is not None:
        query = query.order_by(Study.id.desc()).limit(newest)
    rows = session.execute(query).all()
    studies = {int(i): _StudyOutcome(int(i), str(o), _aware(t) or t) for i, o, t in rows}
    done = [i for i, s in studies.items() if s.outcome == "done"]
    if not finish_times or not done:
        return list(studies.values())
    current = (Job.study_id.in_(done), Job.superseded_at.is_(None))
    for study_id, finished in session.execute(
        select(Job.study_id, func.max(Job.finished_at)).where(*current, Job.state.in_(_FINISHED_JOB))
        .group_by(Job.study_id)
    ).all():
        study = studies[int(study_id)]
        study.finished_at = max(filter(None, (study.finished_at, _aware(finished))), default=None)
    for study_id, delivered in session.execute(
        select(Job.study_id, func.max(Delivery.delivered_at)).join(Job, Job.id == Delivery.job_id)
        .where(*current, Delivery.state == DeliveryState.DELIVERED.value).group_by(Job.study_id)
    ).all():
        study = studies[int(study_id)]
        study.finished_at = max(filter(None, (study.finished_at, _aware(delivered))), default=None)
    return list(studies.values())


@dataclass(frozen=True)
class StudyCounts:
    """Studies first received in a window, by outcome now (``received`` is their sum).

    ``complete`` false: the window holds more studies than :data:`STUDY_COUNT_CAP`; the counts are those of
    its newest ones (``received`` the cap reached), and the window holds at least that many."""

    complete: bool = True
    received: int = 0
    receiving: int = 0
    waiting: int = 0
    in_progress: int = 0
    done: int = 0
    held: int = 0
    failed: int = 0
    ignored: int = 0


def study_counts(sessions: sessionmaker[Session], *, now: datetime, windows: dict[str, timedelta],
                 cap: int = STUDY_COUNT_CAP) -> dict[str, StudyCounts]:
    """``{window name: StudyCounts}`` of the studies first received within each window before ``now``;
    at most ``cap`` studies are looked at (the newest), a window holding more is marked incomplete."""
    if not windows:
        return {}
    widest = now - max(windows.values())
    with sessions() as session:
        first = _first_id_since(session, Study.id, Study.first_received_at, widest)
        outcomes = _study_outcomes(session, _window_filter(Study.id, Study.first_received_at, first, widest),
                                   newest=cap + 1)
    outcomes.sort(key=lambda s: s.id, reverse=True)
    # the newest study left out when the widest window holds more than the cap: a window reaching it is incomplete
    cut = outcomes[cap].first_received_at if len(outcomes) > cap else None
    outcomes = outcomes[:cap]
    result = {}
    for name, length in windows.items():
        since = now - length
        counted = Counter(s.outcome for s in outcomes if s.first_received_at >= since)
        result[name] = StudyCounts(complete=cut is None or cut < since, received=sum(counted.values()),
                                   **{o: counted[o] for o in OUTCOMES})
    return result


# --------------------------------------------------------------------------- queues


@dataclass(frozen=True)
class QueueDepth:
    """Work waiting on a queue (``waiting``: queued or waiting for a retry) and being done (``active``)."""

    queue: str
    waiting: int
    active: int
    retrying: int  # of waiting: failed once, waiting for the next attempt
    dead: int


def _queue_depths(session: Session, kept: counters.Counts | None = None) -> list[QueueDepth]:
    """From the counts the database keeps (:mod:`dicom_node.db.counters`): the dead jobs and deliveries of the
    whole history are counted without reading them."""
    kept = kept or counters.read(session, ("jobs", "deliveries"))
    jobs: Counter[str] = Counter()
    for (state, _), count in kept.of("jobs", 2).items():
        jobs[state] += count
    deliveries: Counter[str] = Counter()
    for (state, _), count in kept.of("deliveries", 2).items():
        deliveries[state] += count
    return [
        QueueDepth("gpu", waiting=jobs[JobState.QUEUED.value] + jobs[JobState.FAILED.value],
                   active=jobs[JobState.RUNNING.value], retrying=jobs[JobState.FAILED.value],
                   dead=jobs[JobState.DEAD.value]),
        QueueDepth("io", waiting=deliveries[DeliveryState.PENDING.value] + deliveries[DeliveryState.FAILED.value],
                   active=deliveries[DeliveryState.SENDING.value], retrying=deliveries[DeliveryState.FAILED.value],
                   dead=deliveries[DeliveryState.DEAD.value]),
    ]


def queue_depths(sessions: sessionmaker[Session]) -> list[QueueDepth]:
    """Depth of the ``gpu`` (jobs) and ``io`` (deliveries) queues, from the job and delivery states."""
    with sessions() as session:
        return _queue_depths(session)


# --------------------------------------------------------------------------- throughput


@dataclass(frozen=True)
class Throughput:
    """Studies done per hour (last 24 h) and instances received per minute (last hour), oldest first.

    Each list holds (bucket start, count) for every bucket, empty ones included.
    """

    studies_per_hour: list[tuple[datetime, int]]
    instances_per_minute: list[tuple[datetime, int]]


def _minute_key(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M", Instance.received_at)
    if dialect == "postgresql":
        return func.to_char(Instance.received_at, "YYYY-MM-DD HH24:MI")
    return None


def throughput(sessions: sessionmaker[Session], *, now: datetime, hours: int = 24, minutes: int = 60) -> Throughput:
    """See :class:`Throughput`; a study counts in the hour its last job finished or delivery was delivered."""
    now = now.astimezone(timezone.utc)
    hour0 = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    minute0 = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    with sessions() as session:
        # the studies a job finished or a delivery was delivered for in the window, read first by the
        # finished_at / delivered_at indexes (as one OR of IN subqueries PostgreSQL scanned every study: 6 s
        # for 10,000), then their outcomes by primary key
        touched = set(session.scalars(select(Job.study_id).where(Job.finished_at >= hour0)).all())
        touched.update(session.scalars(select(Job.study_id).join(Delivery, Delivery.job_id == Job.id)
                                       .where(Delivery.delivered_at >= hour0)).all())
        done = [s.finished_at for s in _study_outcomes(session, Study.id.in_(sorted(touched)), finish_times=True)
                if s.outcome == "done" and s.finished_at is not None and s.finished_at >= hour0] if touched else []
        first = _first_id_since(session, Instance.id, Instance.received_at, minute0)
        window = _window_filter(Instance.id, Instance.received_at, first, minute0)
        key = _minute_key(session)
        per_minute: Counter[str] = Counter()
        if first is not None:
            if key is not None:
                per_minute.update({str(k): int(n) for k, n in session.execute(
                    select(key, func.count()).where(window).group_by(key)).all()})
            else:
                per_minute.update(f"{_aware(t):%Y-%m-%d %H:%M}" for t in session.scalars(
                    select(Instance.received_at).where(window)))
    hours_count = Counter(int((t - hour0).total_seconds() // 3600) for t in done)
    return Throughput(
        studies_per_hour=[(hour0 + timedelta(hours=h), hours_count[h]) for h in range(hours)],
        instances_per_minute=[
            (minute0 + timedelta(minutes=m), per_minute[f"{minute0 + timedelta(minutes=m):%Y-%m-%d %H:%M}"])
            for m in range(minutes)
        ],
    )


def job_briefs(sessions: sessionmaker[Session], job_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    """``{job id: (Study Instance UID, pipeline)}`` of the given jobs (the dashboard's "running now")."""
    ids = sorted({int(i) for i in job_ids})
    if not ids:
        return {}
    with sessions() as session:
        rows = session.execute(select(Job.id, Study.study_instance_uid, Job.pipeline)
                               .join(Study, Study.id == Job.study_id).where(Job.id.in_(ids))).all()
    return {int(i): (str(uid), str(pipeline)) for i, uid, pipeline in rows}


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RecentError:
    """Something that went wrong, for the dashboard's error list.

    ``kind``: job, delivery, ingest (a refused instance) or association (a refused association).
    """

    at: datetime
    kind: str
    state: str
    what: str
    error: str
    study_instance_uid: str | None = None
    job_id: int | None = None
    delivery_id: int | None = None


def recent_errors(sessions: sessionmaker[Session], *, limit: int = 20) -> list[RecentError]:
    """The newest failed/dead jobs and deliveries, held results (they wait for a person too), refused
    instances and rejected associations, newest first."""
    from dicom_node.db.job_checks import outcome_reason

    found: list[RecentError] = []
    with sessions() as session:
        for job_id, uid, pipeline, at, checks in session.execute(
            select(Job.id, Study.study_instance_uid, Job.pipeline, Job.state_changed_at, Job.checks)
            .join(Study, Study.id == Job.study_id).where(Job.state == JobState.HELD.value)
            .order_by(Job.state_changed_at.desc()).limit(limit)
        ).all():
            reason = outcome_reason(JobState.HELD.value, json_object(checks, f"checks of job {job_id}"))
            found.append(RecentError(at, "job", JobState.HELD.value,
                                     f"job {job_id}: {pipeline} results held, not sent (release or discard them)",
                                     reason or "(judged implausible; no reason recorded)", uid, job_id=job_id))
        # one query per state: each reads the newest rows of (state, state_changed_at), never all such rows
        for job_id, uid, pipeline, state, error, at, attempts, max_attempts in (row for wanted in _ERROR_JOB
                                                                               for row in session.execute(
            select(Job.id, Study.study_instance_uid, Job.pipeline, Job.state, Job.error, Job.state_changed_at,
                   Job.attempts, Job.max_attempts)
            .join(Study, Study.id == Job.study_id)
            .where(Job.state == wanted)
            .order_by(Job.state_changed_at.desc()).limit(limit)
        ).all()):
            found.append(RecentError(at, "job", state, f"job {job_id}: {pipeline} (attempt {attempts}/{max_attempts})",
                                     error or "(no error text)", uid, job_id=job_id))
        for delivery_id, job_id, uid, destination, state, error, at, attempts, max_attempts in (
                row for wanted in _ERROR_DELIVERY for row in session.execute(
            select(Delivery.id, Delivery.job_id, Study.study_instance_uid, Delivery.destination, Delivery.state,
                   Delivery.error, Delivery.state_changed_at, Delivery.attempts, Delivery.max_attempts)
            .join(Job, Job.id == Delivery.job_id).join(Study, Study.id == Job.study_id)
            .where(Delivery.state == wanted)
            .order_by(Delivery.state_changed_at.desc()).limit(limit)
        ).all()):
            found.append(RecentError(
                at, "delivery", state, f"delivery {delivery_id} of job {job_id} to {destination} "
                f"(attempt {attempts}/{max_attempts})", error or "(no error text)", uid, job_id=job_id,
                delivery_id=delivery_id))
        for at, calling, status, reason, sop, protocol, username in session.execute(
            select(IngestError.at, IngestError.calling_ae_title, IngestError.status, IngestError.reason,
                   IngestError.sop_instance_uid, AssociationRecord.protocol, AssociationRecord.username)
            .outerjoin(AssociationRecord, AssociationRecord.id == IngestError.association_id)
            .order_by(IngestError.at.desc(), IngestError.id.desc()).limit(limit)
        ).all():
            sender = source_label(protocol or AssociationProtocol.DICOM.value, calling or "", username)
            found.append(RecentError(at, "ingest", f"0x{int(status):04X}",
                                     f"instance {sop or '?'} from {sender or '?'} refused", reason))
        for at, calling, address, reason in session.execute(
            select(AssociationRecord.started_at, AssociationRecord.calling_ae_title, AssociationRecord.peer_address,
                   AssociationRecord.reject_reason)
            .where(AssociationRecord.outcome == AssociationOutcome.REJECTED.value)
            .order_by(AssociationRecord.started_at.desc(), AssociationRecord.id.desc()).limit(limit)
        ).all():
            found.append(RecentError(at, "association", "rejected",
                                     f"association from {calling or '?'} ({address})", reason or "(no reason)"))
    found.sort(key=lambda e: e.at, reverse=True)
    return found[:limit]


# --------------------------------------------------------------------------- metrics


#: reject_reason text (as dicom_node.access and dicom_node.scp write it) -> a small set of metric labels.
_REJECT_REASONS = (
    (re.compile(r"called AE title"), "called_ae_title"),
    (re.compile(r"is not allowed from address"), "calling_address"),
    (re.compile(r"calling AE title"), "calling_ae_title"),
    (re.compile(r"associations open"), "too_many_associations"),
    (re.compile(r"without a valid association request"), "invalid_request"),
)


def normalise_reject_reason(reason: str | None) -> str:
    """One of called_ae_title, calling_ae_title, calling_address, too_many_associations, invalid_request, other.

    The database's counter of rejected associations labels them with the same rules, in SQL (migration
    0012); tests/db/test_metric_counters.py checks that both agree."""
    for pattern, label in _REJECT_REASONS:
        if reason and pattern.search(reason):
            return label
    return "other"


@dataclass(frozen=True)
class MetricsSnapshot:
    """The aggregates ``/metrics`` exposes, read in one database session (no patient identifiers)."""

    instances_received: int
    bytes_received: int
    associations: dict[str, int]  # finished associations by outcome
    associations_open: int
    stow_requests: dict[str, int]  # ended STOW-RS requests by outcome (released: answered, aborted: cut off)
    rejected: dict[str, int]  # by normalised reason
    ingest_errors: dict[str, int]  # by status, 0xNNNN
    studies: dict[str, int]  # by state
    jobs: dict[tuple[str, str], int]  # (state, pipeline)
    deliveries: dict[tuple[str, str], int]  # (state, destination)
    delivery_failures: dict[str, int]  # failed attempts by destination
    queues: list[QueueDepth]
    workers_online: int
    #: Stage times of jobs whose run ended: {(stage, pipeline, upper bound or "+Inf"): jobs} (not cumulative)
    stage_buckets: dict[tuple[str, str, str], int] = field(default_factory=dict)
    stage_seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # their sum, by (stage, pipeline)


def metrics_snapshot(sessions: sessionmaker[Session], *, now: datetime, worker_stale_seconds: float) -> MetricsSnapshot:
    """Everything for one scrape, in two small queries whatever the size of the history: the counts the
    database keeps (:mod:`dicom_node.db.counters`; migration 0012 says what each counts) and the workers'
    heartbeats.

    Received instances and bytes are counted when their association or STOW-RS request ends. A failed
    delivery attempt is one that left ``sending`` without delivering (a hand-back does not count); a manual
    retry no longer resets the count."""
    with sessions() as session:
        kept = counters.read(session)
        online = int(session.scalar(select(func.count()).select_from(WorkerStatus).where(
            WorkerStatus.last_seen_at >= now - timedelta(seconds=worker_stale_seconds))) or 0)
        queues = _queue_depths(session, kept)
    return MetricsSnapshot(
        instances_received=kept.total("instances_received"), bytes_received=kept.total("bytes_received"),
        associations=kept.labelled("associations"),
        associations_open=sum(n for protocol, n in kept.labelled("associations_open").items()
                              if protocol != AssociationProtocol.STOW_RS.value),
        stow_requests=kept.labelled("stow_requests"), rejected=kept.labelled("associations_rejected"),
        ingest_errors={f"0x{int(status):04X}": n for status, n in kept.labelled("ingest_errors").items()},
        studies=kept.labelled("studies"), jobs=kept.of("jobs", 2),  # type: ignore[arg-type]
        deliveries=kept.of("deliveries", 2),  # type: ignore[arg-type]
        delivery_failures=kept.labelled("delivery_failures"), queues=queues,
        workers_online=online, stage_buckets=kept.of("job_stage_bucket", 3),  # type: ignore[arg-type]
        stage_seconds={k: v / 1_000_000 for k, v in kept.of("job_stage_sum_us", 2).items()},  # type: ignore[misc]
    )


# --------------------------------------------------------------------------- readiness


@dataclass(frozen=True)
class DatabaseStatus:
    """Whether the database answers and whether its schema is the one this version needs."""

    reachable: bool
    current_revision: str | None
    head_revision: str | None
    error: str | None = None

    @property
    def at_head(self) -> bool:
        return self.reachable and self.current_revision == self.head_revision


@functools.lru_cache(maxsize=1)
def _head_revision() -> str | None:
    from dicom_node.db.session import head_revision

    return head_revision()


def database_status(sessions: sessionmaker[Session]) -> DatabaseStatus:
    """Ping the database and read its migration revision; errors are reported, not raised."""
    from dicom_node.db.session import current_revision

    head = _head_revision()
    engine = sessions.kw["bind"]
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        current = current_revision(engine)
    except Exception as exc:  # any driver error means "not ready"; the message says which
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return DatabaseStatus(False, None, head, f"{type(exc).__name__}: {first_line[:200]}")
    return DatabaseStatus(True, current, head)
