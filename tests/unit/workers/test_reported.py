"""The coded findings a job's summary keeps for notifications (``workers.outputs.reported``), per result kind."""

from __future__ import annotations

import numpy as np

from dicom_node.contracts import CodedConcept, Detection, ReportedFinding, SegmentLabel
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.outputs.reported import reported_findings

ANATOMY = CodedConcept(value="123037004", scheme="SCT", meaning="Anatomical Structure")
ALTERED = CodedConcept(value="49755003", scheme="SCT", meaning="Morphologically Altered Structure")
LUNG = SegmentLabel(value=1, name="lung", property_category=ANATOMY,
                    property_type=CodedConcept(value="39607008", scheme="SCT", meaning="Lung"))
NODULE = SegmentLabel(value=2, name="nodule", property_category=ALTERED,
                      property_type=CodedConcept(value="27925004", scheme="SCT", meaning="Nodule"))


def _read(records: list[dict[str, object]]) -> list[ReportedFinding]:
    return [ReportedFinding.model_validate(record) for record in records]


def test_segmentation_reports_each_structure_with_its_volume_and_site() -> None:
    result = SegmentationResult(np.zeros((2, 2, 2), np.uint8), (LUNG, NODULE))
    lung, nodule = _read(reported_findings(result, {"lung": 4876.04, "nodule": 1.2}))
    assert lung.text == "Lung: 4876.0 mL" and lung.site == LUNG.property_type
    assert [(m.name.meaning, m.value, m.unit.value) for m in lung.measurements] == [("Volume", 4876.04, "mL")]
    assert nodule.site is None, "a nodule is no place in the body"
    assert len(reported_findings(result, {"lung": 10.0})) == 1, "a label without a measured volume is left out"


def test_detection_reports_long_axis_certainty_and_low_confidence() -> None:
    result = DetectionResult((Detection(centre_mm=(0, 0, 0), size_mm=(9, 9, 9), diameter_mm=8.96, score=0.42,
                                        label=NODULE),))
    [found] = _read(reported_findings(result, None, 0.5))
    assert found.low_confidence and found.text == "Nodule 1: 9.0 mm, certainty 42 % (low confidence)"
    assert [(m.name.value, m.value, m.unit.value) for m in found.measurements] == [
        ("103339001", 9.0, "mm"), ("111012", 42.0, "%")]
    assert not _read(reported_findings(result, None, None))[0].low_confidence


def test_classification_reports_the_class_as_the_answer_to_the_question() -> None:
    present = SegmentLabel(value=1, name="present", property_category=NODULE.property_type,
                           property_type=CodedConcept(value="52101004", scheme="SCT", meaning="Present"))
    absent = SegmentLabel(value=2, name="absent", property_category=NODULE.property_type,
                          property_type=CodedConcept(value="2667000", scheme="SCT", meaning="Absent"))
    [found] = _read(reported_findings(ClassificationResult((present, absent), (0.8, 0.2))))
    assert (found.type.meaning, found.value.meaning if found.value else None) == ("Nodule", "Present")
    assert found.text == "Nodule: Present (certainty 80 %)" and found.measurements[0].value == 80.0
