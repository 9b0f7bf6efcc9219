"""MONAI RetinaNet detection bundles without torchvision (workers.models.retinanet).

What the tests prove:

* the Model Zoo ``lung_nodule_ct_detection`` config builds without torchvision, and
  its network's state-dict keys and shapes are those of the Zoo's (torchvision's
  ``IntermediateLayerGetter`` layout: the backbone's children up to the last
  returned layer under ``feature_extractor.body``, MONAI's FPN under ``.fpn``), so a
  Zoo ``models/model.pt`` loads strictly;
* with seeded random weights saved as ``models/model.pt`` it runs on a chest
  phantom series through ``build_model`` (the registry's dispatch) and returns
  well-formed detections inside the series, which the GSPS and SR builders accept
  (dciodvfy: no errors);
* geometry: a stand-in network (same interface) plants one box of known voxel size
  on the bright object; the reported LPS centre and size match the planted object
  and size for axial, flipped, sagittal and oblique series, and equal what the
  Zoo's own postprocessing transforms compute from the same boxes;
* labels: without coded labels, or with a class index the detector lacks, loading
  fails with an error that says so.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.contracts import CodedConcept, SegmentLabel
from dicom_node.model_catalog import BundleError, BundleLabel, ModelEntry
from dicom_node.palette import palette_colour
from tests.unit.workers.model_fixtures import (
    centred_geometry,
    oblique_orientation,
    sample_world,
)
from tests.unit.workers.outputs_fixtures import dciodvfy_findings
from tests.zoo import model_zoo_bundle
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from workers.models.base import DetectionResult
from workers.models.registry import build_model
from workers.models.retinanet import (
    IntermediateLayers,
    RetinaNetBundleModel,
    boxes_to_world_lps,
    is_retinanet_bundle,
)
from workers.outputs.common import SeriesIdentity
from workers.outputs.gsps import build_gsps
from workers.outputs.sr import DetectionFindings, build_sr
from workers.volume import Volume, load_series

REPO = Path(__file__).resolve().parents[3]


def zoo_detection() -> Path:
    """The Model Zoo's lung_nodule_ct_detection configs (skips, or fails in CI, without them: tests/zoo.py)."""
    return model_zoo_bundle("lung_nodule_ct_detection")

NODULE = SegmentLabel(
    value=1,
    name="nodule",
    property_category=CodedConcept(value="49755003", scheme="SCT", meaning="Morphologically Altered Structure"),
    property_type=CodedConcept(value="27925004", scheme="SCT", meaning="Nodule"),
    color_rgb=palette_colour(1),  # the entry names no colour: the label takes its value's palette colour
)
NODULE_ENTRY_LABEL = BundleLabel(value=1, name="nodule", bundle_value=0, code=NODULE.property_type,
                                 category=NODULE.property_category)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
AXIAL_FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = oblique_orientation(20.0, 15.0)

#: The planted object (LPS mm) and the box the stand-in network puts on it (voxels x, y, z).
PLANTED_CENTRE_MM = np.array([24.0, -17.0, 11.0])
PLANTED_RADIUS_MM = 7.0
BOX_VOXELS = (6.0, 5.0, 4.0)
#: The preprocessed grid of the geometry tests (Spacingd pixdim, x y z mm): coarse to stay fast.
PIXDIM = (2.0, 2.0, 2.5)


@pytest.fixture(scope="module", autouse=True)
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the Zoo network, without torchvision


def _torchvision_layout_keys(backbone: torch.nn.Module, returned_layers: list[int]) -> set[str]:
    """State-dict keys of the body torchvision's IntermediateLayerGetter keeps: children up to the last returned layer."""
    last = f"layer{max(returned_layers)}"
    kept: list[str] = []
    for name, _ in backbone.named_children():
        kept.append(name)
        if name == last:
            break
    return {key for key in backbone.state_dict() if key.split(".")[0] in kept}


