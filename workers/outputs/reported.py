"""A model result's findings, coded, for the job's summary: what notifications tell a RIS or an EHR.

Why: the node sends HL7 ORU^R01 OBX lines and FHIR Observations (:mod:`dicom_node.notify`)
from the job's summary alone - it neither reads the DICOM results back nor knows the model's
labels. The codes are the SR's (:mod:`workers.outputs.sr`): SNOMED CT for what was found
(the label's property type) and for Volume / Long axis, DCM for Certainty of Finding, UCUM
units. One :class:`~dicom_node.contracts.ReportedFinding` per segmented structure (its
volume), per detection (long axis, certainty), and one for a classification (the winning
class as the answer to the model's question, with its certainty).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from dicom_node.contracts import CodedConcept, ReportedFinding, ReportedMeasurement, SegmentLabel
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.outputs.confidence import is_low_confidence

__all__ = ["reported_findings"]


def _concept(code: Code) -> CodedConcept:
    """The contract's form of a pydicom code: the measurement names the SR uses (sr.py), from the same dictionary."""
    return CodedConcept(value=code.value, scheme=code.scheme_designator, meaning=code.meaning)


VOLUME = _concept(codes.SCT.Volume)
LONG_AXIS = _concept(codes.SCT.LongAxis)
CERTAINTY = _concept(codes.DCM.CertaintyOfFinding)
MILLILITER = CodedConcept(value="mL", scheme="UCUM", meaning="milliliter")
MILLIMETER = CodedConcept(value="mm", scheme="UCUM", meaning="millimeter")
PERCENT = CodedConcept(value="%", scheme="UCUM", meaning="percent")
#: Categories whose property type is itself a place in the body (SCT "Anatomical Structure", either code):
#: the structure is then also the finding's site, as in the SR.
_ANATOMY = frozenset({("123037004", "SCT"), ("91723000", "SCT")})


def _site(label: SegmentLabel) -> CodedConcept | None:
    category = label.property_category
    return label.property_type if (category.value, category.scheme) in _ANATOMY else None


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def reported_findings(result: Any, volumes_ml: Mapping[str, float] | None = None,
                      display_threshold: float | None = None) -> list[dict[str, Any]]:
    """The coded findings of ``result`` as JSON records (``ReportedFinding.model_dump(mode="json")``).

    ``volumes_ml``: a segmentation's volume per label name (the summary's, already measured);
    ``display_threshold``: a detection model's, to mark low-confidence findings.
    """
    findings: list[ReportedFinding] = []
    if isinstance(result, SegmentationResult):
        for label in result.labels:
            volume = (volumes_ml or {}).get(label.name)
            if volume is None:
                continue
            findings.append(ReportedFinding(
                text=f"{_capital(label.name)}: {volume:.1f} mL", type=label.property_type, site=_site(label),
                measurements=(ReportedMeasurement(name=VOLUME, value=round(volume, 2), unit=MILLILITER),)))
    elif isinstance(result, DetectionResult):
        for number, detection in enumerate(result.detections, start=1):
            low = is_low_confidence(detection, display_threshold)
            findings.append(ReportedFinding(
                text=(f"{_capital(detection.label.name)} {number}: {detection.diameter_mm:.1f} mm, certainty "
                      f"{detection.score * 100:.0f} %" + (" (low confidence)" if low else "")),
                type=detection.label.property_type, site=_site(detection.label), low_confidence=low,
                measurements=(
                    ReportedMeasurement(name=LONG_AXIS, value=round(detection.diameter_mm, 1), unit=MILLIMETER),
                    ReportedMeasurement(name=CERTAINTY, value=round(detection.score * 100, 1), unit=PERCENT))))
    elif isinstance(result, ClassificationResult):
        winner = result.winner
        certainty = result.winner_probability * 100
        findings.append(ReportedFinding(
            text=f"{winner.property_category.meaning}: {winner.property_type.meaning} (certainty {certainty:.0f} %)",
            type=winner.property_category, value=winner.property_type,
            measurements=(ReportedMeasurement(name=CERTAINTY, value=round(certainty, 1), unit=PERCENT),)))
    return [finding.model_dump(mode="json") for finding in findings]
