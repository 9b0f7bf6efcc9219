"""The "AI analysis not performed" SR: valid, in the source study, naming the model and the coded reason."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.contracts import AlgorithmInfo
from outputs_fixtures import AXIAL, dcentvfy_findings, dciodvfy_findings, volume_from_files, write_phantom_series
from workers.outputs.common import SeriesIdentity
from workers.outputs.notice import REASON_CODES, build_not_performed_sr

ALGORITHM = AlgorithmInfo(name="Chest CT segmentation", version="0.1.0", model_id="chest-ct-segmentation")
SERIES = SeriesIdentity(series_number=9019, series_description="AI chest anatomy - not performed "
                                                                "(chest-ct-segmentation 0.1.0)")


def test_the_notice_names_the_model_and_the_reason_and_validates(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", AXIAL, seed=5)
    volume = volume_from_files(files)
    reason = "body region: the image shows head, the model is made for chest"
    sr = build_not_performed_sr(volume, ALGORITHM, "body-region", reason, SERIES)
    path = tmp_path / "notice.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy_findings(path)
    assert errors == []
    assert all("99DCMNODE" in w for w in warnings), warnings  # only our private coding scheme is unknown to it
    errors, _ = dcentvfy_findings([*files, path])
    assert errors == []

    ds = pydicom.dcmread(path)
    assert (ds.StudyInstanceUID, ds.PatientID) == (volume.study_instance_uid, volume.datasets[0].PatientID)
    assert (int(ds.SeriesNumber), ds.SeriesDescription) == (9019, SERIES.series_description)
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DCMNODE"
    assert hd.sr.srread(BytesIO(path.read_bytes())).SOPClassUID == ds.SOPClassUID  # highdicom reads it back
    flat = _flatten(ds.ContentSequence)
    assert ("AINPR", REASON_CODES["body-region"].value) in [(n, v) for n, v, _ in flat]
    assert ("121106", None, reason) in flat
    assert ("111001", None, "Chest CT segmentation") in flat  # Algorithm Name (TID 4019)
    assert ("111003", None, "0.1.0") in flat  # Algorithm Version


def _flatten(items: pydicom.Sequence) -> list[tuple[str, str | None, str | None]]:
    """(concept name code, code value, text) of every content item of an SR tree."""
    out = []
    for item in items:
        name = str(item.ConceptNameCodeSequence[0].CodeValue) if "ConceptNameCodeSequence" in item else ""
        code = str(item.ConceptCodeSequence[0].CodeValue) if "ConceptCodeSequence" in item else None
        out.append((name, code, str(item.TextValue) if "TextValue" in item else None))
        out += _flatten(item.get("ContentSequence", []))
    return out


def test_an_unknown_reason_is_refused(tmp_path: Path) -> None:
    volume = volume_from_files(write_phantom_series(tmp_path / "ct", AXIAL, seed=5))
    with pytest.raises(ValueError, match="reason_code 'tired' is not one of"):
        build_not_performed_sr(volume, ALGORITHM, "tired", "no", SERIES)
