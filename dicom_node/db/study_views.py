"""Read-only views of studies for the web UI and the API: the studies list and one study's detail.

Why: the studies list, the study page, the job API and the preview all need the same
joined picture of a study (series, sources, jobs with stages, results, deliveries,
events). Building it here, in a handful of set-based queries per page (never one
query per row), keeps pages fast with hundreds of studies and lets the pages and the
API share one implementation. A study's jobs are read by
:func:`dicom_node.db.job_views.job_rows` (shared with the job API); its timeline and
findings are pure functions of the :class:`StudyDetail`
(:mod:`dicom_node.db.study_timeline`), so the page, its live fragment and the API show
exactly the same thing. A study's shown state (``status``: receiving, waiting, in progress,
done, held, failed, ignored, with the reason) comes from :mod:`dicom_node.db.study_states`,
as do the list's state filter and the dashboard's counts, so they all agree.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, column, exists, func, literal_column, select, table
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.job_views import JobRow, ResultRow, job_rows, jobs_query
from dicom_node.db.keyset import COUNT_CAP, Cursor, Keyset, Page, capped_count
from dicom_node.db.models import (
    AssociationProtocol,
    AssociationRecord,
    AssociationStudy,
    Job,
    ResultObject,
    Series,
    Study,
    StudyEvent,
)
from dicom_node.db.study_states import state_condition, study_statuses
from dicom_node.study_status import SHOWN_STATES, StudyStatus

# ResultRow and JobRow are part of a StudyDetail (its jobs and their results): named here for its readers.
__all__ = [
    "COUNT_CAP",
    "JOB_OUTCOMES",
    "NON_IMAGE_MODALITIES",
    "SHOWN_STATES",
    "AssociationRow",
    "JobRow",
    "ResultRow",
    "SeriesRow",
    "StudyDetail",
    "StudyEventRow",
    "StudyFilters",
    "StudyHeader",
    "StudyPage",
    "StudyCursor",
    "StudyRow",
    "StudyStatus",
    "list_studies",
    "study_detail",
]

logger = logging.getLogger(__name__)

#: The older "jobs" filter of the studies list, kept for API clients: in_progress, done, held and failed
#: select the studies *shown* in that state (the ``status`` filter, :data:`SHOWN_STATES`); none: no current job.
JOB_OUTCOMES = ("in_progress", "done", "held", "failed", "none")

#: Modalities of series that are not images (results, reports, presentation states).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC",
                                  "REG", "FID", "AU", "ECG"})

# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class StudyFilters:
    """What the studies list may be narrowed by; ``None`` (or empty) means "any".

    Dates are DICOM dates (YYYYMMDD), inclusive. ``patient_name`` matches any part,
    case-insensitively; the others match exactly. ``state`` is the stored state (receiving,
    complete, routed, ignored); ``status`` the shown one (:data:`SHOWN_STATES`); ``jobs`` one of
    :data:`JOB_OUTCOMES`; ``received_from``: first received at or after (ISO 8601, as the
    dashboard links it).
    """

    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    state: str | None = None
    jobs: str | None = None
    modality: str | None = None
    source_ae: str | None = None
    status: str | None = None
    received_from: datetime | None = None

    def active(self) -> dict[str, str]:
        """The filters that are set, by name (for links that keep them)."""
        return {name: value.isoformat() if isinstance(value, datetime) else value
                for name, value in self.__dict__.items() if value}


@dataclass(frozen=True)
class StudyHeader:
    """Who and what a study is, as the list and the study page both head it."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    state: str  # the stored state: receiving, complete, routed or ignored
    status: StudyStatus  # the shown state, with its reason and the counts of current jobs and deliveries

    @property
    def job_counts(self) -> dict[str, int]:
        """Current jobs (not superseded by a re-process) by state."""
        return self.status.job_counts

    @property
    def delivery_counts(self) -> dict[str, int]:
        """Deliveries of the current jobs by state."""
        return self.status.delivery_counts


