"""Model loaders and registry: MONAI bundles (ours and the Model Zoo's), TorchScript, the nodule detector.

What the tests prove:

* a Volume enters MONAI exactly as ``LoadImage`` reads the same DICOM series
  (array order and RAS affine, for axial, sagittal and oblique series);
* label maps come back on the volume's own voxels whatever the orientation (a
  thresholding bundle labels an asymmetric object in the right place for axial,
  rotated, sagittal, coronal and oblique series; exactly when no resampling is involved);
* a bundle whose postprocessing does not return to the input grid is an error;
* the real Model Zoo configs (spleen, whole body) run with random weights;
* the segmentation bundle's TorchScript export, served with explicit
  preprocessing, agrees with the bundle;
* the shipped nodule detector finds a phantom's nodule at its LPS position, from
  axial, sagittal and oblique series;
* the registry rejects bad files with errors naming entry and field, resolves
  paths and loads each model once.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dicom_node.contracts import CodedConcept, SegmentLabel
from tests.unit.workers.model_fixtures import (
    CHEST_ROI,
    CHEST_SPACING_MM,
    CHEST_WINDOW_HU,
    OBJECT_LEFT_FACES_X,
    OBJECT_RIGHT_FACE_X,
    THRESHOLD_LABEL,
    as_sagittal,
    centred_geometry,
    inside_object,
    object_centroid_mm,
    object_hu,
    oblique_orientation,
    reslice,
    sample_world,
    volume_from_geometry,
    world_grid,
    write_edge_bundle,
    write_random_chest_bundle,
    write_threshold_bundle,
)
from tests.zoo import model_zoo_bundle
from training.labels import CHEST_LABELS
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series, simple_body_phantom
from workers.models.base import DetectionResult, Model, SegmentationResult
from dicom_node.model_catalog import BundleError
from workers.models.loading import resolve_device
from workers.models.monai_bundle import (
    MonaiBundleModel,
    label_map_to_volume,
    ras_affine,
    remap_labels,
    volume_to_metatensor,
)
from workers.models.nodule_detector import NoduleDetectorModel, axial_lps_grid
from workers.models.registry import ModelRegistryError, UnknownModel, default_registry, load_model_registry
from workers.models.torchscript import TorchScriptPreprocessing, TorchScriptSegmentationModel
from workers.volume import Volume

REPO = Path(__file__).resolve().parents[3]
DETECTOR = REPO / "workers" / "bundles" / "lung_nodule_detection"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_ROTATED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # rows and columns run the other way
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = oblique_orientation(20.0, 15.0)

SPLEEN = SegmentLabel(
    value=1,
    name="spleen",
    property_category=CodedConcept(value="123037004", scheme="SCT", meaning="Anatomical Structure"),
    property_type=CodedConcept(value="78961009", scheme="SCT", meaning="Spleen"),
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def threshold_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labels > 0 HU; resamples to 2.5 mm and slides 32-voxel windows, so geometry is really exercised."""
    return write_threshold_bundle(tmp_path_factory.mktemp("threshold") / "bundle", spacing_mm=(2.5, 2.5, 2.5),
                                  roi_size=(32, 32, 32))


@pytest.fixture(scope="session")
def chest_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_chest_bundle(tmp_path_factory.mktemp("chest") / "bundle")


