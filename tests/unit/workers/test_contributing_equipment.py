"""Every result object names the model as contributing equipment, with the registry's Device UID; the key images.

IHE AI Results asks every object an AI evidence creator writes (SEG, SR, GSPS, Parametric Map,
Secondary Capture, Key Object Selection, the "not performed" SR) to identify the algorithm
in its Contributing Equipment Sequence. Here each builder makes a real object from a phantom
series and a model identified by a real model registry (:class:`ModelCatalog`: the Device UID
from the weights file, or the entry's own), the object is written to bytes and read back, and
the item is checked; dciodvfy must find no error in any of them, and dcentvfy must find the
source series and all the results of one study consistent (patient, study, equipment entities).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from outputs_fixtures import (
    ALGORITHM,
    AXIAL,
    LABELS,
    dcentvfy_findings,
    dciodvfy_findings,
    detection,
    sphere_mask,
    volume_from_files,
    write_phantom_series,
)
from dicom_node.model_catalog import BundleLabel, ModelCatalog, ModelEntry, derived_device_uid
from dicom_node.model_files import device_uid_for_digest, weights_digest
from training.classification.nodule_presence import CLASS_LABELS
from workers.models.base import ClassificationResult, DetectionResult, SegmentationResult
from workers.outputs.common import SeriesIdentity
from workers.outputs.explanation import build_overlay_sc, build_parametric_map
from workers.outputs.gsps import build_gsps
from workers.outputs.key_images import build_key_object_selection, key_slices
from workers.outputs.notice import build_not_performed_sr
from workers.outputs.seg import build_seg
from workers.outputs.sr import ClassificationFindings, DetectionFindings, SegmentationFindings, build_sr
from workers.volume import Volume

NODULE, LUNG = LABELS[4], LABELS[1]
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _entry(model_id: str, path: Path, **extra: object) -> ModelEntry:
    return ModelEntry.model_validate({
        "id": model_id, "kind": "segmentation", "format": "torchscript", "path": str(path), "version": "1.2.3",
        "labels": [{"value": 1, "name": "lung", "code": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
                    "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}}],
        "preprocessing": {"spacing_mm": [1, 1, 1], "window_hu": [-1000, 400], "roi_size": [32, 32, 32]},
        **extra})


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> ModelCatalog:
    """A registry of three: one identified by its weights, one by its own Device UID and maker, one without weights."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "weights.ts").write_bytes(b"not really torchscript, but bytes to hash")
    return ModelCatalog([
        _entry("chest-organs-test", folder / "weights.ts"),
        _entry("vendor-model", folder / "weights.ts", device_uid="1.2.826.0.1.3680043.8.498.77", manufacturer="Acme AI",
               series_number=9100),
        _entry("gone-model", folder / "missing.ts", series_number=9200),
    ], base_dir=folder, source="equipment test models")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Volume]:
    files = write_phantom_series(tmp_path_factory.mktemp("source"), AXIAL, seed=25)
    return files, volume_from_files(files)