@dataclass(frozen=True)
class StudyRow(StudyHeader):
    """One line of the studies list."""

    modalities: list[str]
    source_ae_titles: list[str]  # calling AE titles of its DICOM associations
    sources: list[str]  # who sent it, readable: AE titles and "STOW-RS by <user>" (source_label)
    series_count: int
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


#: One page of the studies list (:class:`~dicom_node.db.keyset.Page`).
StudyPage = Page[StudyRow]


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    body_part_examined: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    is_result: bool  # a series of results this node produced (sent back to us by a PACS)

    @property
    def is_image(self) -> bool:
        return not self.is_result and (self.modality or "").upper() not in NON_IMAGE_MODALITIES


def source_label(protocol: str, calling_ae_title: str, username: str | None) -> str:
    """Who sent a study, as the pages show it: the calling AE title of a DICOM association,
    ``STOW-RS by <user>`` for a STOW-RS request (which has no AE title)."""
    if protocol == AssociationProtocol.STOW_RS.value:
        return f"STOW-RS by {username or '?'}"
    return calling_ae_title


@dataclass(frozen=True)
class AssociationRow:
    """A DICOM association, or a STOW-RS request (``protocol``, with the ``username`` that sent it)."""

    id: int
    calling_ae_title: str
    peer_address: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    instances_stored: int
    protocol: str = AssociationProtocol.DICOM.value
    username: str | None = None

    @property
    def source(self) -> str:
        return source_label(self.protocol, self.calling_ae_title, self.username)


@dataclass(frozen=True)
class StudyEventRow:
    at: datetime
    kind: str
    detail: str | None


@dataclass(frozen=True)
class StudyDetail(StudyHeader):
    """Everything the study page shows, read in a fixed number of queries."""

    instance_count: int
    late_instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    receiving_since: datetime
    completed_at: datetime | None
    state_changed_at: datetime
    series: list[SeriesRow]
    associations: list[AssociationRow]
    events: list[StudyEventRow]
    jobs: list[JobRow]
    purged_at: datetime | None = None  # when retention removed its files (the record stays)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    @property
    def source_ae_titles(self) -> list[str]:
        """Calling AE titles of the DICOM associations that sent it."""
        return sorted({a.calling_ae_title for a in self.associations
                       if a.protocol == AssociationProtocol.DICOM.value})

    @property
    def sources(self) -> list[str]:
        """Who sent it, readable (:func:`source_label`)."""
        return sorted({a.source for a in self.associations})


# --------------------------------------------------------------------------- studies list


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    """Case-insensitive "contains", with LIKE wildcards in ``text`` taken literally."""
    return func.lower(column).contains(text.lower(), autoescape=True)


def _conditions(filters: StudyFilters) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filters.patient_id:
        conditions.append(Study.patient_id == filters.patient_id)
    if filters.patient_name:
        conditions.append(_contains(Study.patient_name, filters.patient_name))
    if filters.accession_number:
        conditions.append(Study.accession_number == filters.accession_number)
    if filters.date_from:
        conditions.append(Study.study_date >= filters.date_from)
    if filters.date_to:
        conditions.append(Study.study_date <= filters.date_to)
    if filters.state:
        conditions.append(Study.state == filters.state)
    if filters.modality:
        conditions.append(exists().where(Series.study_id == Study.id, Series.modality == filters.modality))
    if filters.source_ae:
        conditions.append(exists().where(
            AssociationStudy.study_id == Study.id,
            AssociationRecord.id == AssociationStudy.association_id,
            AssociationRecord.calling_ae_title == filters.source_ae,
        ))
    if filters.status:
        conditions.append(state_condition(filters.status))
    if filters.jobs:
        conditions.append(_outcome_condition(filters.jobs))
    if filters.received_from:
        conditions.append(Study.first_received_at >= filters.received_from)
    return conditions


def _outcome_condition(outcome: str) -> ColumnElement[bool]:
    """The older ``jobs`` filter: a shown state, or ``none`` (no current job)."""
    if outcome == "none":
        return ~exists().where(Job.study_id == Study.id, Job.superseded_at.is_(None))
    if outcome in JOB_OUTCOMES:
        return state_condition(outcome)
    raise ValueError(f"jobs filter {outcome!r} is not one of {', '.join(JOB_OUTCOMES)}")