@pytest.fixture(scope="session")
def small_chest() -> Volume:
    """A small chest phantom (24 x 48 x 48 at 10 x 7.3 x 7.3 mm) as an axial Volume."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(24, 48, 48), spacing_mm=(10.0, 7.3, 7.3)), seed=3)
    geometry = SeriesGeometry(rows=48, columns=48, slices=24, pixel_spacing=(7.3, 7.3), slice_spacing=10.0,
                              slice_thickness=10.0, origin=phantom.origin_xyz_mm)
    return volume_from_geometry(geometry, phantom.volume_hu)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL, OBLIQUE], ids=["axial", "sagittal", "oblique"])
def test_volume_enters_monai_as_loadimage_reads_the_dicom_series(orientation: tuple[float, ...],
                                                                  tmp_path: Path) -> None:
    from monai.transforms import LoadImage

    geometry = SeriesGeometry(rows=10, columns=12, slices=5, pixel_spacing=(2.0, 3.0), slice_spacing=4.0,
                              orientation=orientation, origin=(10.0, -20.0, 30.0))
    series = generate_ct_series(tmp_path, geometry=geometry, seed=1, keep_volume=True)
    volume = volume_from_geometry(geometry, series.volume_hu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader warns that the optional nvImageCodec is missing
        loaded = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(tmp_path))
    ours = volume_to_metatensor(volume)
    assert tuple(ours.shape) == tuple(loaded.shape) == (1, 12, 10, 5)
    assert np.array_equal(ours.numpy(), loaded.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), loaded.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(ras_affine(volume), loaded.affine.numpy(), atol=1e-4)


def test_thresholding_bundle_is_exact_when_nothing_is_resampled(tmp_path: Path) -> None:
    bundle = write_threshold_bundle(tmp_path / "b", spacing_mm=(2.5, 2.5, 2.5), roi_size=(16, 16, 16))
    geometry = centred_geometry(AXIAL, shape=(20, 24, 28), pixel_spacing=(2.5, 2.5), slice_spacing=2.5)
    volume = sample_world(geometry, object_hu)
    result = MonaiBundleModel(bundle, device="cpu").predict(volume)
    assert result.label_map.dtype == np.uint8 and result.label_map.shape == volume.shape
    expected = (volume.array > 0).astype(np.uint8)
    assert expected.sum() > 500
    assert np.array_equal(result.label_map, expected)
    assert [(label.value, label.name) for label in result.labels] == [(1, THRESHOLD_LABEL.name)]
    # a MONAI config override reaches the parsed bundle: a wider window puts the object below the threshold
    widened = MonaiBundleModel(bundle, device="cpu", overrides={"preprocessing#transforms#4#a_max": 4000.0})
    assert not widened.predict(volume).label_map.any()


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, AXIAL_ROTATED, SAGITTAL, CORONAL, OBLIQUE],
    ids=["axial", "axial-rotated", "sagittal", "coronal", "oblique"],
)
def test_label_map_lands_on_the_same_patient_voxels_in_any_orientation(
    orientation: tuple[float, ...], threshold_bundle: Path
) -> None:
    model = MonaiBundleModel(threshold_bundle, device="cpu")
    volume = sample_world(centred_geometry(orientation), object_hu)
    label_map = model.predict(volume).label_map
    world = world_grid(volume)
    margin = 6.0  # > the combined reach of both resamplings (3 mm input, 2.5 mm model grid)
    sure_inside, sure_outside = inside_object(world, -margin), ~inside_object(world, margin)
    assert sure_inside.sum() > 300 and sure_outside.sum() > 10_000
    assert np.all(label_map[sure_inside] == 1), f"{np.sum(label_map[sure_inside] != 1)} object voxels missed"
    assert np.all(label_map[sure_outside] == 0), f"{np.sum(label_map[sure_outside] != 0)} voxels wrongly labelled"
    scanned = volume.array > 0  # the object as this series sampled it
    assert np.mean((label_map == 1) == scanned) > 0.995
    np.testing.assert_allclose(world[label_map == 1].mean(axis=0), world[scanned].mean(axis=0), atol=0.5)
    np.testing.assert_allclose(world[scanned].mean(axis=0), object_centroid_mm(), atol=2.5)


@pytest.mark.parametrize(
    "orientation", [AXIAL, AXIAL_ROTATED, SAGITTAL, CORONAL], ids=["axial", "axial-rotated", "sagittal", "coronal"]
)
def test_network_sees_the_image_in_ras_orientation(orientation: tuple[float, ...], tmp_path: Path) -> None:
    """A direction-sensitive network marks the faces towards the patient's left whatever the series' orientation."""
    bundle = write_edge_bundle(tmp_path / "edge", spacing_mm=(2.5, 2.5, 2.5), roi_size=(64, 64, 64))
    volume = sample_world(centred_geometry(orientation), object_hu)
    label_map = MonaiBundleModel(bundle, device="cpu").predict(volume).label_map
    x = world_grid(volume)[label_map == 1][:, 0]
    near_face = [np.abs(x - face) <= 3.0 for face in OBJECT_LEFT_FACES_X]
    assert all(mask.sum() > 50 for mask in near_face)  # both left faces found ...
    assert np.all(near_face[0] | near_face[1])  # ... and nothing else
    assert not np.any(np.abs(x - OBJECT_RIGHT_FACE_X) <= 6.0)


def test_postprocessing_that_does_not_invert_is_an_error(threshold_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "no_invert"
    shutil.copytree(threshold_bundle, bundle)
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["postprocessing"]["transforms"] = [
        t for t in config["postprocessing"]["transforms"] if t["_target_"] != "Invertd"
    ]
    config_path.write_text(json.dumps(config))
    volume = sample_world(centred_geometry(AXIAL), object_hu)
    with pytest.raises(BundleError, match=r"shape .* but series 1\.2\.826\.0\.1\.1 has .*Invertd"):
        MonaiBundleModel(bundle, device="cpu").predict(volume)


def test_label_map_with_another_affine_or_several_channels_is_rejected() -> None:
    from monai.data import MetaTensor

    volume = sample_world(centred_geometry(AXIAL, shape=(4, 5, 6)), object_hu)
    shifted = ras_affine(volume)
    shifted[0, 3] += 2.0
    same_shape = MetaTensor(torch.zeros(1, 6, 5, 4), affine=torch.as_tensor(shifted))
    with pytest.raises(BundleError, match="affine differs from the input's by up to 2 mm"):
        label_map_to_volume(same_shape, volume, "test model")
    with pytest.raises(BundleError, match="returned 3 channels"):
        label_map_to_volume(torch.zeros(3, 6, 5, 4), volume, "test model")
    back = label_map_to_volume(torch.arange(120.0).reshape(1, 6, 5, 4), volume, "test model")
    assert back.shape == (4, 5, 6) and back[3, 2, 1] == 1 * 20 + 2 * 4 + 3  # (x, y, z) -> [slice, row, col]


def test_remap_labels_maps_bundle_values_and_drops_unmapped_ones() -> None:
    raw = np.array([[0, 1, 2, 7]])
    other = SPLEEN.model_copy(update={"value": 9, "name": "other"})
    assert remap_labels(raw, {2: SPLEEN, 7: other}).tolist() == [[0, 0, 1, 9]]


def test_a_segmentation_result_holds_its_label_map_in_c_order() -> None:
    in_c_order = np.zeros((3, 4, 5), dtype=np.uint8)
    assert SegmentationResult(in_c_order, (SPLEEN,)).label_map is in_c_order  # no copy
    transposed = np.arange(60, dtype=np.uint8).reshape(5, 4, 3).transpose(2, 1, 0)
    held = SegmentationResult(transposed, (SPLEEN,)).label_map
    assert held.flags.c_contiguous and np.array_equal(held, transposed)


def test_resolve_device_picks_cuda_only_when_present() -> None:
    assert resolve_device(None) == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' requested, but CUDA is not available"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- our segmentation bundle


def test_chest_bundle_serves_its_coded_labels_on_the_volume_grid(chest_bundle: Path, small_chest: Volume) -> None:
    model = MonaiBundleModel(chest_bundle, device="cpu", model_id="chest-ct-segmentation")
    assert isinstance(model, Model) and model.kind == "segmentation"
    assert model.algorithm.model_id == "chest-ct-segmentation" and model.algorithm.version == "0.1.0"
    assert [(label.value, label.property_type.value) for label in model.labels] == [
        (spec.value, spec.code_value) for spec in CHEST_LABELS
    ]
    result = model.predict(small_chest)
    assert isinstance(result, SegmentationResult)
    assert result.label_map.shape == small_chest.shape and result.label_map.dtype == np.uint8
    assert result.label_map.flags.c_contiguous  # the encoders walk it slice by slice
    assert set(np.unique(result.label_map)) <= {0, 1, 2, 3, 4, 5}
    assert not (chest_bundle / "eval").exists()  # SaveImaged was left out


def test_torchscript_export_with_explicit_preprocessing_agrees_with_the_bundle(
    chest_bundle: Path, small_chest: Volume
) -> None:
    bundle_model = MonaiBundleModel(chest_bundle, device="cpu")
    labels = {label.value: label for label in bundle_model.labels}
    ts_model = TorchScriptSegmentationModel(
        chest_bundle / "models" / "model.ts",
        preprocessing=TorchScriptPreprocessing(spacing_mm=CHEST_SPACING_MM, window_hu=CHEST_WINDOW_HU,
                                               roi_size=CHEST_ROI, sw_batch_size=2, padding_mode="replicate"),
        labels=labels,
        device="cpu",
        model_id="chest-ts",
    )
    assert ts_model.labels == bundle_model.labels and ts_model.algorithm.model_id == "chest-ts"
    expected = bundle_model.predict(small_chest).label_map
    got = ts_model.predict(small_chest).label_map
    assert got.shape == expected.shape
    assert len(np.unique(expected)) > 1  # random weights, but not a constant output
    assert np.mean(got == expected) > 0.999


def test_bundle_without_weights_or_labels_is_a_clear_error(chest_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(chest_bundle, bundle)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match="no models/model.pt"):
        MonaiBundleModel(bundle, device="cpu")
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["dicom_node"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no dicom_node.labels; give the model's labels .* config/models.yaml"):
        MonaiBundleModel(bundle, device="cpu", random_weights=True)
    with pytest.raises(BundleError, match="maps bundle value 9, but the bundle's outputs are 0..5"):
        MonaiBundleModel(bundle, device="cpu", random_weights=True, labels={9: SPLEEN})
    with pytest.raises(BundleError, match="override 'inferer#no_such_key' names no item"):
        MonaiBundleModel(bundle, device="cpu", random_weights=True, labels={1: SPLEEN},
                         overrides={"inferer#no_such_key": 1})


# --------------------------------------------------------------------------- Model Zoo compatibility


def _zoo_volume(orientation: tuple[float, ...]) -> Volume:
    """A 12 x 12 x 10 cm body phantom: one 96^3 window at the Zoo bundles' 1.5 mm grids."""
    geometry = centred_geometry(orientation, shape=(20, 24, 24), pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    return volume_from_geometry(geometry, simple_body_phantom(geometry, seed=5))


def _channel_values(bundle: Path) -> set[int]:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {int(k) for k in meta["network_data_format"]["outputs"]["pred"]["channel_def"]}


def test_model_zoo_spleen_bundle_runs_with_its_own_configs(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    bundle = tmp_path / "spleen_ct_segmentation"
    shutil.copytree(model_zoo_bundle("spleen_ct_segmentation"), bundle)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")

    model = MonaiBundleModel(bundle, device="cpu", labels={1: SPLEEN}, model_id="spleen")
    assert model.algorithm.version == "0.5.9" and model.labels == (SPLEEN,)
    volume = _zoo_volume(AXIAL)
    raw = model.predict_values(volume)
    assert raw.shape == volume.shape
    assert set(np.unique(raw)) <= _channel_values(bundle) == {0, 1}
    assert not (bundle / "eval").exists()


def test_model_zoo_whole_body_bundle_runs_with_its_own_configs() -> None:
    bundle = model_zoo_bundle("wholeBody_ct_segmentation")
    liver = SPLEEN.model_copy(update={"value": 2, "name": "liver"})
    model = MonaiBundleModel(bundle, device="cpu", random_weights=True, labels={1: SPLEEN, 5: liver})
    volume = _zoo_volume(SAGITTAL)
    raw = model.predict_values(volume)
    assert raw.shape == volume.shape
    channels = _channel_values(bundle)
    assert channels == set(range(105)) and set(np.unique(raw)) <= channels
    assert not (bundle / "eval").exists()


# --------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def nodule_phantom() -> tuple[Volume, np.ndarray, float]:
    """The default chest phantom with one 14-18 mm nodule: (axial volume, nodule centre LPS, diameter)."""
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(1, 1), nodule_diameter_mm=(14.0, 18.0)),
                                     seed=424242)
    [nodule] = phantom.nodules
    nz, ny, nx = phantom.shape
    sz, sy, sx = phantom.spacing_mm
    geometry = SeriesGeometry(rows=ny, columns=nx, slices=nz, pixel_spacing=(sy, sx), slice_spacing=sz,
                              slice_thickness=sz, origin=phantom.origin_xyz_mm)
    return volume_from_geometry(geometry, phantom.volume_hu), np.asarray(nodule.centre_xyz_mm), nodule.diameter_mm


