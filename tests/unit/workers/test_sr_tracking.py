"""AIR report content: findings keep their tracking UIDs across re-processing, the procedure reported is the
source study's, and a text summary states every finding.

Every SR is built from a phantom series written to disk, written to bytes and read back
before anything is asserted.
"""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.contracts import AlgorithmInfo, CodedConcept, Detection
from tests.unit.workers.outputs_fixtures import AXIAL, LABELS, detection, volume_from_files, write_phantom_series
from workers.outputs.common import SeriesIdentity
from workers.outputs.procedure import CT_CHEST, procedure_reported
from workers.outputs.sr import DetectionFindings, build_sr
from workers.outputs.tracking import FindingTracker, TrackedFinding, finding_key, tracked_findings
from workers.volume import Volume

DETECTOR = AlgorithmInfo(name="Nodule detector test net", version="0.9.1", model_id="nodule-detector-test")
SR_SERIES = SeriesIdentity(series_number=902, series_description="AI measurements")
NODULE = LABELS[4]
TRACKING_UID, TRACKING_ID = "112040", "112039"
PROCEDURE_REPORTED = "121058"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    paths = write_phantom_series(tmp_path_factory.mktemp("tracking") / "src", AXIAL, seed=5)
    return volume_from_files(paths)


def _read(sr: Dataset) -> Dataset:
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _tracking_by_identifier(sr: Dataset) -> dict[str, str]:
    """Tracking Identifier text -> Tracking Unique Identifier of every measurement group."""
    measurements = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    found = {}
    for group in measurements.ContentSequence:
        items = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group.ContentSequence}
        found[str(items[TRACKING_ID].TextValue)] = str(items[TRACKING_UID].UID)
    return found


def _moved(found: Detection, offset_mm: float) -> Detection:
    centre = tuple(v + offset_mm for v in found.centre_mm)
    return found.model_copy(update={"centre_mm": centre})


def _two_nodules(volume: Volume) -> tuple[Detection, Detection]:
    shape = np.asarray(volume.shape, dtype=float)
    return (detection(volume, shape * [0.5, 0.4, 0.35], 12.0, 0.87, NODULE),
            detection(volume, shape * [0.3, 0.65, 0.7], 8.0, 0.6, NODULE))


def test_a_re_run_keeps_the_tracking_uid_of_the_same_nodule_and_gives_a_new_one_to_a_new_nodule(volume: Volume) -> None:
    first_nodule, second_nodule = _two_nodules(volume)
    earlier = FindingTracker()
    first = _read(build_sr(volume, [DetectionFindings(DETECTOR, (first_nodule, second_nodule), (NODULE,))],
                           SR_SERIES, tracker=earlier))
    first_uids = _tracking_by_identifier(first)

    # The job keeps the records in its summary (JSON); the re-run starts from them.
    records = [finding.as_record() for finding in earlier.records]
    later = FindingTracker(tracked_findings(records))
    # The same first nodule found 2 mm further along each axis, the second no longer found, a new one far away.
    shape = np.asarray(volume.shape, dtype=float)
    new_nodule = detection(volume, shape * [0.7, 0.7, 0.7], 6.0, 0.9, NODULE)
    second = _read(build_sr(volume, [DetectionFindings(DETECTOR, (new_nodule, _moved(first_nodule, 2.0)), (NODULE,))],
                            SR_SERIES, tracker=later))
    second_uids = _tracking_by_identifier(second)

    assert second_uids[f"{NODULE.name} 2"] == first_uids[f"{NODULE.name} 1"]  # the same nodule, listed second now
    assert second_uids[f"{NODULE.name} 1"] not in first_uids.values()  # the new one
    assert first_uids[f"{NODULE.name} 2"] not in second_uids.values()  # the one no longer found is not reused
    assert str(first.SOPInstanceUID) != str(second.SOPInstanceUID)


def test_a_nodule_that_moved_further_than_its_radius_is_a_new_finding(volume: Volume) -> None:
    nodule, _ = _two_nodules(volume)
    earlier = FindingTracker()
    earlier.start("1.2.3.4")
    uid = earlier.uid(finding_key("detection", NODULE.property_type, NODULE.name), centre_mm=nodule.centre_mm,
                      diameter_mm=12.0)
    later = FindingTracker(tuple(earlier.records))
    later.start("1.2.3.5")
    key = finding_key("detection", NODULE.property_type, NODULE.name)
    far = later.uid(key, centre_mm=tuple(v + 10.0 for v in nodule.centre_mm), diameter_mm=12.0)  # 17 mm > 6 mm
    near = later.uid(key, centre_mm=tuple(v + 1.0 for v in nodule.centre_mm), diameter_mm=12.0)
    again = later.uid(key, centre_mm=nodule.centre_mm, diameter_mm=12.0)  # each earlier finding matched once
    assert far != uid and near == uid and again != uid


