"""Segmentation training, its MONAI bundle and the bundle's use outside the product.

One tiny training run (3 phantoms of 24x48x48 voxels, 3 epochs on 32x32x16
patches) is shared by the module's tests: the loss must fall, the records and
plots must be written, and the exported bundle must load through MONAI's bundle
API, run under ``python -m monai.bundle run`` and carry SNOMED-coded labels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from training.bundle import read_bundle_metadata
from training.labels import CHEST_LABELS
from training.phantoms.chest import PhantomConfig
from training.phantoms.dataset import write_phantom_dataset
from training.segmentation import train_segmentation

PATCH = (32, 32, 16)  # x, y, z voxels
SPACING_XYZ = (7.3, 7.3, 10.0)  # the phantoms' grid, so resampling is (nearly) the identity
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = PhantomConfig(shape=(24, 48, 48), spacing_mm=(SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]))
    return write_phantom_dataset(tmp_path_factory.mktemp("seg_dataset"), 3, seed=7, config=config, dicom=False)


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> dict[str, Any]:
    bundle = tmp_path_factory.mktemp("seg_bundle") / "bundle"
    record = train_segmentation(
        tiny_dataset,
        bundle,
        epochs=3,
        seed=0,
        patch_size=PATCH,
        batch_size=2,
        learning_rate=5e-3,
        val_fraction=0.34,
        spacing_mm=SPACING_XYZ,
        init_filters=8,
        progress=False,
    )
    return {"record": record, "bundle": bundle, "dataset": tiny_dataset}


def test_training_reduces_loss_and_writes_metrics_and_plots(trained: dict[str, Any]) -> None:
    bundle: Path = trained["bundle"]
    metrics = json.loads((bundle / "metrics.json").read_text())
    losses = [epoch["loss"] for epoch in metrics["epochs"]]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert metrics["device"] == "cpu"
    assert metrics["training_seconds"] > 0
    assert len(metrics["train_cases"]) == 2 and len(metrics["validation_cases"]) == 1
    last = metrics["epochs"][-1]
    assert set(last["validation_dice"]) == {spec.name for spec in CHEST_LABELS}
    assert all(0.0 <= v <= 1.0 for v in last["validation_dice"].values())
    assert metrics["best_epoch"] in (1, 2, 3)
    for name in ("loss.png", "dice.png", "validation_slices.png"):
        data = (bundle / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name


def test_bundle_loads_with_monai_bundle_api_and_torchscript_matches(trained: dict[str, Any]) -> None:
    from monai.bundle import ConfigParser

    bundle: Path = trained["bundle"]
    assert {p.name for p in (bundle / "configs").iterdir()} >= {"inference.json", "metadata.json"}
    assert (bundle / "docs" / "README.md").read_text().startswith("# ")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu")
    scripted.eval()
    x = torch.rand(1, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = network(x), scripted(x)
    assert expected.shape == (1, len(CHEST_LABELS) + 1, *PATCH)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The bundle's own preprocessing and inferer parse too (what a worker uses).
    assert type(parser.get_parsed_content("inferer")).__name__ == "SlidingWindowInferer"


def test_monai_bundle_run_writes_a_label_map_on_the_input_grid(trained: dict[str, Any], tmp_path: Path) -> None:
    bundle: Path = trained["bundle"]
    image = sorted((trained["dataset"] / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(bundle / "configs" / "inference.json"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--bundle_root", str(bundle),
        "--datalist", repr([str(image)]),
        "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(out.rglob("*.nii.gz"))
    assert len(written) == 1, written
    source, result = nib.load(image), nib.load(written[0])
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    values = np.unique(np.asarray(result.dataobj))
    assert set(values.tolist()) <= set(range(len(CHEST_LABELS) + 1))


def test_metadata_carries_snomed_coded_labels_and_monai_fields(trained: dict[str, Any]) -> None:
    meta = read_bundle_metadata(trained["bundle"])
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright"):
        assert meta[key], key
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "hounsfield" and image["modality"] == "CT" and image["num_channels"] == 1
    assert image["spatial_shape"] == list(PATCH)
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "background", **{str(s.value): s.name for s in CHEST_LABELS}}
    node = meta["dicom_node"]
    assert node["kind"] == "segmentation"
    assert node["input"] == {"modality": "CT", "spacing_mm": list(SPACING_XYZ),
                             "intensity_window_hu": [-1000.0, 500.0]}
    assert [entry["value"] for entry in node["labels"]] == [s.value for s in CHEST_LABELS]
    for entry, spec in zip(node["labels"], CHEST_LABELS):
        assert entry["name"] == spec.name
        assert entry["code"] == {"value": spec.code_value, "scheme": "SCT", "meaning": spec.code_meaning}
        assert entry["category"] == {"value": spec.category_value, "scheme": "SCT", "meaning": spec.category_meaning}
        assert entry["color_rgb"] == list(spec.color_rgb)
    assert node["evaluation"]["split"] == "validation"
    assert set(node["evaluation"]["dice"]) == {s.name for s in CHEST_LABELS}
    assert node["torchscript"] == {"written": True, "method": "script"}


def test_evaluate_through_the_cli_scores_every_case_and_records_held_out(trained: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    from training.cli import main

    out = tmp_path / "evaluation"
    code = main(["evaluate", "--bundle", str(trained["bundle"]), "--dataset", str(trained["dataset"]),
                 "--out", str(out), "--record"])
    assert code == 0
    result = json.loads((out / "segmentation_evaluation.json").read_text())
    assert result["cases"] == 3 and len(result["per_case"]) == 3
    assert set(result["dice"]) == {s.name for s in CHEST_LABELS}
    assert (out / "overlay.png").read_bytes().startswith(PNG_MAGIC)
    held_out = read_bundle_metadata(trained["bundle"])["dicom_node"]["evaluation"]["held_out"]
    assert held_out["dice"] == result["dice"] and held_out["cases"] == 3
    # Lesion-wise figures for the lesion label only, one entry per reference nodule (26-connected region).
    assert set(result["lesions"]) == {"nodule"} and held_out["lesions"] == result["lesions"]
    expected = 0
    for case in result["per_case"]:
        reference = np.asarray(nib.load(trained["dataset"] / "labelsTr" / f"{case['case']}.nii.gz").dataobj) == 5
        count = ndimage.label(reference, structure=np.ones((3, 3, 3)))[1]
        assert len(case["lesions"]["nodule"]) == count
        expected += count
    nodules = result["lesions"]["nodule"]
    assert nodules["lesions"] == expected > 0
    # Each lesion's centre is given in RAS mm, the world of boxes.json: a phantom nodule's centre lies there.
    boxes = json.loads((trained["dataset"] / "boxes.json").read_text())
    centres = {Path(e["image"]).name.split(".")[0]: np.array([b[:3] for b in e["box"]]).reshape(-1, 3)
               for split in boxes.values() for e in split}
    wide = [(case["case"], lesion) for case in result["per_case"] for lesion in case["lesions"]["nodule"]
            if lesion["voxels"] >= 8]  # a centre of mass a few voxels wide is a fair estimate of the centre
    assert wide
    for name, lesion in wide:
        distance = np.linalg.norm(centres[name] - lesion["centre_ras_mm"], axis=1).min()
        assert distance < np.linalg.norm(SPACING_XYZ)  # within a voxel's diagonal
    assert (out / "lesions.png").read_bytes().startswith(PNG_MAGIC)
    assert sum(band["lesions"] for band in nodules["size_bands"]) == expected
    assert 0 <= nodules["found"] <= expected


def test_training_is_deterministic_for_a_seed(trained: dict[str, Any], tmp_path: Path) -> None:
    """Same seed, same data: the first optimiser steps see the same patches and weights."""
    again = train_segmentation(
        trained["dataset"], tmp_path / "again", epochs=1, seed=0, patch_size=PATCH, batch_size=2,
        learning_rate=5e-3, val_fraction=0.34, spacing_mm=SPACING_XYZ, init_filters=8, progress=False,
    )
    first = trained["record"]["epochs"][0]["step_losses"]
    assert again["validation_cases"] == trained["record"]["validation_cases"]
    # The learning-rate schedule depends on the number of epochs, so only the first step must match.
    assert again["epochs"][0]["step_losses"][0] == pytest.approx(first[0], rel=1e-6)


def test_fine_tuning_starts_from_the_given_bundle(trained: dict[str, Any], tmp_path: Path) -> None:
    """A second stage starts where the first ended: its first loss is the trained network's, not a random one's."""
    kwargs: dict[str, Any] = dict(epochs=1, seed=0, patch_size=PATCH, batch_size=2, learning_rate=1e-3,
                                  val_fraction=0.34, spacing_mm=SPACING_XYZ, init_filters=8, progress=False)
    scratch = train_segmentation(trained["dataset"], tmp_path / "scratch", **kwargs)
    tuned = train_segmentation(trained["dataset"], tmp_path / "tuned", init_bundle=trained["bundle"], **kwargs)
    assert tuned["epochs"][0]["step_losses"][0] < scratch["epochs"][0]["step_losses"][0]
    assert tuned["settings"]["init_bundle"] == str(trained["bundle"])
    with pytest.raises(FileNotFoundError, match="has no models/model.pt"):
        train_segmentation(trained["dataset"], tmp_path / "bad", init_bundle=tmp_path, **kwargs)


# --------------------------------------------------------------------------- nodule branch


@pytest.fixture(scope="module")
def branched(trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny bundle above with a nodule branch trained on the same phantoms."""
    from training.segmentation.nodule_branch import train_nodule_branch

    bundle = tmp_path_factory.mktemp("branch_bundle") / "bundle"
    record = train_nodule_branch(trained["dataset"], bundle, base_bundle=trained["bundle"], epochs=3, seed=0,
                                 patch_size=PATCH, batch_size=2, learning_rate=5e-3, val_fraction=0.34,
                                 progress=False)
    return {"record": record, "bundle": bundle, "dataset": trained["dataset"]}