def test_zoo_network_builds_without_torchvision_with_the_zoos_state_dict_layout() -> None:
    from monai.networks.blocks.feature_pyramid_network import (
        FeaturePyramidNetwork,
        LastLevelMaxPool,
    )
    from monai.networks.nets.resnet import resnet50

    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (the point: none here)
    torch.manual_seed(0)
    model = RetinaNetBundleModel(zoo_detection(), device="cpu", random_weights=True, labels={0: NODULE})
    state = model._detector.network.state_dict()

    backbone = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    body = _torchvision_layout_keys(backbone, [1, 2])
    fpn = FeaturePyramidNetwork(3, [256, 512], 256, LastLevelMaxPool(3)).state_dict()
    extractor = {f"feature_extractor.body.{k}" for k in body} | {f"feature_extractor.fpn.{k}" for k in fpn}
    assert {k for k in state if k.startswith("feature_extractor.")} == extractor
    assert "feature_extractor.body.layer3.0.conv1.weight" not in state  # dropped, as torchvision drops it
    for key in body:
        assert state[f"feature_extractor.body.{key}"].shape == backbone.state_dict()[key].shape, key
    heads = {k.split(".")[0] for k in state if not k.startswith("feature_extractor.")}
    assert heads == {"classification_head", "regression_head"}
    assert state["classification_head.cls_logits.weight"].shape == (3, 256, 3, 3, 3)  # 3 anchors x 1 class
    assert state["regression_head.bbox_reg.weight"].shape == (18, 256, 3, 3, 3)  # 3 anchors x 6


def test_intermediate_layers_run_every_kept_child_in_order() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential()
    model.add_module("a", torch.nn.Linear(3, 4))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("b", torch.nn.Linear(4, 2))
    model.add_module("unused", torch.nn.Linear(2, 9))
    getter = IntermediateLayers(model, {"a": "first", "b": "second"})
    assert list(getter) == ["a", "act", "b"]
    x = torch.randn(5, 3)
    out = getter(x)
    assert list(out) == ["first", "second"]
    assert torch.equal(out["first"], model.a(x)) and torch.equal(out["second"], model.b(model.act(model.a(x))))
    with pytest.raises(ValueError, match=r"return_layers \['nope'\]"):
        IntermediateLayers(model, {"nope": "x"})


def test_config_references_to_torchvision_helpers_are_redirected() -> None:
    from workers.models.retinanet import _torchvision_free

    config = {
        "imports": ["$from monai.apps.detection.networks.retinanet_network import resnet_fpn_feature_extractor"],
        "fe": "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor(@backbone,3)",
        "fpn": {"_target_": "monai.networks.blocks.backbone_fpn_utils.BackboneWithFPN", "out_channels": 8},
        "short": [{"_target_": "resnet_fpn_feature_extractor"}],
        "other": "$monai.networks.nets.resnet.resnet50(spatial_dims=3)",
    }
    out = _torchvision_free(config)
    redirected = "$from workers.models.retinanet import resnet_fpn_feature_extractor as resnet_fpn_feature_extractor"
    assert out["imports"] == [redirected]
    assert out["fe"] == "$_dicom_node_retinanet.resnet_fpn_feature_extractor(@backbone,3)"
    assert out["fpn"] == {"_target_": "workers.models.retinanet.BackboneWithFPN", "out_channels": 8}
    assert out["short"] == [{"_target_": "workers.models.retinanet.resnet_fpn_feature_extractor"}]
    assert out["other"] == config["other"]


def test_only_retinanet_bundles_are_recognised(tmp_path: Path) -> None:
    assert is_retinanet_bundle(zoo_detection())
    assert not is_retinanet_bundle(REPO / "workers" / "bundles" / "lung_nodule_detection")
    assert not is_retinanet_bundle(tmp_path)


# --------------------------------------------------------------------------- the Zoo bundle on a phantom series


@pytest.fixture(scope="module")
def zoo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the Zoo config with seeded random weights as models/model.pt (the Zoo's weights are not here)."""
    bundle = tmp_path_factory.mktemp("zoo") / "lung_nodule_ct_detection"
    shutil.copytree(zoo_detection(), bundle)
    torch.manual_seed(22)
    model = RetinaNetBundleModel(bundle, device="cpu", random_weights=True, labels={0: NODULE})
    (bundle / "models").mkdir()
    torch.save(model._detector.network.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, list[Path]]:
    phantom = generate_chest_phantom(PhantomConfig(shape=(24, 64, 64), spacing_mm=(10.0, 5.5, 5.5)), seed=4)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("case"), seed=4)
    paths = sorted(series_dir.glob("*.dcm"))
    return load_series(paths), paths