@pytest.fixture(scope="module")
def detector() -> NoduleDetectorModel:
    return NoduleDetectorModel(DETECTOR, device="cpu", model_id="lung-nodule-detection")


def test_detector_finds_the_nodule_at_its_lps_position(
    detector: NoduleDetectorModel, nodule_phantom: tuple[Volume, np.ndarray, float]
) -> None:
    volume, centre, diameter = nodule_phantom
    result = detector.predict(volume)
    assert isinstance(result, DetectionResult) and result.detections
    best = result.detections[0]
    assert [d.score for d in result.detections] == sorted((d.score for d in result.detections), reverse=True)
    assert np.linalg.norm(np.asarray(best.centre_mm) - centre) < diameter / 4
    assert abs(best.diameter_mm - diameter) < diameter * 0.5
    assert all(abs(s - diameter) < diameter * 0.5 for s in best.size_mm)
    assert best.label.name == "nodule" and best.label.property_type.value == "27925004" and best.label.value == 5
    assert detector.kind == "detection" and detector.labels == (best.label,)


def test_detector_reports_the_same_world_position_for_sagittal_and_oblique_series(
    detector: NoduleDetectorModel, nodule_phantom: tuple[Volume, np.ndarray, float]
) -> None:
    volume, centre, diameter = nodule_phantom
    axial_best = detector.predict(volume).detections[0]
    sagittal_best = detector.predict(as_sagittal(volume)).detections[0]
    np.testing.assert_allclose(sagittal_best.centre_mm, axial_best.centre_mm, atol=1e-3)
    assert sagittal_best.score == pytest.approx(axial_best.score, abs=1e-5)
    # an oblique acquisition of the same patient, off-centre so that a mirrored result would miss
    oblique = reslice(volume, centred_geometry(OBLIQUE, shape=(48, 80, 80), pixel_spacing=(2.2, 2.2),
                                               slice_spacing=2.5, centre_mm=centre + [20.0, -15.0, 10.0]))
    oblique_best = detector.predict(oblique).detections[0]
    assert np.linalg.norm(np.asarray(oblique_best.centre_mm) - centre) < diameter / 4


