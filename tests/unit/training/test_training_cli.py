"""The training command line (training.cli) as the product CLI mounts it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.zoo import model_zoo_bundle
from training.cli import (
    add_phantom_command,
    add_training_commands,
    evaluate_command,
    main,
    phantom_command,
    train_command,
)



def _parser() -> argparse.ArgumentParser:
    """A product-like parser: its own commands plus the mounted training ones."""
    parser = argparse.ArgumentParser(prog="dicom-node")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve")
    add_training_commands(commands)
    add_phantom_command(commands)
    return parser


def test_train_parses_common_and_kind_specific_options() -> None:
    args = _parser().parse_args(
        ["train", "segmentation", "--dataset", "d", "--out", "b", "--epochs", "3", "--device", "cuda",
         "--seed", "5", "--batch-size", "4", "--learning-rate", "0.001", "--patch-size", "64", "64", "48",
         "--spacing", "2.2", "2.2", "2.5", "--init-filters", "16"]
    )
    assert args.handler is train_command
    assert (args.kind, args.dataset, args.out, args.epochs, args.device, args.seed) == (
        "segmentation", Path("d"), Path("b"), 3, "cuda", 5)
    assert (args.batch_size, args.learning_rate, args.patch_size, args.spacing, args.init_filters) == (
        4, 0.001, [64, 64, 48], [2.2, 2.2, 2.5], 16)
    detection = _parser().parse_args(["train", "detection", "--dataset", "d", "--out", "b", "--steps-per-epoch", "8"])
    assert (detection.kind, detection.steps_per_epoch, detection.epochs) == ("detection", 8, None)
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "classification", "--dataset", "d", "--out", "b"])


def test_evaluate_and_phantom_parse() -> None:
    args = _parser().parse_args(["evaluate", "--bundle", "b", "--dataset", "d", "--device", "cpu"])
    assert args.handler is evaluate_command and args.bundle == Path("b") and not args.record
    args = _parser().parse_args(["phantom", "--out", "o", "--cases", "2"])
    assert args.handler is phantom_command and (args.cases, args.seed, args.no_dicom) == (2, 0, False)


def test_options_of_the_other_kind_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "segmentation", "--dataset", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--steps-per-epoch", "3"])
    assert code == 2 and "--steps-per-epoch" in capsys.readouterr().err
    code = main(["train", "detection", "--dataset", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--patch-size", "32", "32", "32"])
    assert code == 2 and "--patch-size" in capsys.readouterr().err
    code = main(["train", "small-nodules", "--dataset", str(tmp_path), "--out", str(tmp_path / "b")])
    assert code == 2 and "--base-bundle is required when training small-nodules" in capsys.readouterr().err
    code = main(["train", "small-nodules", "--dataset", str(tmp_path), "--out", str(tmp_path / "b"),
                 "--base-bundle", str(tmp_path), "--val-interval", "2", "--mirror-axes", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--mirror-axes" in err and "--val-interval" in err and "small-nodules" in err
    assert not (tmp_path / "b").exists()


def test_missing_dataset_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "segmentation", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_evaluate_needs_a_dicom_node_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--bundle", str(model_zoo_bundle("spleen_ct_segmentation")), "--dataset", str(tmp_path)])
    assert code == 2 and "dicom_node.kind" in capsys.readouterr().err
    assert main(["evaluate", "--bundle", str(tmp_path / "none"), "--dataset", str(tmp_path)]) == 2


def test_phantom_writes_a_decathlon_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "phantoms"
    assert main(["phantom", "--out", str(out), "--cases", "1", "--seed", "3", "--no-dicom"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 1
    assert (out / dataset["training"][0]["label"]).exists()
    assert main(["phantom", "--out", str(out), "--cases", "0"]) == 2


def test_phantom_on_a_thin_slice_grid_keeps_the_field_of_view(tmp_path: Path) -> None:
    """--spacing X Y Z: the same patient (same seed, same nodules) on a finer grid; --workers does not change it."""
    import nibabel as nib

    from training.data.boxes import read_box_list

    common = ["--cases", "2", "--seed", "3", "--no-dicom", "--nodules", "1", "1"]
    assert main(["phantom", "--out", str(tmp_path / "coarse"), *common, "--spacing", "11", "11", "12.5"]) == 0
    assert main(["phantom", "--out", str(tmp_path / "fine"), *common, "--spacing", "5.5", "5.5", "6.25",
                 "--workers", "2"]) == 0
    assert main(["phantom", "--out", str(tmp_path / "serial"), *common, "--spacing", "5.5", "5.5", "6.25"]) == 0
    coarse, fine = (nib.load(tmp_path / d / "imagesTr" / "chest_0001.nii.gz") for d in ("coarse", "fine"))
    assert fine.shape == (64, 64, 38) and coarse.shape == (32, 32, 19)  # x, y, z: 352 x 352 x 240 mm
    np.testing.assert_allclose(fine.header.get_zooms(), (5.5, 5.5, 6.25))
    boxes = {d: read_box_list(tmp_path / d / "boxes.json")["training"] for d in ("coarse", "fine", "serial")}
    assert boxes["fine"] == boxes["serial"]
    assert [e.diameter_mm for e in boxes["coarse"]] == [e.diameter_mm for e in boxes["fine"]]
    for name in ("imagesTr/chest_0000.nii.gz", "labelsTr/chest_0001.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "fine" / name).dataobj),
                                      np.asarray(nib.load(tmp_path / "serial" / name).dataobj))
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--cases", "1", "--spacing", "0", "1", "1"]) == 2
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--cases", "1", "--workers", "0"]) == 2


def test_module_entry_point_shows_help() -> None:
    done = subprocess.run([sys.executable, "-m", "training.cli", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0
    assert "train" in done.stdout and "evaluate" in done.stdout and "phantom" in done.stdout