def test_segments_and_absent_labels_keep_their_uids_by_label_and_damaged_records_are_skipped() -> None:
    lung = CodedConcept(value="39607008", scheme="SCT", meaning="Lung")
    earlier = FindingTracker()
    earlier.start("1.2.3")
    left = earlier.uid(finding_key("segment", lung, "Left lung"))
    right = earlier.uid(finding_key("segment", lung, "Right lung"))
    records = [f.as_record() for f in earlier.records] + [{"key": 3}, "junk", {"uid": "1.2"}]
    restored = tracked_findings(records)
    assert restored == tuple(earlier.records)
    later = FindingTracker(restored)
    later.start("1.2.4")
    assert later.uid(finding_key("segment", lung, "Right lung")) == right
    assert later.uid(finding_key("segment", lung, "Left lung")) == left
    assert later.uid(finding_key("absent", lung, "Left lung")) not in (left, right)
    with pytest.raises(ValueError, match="start"):
        FindingTracker().uid("segment:SCT:1:x")
    assert TrackedFinding.from_record({"key": "k", "uid": "1.2", "centre_mm": [1, 2, 3]}).centre_mm == (1.0, 2.0, 3.0)


def _procedure(sr: Dataset) -> tuple[str, str, str]:
    item = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == PROCEDURE_REPORTED)
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)


def _with_header(volume: Volume, **attributes: object) -> Volume:
    """``volume`` whose first source header says ``attributes`` (None deletes one)."""
    changed = copy.copy(volume)
    first = copy.deepcopy(volume.datasets[0])
    for keyword, value in attributes.items():
        if value is None:
            if keyword in first:
                delattr(first, keyword)
        else:
            setattr(first, keyword, value)
    object.__setattr__(changed, "datasets", (first, *volume.datasets[1:]))
    return changed


def test_the_procedure_reported_is_the_source_studys(volume: Volume) -> None:
    findings = [DetectionFindings(DETECTOR, (), (NODULE,))]
    chest = _read(build_sr(volume, findings, SR_SERIES))
    assert _procedure(chest) == (CT_CHEST.value, "LN", "CT Chest")  # the phantom says BodyPartExamined CHEST

    coded = Dataset()
    coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = "RPID16", "RADLEX", "CT Chest Abdomen Pelvis"
    ordered = _with_header(volume, ProcedureCodeSequence=[coded])
    assert _procedure(_read(build_sr(ordered, findings, SR_SERIES))) == ("RPID16", "RADLEX", "CT Chest Abdomen Pelvis")

    head = _with_header(volume, BodyPartExamined="HEAD", StudyDescription="CT HEAD", SeriesDescription="AXIAL",
                        ProtocolName=None)
    assert procedure_reported(head).meaning == "CT Head"
    unnamed = _with_header(volume, BodyPartExamined=None, StudyDescription="", SeriesDescription="",
                           ProtocolName=None)
    assert procedure_reported(unnamed).meaning == "CT unspecified body region"


def test_the_summary_states_each_nodule_once_and_what_was_not_found(volume: Volume) -> None:
    first_nodule, second_nodule = _two_nodules(volume)
    sr = _read(build_sr(volume, [DetectionFindings(DETECTOR, (first_nodule, second_nodule), (NODULE,))], SR_SERIES))
    container = sr.ContentSequence[-1]
    assert container.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
    text = str(container.ContentSequence[0].TextValue)
    lines = text.splitlines()
    assert len(lines) == 2, text  # a detection's planar and volumetric groups make one line
    assert "12.0 mm" in lines[0] and "certainty 87 %" in lines[0]
    assert "8.0 mm" in lines[1] and "certainty 60 %" in lines[1]

    nothing = _read(build_sr(volume, [DetectionFindings(DETECTOR, (), (NODULE,))], SR_SERIES))
    assert str(nothing.ContentSequence[-1].ContentSequence[0].TextValue) == f"{NODULE.name}: not found"


def test_summary_and_procedure_keep_the_sr_valid(volume: Volume, tmp_path: Path) -> None:
    from tests.unit.workers.outputs_fixtures import dciodvfy_findings

    sr = build_sr(volume, [DetectionFindings(DETECTOR, _two_nodules(volume), (NODULE,))], SR_SERIES)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _warnings = dciodvfy_findings(path)
    assert errors == []
