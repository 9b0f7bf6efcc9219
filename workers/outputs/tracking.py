"""Tracking of findings across re-processing: the same finding keeps its Tracking Unique Identifier.

Why: a radiologist (or a downstream system) follows a finding by its TID 4108
Tracking Unique Identifier. When a study is processed again (a new model version,
more slices arrived, an operator's re-process) the new report names the same lung,
the same nodule: it must carry the same tracking UID, so viewers and registries
link the two reports' findings instead of showing new ones.

How: every finding a report states is recorded as a :class:`TrackedFinding` (its
key, its UID, and for a detection where it lies and how large it is); the job
keeps the records in its summary (``summary["tracking"]``), and a later run of the
same model on the same series starts its :class:`FindingTracker` from them
(:func:`dicom_node.db.job_reruns.lineage`). A finding is the same as an earlier one when

* a segment, an absent label or a classification: the same key (the label's coded
  property type and name, or the question answered);
* a detection: the same key (label) and its centre lies within the larger of the
  two radii (at least :data:`MIN_MATCH_MM`) of the earlier centre (the nearest
  such one); each earlier finding is matched at most once.

A finding without an earlier match gets a new UID derived from the report's SOP
Instance UID and its position (reproducible builds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import generate_uid

from dicom_node.contracts import CodedConcept

__all__ = ["MIN_MATCH_MM", "FindingTracker", "TrackedFinding", "finding_key", "tracked_findings"]

logger = logging.getLogger(__name__)

#: Two detections closer than this (mm, centre to centre) may be the same finding, however small they are.
MIN_MATCH_MM = 5.0


def finding_key(kind: str, concept: CodedConcept, name: str = "") -> str:
    """The key of a finding: what it is (``kind`` and coded concept) and, for labels, the label's name."""
    return f"{kind}:{concept.scheme}:{concept.value}:{name}"


@dataclass(frozen=True)
class TrackedFinding:
    """One finding a report stated: its key, Tracking Unique Identifier and, for a detection, centre and diameter."""

    key: str
    uid: str
    centre_mm: tuple[float, float, float] | None = None
    diameter_mm: float | None = None

    def as_record(self) -> dict[str, Any]:
        """The JSON form kept in the job's summary."""
        record: dict[str, Any] = {"key": self.key, "uid": self.uid}
        if self.centre_mm is not None:
            record["centre_mm"] = [round(v, 2) for v in self.centre_mm]
        if self.diameter_mm is not None:
            record["diameter_mm"] = round(self.diameter_mm, 2)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrackedFinding:
        """A record of :meth:`as_record`; raises ValueError naming what is wrong with it."""
        key, uid = record.get("key"), record.get("uid")
        if not isinstance(key, str) or not isinstance(uid, str) or not uid:
            raise ValueError(f"tracked finding {dict(record)!r}: needs a text 'key' and 'uid'")
        centre = record.get("centre_mm")
        diameter = record.get("diameter_mm")
        if centre is not None and (not isinstance(centre, list) or len(centre) != 3):
            raise ValueError(f"tracked finding {uid}: centre_mm {centre!r} is not three numbers")
        return cls(key=key, uid=uid,
                   centre_mm=None if centre is None else (float(centre[0]), float(centre[1]), float(centre[2])),
                   diameter_mm=None if diameter is None else float(diameter))


def tracked_findings(records: Iterable[Any]) -> tuple[TrackedFinding, ...]:
    """The usable records of an earlier job's summary; a damaged record is skipped (and logged), never fatal:
    the finding then gets a new UID, which is what a report without history does anyway."""
    findings = []
    for record in records:
        try:
            if not isinstance(record, Mapping):
                raise ValueError(f"tracked finding {record!r} is not an object")
            findings.append(TrackedFinding.from_record(record))
        except (TypeError, ValueError) as exc:
            logger.warning("earlier tracking record skipped: %s", exc)
    return tuple(findings)


@dataclass
class FindingTracker:
    """Hands out the Tracking Unique Identifier of each finding of one report (see the module docstring).

    ``earlier``: the findings of the report this one replaces. The report's builder
    calls :meth:`start` with the report's SOP Instance UID, from which new UIDs
    derive. :attr:`records` lists what was handed out, for the job's summary.
    """

    earlier: Sequence[TrackedFinding] = ()
    records: list[TrackedFinding] = field(default_factory=list)
    _report_uid: str = ""
    _used: set[str] = field(default_factory=set)

    def start(self, report_uid: str) -> None:
        """Begin handing out the UIDs of the report ``report_uid`` (forgets an earlier build's)."""
        self._report_uid = str(report_uid)
        self.records.clear()
        self._used.clear()

    def uid(self, key: str, *, centre_mm: Sequence[float] | None = None, diameter_mm: float | None = None) -> str:
        """The UID of the finding ``key`` (at ``centre_mm``, ``diameter_mm`` for a detection): the earlier one's
        when it matches one, else a new one."""
        centre = None if centre_mm is None else (float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2]))
        match = self._match(key, centre, diameter_mm)
        if match is not None:
            self._used.add(match.uid)
            uid = match.uid
        else:
            if not self._report_uid:
                raise ValueError("finding tracker: start(report_uid) was not called before the first uid()")
            uid = generate_uid(entropy_srcs=[self._report_uid, "tracking", str(len(self.records))])
        self.records.append(TrackedFinding(key=key, uid=uid, centre_mm=centre, diameter_mm=diameter_mm))
        return uid

    def _match(self, key: str, centre: tuple[float, float, float] | None,
               diameter_mm: float | None) -> TrackedFinding | None:
        candidates = [f for f in self.earlier if f.key == key and f.uid not in self._used]
        if centre is None:
            return next((f for f in candidates if f.centre_mm is None), None)
        best, best_distance = None, math.inf
        for earlier in candidates:
            if earlier.centre_mm is None:
                continue
            distance = math.dist(centre, earlier.centre_mm)
            reach = max(MIN_MATCH_MM, (diameter_mm or 0.0) / 2.0, (earlier.diameter_mm or 0.0) / 2.0)
            if distance <= reach and distance < best_distance:
                best, best_distance = earlier, distance
        return best