@pytest.fixture(scope="module")
def zoo_result(zoo_bundle: Path, phantom_series: tuple[Volume, list[Path]]) -> tuple[RetinaNetBundleModel, DetectionResult]:
    entry = ModelEntry(id="zoo-lung-nodules", kind="detection", format="monai_bundle", path=str(zoo_bundle),
                       version="0.6.8", labels=(NODULE_ENTRY_LABEL,))
    model = build_model(entry, zoo_bundle, "cpu")
    assert isinstance(model, RetinaNetBundleModel)
    result = model.predict(phantom_series[0])
    assert isinstance(result, DetectionResult)
    return model, result


def test_zoo_bundle_with_seeded_weights_gives_well_formed_detections(
    zoo_result: tuple[RetinaNetBundleModel, DetectionResult], phantom_series: tuple[Volume, list[Path]]
) -> None:
    model, result = zoo_result
    volume = phantom_series[0]
    assert model.kind == "detection" and model.labels == (NODULE,)
    assert model.algorithm.model_id == "zoo-lung-nodules" and model.algorithm.version == "0.6.8"
    assert 0 < len(result.detections) <= 300  # detections_per_img of the config
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True) and all(0.02 <= s <= 1.0 for s in scores)  # score_thresh 0.02
    corners = volume.index_to_world(np.array([[i, j, k] for i in (0, volume.shape[0] - 1)
                                              for j in (0, volume.shape[1] - 1) for k in (0, volume.shape[2] - 1)]))
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = np.asarray(volume.spacing_mm)[::-1]  # x, y, z for an axial series
    for d in result.detections:
        centre, size = np.asarray(d.centre_mm), np.asarray(d.size_mm)
        assert d.label == NODULE and np.all(size > 0) and d.diameter_mm == pytest.approx(float(size.mean()))
        # clipped to the image as MONAI clips, to [0, size] voxel coordinates: one voxel past the last centre
        assert np.all(centre - size / 2 >= low - spacing - 1e-3) and np.all(centre + size / 2 <= high + spacing + 1e-3)


def test_gsps_and_sr_accept_the_zoo_detections(
    zoo_result: tuple[RetinaNetBundleModel, DetectionResult], phantom_series: tuple[Volume, list[Path]],
    tmp_path: Path,
) -> None:
    model, result = zoo_result
    volume = phantom_series[0]
    detections = list(result.detections[:3])
    gsps = build_gsps(volume, detections, model.algorithm,
                      SeriesIdentity(series_number=9021, series_description="AI lung nodules (Zoo)"))
    assert gsps is not None and len(gsps.GraphicAnnotationSequence) >= 1
    gsps.save_as(tmp_path / "gsps.dcm", enforce_file_format=True)
    errors, _ = dciodvfy_findings(tmp_path / "gsps.dcm")
    assert errors == []
    sr = build_sr(volume, [DetectionFindings(model.algorithm, tuple(detections), model.labels)],
                  SeriesIdentity(series_number=9022, series_description="AI lung nodules SR"))
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    errors, _ = dciodvfy_findings(tmp_path / "sr.dcm")
    assert errors == []


# --------------------------------------------------------------------------- labels


def test_zoo_bundle_without_coded_labels_is_refused() -> None:
    with pytest.raises(BundleError, match=r"no coded labels .*bundle_value"):
        RetinaNetBundleModel(zoo_detection(), device="cpu", random_weights=True)


def test_label_for_a_class_the_detector_lacks_is_refused() -> None:
    with pytest.raises(BundleError, match=r"class indices \[1\].*1 class\(es\)"):
        RetinaNetBundleModel(zoo_detection(), device="cpu", random_weights=True, labels={1: NODULE})


def test_registry_entry_for_a_detector_needs_bundle_values() -> None:
    with pytest.raises(ValueError, match="bundle_value"):
        ModelEntry(id="zoo", kind="detection", format="monai_bundle", path="x", version="1",
                   labels=(NODULE_ENTRY_LABEL.model_copy(update={"bundle_value": None}),))


# --------------------------------------------------------------------------- geometry: a planted response


def _planted_model(**more_overrides: object) -> RetinaNetBundleModel:
    network = {
        "_target_": "tests.unit.workers.retinanet_fixtures.PlantedResponse",
        "anchor_generator": "@anchor_generator",
        "box_size_voxels": list(BOX_VOXELS),
        "num_classes": "@num_classes",
        "size_divisible": "@size_divisible",
    }
    overrides = {"network_def": network, "whether_raw_luna16": True,
                 "preprocessing#transforms#4#pixdim": list(PIXDIM), **more_overrides}
    return RetinaNetBundleModel(zoo_detection(), device="cpu", random_weights=True, labels={0: NODULE},
                                overrides=overrides)