def _parsed_network(bundle: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return network.eval()


def test_nodule_branch_learns_and_leaves_the_anatomy_network_as_it_was(
    trained: dict[str, Any], branched: dict[str, Any]
) -> None:
    from workers.models.segmentation_networks import AnatomyWithNoduleBranch

    bundle: Path = branched["bundle"]
    metrics = json.loads((bundle / "metrics.json").read_text())
    losses = [epoch["loss"] for epoch in metrics["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert metrics["base_bundle"] == str(trained["bundle"])
    assert set(metrics["epochs"][-1]["validation_dice"]) == {"nodule"}
    for name in ("loss.png", "dice.png", "validation_slices.png"):
        assert (bundle / "plots" / name).read_bytes().startswith(PNG_MAGIC), name

    joined, base = _parsed_network(bundle), _parsed_network(trained["bundle"])
    assert isinstance(joined, AnatomyWithNoduleBranch)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(joined.anatomy.state_dict()[name], value, rtol=0, atol=0)
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu").eval()
    x = torch.rand(1, 1, *PATCH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), joined(x), rtol=1e-5, atol=1e-5)
        assert joined(x).shape == base(x).shape
        # Everything but the nodule channel is the anatomy network's own ranking.
        torch.testing.assert_close(joined(x)[:, :5].softmax(1), base(x)[:, :5].softmax(1), rtol=1e-4, atol=1e-5)

    meta = read_bundle_metadata(bundle)
    assert [label["name"] for label in meta["dicom_node"]["labels"]] == [s.name for s in CHEST_LABELS]
    assert meta["training"]["nodule_branch"]["epochs"] == 3 and "anatomy" in meta["training"]
    # By default nodule patches are centred up to half the patch (32, 32, 16) less 4 voxels from the nodule.
    assert (meta["training"]["nodule_branch"]["nodule_patch_centres"]
            == "each nodule equally often, up to [12, 12, 4] voxels from it")
    assert "held_out" not in meta["dicom_node"]["evaluation"]  # the base's figures describe another network
    # By default the exported network averages the branch over the input and its mirror images in x, y and z
    # (model.ts above agrees with it), and records that.
    assert joined.nodule_mirror_axes == (0, 1, 2)
    assert json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]["nodule_mirror_axes"] == [
        0, 1, 2]
    assert meta["training"]["nodule_branch"]["nodule_mirror_axes"] == [0, 1, 2]

    # The size filter chosen on validation is in the bundle's postprocessing, before the argmax, when it filters.
    steps = [step["_target_"] for step in
             json.loads((bundle / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]]
    choice = f"{metrics['nodule_threshold']} min {metrics['nodule_min_voxels']}"
    chosen = metrics["validation_dice_by_threshold"][choice]
    assert chosen["all_cases"] == pytest.approx(metrics["best_validation_mean_dice"])
    if metrics["nodule_min_voxels"] > 1:
        assert steps[:3] == ["Activationsd", "workers.models.postprocessing.DropSmallComponentsd", "AsDiscreted"]
    else:
        assert "workers.models.postprocessing.DropSmallComponentsd" not in steps
    # The anatomy bundle's filter of organs outside the body (after the argmax) is kept by the joined bundle.
    assert steps[steps.index("AsDiscreted") + 1] == "workers.models.postprocessing.KeepInsideBodyd"


def test_joined_bundle_runs_in_the_node_and_under_monai_bundle_run(branched: dict[str, Any], tmp_path: Path) -> None:
    from workers.models.monai_bundle import MonaiBundleModel

    bundle: Path = branched["bundle"]
    model = MonaiBundleModel(bundle)
    assert [label.name for label in model.labels] == [s.name for s in CHEST_LABELS]
    image = sorted((branched["dataset"] / "imagesTr").glob("*.nii.gz"))[0]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
               "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
               "--datalist", repr([str(image)]), "--output_dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = sorted(tmp_path.rglob("*.nii.gz"))
    assert nib.load(written).shape == nib.load(image).shape


def test_nodule_branch_retrains_on_a_joined_bundle_and_refuses_bad_bases(
    branched: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.cli import main
    from training.segmentation.nodule_branch import train_nodule_branch

    again = train_nodule_branch(branched["dataset"], tmp_path / "again", base_bundle=branched["bundle"], epochs=1,
                                seed=0, patch_size=PATCH, batch_size=2, val_fraction=0.34, progress=False)
    first = branched["record"]["epochs"][0]["step_losses"][0]
    assert again["epochs"][0]["step_losses"][0] == pytest.approx(first, rel=1e-6)  # same anatomy, fresh branch
    with pytest.raises(FileNotFoundError, match="has no configs/inference.json"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", base_bundle=tmp_path, epochs=1, progress=False)
    args = ["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(tmp_path / "cli")]
    assert main(args) == 2
    assert main([*args, "--base-bundle", str(branched["bundle"]), "--init-filters", "16"]) == 2
    one_epoch = ["--base-bundle", str(branched["bundle"]), "--epochs", "1", "--patch-size", *map(str, PATCH),
                 "--batch-size", "2", "--val-fraction", "0.34"]
    assert main([*args, *one_epoch, "--nodule-sampling", "per-voxel", "--mirror-axes"]) == 0
    settings = json.loads((tmp_path / "cli" / "metrics.json").read_text())["settings"]
    assert settings["nodule_patch_centres"] == "each nodule voxel equally often"
    assert settings["nodule_mirror_axes"] == []  # --mirror-axes without a value: no mirroring, nothing exported
    assert "nodule_mirror_axes" not in json.loads((tmp_path / "cli" / "configs" / "inference.json").read_text())[
        "network_def"]
    centred = ["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(tmp_path / "centred")]
    assert main([*centred, *one_epoch, "--nodule-sampling", "per-nodule", "--mirror-axes", "2"]) == 0
    settings = json.loads((tmp_path / "centred" / "metrics.json").read_text())["settings"]
    assert settings["nodule_patch_centres"] == "each nodule equally often"
    assert _parsed_network(tmp_path / "centred").nodule_mirror_axes == (2,)
    full = ["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(tmp_path / "full")]
    assert main([*full, *one_epoch, "--mirror-axes", "--full-resolution-channels", "4"]) == 0
    branch_def = json.loads((tmp_path / "full" / "configs" / "inference.json").read_text())["network_def"]["nodule"]
    assert branch_def["channels"][0] == 4 and branch_def["strides"][0] == 1
    assert read_bundle_metadata(tmp_path / "full")["training"]["nodule_branch"]["network"] == branch_def
    refused_out = tmp_path / "negative"
    assert main([*args[:-1], str(refused_out), *one_epoch, "--full-resolution-channels", "-1"]) == 2
    assert "full_resolution_channels must be >= 0, got -1" in capsys.readouterr().err and not refused_out.exists()
    with pytest.raises(SystemExit) as refused:  # argparse names the choices
        main([*centred, *one_epoch, "--mirror-axes", "3"])
    assert refused.value.code == 2
    with pytest.raises(ValueError, match=r"mirror axes must be distinct spatial axes .*, got \(0, 0\)"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", base_bundle=branched["bundle"], epochs=1,
                            nodule_mirror_axes=(0, 0), progress=False)
    with pytest.raises(ValueError, match="nodule_sampling must be one of .*, got 'centred'"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", base_bundle=branched["bundle"], epochs=1,
                            nodule_sampling="centred", progress=False)
    steps = [step["_target_"] for step in
             json.loads((tmp_path / "cli" / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]]
    assert steps.count("workers.models.postprocessing.DropSmallComponentsd") <= 1  # a filter of the base is replaced
    # The joined base's own branch leaves no trace in the new metadata.
    meta = read_bundle_metadata(tmp_path / "cli")
    assert meta["description"].count("binary 3D UNet branch") == 1
    assert set(meta["training"]) == {"anatomy", "nodule_branch"} and "nodule_branch" not in meta["training"]["anatomy"]
    segmentation = ["train", "segmentation", "--dataset", str(branched["dataset"]), "--out", str(tmp_path / "seg")]
    assert main([*segmentation, "--nodule-sampling", "per-nodule"]) == 2
    assert main([*segmentation, "--lesion-loss-weight", "1"]) == 2
    assert main([*segmentation, "--mirror-axes", "0"]) == 2
    assert main([*segmentation, "--full-resolution-channels", "8"]) == 2


def test_nodule_branch_fine_tunes_from_a_joined_bundle_with_the_per_lesion_loss(
    trained: dict[str, Any], branched: dict[str, Any], tmp_path: Path
) -> None:
    from monai.bundle import ConfigParser

    from training.cli import main
    from training.segmentation.nodule_branch import train_nodule_branch

    common: dict[str, Any] = dict(base_bundle=branched["bundle"], epochs=1, seed=0, patch_size=PATCH, batch_size=2,
                                  val_fraction=0.34, progress=False)
    fresh = train_nodule_branch(branched["dataset"], tmp_path / "fresh", **common)
    tuned = train_nodule_branch(branched["dataset"], tmp_path / "tuned", init_bundle=branched["bundle"], **common)
    # Same patches (same seed); the trained branch starts with a lower loss than a random one.
    assert tuned["epochs"][0]["step_losses"][0] < fresh["epochs"][0]["step_losses"][0]
    assert tuned["settings"]["init_bundle"] == str(branched["bundle"]) and fresh["settings"]["init_bundle"] is None
    with pytest.raises(ValueError, match="has no nodule branch to start from"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", init_bundle=trained["bundle"], **common)
    # A joined bundle whose branch is another network: named, not a traceback.
    narrow = tmp_path / "narrow"
    shutil.copytree(branched["bundle"], narrow)
    inference = json.loads((narrow / "configs" / "inference.json").read_text())
    inference["network_def"]["nodule"]["channels"] = [8, 16, 32, 64]
    (narrow / "configs" / "inference.json").write_text(json.dumps(inference))
    with pytest.raises(ValueError, match=f"init bundle {narrow} cannot be loaded: Error"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", init_bundle=narrow, **common)
    parser = ConfigParser()
    parser.read_config(str(narrow / "configs" / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), narrow / "models" / "model.pt")  # consistent
    with pytest.raises(ValueError, match=f"init bundle {narrow}'s nodule branch does not fit this trainer's"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", init_bundle=narrow, **common)
    with pytest.raises(ValueError, match="lesion_loss_weight must be a finite number >= 0, got -1"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", lesion_loss_weight=-1, **common)

    out = tmp_path / "cli"
    assert main(["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(out),
                 "--base-bundle", str(branched["bundle"]), "--init-bundle", str(branched["bundle"]),
                 "--lesion-loss-weight", "2", "--epochs", "1", "--patch-size", *map(str, PATCH),
                 "--batch-size", "2", "--val-fraction", "0.34", "--no-progress"]) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["lesion_loss_weight"] == 2.0 and settings["loss"].endswith("+ 2 x per-lesion Dice")
    meta = read_bundle_metadata(out)
    assert "and a per-lesion Dice term" in meta["description"]
    assert meta["training"]["nodule_branch"]["init_bundle"] == str(branched["bundle"])


def test_nodule_branch_on_a_finer_grid_pools_for_the_anatomy_network(
    trained: dict[str, Any], branched: dict[str, Any], tmp_path: Path
) -> None:
    from training.cli import main
    from training.segmentation.nodule_branch import train_nodule_branch
    from workers.models.segmentation_networks import AnatomyWithNoduleBranch

    fine = tuple(v / 2 for v in SPACING_XYZ)
    out = tmp_path / "fine"
    assert main(["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(out),
                 "--base-bundle", str(branched["bundle"]), "--spacing", *map(str, fine), "--epochs", "1",
                 "--patch-size", *map(str, PATCH), "--batch-size", "2", "--val-fraction", "0.34",
                 "--no-progress"]) == 0
    meta = read_bundle_metadata(out)
    assert meta["dicom_node"]["input"]["spacing_mm"] == list(fine)
    assert "average-pooled to its own 7.3 x 7.3 x 10 mm grid" in meta["description"]
    inference = json.loads((out / "configs" / "inference.json").read_text())
    base_roi = json.loads((trained["bundle"] / "configs" / "inference.json").read_text())["inferer"]["roi_size"]
    assert inference["inferer"]["roi_size"] == [2 * v for v in base_roi]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [2 * v for v in base_roi]
    [resample] = [s for s in inference["preprocessing"]["transforms"] if s["_target_"] == "Spacingd"]
    assert resample["pixdim"] == list(fine)
    # Size filters are tried in mm³: up to 72 mm³, here 1 and 2 voxels of 66.6 mm³.
    tried = json.loads((out / "metrics.json").read_text())["validation_dice_by_threshold"]
    assert {int(key.split(" min ")[1]) for key in tried} == {1, 2}

    joined, base = _parsed_network(out), _parsed_network(trained["bundle"])
    assert isinstance(joined, AnatomyWithNoduleBranch) and joined.anatomy_pool == (2, 2, 2)
    x = torch.rand(1, 1, *(2 * v for v in PATCH), generator=torch.Generator().manual_seed(5))
    scripted = torch.jit.load(str(out / "models" / "model.ts"), map_location="cpu").eval()
    with torch.no_grad():
        y = joined(x)
        torch.testing.assert_close(scripted(x), y, rtol=1e-5, atol=1e-5)
        assert y.shape == (1, 6, *x.shape[2:])
        # The anatomy channels are the base network's on the pooled input, interpolated back to the fine grid.
        coarse = base(torch.nn.functional.avg_pool3d(x, 2))
        upsampled = torch.nn.functional.interpolate(coarse, size=x.shape[2:], mode="trilinear")
        torch.testing.assert_close(y[:, :5].softmax(1), upsampled[:, :5].softmax(1), rtol=1e-4, atol=1e-5)

    # MONAI runs it on a NIfTI; the label map comes back on the input's own grid.
    image = sorted((branched["dataset"] / "imagesTr").glob("*.nii.gz"))[0]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(out / "configs" / "inference.json"),
               "--meta_file", str(out / "configs" / "metadata.json"), "--bundle_root", str(out),
               "--datalist", repr([str(image)]), "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = sorted((tmp_path / "run").rglob("*.nii.gz"))
    assert nib.load(written).shape == nib.load(image).shape

    # Retraining on the fine joined bundle finds the anatomy's own grid under it; a grid that does not divide it
    # is named.
    again = tmp_path / "again"
    assert main(["train", "nodule-branch", "--dataset", str(branched["dataset"]), "--out", str(again),
                 "--base-bundle", str(out), "--epochs", "1", "--patch-size", *map(str, PATCH), "--batch-size",
                 "2", "--val-fraction", "0.34", "--no-progress"]) == 0
    assert read_bundle_metadata(again)["dicom_node"]["input"]["spacing_mm"] == list(SPACING_XYZ)
    assert _parsed_network(again).anatomy_pool == (1, 1, 1)
    with pytest.raises(ValueError, match=r"must divide the base bundle's spacing \(7.3, 7.3, 10.0\) mm by whole"):
        train_nodule_branch(branched["dataset"], tmp_path / "bad", base_bundle=out, spacing_mm=(3.0, 3.65, 5.0),
                            epochs=1, patch_size=PATCH, progress=False)


def test_small_nodule_stage_trains_on_a_joined_bundle_and_exports_with_it(
    trained: dict[str, Any], branched: dict[str, Any], tmp_path: Path
) -> None:
    from training.segmentation.small_nodules import train_small_nodule_stage
    from workers.models.monai_bundle import MonaiBundleModel
    from workers.models.segmentation_networks import CERTAIN_NODULE_PROBABILITY, AnatomyWithNoduleBranch
    from workers.models.small_nodules import SmallNoduleStage

    # Phantoms with 2-3 nodules of 10-20 mm each: on this coarse grid (7.3 mm) they are the blobs that the
    # stage's candidates need; the stage resamples them to the base bundle's grid as any dataset.
    config = PhantomConfig(shape=(24, 48, 48), spacing_mm=(SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]),
                           nodule_count=(2, 3), nodule_diameter_mm=(10.0, 20.0))
    dataset = write_phantom_dataset(tmp_path / "nodules", 4, seed=11, config=config, dicom=False)
    bundle = tmp_path / "staged"
    record = train_small_nodule_stage(dataset, bundle, base_bundle=branched["bundle"], epochs=3,
                                      batch_size=8, val_fraction=0.25, seed=0, progress=False)
    losses = [epoch["loss"] for epoch in record["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0 < record["candidates"]["nodules"] < record["candidates"]["total"]
    chosen = record["validation_dice_by_thresholds"][f"{record['candidate_threshold']} accept "
                                                     f"{record['accept_threshold']}"]
    assert chosen == record["best_validation_dice"]
    # The stage is picked by its validation Dice, so it never scores below the bundle without it.
    assert chosen["all_cases"] >= record["validation_dice_without_stage"]["all_cases"]

    joined, base = _parsed_network(bundle), _parsed_network(branched["bundle"])
    assert isinstance(joined, AnatomyWithNoduleBranch) and isinstance(joined.small_nodules, SmallNoduleStage)
    assert joined.small_nodules.candidate_threshold == record["candidate_threshold"]
    for name, value in base.state_dict().items():  # anatomy and branch are the base's
        torch.testing.assert_close(joined.state_dict()[name], value, rtol=0, atol=0)
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu").eval()
    x = torch.rand(1, 1, *PATCH, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), joined(x), rtol=1e-5, atol=1e-5)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["small_nodules"]["accept_threshold"] == record["accept_threshold"]
    for step in inference["postprocessing"]["transforms"]:
        if step["_target_"] == "workers.models.postprocessing.DropSmallComponentsd":
            assert step["keep_probability"] == CERTAIN_NODULE_PROBABILITY
    meta = read_bundle_metadata(bundle)
    assert meta["training"]["small_nodule_stage"]["candidates"] == record["candidates"]
    assert "nodule_branch" in meta["training"] and "held_out" not in meta["dicom_node"]["evaluation"]
    assert "small-nodule stage" in meta["description"]
    # The branch's own training record goes along.
    assert (bundle / "metrics_nodule_branch.json").read_text() == (branched["bundle"] / "metrics.json").read_text()
    assert [label.name for label in MonaiBundleModel(bundle).labels] == [s.name for s in CHEST_LABELS]

    with pytest.raises(ValueError, match="has no nodule branch"):
        train_small_nodule_stage(dataset, tmp_path / "bad", base_bundle=trained["bundle"], epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        train_small_nodule_stage(dataset, tmp_path / "bad", base_bundle=bundle, batch_size=1, progress=False)
