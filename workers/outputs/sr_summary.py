"""A short text summary of a measurement report, for viewers that show an SR as text.

Why: many PACS viewers render an SR as its content tree and cannot draw its
regions; a radiologist there should still read, in one line per finding, what the
AI found: "Left lung: 2412.5 mL, mean -846 HU", "Lung nodule 1: 12.0 mm, certainty
85 %", "Lung nodule 2: low confidence, 6.0 mm, certainty 31 %", "Lung nodule: not found". The summary is derived from the measurement groups
themselves (never computed twice, never disagreeing with them) and added as TID
1500's "Qualitative Evaluations" container (UMLS C0034375) with one TEXT item
"Summary" (DCM 121111), after Imaging Measurements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from workers.outputs.confidence import LOW_CONFIDENCE_TEXT, PRESENTATION_OPTIONAL

__all__ = ["QUALITATIVE_EVALUATIONS", "add_summary", "summary_lines"]

#: TID 1500's container of report-level qualitative evaluations.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS",
                                             meaning="Qualitative Evaluations")
_TRACKING_ID = "112039"
_TRACKING_UID = "112040"
_VOLUME = codes.SCT.Volume.value
_ATTENUATION = codes.DCM.AttenuationCoefficient.value
_MEAN = codes.SCT.Mean.value
_LONG_AXIS = codes.SCT.LongAxis.value
_CERTAINTY = codes.DCM.CertaintyOfFinding.value
_ABSENT = codes.SCT.Absent.value
_RENDERING_INTENT = codes.DCM.RenderingIntent.value


def _code(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> str:
    sequence = item.get(attribute)
    return str(sequence[0].CodeValue) if sequence else ""


def _number(item: Dataset) -> float | None:
    values = item.get("MeasuredValueSequence")
    return float(values[0].NumericValue) if values else None


def _derivation(item: Dataset) -> str:
    """The DERIVATION concept modifier of a NUM item (mean, minimum, maximum), if any."""
    for child in item.get("ContentSequence", []):
        if _code(child) == "121401":  # DCM "Derivation"
            return _code(child, "ConceptCodeSequence")
    return ""


def _group_line(group: Dataset) -> tuple[str, str] | None:
    """(tracking UID, one summary line) of one measurement group; None for a group with nothing to say."""
    items = list(group.get("ContentSequence", []))
    name = next((str(i.TextValue) for i in items if _code(i) == _TRACKING_ID), "")
    uid = next((str(i.UID) for i in items if _code(i) == _TRACKING_UID), name)
    if not name:
        return None
    name = name.split(" (segment ")[0]
    parts = []
    for item in items:
        if item.get("ValueType") != "NUM" or _number(item) is None:
            continue
        value, concept = _number(item), _code(item)
        assert value is not None
        if concept == _VOLUME:
            parts.append(f"{value:.1f} mL")
        elif concept == _ATTENUATION and _derivation(item) == _MEAN:
            parts.append(f"mean {value:.0f} HU")
        elif concept == _LONG_AXIS:
            parts.append(f"{value:.1f} mm")
        elif concept == _CERTAINTY:
            parts.append(f"certainty {value:.0f} %")
    absent = any(_code(i, "ConceptCodeSequence") == _ABSENT for i in items if i.get("ValueType") == "CODE")
    if absent:
        return uid, f"{name.removesuffix(' (not found)')}: not found"
    qualitative = [_qualitative(i) for i in items
                   if i.get("ValueType") == "CODE" and _code(i) not in ("121071", "276214006", "363698007")
                   and i.get("RelationshipType") == "CONTAINS"]
    qualitative = [text for text in qualitative if text]
    if not parts and not qualitative:
        return None
    return uid, f"{name}: {', '.join(qualitative + parts)}"


def _qualitative(item: Dataset) -> str:
    """How a qualitative evaluation reads in the summary: its meaning; a Rendering Intent only as "low
    confidence" when it is "Presentation Optional" (under the model's display threshold), else not at all."""
    if _code(item) == _RENDERING_INTENT:
        return LOW_CONFIDENCE_TEXT if _code(item, "ConceptCodeSequence") == PRESENTATION_OPTIONAL.value else ""
    return str(item.ConceptCodeSequence[0].CodeMeaning)


def summary_lines(groups: Iterable[Dataset]) -> list[str]:
    """One line per finding (groups sharing a tracking UID - a detection's planar and volumetric groups - give
    one line: the first that has something to say)."""
    seen: set[str] = set()
    lines = []
    for group in groups:
        line = _group_line(group)
        if line is None or line[0] in seen:
            continue
        seen.add(line[0])
        lines.append(line[1])
    return lines


def add_summary(sr: hd.sr.Comprehensive3DSR, groups: Sequence[Dataset]) -> str:
    """Add the summary of ``groups`` (the report's measurement groups) to ``sr``, in the document and in its
    parsed view; returns the text."""
    lines = summary_lines(groups)
    text = "\n".join(lines) if lines else "No finding reported."
    for sequence in (sr.ContentSequence, sr.content[0].ContentSequence):
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = [hd.sr.TextContentItem(name=codes.DCM.Summary, value=text,
                                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
        sequence.append(container)
    return text