#: A position in the studies list (a :class:`~dicom_node.db.keyset.Cursor` of ``(last_received_at, id)``).
StudyCursor = Cursor
#: The studies list's order, newest first: the ``(last_received_at, id)`` index (migration 0010).
_ORDER = Keyset(Study.id, lambda row: Cursor(row.last_received_at, int(row.id)), Study.last_received_at, "studies")


def _name_search_table(session: Session) -> bool:
    """Whether the database has the trigram table of patient names (SQLite, migration 0010), once per engine."""
    bind = session.get_bind()
    if bind.dialect.name != "sqlite":
        return False
    engine = getattr(bind, "engine", bind)
    known = _NAME_SEARCH.get(engine)
    if known is None:
        known = session.execute(select(literal_column("1")).select_from(table("sqlite_master"))
                                .where(literal_column("name") == NAME_SEARCH_TABLE)).first() is not None
        _NAME_SEARCH[engine] = known
    return known


#: SQLite's FTS5 trigram table of ``studies.patient_name`` (migration 0010); its rowid is the study id.
NAME_SEARCH_TABLE = "studies_patient_name"
_NAME_SEARCH: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _name_lookup(session: Session, text: str) -> ColumnElement[bool] | None:
    """The trigram lookup of a patient-name filter on SQLite (three characters or more), which narrows the
    studies to those whose name holds every trigram of ``text`` before the exact ``LIKE`` decides."""
    if len(text) < 3 or not _name_search_table(session):
        return None
    phrase = '"' + text.replace('"', '""') + '"'
    names = table(NAME_SEARCH_TABLE, column("rowid"))
    return Study.id.in_(select(names.c.rowid).where(literal_column(NAME_SEARCH_TABLE).op("MATCH")(phrase)))


def list_studies(
    sessions: sessionmaker[Session], filters: StudyFilters | None = None, *, limit: int = 50, offset: int = 0,
    after: str | None = None, before: str | None = None, count_cap: int | None = COUNT_CAP,
) -> StudyPage:
    """One page of studies matching ``filters``, the most recently received first, with their summaries.

    Pages are found by ``offset`` (older clients; its cost grows with the offset) or, flat with the size of
    the database, by a cursor: ``after`` (the page's ``next_cursor``: the older studies below it) or
    ``before`` (``previous_cursor``: the newer ones above it), which walk the ``(last_received_at, id)``
    index and stay right when studies arrive between two pages. ``total`` counts the matching studies up
    to ``count_cap`` (None: exactly). Six or seven queries whatever the page size: the count, the page,
    then series and senders of the studies on it, and their shown states
    (:func:`~dicom_node.db.study_states.study_statuses`). ValueError names a cursor this node did not give.
    """
    filters = filters or StudyFilters()
    conditions = _conditions(filters)
    with sessions() as session:
        if filters.patient_name and (lookup := _name_lookup(session, filters.patient_name)) is not None:
            conditions.append(lookup)
        total, exact = capped_count(session, select(Study.id).where(*conditions), count_cap)
        columns = (Study.id, Study.study_instance_uid, Study.patient_id, Study.patient_name, Study.accession_number,
                   Study.study_date, Study.study_description, Study.state, Study.instance_count,
                   Study.first_received_at, Study.last_received_at, Study.completed_at)
        page = _ORDER.page(session, select(*columns).where(*conditions), limit=limit, offset=offset, after=after,
                           before=None if after else before)
        rows = page.rows
        ids = [int(r[0]) for r in rows]
        modalities: dict[int, set[str]] = defaultdict(set)
        series_counts: dict[int, int] = defaultdict(int)
        source_aes: dict[int, set[str]] = defaultdict(set)
        sources: dict[int, set[str]] = defaultdict(set)
        statuses = study_statuses(session, {int(r[0]): str(r[7]) for r in rows})
        if ids:
            for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(ids))
            ):
                series_counts[study_id] += 1
                if modality:
                    modalities[study_id].add(modality)
            for study_id, ae, protocol, username in session.execute(
                select(AssociationStudy.study_id, AssociationRecord.calling_ae_title, AssociationRecord.protocol,
                       AssociationRecord.username)
                .join(AssociationRecord, AssociationRecord.id == AssociationStudy.association_id)
                .where(AssociationStudy.study_id.in_(ids)).distinct()
            ):
                sources[study_id].add(source_label(protocol, ae, username))
                if protocol == AssociationProtocol.DICOM.value:
                    source_aes[study_id].add(ae)
    items = [
        StudyRow(
            study_instance_uid=r[1], patient_id=r[2], patient_name=r[3], accession_number=r[4], study_date=r[5],
            study_description=r[6], state=r[7], status=statuses[r[0]], modalities=sorted(modalities[r[0]]),
            source_ae_titles=sorted(source_aes[r[0]]), sources=sorted(sources[r[0]]), series_count=series_counts[r[0]], instance_count=r[8],
            first_received_at=r[9], last_received_at=r[10], completed_at=r[11],
        )
        for r in rows
    ]
    return StudyPage(
        items=items, total=total, limit=limit, offset=0 if after or before else offset, total_exact=exact,
        next_cursor=page.next_cursor, previous_cursor=page.previous_cursor,
    )


