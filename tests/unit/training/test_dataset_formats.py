"""Round trips of the dataset formats: Decathlon NIfTI, MONAI box list, DICOM CT + SEG."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from training.data.boxes import (
    BoxEntry,
    boxes_to_nodules,
    nodule_box_entry,
    nodules_to_boxes,
    read_box_list,
    write_box_list,
)
from training.data.decathlon import load_case, read_decathlon, write_decathlon
from training.data.dicom_pair import read_dicom_case, write_dicom_case
from training.labels import CHEST_LABELS
from training.phantoms.chest import NODULE, ChestPhantom, PhantomConfig, generate_chest_phantom
from training.phantoms.dataset import write_phantom_dataset

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"

# Non-square grid and unequal spacings, so any transposition or flip shows.
SMALL = PhantomConfig(
    shape=(20, 56, 64),
    spacing_mm=(8.0, 6.0, 5.5),
    nodule_count=(2, 3),
    nodule_diameter_mm=(6.0, 20.0),
    vessel_count=4,
)


@pytest.fixture(scope="module")
def phantoms() -> list[ChestPhantom]:
    cases = [generate_chest_phantom(SMALL, seed=s) for s in (11, 12)]
    assert all(c.nodules for c in cases)
    return cases


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def test_decathlon_round_trip_is_exact(tmp_path: Path, phantoms: list[ChestPhantom]) -> None:
    root = write_decathlon(tmp_path / "ds", phantoms, names=["a", "b"], test_fraction=0.5)
    doc = json.loads((root / "dataset.json").read_text())
    assert doc["tensorImageSize"] == "3D" and doc["modality"] == {"0": "CT"}
    assert doc["labels"] == {"0": "background", "1": "body", "2": "lung", "3": "heart", "4": "bone", "5": "nodule"}
    assert doc["numTraining"] == 1
    assert doc["training"] == [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]
    assert doc["test"] == ["./imagesTs/b.nii.gz"]

    training = read_decathlon(root)
    assert [(c.name, c.split) for c in training] == [("a", "training")]
    cases = read_decathlon(root, include_test=True)
    assert [(c.name, c.split) for c in cases] == [("a", "training"), ("b", "test")]
    for case, ph in zip(cases, phantoms):
        assert case.label is not None
        loaded = load_case(case)
        assert loaded.volume_hu.dtype == np.int16 and loaded.labels is not None
        np.testing.assert_array_equal(loaded.volume_hu, ph.volume_hu)
        np.testing.assert_array_equal(loaded.labels, ph.labels)
        assert loaded.spacing_mm == ph.spacing_mm
        assert loaded.origin_xyz_mm == ph.origin_xyz_mm
        by_path = load_case(case.image)  # a bare image path finds its label next door
        assert by_path.labels is not None and np.array_equal(by_path.labels, ph.labels)


def test_nifti_orientation_matches_lps_world(tmp_path: Path, phantoms: list[ChestPhantom]) -> None:
    ph = phantoms[0]
    root = write_decathlon(tmp_path / "ds", [ph], names=["a"])
    for path, array in ((root / "imagesTr/a.nii.gz", ph.volume_hu), (root / "labelsTr/a.nii.gz", ph.labels)):
        img = nib.load(path)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        data = np.asanyarray(img.dataobj)
        assert data.shape == array.shape[::-1] and data.dtype == array.dtype
        for zyx in [(0, 0, 0), (19, 55, 63), (3, 40, 7), tuple(int(round(c)) for c in ph.nodules[0].centre_zyx)]:
            k, j, i = zyx
            assert data[i, j, k] == array[zyx]
            ras = img.affine @ np.array([i, j, k, 1.0])
            x, y, z = ph.voxel_to_world(zyx)
            np.testing.assert_allclose(ras[:3], [-x, -y, z], atol=1e-4)


def test_box_list_round_trip(tmp_path: Path, phantoms: list[ChestPhantom]) -> None:
    entries = {
        "training": [nodule_box_entry("imagesTr/a.nii.gz", phantoms[0].nodules)],
        "validation": [nodule_box_entry("imagesTr/b.nii.gz", phantoms[1].nodules), BoxEntry("imagesTr/c.nii.gz")],
    }
    path = write_box_list(tmp_path / "boxes.json", entries)
    doc = json.loads(path.read_text())
    first = doc["training"][0]
    assert first["image"] == "imagesTr/a.nii.gz"
    assert first["label"] == [0] * len(phantoms[0].nodules)
    assert all(len(b) == 6 for b in first["box"])
    assert first["kind"] == [n.kind for n in phantoms[0].nodules]
    assert doc["validation"][1] == {"image": "imagesTr/c.nii.gz", "box": [], "label": []}
    assert read_box_list(path) == entries
    # The dataclass mirrors the JSON keys, so asdict() reads like the JSON object.
    assert list(dataclasses.asdict(entries["training"][0])) == list(first)
    # A plain sequence is the training split with an empty validation split.
    assert read_box_list(write_box_list(tmp_path / "b2.json", entries["training"])) == {
        "training": entries["training"], "validation": []
    }

    ph = phantoms[0]
    for box, n in zip(nodules_to_boxes(ph.nodules), ph.nodules):
        x, y, z = n.centre_xyz_mm
        assert box == (-x, -y, z, n.diameter_mm, n.diameter_mm, n.diameter_mm)
    back = boxes_to_nodules(read_box_list(path)["training"][0], ph.spacing_mm, ph.origin_xyz_mm)
    assert len(back) == len(ph.nodules)
    for got, want in zip(back, ph.nodules):
        np.testing.assert_allclose(got.centre_xyz_mm, want.centre_xyz_mm, atol=1e-9)
        np.testing.assert_allclose(got.centre_zyx, want.centre_zyx, atol=1e-9)
        assert (got.diameter_mm, got.kind) == (want.diameter_mm, want.kind)


def test_boxes_agree_with_the_nifti_affine(tmp_path: Path, phantoms: list[ChestPhantom]) -> None:
    """World RAS box centres map through the inverse NIfTI affine onto the nodule voxels."""
    ph = phantoms[1]
    root = write_decathlon(tmp_path / "ds", [ph], names=["a"])
    affine = nib.load(root / "labelsTr/a.nii.gz").affine
    labels_xyz = np.asanyarray(nib.load(root / "labelsTr/a.nii.gz").dataobj)
    for box, n in zip(nodules_to_boxes(ph.nodules), ph.nodules):
        ijk = np.linalg.inv(affine) @ np.array([box[0], box[1], box[2], 1.0])
        np.testing.assert_allclose(ijk[:3], n.centre_zyx[::-1], atol=1e-4)
        assert labels_xyz[tuple(int(round(c)) for c in ijk[:3])] == NODULE


def test_dicom_and_seg_round_trip(tmp_path: Path, phantoms: list[ChestPhantom]) -> None:
    ph = phantoms[0]
    series_dir, seg_path = write_dicom_case(ph, tmp_path / "case", seed=3)
    files = sorted(series_dir.glob("*.dcm"))
    assert len(files) == ph.shape[0] and seg_path == tmp_path / "case" / "seg.dcm"
    ct = pydicom.dcmread(files[0])
    assert (ct.Rows, ct.Columns) == ph.shape[1:]
    assert [float(v) for v in ct.PixelSpacing] == [6.0, 5.5]
    assert [float(v) for v in ct.ImagePositionPatient] == list(ph.origin_xyz_mm)

    seg = pydicom.dcmread(seg_path)
    assert seg.SegmentationType == "BINARY"
    coded = {
        str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue): str(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue)
        for s in seg.SegmentSequence
    }
    assert coded == {spec.code_value: spec.category_value for spec in CHEST_LABELS}
    assert coded["27925004"] == "49755003" and coded["39607008"] == "123037004"

    # Shuffle the files on disk: the reader sorts by position along the normal.
    for i, f in enumerate(reversed(files)):
        f.rename(series_dir / f"z{i:03d}_{f.name}")
    case = read_dicom_case(series_dir, seg_path)
    np.testing.assert_array_equal(case.volume_hu, ph.volume_hu)
    np.testing.assert_array_equal(case.labels, ph.labels)
    assert case.spacing_mm == ph.spacing_mm
    assert case.origin_xyz_mm == ph.origin_xyz_mm

    assert _dciodvfy_errors(seg_path) == []
    assert _dciodvfy_errors(next(series_dir.iterdir())) == []


def test_write_phantom_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_phantom_dataset(tmp_path / "phantoms", cases=2, seed=40, config=SMALL)
    assert capsys.readouterr() == ("", "")
    assert out == tmp_path / "phantoms"
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["numTraining"] == 2 and doc["test"] == []
    names = ["chest_0000", "chest_0001"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{n}.nii.gz" for n in names]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{n}.nii.gz" for n in names]

    boxes = read_box_list(out / "boxes.json")
    assert [e.image for e in boxes["training"]] == [f"imagesTr/{n}.nii.gz" for n in names]
    assert boxes["validation"] == []
    for i, (name, entry) in enumerate(zip(names, boxes["training"])):
        assert (out / entry.image).exists()
        ph = generate_chest_phantom(SMALL, seed=40 + i)
        assert entry == nodule_box_entry(f"imagesTr/{name}.nii.gz", ph.nodules)
        loaded = load_case(read_decathlon(out)[i])
        np.testing.assert_array_equal(loaded.volume_hu, ph.volume_hu)
        case_dir = out / "dicom" / name
        assert len(list((case_dir / "series").glob("*.dcm"))) == SMALL.shape[0]
        assert (case_dir / "seg.dcm").is_file()
    # CT UIDs come from the case seed: the two cases are distinct studies.
    uids = {pydicom.dcmread(next((out / "dicom" / n / "series").iterdir())).StudyInstanceUID for n in names}
    assert len(uids) == 2

    plain = write_phantom_dataset(tmp_path / "nodicom", cases=1, seed=40, config=SMALL, dicom=False)
    assert not (plain / "dicom").exists() and (plain / "boxes.json").exists()
