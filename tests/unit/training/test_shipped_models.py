"""The demo models shipped in the package load with MONAI's bundle API and find what they should."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from training.labels import label_by_name
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from workers.models.detection_network import detect, load_detector

BUNDLES = Path(__file__).resolve().parents[3] / "workers" / "bundles"
DETECTOR = BUNDLES / "lung_nodule_detection"


def test_detector_bundle_metadata_declares_input_labels_and_held_out_figures() -> None:
    metadata = json.loads((DETECTOR / "configs" / "metadata.json").read_text())
    node = metadata["dicom_node"]
    assert node["kind"] == "detection" and node["input"]["modality"] == "CT"
    [nodule] = node["labels"]
    assert nodule["code"] == {"value": label_by_name("nodule").code_value, "scheme": "SCT", "meaning": "Nodule"}
    held_out = node["evaluation"]["held_out"]
    assert held_out["large"]["sensitivity_at"]["1"] >= 0.9  # the shipped target, nodules >= 6 mm
    assert sum(path.stat().st_size for path in BUNDLES.rglob("*") if path.is_file()) < 50_000_000


def test_detector_bundle_loads_with_monai_and_torchscript_agrees() -> None:
    parser = ConfigParser()
    parser.read_config(DETECTOR / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(DETECTOR / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    scripted = torch.jit.load(str(DETECTOR / "models" / "model.ts"), map_location="cpu")
    image = torch.rand(1, 1, 32, 64, 64)
    with torch.no_grad():
        eager, traced = network(image), scripted(image)
    eager = eager if isinstance(eager, (tuple, list)) else [eager]
    traced = traced if isinstance(traced, (tuple, list)) else [traced]
    for a, b in zip(eager, traced, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_detector_finds_a_large_nodule_where_the_phantom_put_it() -> None:
    config = PhantomConfig(nodule_count=(1, 1), nodule_diameter_mm=(14.0, 18.0))
    phantom = generate_chest_phantom(config, seed=424242)
    [nodule] = phantom.nodules
    network, detector_config = load_detector(DETECTOR)
    found = detect(network, phantom.volume_hu, phantom.spacing_mm, phantom.origin_xyz_mm, config=detector_config)
    assert found, "no detection at all"
    best = found[0]
    distance = float(np.linalg.norm(np.asarray(best.centre_xyz_mm) - np.asarray(nodule.centre_xyz_mm)))
    assert distance < nodule.diameter_mm / 2, f"best detection {distance:.1f} mm from the nodule centre"
    assert abs(best.diameter_mm - nodule.diameter_mm) < nodule.diameter_mm * 0.5


SEGMENTER = BUNDLES / "chest_ct_segmentation"


@pytest.mark.parametrize("bundle", [DETECTOR, SEGMENTER], ids=lambda path: path.name)
def test_a_bundle_exported_before_the_networks_moved_still_loads_its_weights(bundle: Path) -> None:
    """The shipped config with the `training.*` targets that earlier versions exported builds the same network,
    and the shipped weights load into it unchanged (where the training package is installed)."""
    from training.bundle import moved_targets

    text = (bundle / "configs" / "inference.json").read_text()
    for old, new in moved_targets().items():
        text = text.replace(f'"{new}"', f'"{old}"')
    assert '"_target_": "training.' in text
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    networks = []
    for config in (json.loads(text), json.loads((bundle / "configs" / "inference.json").read_text())):
        parser = ConfigParser()
        parser.read_config(config)
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(state)
        networks.append(network)
    old, new = networks
    assert type(old) is type(new) and type(new).__module__.startswith("workers.models.")


def test_segmentation_bundle_metadata_declares_labels_and_held_out_figures() -> None:
    node = json.loads((SEGMENTER / "configs" / "metadata.json").read_text())["dicom_node"]
    assert node["kind"] == "segmentation"
    assert [label["name"] for label in node["labels"]] == ["body", "lung", "heart", "bone", "nodule"]
    held_out = node["evaluation"]["held_out"]
    assert held_out["cases"] == 32 and held_out["dice"]["lung"] >= 0.95  # the shipped lung target
    assert held_out["cases_with_label"]["nodule"] == 24 and held_out["dice_pooled"]["nodule"] >= 0.9
    assert held_out["dice_cases_with_label"]["nodule"] >= 0.7  # the shipped nodule target, per case with nodules
    assert held_out["dice"]["nodule"] >= 0.7  # over all 32 cases, a nodule-free case scoring 1 when left empty
    assert held_out["false_positive_cases"]["nodule"] <= 2  # of the 8 cases without nodules
    # Lesion-wise: the nodules >= 8 mm are found, each segmented on its own, and the small-nodule stage finds
    # some of those under 6 mm (the branch alone found 1 of 25).
    nodules = held_out["lesions"]["nodule"]
    bands = {band["band"]: band for band in nodules["size_bands"]}
    assert nodules["lesions"] == sum(band["lesions"] for band in bands.values()) > 0
    assert bands[">= 8 mm"]["sensitivity"] >= 0.9 and bands[">= 8 mm"]["mean_dice"] >= 0.8
    assert bands["< 6 mm"]["found"] >= 8
    assert nodules["found"] >= 44 and nodules["false_positive_lesions_per_case"] <= 0.2


def test_segmentation_bundle_mirrors_its_nodule_branch_unless_overridden() -> None:
    """The shipped network averages the branch over x, y and z mirror images; a MONAI override turns that off."""
    from workers.models.segmentation_networks import AnatomyWithNoduleBranch

    def network(overrides: dict[str, object]) -> AnatomyWithNoduleBranch:
        parser = ConfigParser()
        parser.read_config(str(SEGMENTER / "configs" / "inference.json"))
        for key, value in overrides.items():
            parser[key] = value
        built = parser.get_parsed_content("network_def")
        assert isinstance(built, AnatomyWithNoduleBranch)
        return built

    assert network({}).nodule_mirror_axes == (0, 1, 2)
    assert network({"network_def#nodule_mirror_axes": []}).nodule_mirror_axes == ()
    metrics = json.loads((SEGMENTER / "metrics_nodule_branch.json").read_text())
    # Threshold and size filter are the ones the trainer's selection picks with mirroring on its validation cases.
    inference = json.loads((SEGMENTER / "configs" / "inference.json").read_text())
    assert inference["network_def"]["nodule_threshold"] == metrics["nodule_threshold"]
    [size_filter] = [step for step in inference["postprocessing"]["transforms"] if "min_voxels" in step]
    assert size_filter["min_voxels"] == metrics["nodule_min_voxels"]
    table = metrics["validation_dice_by_threshold"]
    chosen = table[f"{metrics['nodule_threshold']} min {metrics['nodule_min_voxels']}"]["all_cases"]
    assert chosen == max(entry["all_cases"] for entry in table.values())


def test_segmentation_bundle_adds_small_nodules_with_the_thresholds_its_validation_chose() -> None:
    """The shipped network has a small-nodule stage; its thresholds and the size filter's exemption are recorded."""
    from workers.models.segmentation_networks import CERTAIN_NODULE_PROBABILITY, AnatomyWithNoduleBranch
    from workers.models.small_nodules import SmallNoduleStage

    parser = ConfigParser()
    parser.read_config(str(SEGMENTER / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, AnatomyWithNoduleBranch) and isinstance(network.small_nodules, SmallNoduleStage)
    metrics = json.loads((SEGMENTER / "metrics.json").read_text())
    assert metrics["kind"] == "small-nodule-stage"
    assert network.small_nodules.candidate_threshold == metrics["candidate_threshold"]
    table = metrics["validation_dice_by_thresholds"]
    chosen = table[f"{metrics['candidate_threshold']} accept {metrics['accept_threshold']}"]["all_cases"]
    assert chosen == max(entry["all_cases"] for entry in table.values())
    assert chosen > metrics["validation_dice_without_stage"]["all_cases"]
    inference = json.loads((SEGMENTER / "configs" / "inference.json").read_text())
    [size_filter] = [step for step in inference["postprocessing"]["transforms"] if "min_voxels" in step]
    assert size_filter["keep_probability"] == CERTAIN_NODULE_PROBABILITY


def test_segmentation_bundle_runs_with_monai_and_finds_the_lungs_and_nodule_of_a_new_phantom(tmp_path: Path) -> None:
    """MONAI's own bundle API, on a phantom it never saw: lungs, heart and a solid nodule where the phantom has them."""
    from monai.transforms import Compose, SaveImaged

    from training.data.decathlon import write_decathlon_case
    from training.metrics import dice_per_label

    torch.set_num_threads(1)
    config = PhantomConfig(nodule_count=(1, 1), nodule_diameter_mm=(12.0, 16.0), nodule_kind_weights=(1.0, 0.0, 0.0))
    phantom = generate_chest_phantom(config, seed=777_001)
    assert len(phantom.nodules) == 1
    write_decathlon_case(tmp_path, "case", phantom)
    parser = ConfigParser()
    parser.read_config(SEGMENTER / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(SEGMENTER / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "imagesTr" / "case.nii.gz")})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    post = parser.get_parsed_content("postprocessing")
    data = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])(data)
    pred = np.asarray(data["pred"][0]).round().astype(np.uint8)
    import nibabel

    reference = np.asarray(nibabel.load(tmp_path / "labelsTr" / "case.nii.gz").dataobj).astype(np.uint8)
    assert pred.shape == reference.shape
    lung, heart, nodule = (label_by_name(name).value for name in ("lung", "heart", "nodule"))
    dice = dice_per_label(pred, reference, [lung, heart, nodule])
    assert dice[lung] > 0.9 and dice[heart] > 0.8 and dice[nodule] > 0.6, dice
