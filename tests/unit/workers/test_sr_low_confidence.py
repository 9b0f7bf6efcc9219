"""Low-confidence detections (a model's display threshold) in the SR: still reported, titled and coded as such.

The SR is built from a written phantom series and checked as a reader and a validator
see it: the planar group's Comment (the title OHIF lists), the volumetric group's coded
Rendering Intent (DCM 111056, CID 6034), the text summary, and dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests.unit.workers.outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    dciodvfy_findings,
    detection,
    volume_from_files,
    write_phantom_series,
)
from workers.outputs.common import SeriesIdentity
from workers.outputs.sr import DetectionFindings, build_sr

NODULE = LABELS[4]
IDENTITY = SeriesIdentity(series_number=902, series_description="AI nodule report")


def _groups(ds: Dataset) -> list[Dataset]:
    """The measurement groups of a TID 1500 report, in order."""
    [measurements] = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def _children(group: Dataset, code_value: str) -> list[Dataset]:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]


def test_a_detection_under_the_threshold_is_reported_with_all_measurements_titled_and_coded_low_confidence(
    tmp_path: Path,
) -> None:
    volume = volume_from_files(write_phantom_series(tmp_path / "src", AXIAL, seed=41))
    certain = detection(volume, (12.0, 30.0, 30.0), 12.0, 0.85, NODULE)
    doubtful = detection(volume, (8.0, 20.0, 40.0), 6.0, 0.31, NODULE)
    sr = build_sr(volume, [DetectionFindings(ALGORITHM, (certain, doubtful), (NODULE,), display_threshold=0.34)],
                  IDENTITY)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_findings(path)
    assert errors == [] and warnings == [], (errors, warnings)

    ds = pydicom.dcmread(path)
    planar_certain, volumetric_certain, planar_doubtful, volumetric_doubtful = _groups(ds)
    titles = [str(_children(g, "121106")[0].TextValue) for g in (planar_certain, planar_doubtful)]
    assert titles[0].endswith("12 mm, 85 %") and "low confidence" not in titles[0]
    assert titles[1].endswith("6 mm, 31 % (low confidence)")
    # Both keep every measurement and their tracking; the rendering intent says which one a viewer may leave out.
    for group in (volumetric_certain, volumetric_doubtful):
        assert {str(n.ConceptNameCodeSequence[0].CodeValue) for n in group.ContentSequence
                if n.ValueType == "NUM"} == {"103339001", "111012"}  # long axis, certainty of finding
        assert _children(group, "112040"), "a tracking UID"
    intents = [_children(g, "111056")[0].ConceptCodeSequence[0] for g in (volumetric_certain, volumetric_doubtful)]
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in intents] == [("111150", "DCM"), ("111151", "DCM")]
    assert not _children(planar_doubtful, "111056"), "the planar group (OHIF's) carries no qualitative item"

    [evaluations] = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    lines = str(evaluations.ContentSequence[0].TextValue).splitlines()
    assert lines == ["nodule 1: 12.0 mm, certainty 85 %", "nodule 2: low confidence, 6.0 mm, certainty 31 %"]


def test_without_a_threshold_nothing_is_coded_low_confidence(tmp_path: Path) -> None:
    volume = volume_from_files(write_phantom_series(tmp_path / "src", AXIAL, seed=42))
    doubtful = detection(volume, (8.0, 20.0, 40.0), 6.0, 0.31, NODULE)
    ds = build_sr(volume, [DetectionFindings(ALGORITHM, (doubtful,), (NODULE,))], IDENTITY)
    planar, volumetric = _groups(ds)
    assert "low confidence" not in str(_children(planar, "121106")[0].TextValue)
    assert not _children(volumetric, "111056")