# --------------------------------------------------------------------------- one study


def study_detail(sessions: sessionmaker[Session], study_instance_uid: str) -> StudyDetail | None:
    """A study with its series, senders, events, jobs, results and deliveries, and its shown state;
    None if unknown.

    Ten or eleven queries whatever the size of the study.
    """
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
        if study is None:
            return None
        series_rows = session.execute(select(Series).where(Series.study_id == study.id)
                                      .order_by(Series.series_number, Series.id)).scalars().all()
        result_series = {str(r[0]) for r in session.execute(
            select(ResultObject.series_instance_uid).join(Job, Job.id == ResultObject.job_id)
            .where(Job.study_id == study.id,
                   ResultObject.series_instance_uid.in_([s.series_instance_uid for s in series_rows])).distinct()
        )} if series_rows else set()
        associations = [
            AssociationRow(id=a.id, calling_ae_title=a.calling_ae_title, peer_address=a.peer_address,
                           started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome,
                           instances_stored=a.instances_stored, protocol=a.protocol, username=a.username)
            for a in session.execute(
                select(AssociationRecord).join(AssociationStudy, AssociationStudy.association_id == AssociationRecord.id)
                .where(AssociationStudy.study_id == study.id).order_by(AssociationRecord.started_at)
            ).scalars()
        ]
        events = [StudyEventRow(at=e.at, kind=e.kind, detail=e.detail) for e in session.execute(
            select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)).scalars()]
        study_jobs = job_rows(session, jobs_query().where(Job.study_id == study.id).order_by(Job.id))
        status = study_statuses(session, {study.id: study.state})[study.id]
        return StudyDetail(
            study_instance_uid=study.study_instance_uid, patient_id=study.patient_id, patient_name=study.patient_name,
            accession_number=study.accession_number, study_date=study.study_date,
            study_description=study.study_description, state=study.state, status=status,
            instance_count=study.instance_count,
            late_instance_count=study.late_instance_count, first_received_at=study.first_received_at,
            last_received_at=study.last_received_at, receiving_since=study.receiving_since,
            completed_at=study.completed_at, state_changed_at=study.state_changed_at,
            series=[SeriesRow(
                series_instance_uid=s.series_instance_uid, series_number=s.series_number, modality=s.modality,
                series_description=s.series_description, body_part_examined=s.body_part_examined,
                instance_count=s.instance_count, first_received_at=s.first_received_at,
                last_received_at=s.last_received_at, is_result=s.series_instance_uid in result_series,
            ) for s in series_rows],
            associations=associations, events=events, jobs=study_jobs, purged_at=study.purged_at,
        )