@pytest.fixture(scope="module")
def planted_model() -> RetinaNetBundleModel:
    return _planted_model()


def _planted_volume(orientation: tuple[float, ...]) -> Volume:
    geometry = centred_geometry(orientation, shape=(30, 40, 40), pixel_spacing=(1.8, 1.6), slice_spacing=2.2,
                                centre_mm=(5.0, -3.0, 2.0))

    def hu(points: np.ndarray) -> np.ndarray:
        inside = np.linalg.norm(points - PLANTED_CENTRE_MM, axis=-1) <= PLANTED_RADIUS_MM
        return np.where(inside, 400.0, -1000.0).astype(np.float32)

    return sample_world(geometry, hu)


@pytest.mark.parametrize("orientation", [AXIAL, AXIAL_FLIPPED, SAGITTAL, OBLIQUE],
                         ids=["axial", "axial-flipped", "sagittal", "oblique"])
def test_planted_box_lands_at_the_planted_object_in_patient_space(
    planted_model: RetinaNetBundleModel, orientation: tuple[float, ...]
) -> None:
    volume = _planted_volume(orientation)
    result = planted_model.predict(volume)
    assert len(result.detections) == 1
    found = result.detections[0]
    assert found.score > 0.99 and found.label == NODULE
    # centre: the object's, to a fraction of the 2-2.5 mm grid (the object is sampled on the series' voxels)
    assert np.linalg.norm(np.asarray(found.centre_mm) - PLANTED_CENTRE_MM) < 0.8
    # size: the planted voxel box on the preprocessed grid (RAS x, y, z extents = LPS x, y, z extents)
    assert found.size_mm == pytest.approx(tuple(b * p for b, p in zip(BOX_VOXELS, PIXDIM)), abs=1e-3)


def test_sliding_window_path_finds_the_same_box(planted_model: RetinaNetBundleModel) -> None:
    """force_sliding_window (the Zoo inferer's flag) runs the detector's SlidingWindowInferer; same box."""
    volume = _planted_volume(AXIAL_FLIPPED)
    whole = planted_model.predict(volume).detections
    # the preprocessed image is 32 x 36 x 27 voxels, padded to 32 x 48 x 32 (size_divisible): one window
    sliding = _planted_model(force_sliding_window=True, infer_patch_size=[32, 48, 32])
    _, image = sliding.raw_detections(volume)
    assert tuple(image.shape[1:]) == (32, 36, 27)
    assert sliding._use_sliding_window(image) and not planted_model._use_sliding_window(image)
    found = sliding.predict(volume).detections
    assert len(whole) == len(found) == 1
    assert found[0].centre_mm == pytest.approx(whole[0].centre_mm, abs=1e-3)
    assert found[0].size_mm == pytest.approx(whole[0].size_mm, abs=1e-3)


def test_world_mapping_equals_the_zoo_postprocessing(planted_model: RetinaNetBundleModel) -> None:
    from monai.bundle import ConfigParser

    volume = _planted_volume(OBLIQUE)
    raw, image = planted_model.raw_detections(volume)
    boxes = torch.as_tensor(raw["box"]).float()
    # a second box hanging over the image's edge: clipped by both
    edge = torch.tensor([[-3.0, 2.0, 1.0, 4.0, 9.0, 5.0]])
    boxes = torch.cat([boxes, edge])
    parser = ConfigParser()
    parser.read_config(str(zoo_detection() / "configs" / "inference.json"))
    post = parser.get_parsed_content("postprocessing")
    out = post({"box": boxes.clone(), "label": torch.zeros(len(boxes), dtype=torch.long), "image": image})
    zoo = torch.as_tensor(out["box"]).double().numpy()  # LPS cccwhd
    centres, sizes, kept = boxes_to_world_lps(boxes.numpy(), image.affine.numpy(), image.shape[1:])
    assert kept.all() and len(zoo) == 2
    assert np.allclose(centres, zoo[:, :3], atol=1e-3) and np.allclose(sizes, zoo[:, 3:], atol=1e-3)
