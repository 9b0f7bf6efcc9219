"""Result objects written by ``dicom_bytes`` are byte for byte what pydicom's plain ``save_as`` writes.

Every kind the pipeline writes (SEG from single-frame and multi-frame sources, SR of a
segmentation and of detections, GSPS, KO) is built from a phantom series, copied, and
written both ways; so is a dataset holding raw elements read from an Implicit VR file,
which ``dicom_bytes`` must leave to pydicom to decode.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.unit.workers.outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    detection,
    multiframe_volume,
    sphere_mask,
    volume_from_files,
    write_phantom_series,
)
from workers.models.base import DetectionResult, SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.gsps import build_gsps
from workers.outputs.key_images import build_key_object_selection
from workers.outputs.seg import build_seg
from workers.outputs.sr import DetectionFindings, SegmentationFindings, build_sr
from workers.outputs.writing import dicom_bytes
from workers.volume import Volume

LUNG, NODULE = LABELS[1], LABELS[4]


def plain(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def objects(volume: Volume) -> dict[str, Dataset]:
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:9, 10:22, 8:30] = LUNG.value
    labels[sphere_mask(volume, volume.index_to_world((11.0, 30.0, 30.0)), 9.0)] = NODULE.value
    segmentation = SegmentationResult(labels, LABELS)
    seg = build_seg(volume, segmentation, ALGORITHM, SeriesIdentity(series_number=901, series_description="SEG"))
    assert seg is not None
    found = (detection(volume, (11.0, 30.0, 30.0), 12.0, 0.9, NODULE), detection(volume, (5.0, 20.0, 40.0), 6.0, 0.6,
                                                                                 NODULE))
    sr = build_sr(volume, [SegmentationFindings(ALGORITHM, segmentation, seg),
                           DetectionFindings(ALGORITHM, found, (NODULE,))],
                  SeriesIdentity(series_number=902, series_description="SR"))
    gsps = build_gsps(volume, found, ALGORITHM, SeriesIdentity(series_number=903, series_description="GSPS"))
    ko = build_key_object_selection(volume, DetectionResult(found), ALGORITHM,
                                    SeriesIdentity(series_number=904, series_description="KO"))
    assert gsps is not None and ko is not None
    return {"SEG": seg, "SR": sr, "GSPS": gsps, "KO": ko}


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame source", "multi-frame source"])
def test_every_result_object_is_written_as_pydicom_writes_it(tmp_path: Path, multiframe: bool) -> None:
    paths = write_phantom_series(tmp_path / "series", AXIAL, seed=21)
    volume = multiframe_volume(paths, tmp_path / "enhanced.dcm") if multiframe else volume_from_files(paths)
    for kind, dataset in objects(volume).items():
        expected = plain(copy.deepcopy(dataset))
        assert dicom_bytes(dataset) == expected, kind
        assert dicom_bytes(dataset) == expected, f"{kind}, written a second time"


def test_raw_elements_read_from_an_implicit_vr_file_are_decoded_as_pydicom_does() -> None:
    source = pydicom.dcmread(get_testdata_file("MR_small_implicit.dcm"))
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    expected = plain(copy.deepcopy(source))
    written = dicom_bytes(source)
    assert written == expected
    back = pydicom.dcmread(io.BytesIO(written))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and back.Rows == 64
    assert np.array_equal(back.pixel_array, pydicom.dcmread(get_testdata_file("MR_small_implicit.dcm")).pixel_array)
