"""QIDO-RS query parameters (PS3.18 8.3.4) read into matching keys, and results written as DICOM JSON.

Why a module of its own: the routes stay parse -> search -> render; what a parameter means,
which values are refused (400) and what a result holds by default or with ``includefield``
are decided here once for the three search levels.

* A matching key is named by keyword (``PatientName``) or tag (``00100010``); UIDs take a
  list (``,`` or ``\\`` separated, at most :data:`MAX_UIDS`); ``ModalitiesInStudy`` and
  ``Modality`` a list of code strings; ``StudyDate`` a date or a range. Wildcard values
  are bounded: at most :data:`MAX_VALUE` characters (:data:`MAX_PN_VALUE` for a name) and
  :data:`MAX_STARS` ``*``.
* ``fuzzymatching=false`` is what the node does anyway; ``true`` is answered with literal
  matching and a ``Warning: 299`` header saying so, as are matching keys the node cannot
  match on (they are ignored, PS3.18 8.3.4.1).
* ``includefield`` (keywords, tags or ``all``; repeated or comma separated) adds the
  attributes the index holds beyond the default ones; one it does not hold is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.datastructures import QueryParams

from dicom_node.db.dicomweb_index import IndexedInstance, IndexedSeries, IndexedStudy, SeriesMatch, StudyMatch
from dicom_node.header import uid_problem

__all__ = ["INSTANCE_ATTRIBUTES", "MAX_STARS", "MAX_UIDS", "MAX_VALUE", "SERIES_ATTRIBUTES", "STUDY_ATTRIBUTES",
           "WARNING_AGENT", "Attribute", "QidoError", "QidoQuery", "parse_query", "render"]

MAX_UIDS = 100
MAX_VALUE = 64
MAX_PN_VALUE = 324
MAX_STARS = 8
WARNING_AGENT = "dicom-node"
#: Parameters of QIDO-RS itself, not matching keys.
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
_DATE = re.compile(r"^\d{8}$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


class QidoError(ValueError):
    """A query the node refuses (answered 400), naming the parameter and the value."""


@dataclass(frozen=True)
class Attribute:
    """One attribute a search result can hold: its tag, keyword, VR, how to read it, and whether it is returned
    without ``includefield``."""

    tag: str
    keyword: str
    vr: str
    value: Callable[[Any], Any]
    default: bool = True


def _study(read: Callable[[IndexedStudy], Any]) -> Callable[[IndexedSeries], Any]:
    return lambda series: None if series.study is None else read(series.study)


STUDY_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("0020000D", "StudyInstanceUID", "UI", lambda s: s.study_instance_uid),
    Attribute("00100020", "PatientID", "LO", lambda s: s.patient_id),
    Attribute("00100010", "PatientName", "PN", lambda s: s.patient_name),
    Attribute("00080050", "AccessionNumber", "SH", lambda s: s.accession_number),
    Attribute("00080020", "StudyDate", "DA", lambda s: s.study_date),
    Attribute("00081030", "StudyDescription", "LO", lambda s: s.study_description),
    Attribute("00080061", "ModalitiesInStudy", "CS", lambda s: list(s.modalities)),
    Attribute("00201206", "NumberOfStudyRelatedSeries", "IS", lambda s: s.series_count),
    Attribute("00201208", "NumberOfStudyRelatedInstances", "IS", lambda s: s.instance_count),
    Attribute("00080056", "InstanceAvailability", "CS", lambda s: "UNAVAILABLE" if s.purged else "ONLINE",
              default=False),
)
SERIES_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("0020000D", "StudyInstanceUID", "UI", lambda s: s.study_instance_uid),
    Attribute("0020000E", "SeriesInstanceUID", "UI", lambda s: s.series_instance_uid),
    Attribute("00080060", "Modality", "CS", lambda s: s.modality),
    Attribute("00200011", "SeriesNumber", "IS", lambda s: s.series_number),
    Attribute("0008103E", "SeriesDescription", "LO", lambda s: s.series_description),
    Attribute("00201209", "NumberOfSeriesRelatedInstances", "IS", lambda s: s.instance_count),
    Attribute("00180015", "BodyPartExamined", "CS", lambda s: s.body_part_examined, default=False),
    *(Attribute(a.tag, a.keyword, a.vr, _study(a.value), default=False) for a in STUDY_ATTRIBUTES
      if a.keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyDescription")),
)
INSTANCE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("0020000D", "StudyInstanceUID", "UI", lambda i: i.study_instance_uid),
    Attribute("0020000E", "SeriesInstanceUID", "UI", lambda i: i.series_instance_uid),
    Attribute("00080016", "SOPClassUID", "UI", lambda i: i.sop_class_uid),
    Attribute("00080018", "SOPInstanceUID", "UI", lambda i: i.sop_instance_uid),
    Attribute("00200013", "InstanceNumber", "IS", lambda i: i.instance_number),
    Attribute("00083002", "AvailableTransferSyntaxUID", "UI", lambda i: i.transfer_syntax_uid),
)

#: The matching keys each level takes (keyword -> how its values are read).
_STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDescription", "StudyDate",
               "ModalitiesInStudy")
_SERIES_KEYS = ("SeriesInstanceUID", "Modality")


@dataclass(frozen=True)
class QidoQuery:
    """A parsed query: the matching keys, the attributes to return, and the warnings to send (``Warning: 299``)."""

    study: StudyMatch
    series: SeriesMatch
    sop_instance_uids: tuple[str, ...]
    include: frozenset[str]  # keywords asked for by includefield (``all``: every one)
    warnings: tuple[str, ...]


def _keyword(name: str) -> str | None:
    """The keyword a parameter names (by keyword or by tag), None for no DICOM attribute."""
    if _TAG.match(name):
        return keyword_for_tag(int(name, 16)) or None
    return name if tag_for_keyword(name) is not None else None


def _uids(name: str, value: str) -> tuple[str, ...]:
    uids = tuple(uid.strip() for uid in re.split(r"[,\\]", value) if uid.strip())
    if len(uids) > MAX_UIDS:
        raise QidoError(f"{name} lists {len(uids)} UIDs; at most {MAX_UIDS}")
    for uid in uids:
        problem = uid_problem(uid)
        if problem is not None:
            raise QidoError(f"{name} value {uid[:80]!r} {problem}")
    return uids


def _codes(name: str, value: str) -> tuple[str, ...]:
    codes = tuple(code.strip() for code in re.split(r"[,\\]", value) if code.strip())
    if len(codes) > MAX_UIDS or any(len(code) > 16 for code in codes):
        raise QidoError(f"{name} {value[:80]!r}: at most {MAX_UIDS} code strings of up to 16 characters")
    return codes


def _wildcard_value(name: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise QidoError(f"{name} value is {len(value)} characters long; at most {limit}")
    if value.count("*") > MAX_STARS:
        raise QidoError(f"{name} value {value!r} holds {value.count('*')} '*' wildcards; at most {MAX_STARS}")
    if any(ord(c) < 0x20 for c in value) or "\\" in value:
        raise QidoError(f"{name} value {value!r} holds a control character or a backslash")
    return value


def _date_range(name: str, value: str) -> tuple[str | None, str | None]:
    first, dash, last = value.partition("-")
    dates = (first, last) if dash else (first, first)
    for date in dates:
        if date and not _DATE.match(date):
            raise QidoError(f"{name} {value!r} is not a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if not any(dates):
        raise QidoError(f"{name} {value!r} names no date")
    return dates[0] or None, dates[1] or None


def _includes(values: Iterable[str]) -> frozenset[str]:
    include: set[str] = set()
    for value in values:
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            if item.lower() == "all":
                include.add("all")
                continue
            keyword = _keyword(item)
            if keyword is None:
                raise QidoError(f"includefield {item[:80]!r} is not a DICOM attribute keyword or tag")
            include.add(keyword)
    return frozenset(include)


def parse_query(params: QueryParams, *, study_uid: str | None = None, series_uid: str | None = None) -> QidoQuery:
    """Read ``params`` (``study_uid`` / ``series_uid``: those the URL names); :class:`QidoError` for a value the
    node refuses."""
    values: dict[str, str] = {}
    warnings: list[str] = []
    ignored: list[str] = []
    for name, value in params.multi_items():
        if name in _CONTROL:
            continue
        keyword = _keyword(name)
        if keyword in _STUDY_KEYS + _SERIES_KEYS + ("SOPInstanceUID",):
            if keyword in values:
                raise QidoError(f"{keyword} is given twice")
            values[keyword] = value
        else:
            ignored.append(keyword or name[:40])
    fuzzy = params.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise QidoError(f"fuzzymatching {fuzzy[:20]!r} is neither true nor false")
    if fuzzy == "true":
        warnings.append("The fuzzymatching parameter is not supported. Only literal matching has been performed.")
    if ignored:
        warnings.append(f"The node cannot match on {', '.join(sorted(set(ignored)))}; ignored.")
    study_uids = _uids("StudyInstanceUID", values["StudyInstanceUID"]) if "StudyInstanceUID" in values else ()
    if study_uid is not None:
        study_uids = (study_uid,) if not study_uids or study_uid in study_uids else ("",)  # "": matches nothing
    date = values.get("StudyDate")
    study = StudyMatch(
        study_instance_uids=study_uids,
        patient_id=_wildcard_value("PatientID", values["PatientID"], MAX_VALUE) if "PatientID" in values else None,
        patient_name=(_wildcard_value("PatientName", values["PatientName"], MAX_PN_VALUE)
                      if "PatientName" in values else None),
        accession_number=(_wildcard_value("AccessionNumber", values["AccessionNumber"], MAX_VALUE)
                          if "AccessionNumber" in values else None),
        study_description=(_wildcard_value("StudyDescription", values["StudyDescription"], MAX_VALUE)
                           if "StudyDescription" in values else None),
        study_date=_date_range("StudyDate", date) if date else None,
        modalities_in_study=_codes("ModalitiesInStudy", values.get("ModalitiesInStudy", "")),
    )
    series_uids = _uids("SeriesInstanceUID", values["SeriesInstanceUID"]) if "SeriesInstanceUID" in values else ()
    if series_uid is not None:
        series_uids = (series_uid,) if not series_uids or series_uid in series_uids else ("",)
    series = SeriesMatch(study=study, series_instance_uids=series_uids,
                         modalities=_codes("Modality", values.get("Modality", "")))
    sop_uids = _uids("SOPInstanceUID", values["SOPInstanceUID"]) if "SOPInstanceUID" in values else ()
    return QidoQuery(study, series, sop_uids, _includes(params.getlist("includefield")), tuple(warnings))


def _attribute(vr: str, value: Any) -> dict[str, Any]:
    """One attribute of the DICOM JSON model (PS3.18 F.2): empty when the value is unknown."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": list(value) if isinstance(value, list) else [value]}


def render(rows: Iterable[IndexedStudy | IndexedSeries | IndexedInstance], attributes: tuple[Attribute, ...],
           include: frozenset[str]) -> list[dict[str, Any]]:
    """Each row as a DICOM JSON data set: the default attributes and those ``include`` asks for."""
    chosen = [a for a in attributes if a.default or "all" in include or a.keyword in include]
    return [{a.tag: _attribute(a.vr, a.value(row)) for a in chosen} for row in rows]