def test_axial_grid_of_an_oblique_series_keeps_world_positions() -> None:
    def bright_spot(points: np.ndarray) -> np.ndarray:
        return np.where(np.linalg.norm(points - np.array([12.0, -7.0, 5.0]), axis=-1) < 4.0, 1000.0, -1000.0)

    volume = sample_world(centred_geometry(OBLIQUE, shape=(24, 30, 30), pixel_spacing=(2.0, 2.0)), bright_spot)
    grid = axial_lps_grid(volume, (2.0, 2.0, 2.0))
    hot = np.argwhere(grid.array > 0)
    zyx = hot.mean(axis=0)
    world = np.asarray(grid.origin_xyz_mm) + zyx[::-1] * np.asarray(grid.spacing_zyx_mm)[::-1]
    np.testing.assert_allclose(world, [12.0, -7.0, 5.0], atol=1.0)
    assert grid.array.min() == pytest.approx(-1024.0)  # outside the oblique slab: air


# --------------------------------------------------------------------------- registry


def _write_registry(path: Path, models: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def _entry(**fields: object) -> dict[str, object]:
    return {"id": "m", "kind": "segmentation", "format": "monai_bundle", "path": "bundle", "version": "0.1.0",
            **fields}


def test_shipped_registry_lists_the_demo_models_and_loads_the_detector_once() -> None:
    registry = load_model_registry(REPO / "config" / "models.yaml")
    assert registry.ids == ("chest-ct-segmentation", "lung-nodule-detection")
    assert registry.path("lung-nodule-detection").resolve() == DETECTOR.resolve()
    assert registry.path("chest-ct-segmentation").resolve() == (REPO / "workers" / "bundles"
                                                                / "chest_ct_segmentation").resolve()
    assert registry.entry("chest-ct-segmentation").kind == "segmentation"
    built_in = default_registry()  # what a node without a models file serves: the same two entries
    assert [built_in.entry(i) for i in built_in.ids] == [registry.entry(i) for i in registry.ids]
    model = registry.load("lung-nodule-detection", device="cpu")
    assert model.kind == "detection" and model.algorithm.model_id == "lung-nodule-detection"
    assert registry.load("lung-nodule-detection", device="cpu") is model
    with pytest.raises(UnknownModel, match="no model 'nope' .*chest-ct-segmentation, lung-nodule-detection"):
        registry.load("nope")


def test_registry_serves_bundles_and_torchscript_from_relative_paths(
    chest_bundle: Path, small_chest: Volume, tmp_path: Path
) -> None:
    shutil.copytree(chest_bundle, tmp_path / "models" / "chest")
    lung = {"value": 1, "name": "lung", "bundle_value": 2,
            "code": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
            "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}}
    path = _write_registry(tmp_path / "models.yaml", [
        _entry(id="seg", path="models/chest", name="Chest test"),
        _entry(id="seg-ts", format="torchscript", path="models/chest/models/model.ts", labels=[lung],
               preprocessing={"spacing_mm": list(CHEST_SPACING_MM), "window_hu": list(CHEST_WINDOW_HU),
                              "roi_size": list(CHEST_ROI)}),
    ])
    registry = load_model_registry(path)
    bundle_model = registry.load("seg", device="cpu")
    assert bundle_model.algorithm.name == "Chest test" and len(bundle_model.labels) == len(CHEST_LABELS)
    ts_model = registry.load("seg-ts", device="cpu")
    assert [label.name for label in ts_model.labels] == ["lung"]
    ts_map = ts_model.predict(small_chest).label_map
    assert set(np.unique(ts_map)) <= {0, 1}
    bundle_map = bundle_model.predict(small_chest).label_map
    assert np.mean((ts_map == 1) == (bundle_map == 2)) > 0.999  # bundle value 2 (lung) became label 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"colour": [1, 2, 3]}, r"models\[0\] \(id 'm'\): colour: Extra inputs are not permitted"),
        ({"kind": "regression"}, r"models\[0\] \(id 'm'\): kind: Input should be 'segmentation', 'detection' or 'classification'"),
        ({"version": ""}, r"models\[0\] \(id 'm'\): version: String should have at least 1 character"),
        ({"format": "torchscript"}, r"format torchscript needs 'preprocessing'"),
        ({"preprocessing": {"spacing_mm": [1, 1, 1], "window_hu": [0, 1], "roi_size": [8, 8, 8]}},
         r"'preprocessing' is for torchscript and onnx entries"),
        ({"kind": "detection", "labels": [{"value": 5, "name": "nodule",
                                           "code": {"value": "1", "scheme": "SCT", "meaning": "x"},
                                           "category": {"value": "2", "scheme": "SCT", "meaning": "y"}}]},
         r"detection labels need 'bundle_value'"),
        ({"labels": [{"value": 300, "name": "x", "code": {"value": "1", "scheme": "SCT", "meaning": "x"},
                      "category": {"value": "2", "scheme": "SCT", "meaning": "y"}}]},
         r"models\[0\] \(id 'm'\): labels\.0\.value: Input should be less than or equal to 255, got 300"),
    ],
    ids=["unknown-key", "bad-kind", "empty-version", "ts-without-preprocessing", "bundle-with-preprocessing",
         "detection-label-without-class", "label-value-too-large"],
)
def test_registry_rejects_bad_entries_naming_entry_and_field(
    fields: dict[str, object], message: str, tmp_path: Path
) -> None:
    path = _write_registry(tmp_path / "models.yaml", [_entry(**fields)])
    with pytest.raises(ModelRegistryError, match=message) as caught:
        load_model_registry(path)
    assert str(path) in str(caught.value)


