"""A small nnU-Net v2 results folder made with nnunetv2's own tools, for the nnunet loader's tests and bench.

``python tests/unit/workers/nnunet_fixtures.py ROOT [--train ITERATIONS] [--cases N]`` writes chest
phantoms as an nnUNet_raw dataset (``.nii.gz`` through SimpleITK, the coarse axis stored last so
that the plans transpose), runs nnU-Net's fingerprint extraction, planner and preprocessor, and
then either trains ``ITERATIONS`` iterations (two epochs) on the CPU with a short trainer
subclass, or (default) saves the plans' network with seeded random weights in nnU-Net's
checkpoint format. The results folder is ``ROOT/results`` (dataset.json, plans.json,
fold_0/checkpoint_final.pth). Runs in its own process because nnunetv2 reads its folders from the
environment when it is imported. :func:`build_results_folder` calls it from tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
#: Phantom grid (slices, rows, columns) and spacing (mm) of the dataset's cases; stored transposed (x, y, z).
SHAPE = (24, 64, 64)
SPACING = (10.0, 5.5, 5.5)
#: dataset.json labels: the phantom's own values.
LABELS = {"background": 0, "body": 1, "lung": 2, "heart": 3, "bone": 4, "nodule": 5}


def case_array(seed: int, shape: tuple[int, int, int] = SHAPE, spacing_mm: tuple[float, float, float] = SPACING
               ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image HU, labels, spacing) of case ``seed`` in the dataset's stored layout (x, y, z order, coarse z last).

    ``shape`` and ``spacing_mm``: the phantom's (slices, rows, columns) grid; the arrays come transposed.
    """
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom

    phantom = generate_chest_phantom(PhantomConfig(shape=shape, spacing_mm=spacing_mm, nodule_count=(1, 2)), seed=seed)
    image = phantom.volume_hu.astype(np.float32).transpose(2, 1, 0)
    labels = phantom.labels.transpose(2, 1, 0)
    return image, labels, (spacing_mm[2], spacing_mm[1], spacing_mm[0])


def build_results_folder(root: Path, train_iterations: int = 0, cases: int = 4) -> Path:
    """Run this module as a script into ``root`` (a subprocess); the trained-model folder it made."""
    command = [sys.executable, str(Path(__file__)), str(root), "--cases", str(cases)]
    if train_iterations:
        command += ["--train", str(train_iterations)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, env=env, cwd=REPO, timeout=600)
    return results_folder(root)


def results_folder(root: Path) -> Path:
    return root / "results" / "Dataset001_Phantom" / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=0, help="training iterations (0: seeded random weights)")
    parser.add_argument("--cases", type=int, default=4, help="cases (training needs 5 for its 5-fold split)")
    args = parser.parse_args()
    root: Path = args.root
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")

    import json

    import SimpleITK as sitk
    import torch

    raw = root / "raw" / "Dataset001_Phantom"
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(args.cases):
        image, labels, spacing = case_array(1000 + i)
        for array, path in ((image, raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (labels, raw / "labelsTr" / f"case_{i:03d}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(tuple(reversed(spacing)))
            sitk.WriteImage(itk, str(path))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": args.cases, "file_ending": ".nii.gz",
    }))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([1], num_processes=1, clean=True, verbose=False, show_progress_bar=False)
    plan_experiments([1])
    preprocess([1], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerTiny(nnUNetTrainer):
        """A few iterations, no final validation: enough to make real, non-random weights."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device | None = None):
            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_iterations_per_epoch = max(1, args.train // 2)
            self.num_val_iterations_per_epoch = 1
            self.num_epochs = 2

        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            return None

    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainer's data augmentation in this process, no workers
    preprocessed = root / "preprocessed" / "Dataset001_Phantom"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training sets
    torch.manual_seed(0)
    trainer = nnUNetTrainerTiny(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    if args.train:
        trainer.run_training()
    else:
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes, as training
        trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
        # what on_train_start writes beside the folds
        (Path(trainer.output_folder_base) / "plans.json").write_text(json.dumps(trainer.plans_manager.plans))
        (Path(trainer.output_folder_base) / "dataset.json").write_text(json.dumps(dataset_json))
    out = results_folder(root)
    for name in ("dataset.json", "plans.json"):
        if not (out / name).exists():
            raise SystemExit(f"nnU-Net did not write {out / name}")
    print(out)


if __name__ == "__main__":
    _main()
