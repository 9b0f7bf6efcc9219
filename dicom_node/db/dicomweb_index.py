"""What the node's DICOMweb read endpoints (QIDO-RS, WADO-RS) find in the index: studies, series, instances.

Why a module of its own: the web routes parse queries and render DICOM JSON and multipart
bodies; which rows match a query is decided here, so that the routes and the tests read the
same thing. Matching follows PS3.4 C.2.2.2 for the attributes the index holds:

* UIDs: list matching (any of the UIDs given).
* PatientID, AccessionNumber, StudyDescription: single value matching, case-sensitive;
  PatientName: case-insensitive (PS3.4 allows it for PN). ``*`` (any run of characters) and
  ``?`` (one character) are wildcards; every other character, SQL's ``%`` and ``_``
  included, matches itself (LIKE with an escape character; on SQLite, whose LIKE ignores
  case, a case-sensitive pattern is a GLOB with ``[`` escaped). A value of ``*`` alone
  matches everything, empty values included.
* StudyDate: a date or a range (``from-to``, ``-to``, ``from-``), inclusive.
* ModalitiesInStudy, Modality: any of the values given.

Only received instances are listed, each with its path relative to the node's spool; pages
are bounded and in a stable order (oldest received first).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from dicom_node.db.models import Instance, Series, Study

__all__ = ["WILDCARDS", "IndexedInstance", "IndexedSeries", "IndexedStudy", "SeriesMatch", "StudyMatch",
           "find_instances", "find_series", "find_studies", "has_wildcard"]

WILDCARDS = ("*", "?")
_LIKE_ESCAPE = "\\"


def has_wildcard(value: str) -> bool:
    return any(w in value for w in WILDCARDS)


@dataclass(frozen=True)
class StudyMatch:
    """The study-level matching keys of a QIDO-RS query (None or empty: universal matching)."""

    study_instance_uids: tuple[str, ...] = ()
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    study_date: tuple[str | None, str | None] | None = None  # inclusive (from, to); None: open on that side
    modalities_in_study: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeriesMatch:
    """The series-level matching keys, with the study-level ones of the series' study."""

    study: StudyMatch = field(default_factory=StudyMatch)
    series_instance_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexedStudy:
    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    instance_count: int
    modalities: tuple[str, ...] = ()
    series_count: int = 0
    purged: bool = False  # retention deleted its files: its instances are unavailable


@dataclass(frozen=True)
class IndexedSeries:
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int
    body_part_examined: str | None = None
    study: IndexedStudy | None = None  # its study's attributes (without the counts of its other series)


@dataclass(frozen=True)
class IndexedInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    path: str  # relative to the spool directory
    size_bytes: int


def _like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern with ``\\`` as the escape character."""
    escaped = value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _text(column: InstrumentedAttribute[str | None], value: str | None, *, ignore_case: bool,
          dialect: str) -> ColumnElement[bool] | None:
    """The condition for single value (or wildcard) matching of ``column`` against ``value``; None: universal."""
    if value is None or value == "" or set(value) == {"*"}:
        return None
    if not has_wildcard(value):
        return func.lower(column) == value.lower() if ignore_case else column == value
    if ignore_case:
        return func.lower(column).like(_like_pattern(value.lower()), escape=_LIKE_ESCAPE)
    if dialect == "sqlite":  # SQLite's LIKE ignores ASCII case; GLOB does not, and uses * and ? itself
        return column.op("GLOB")(value.replace("[", "[[]"))
    return column.like(_like_pattern(value), escape=_LIKE_ESCAPE)


def _study_conditions(match: StudyMatch, dialect: str) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool] | None] = [
        Study.study_instance_uid.in_(match.study_instance_uids) if match.study_instance_uids else None,
        _text(Study.patient_id, match.patient_id, ignore_case=False, dialect=dialect),
        _text(Study.patient_name, match.patient_name, ignore_case=True, dialect=dialect),
        _text(Study.accession_number, match.accession_number, ignore_case=False, dialect=dialect),
        _text(Study.study_description, match.study_description, ignore_case=False, dialect=dialect),
    ]
    if match.study_date is not None:
        first, last = match.study_date
        if first is not None:
            conditions.append(Study.study_date >= first)
        if last is not None:
            conditions.append(Study.study_date <= last)
    if match.modalities_in_study:
        conditions.append(exists().where(Series.study_id == Study.id, Series.modality.in_(match.modalities_in_study)))
    return [condition for condition in conditions if condition is not None]


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _study_of(study: Study, modalities: tuple[str, ...] = (), series_count: int = 0) -> IndexedStudy:
    return IndexedStudy(study.study_instance_uid, study.patient_id, study.patient_name, study.accession_number,
                        study.study_date, study.study_description, study.instance_count, modalities, series_count,
                        study.purged_at is not None)


def find_studies(sessions: sessionmaker[Session], match: StudyMatch | None = None, *,
                 limit: int = 100, offset: int = 0) -> list[IndexedStudy]:
    """Studies matching ``match``, oldest received first; at most ``limit`` from ``offset``, each with its
    modalities and series count (one more query for the page)."""
    with sessions() as session:
        query = (select(Study).where(*_study_conditions(match or StudyMatch(), _dialect(session)))
                 .order_by(Study.id).limit(limit).offset(offset))
        studies = list(session.scalars(query))
        modalities: dict[int, set[str]] = defaultdict(set)
        series_counts: dict[int, int] = defaultdict(int)
        if studies:
            for study_id, modality in session.execute(
                    select(Series.study_id, Series.modality).where(Series.study_id.in_([s.id for s in studies]))):
                series_counts[study_id] += 1
                if modality:
                    modalities[study_id].add(modality)
        return [_study_of(s, tuple(sorted(modalities[s.id])), series_counts[s.id]) for s in studies]


def find_series(sessions: sessionmaker[Session], match: SeriesMatch | None = None, *,
                limit: int = 100, offset: int = 0) -> list[IndexedSeries]:
    """Series matching ``match`` (a reused series UID gives one row per study), with their study's attributes."""
    match = match or SeriesMatch()
    with sessions() as session:
        query = (select(Series, Study).join(Study, Study.id == Series.study_id)
                 .where(*_study_conditions(match.study, _dialect(session)))
                 .order_by(Series.id).limit(limit).offset(offset))
        if match.series_instance_uids:
            query = query.where(Series.series_instance_uid.in_(match.series_instance_uids))
        if match.modalities:
            query = query.where(Series.modality.in_(match.modalities))
        return [IndexedSeries(study.study_instance_uid, s.series_instance_uid, s.modality, s.series_number,
                              s.series_description, s.instance_count, s.body_part_examined, _study_of(study))
                for s, study in session.execute(query)]


def find_instances(sessions: sessionmaker[Session], study_instance_uid: str, series_instance_uid: str, *,
                   sop_instance_uid: str | None = None,
                   sop_instance_uids: tuple[str, ...] = ()) -> list[IndexedInstance]:
    """The received instances of one series of one study (or the ones named), in the order they were indexed."""
    query = (select(Instance).join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
             .where(Study.study_instance_uid == study_instance_uid,
                    Series.series_instance_uid == series_instance_uid)
             .order_by(Instance.id))
    wanted = (sop_instance_uid,) if sop_instance_uid is not None else sop_instance_uids
    if wanted:
        query = query.where(Instance.sop_instance_uid.in_(wanted))
    with sessions() as session:
        return [IndexedInstance(study_instance_uid, series_instance_uid, i.sop_class_uid, i.sop_instance_uid,
                                i.instance_number, i.transfer_syntax_uid, i.path, i.size_bytes)
                for i in session.scalars(query)]