def _read_back(dataset: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_device_uid_from_weights_entry_or_id_and_version(catalog: ModelCatalog, tmp_path: Path) -> None:
    weights = catalog.path("chest-organs-test")
    from_weights = device_uid_for_digest(weights_digest([weights], weights))
    assert catalog.device_uid("chest-organs-test") == from_weights
    assert catalog.identify("chest-organs-test", ALGORITHM).device_uid == from_weights
    assert catalog.identify("vendor-model").device_uid == "1.2.826.0.1.3680043.8.498.77"
    assert catalog.identify("vendor-model").manufacturer == "Acme AI"
    # Without weight files: the same id and version give the same UID, a new version a new one.
    assert catalog.identify("gone-model").device_uid == derived_device_uid("gone-model", "1.2.3")
    assert derived_device_uid("gone-model", "1.2.4") != derived_device_uid("gone-model", "1.2.3")
    with pytest.raises(ValueError, match="missing weight file"):
        catalog.device_uid("gone-model")
    with pytest.raises(ValueError, match="device_uid"):
        _entry("bad", tmp_path, device_uid="1.02.3")
    assert catalog.result_series("chest-organs-test", "KO") == (
        9018, "AI chest-organs-test - key images (chest-organs-test 1.2.3)")


def test_every_object_names_the_model_with_the_registry_device_uid(
    catalog: ModelCatalog, study: tuple[list[Path], Volume], tmp_path: Path,
) -> None:
    files, volume = study
    algorithm = catalog.identify("chest-organs-test", ALGORITHM)
    vendor = catalog.identify("vendor-model", ALGORITHM.model_copy(update={"model_id": "vendor-model"}))

    def identity(number: int) -> SeriesIdentity:
        return SeriesIdentity(series_number=number, series_description=f"AI test {number}")

    centre = volume.index_to_world((12.0, 30.0, 26.0))
    label_map = np.where(sphere_mask(volume, centre, 9.0), NODULE.value, 0).astype(np.uint8)
    segmentation = SegmentationResult(label_map, LABELS)
    detections = DetectionResult((detection(volume, (8.0, 30.0, 20.0), 12.0, 0.9, NODULE),
                                  detection(volume, (15.0, 34.0, 40.0), 8.0, 0.6, NODULE)))
    explanation = np.zeros(volume.shape, np.float32)
    explanation[10:14, 20:40, 20:40] = 1.0
    classes = tuple(BundleLabel.model_validate(c).segment_label() for c in CLASS_LABELS)
    classification = ClassificationResult(classes, (0.2, 0.8), explanation, "grad-cam")

    seg = build_seg(volume, segmentation, algorithm, identity(901))
    gsps = build_gsps(volume, detections.detections, algorithm, identity(903))
    seg_ko = build_key_object_selection(volume, segmentation, algorithm, identity(908))
    detection_ko = build_key_object_selection(volume, detections, vendor, identity(918))
    assert seg is not None and gsps is not None and seg_ko is not None and detection_ko is not None
    objects = {
        "seg": (seg, algorithm),
        "seg-sr": (build_sr(volume, [SegmentationFindings(algorithm, segmentation, seg)], identity(902)), algorithm),
        "detection-sr": (build_sr(volume, [DetectionFindings(vendor, detections.detections, (NODULE, LUNG))],
                                  identity(912)), vendor),
        "gsps": (gsps, algorithm),
        "class-sr": (build_sr(volume, [ClassificationFindings(algorithm, classification)], identity(922)), algorithm),
        "pmap": (build_parametric_map(volume, classification, algorithm, identity(924)), algorithm),
        "sc": (build_overlay_sc(volume, classification, algorithm, identity(925))[0], algorithm),
        "notice": (build_not_performed_sr(volume, vendor, "modality", "MR is not CT", identity(919)), vendor),
        "seg-ko": (seg_ko, algorithm),
        "detection-ko": (detection_ko, vendor),
    }
    paths = []
    for name, (dataset, model) in objects.items():
        path = tmp_path / f"{name}.dcm"
        back = _read_back(dataset, path)
        paths.append(path)
        # highdicom adds the library itself (and for images the source's acquisition equipment): one item is the model's
        items = [item for item in back.ContributingEquipmentSequence if "DeviceUID" in item]
        assert len(items) == 1, name
        item = items[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "109102", "DCM", "Processing Equipment"), name
        assert item.DeviceUID == model.device_uid == catalog.device_uid(model.model_id), name
        assert (item.ManufacturerModelName, item.SoftwareVersions) == (model.name, model.version), name
        assert item.Manufacturer == ("Acme AI" if model is vendor else "dicom-ai-node"), name
        assert back.Manufacturer == "dicom-ai-node", name  # General Equipment: the node that wrote it
        errors, _ = dciodvfy_findings(path)
        assert errors == [], (name, errors)
    errors, _ = dcentvfy_findings([*files, *paths])
    assert errors == [], errors


def test_key_images_are_the_slices_with_findings(
    catalog: ModelCatalog, study: tuple[list[Path], Volume], tmp_path: Path,
) -> None:
    files, volume = study
    algorithm = catalog.identify("chest-organs-test", ALGORITHM)
    label_map = np.zeros(volume.shape, np.uint8)
    for k, half in ((4, 2), (5, 4), (6, 3), (16, 5), (17, 6), (18, 1)):  # two lesions, largest on slices 5 and 17
        centre = 20 if k < 10 else 44
        label_map[k, centre - half:centre + half, centre - half:centre + half] = NODULE.value
    label_map[:, :4, :4] = LUNG.value  # an organ flags nothing
    segmentation = SegmentationResult(label_map, LABELS)
    assert key_slices(volume, segmentation) == [5, 17]
    detections = DetectionResult((detection(volume, (9.0, 30.0, 20.0), 12.0, 0.9, NODULE),
                                  detection(volume, (9.2, 20.0, 40.0), 6.0, 0.7, NODULE),
                                  detection(volume, (3.0, 30.0, 30.0), 8.0, 0.6, NODULE)))
    assert key_slices(volume, detections) == [3, 9]
    organs_only = SegmentationResult(np.where(label_map == LUNG.value, LUNG.value, 0).astype(np.uint8), LABELS)
    assert build_key_object_selection(volume, organs_only, algorithm,
                                      SeriesIdentity(series_number=908, series_description="AI key images")) is None

    document = build_key_object_selection(volume, segmentation, algorithm,
                                          SeriesIdentity(series_number=908, series_description="AI key images"))
    assert document is not None
    back = _read_back(document, tmp_path / "ko.dcm")
    assert (back.SOPClassUID, back.Modality, back.SeriesNumber) == (KO_CLASS, "KO", 908)
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    flagged = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
               for item in back.ContentSequence if item.ValueType == "IMAGE"]
    assert flagged == [volume.frames[k].sop_instance_uid for k in (5, 17)]
    assert all(uid in by_uid for uid in flagged)
    description = next(item.TextValue for item in back.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "113012")  # Key Object Description
    assert ALGORITHM.name in description and ALGORITHM.version in description
    observer = next(item.UID for item in back.ContentSequence if item.ValueType == "UIDREF")
    assert observer == algorithm.device_uid
    errors, warnings = dciodvfy_findings(tmp_path / "ko.dcm")
    assert errors == [], errors