def test_registry_rejects_duplicates_and_missing_or_mismatched_bundles(chest_bundle: Path, tmp_path: Path) -> None:
    twice = _write_registry(tmp_path / "twice.yaml", [_entry(), _entry()])
    with pytest.raises(ModelRegistryError, match=r"model ids \['m'\] are listed more than once"):
        load_model_registry(twice)
    label = {"name": "a", "code": {"value": "1", "scheme": "SCT", "meaning": "x"},
             "category": {"value": "2", "scheme": "SCT", "meaning": "y"}}
    same_value = _write_registry(tmp_path / "labels.yaml", [
        _entry(labels=[{**label, "value": 1}, {**label, "value": 1, "bundle_value": 2}])])
    with pytest.raises(ModelRegistryError, match=r"models\[0\] \(id 'm'\): labels\[1\] .* label value 1 a second time"):
        load_model_registry(same_value)
    with pytest.raises(ModelRegistryError, match="package 'no_such_package' is not installed"):
        load_model_registry(_write_registry(tmp_path / "pkg.yaml", [_entry(path="package://no_such_package/x")]))

    missing = load_model_registry(_write_registry(tmp_path / "missing.yaml", [_entry(path="nowhere")]))
    with pytest.raises(ModelRegistryError, match=r"model 'm': path 'nowhere' \(.*nowhere\) does not exist"):
        missing.load("m", device="cpu")
    mismatched = load_model_registry(
        _write_registry(tmp_path / "version.yaml", [_entry(path=str(chest_bundle), version="9.9")])
    )
    with pytest.raises(ModelRegistryError, match="registry says version '9.9', the bundle's metadata says '0.1.0'"):
        mismatched.load("m", device="cpu")
