"""Train and export the demo classifier "lung nodule present?" on chest phantoms (a MONAI bundle).

Why: the node serves classification models (class probabilities, an explanation map);
this trains the small one meant to show that path. Phantoms without nodules
(``nodule_count`` (0, 0)) are class 0 "nodule absent", phantoms with one to three nodules
of 18-30 mm class 1 "nodule present"; the network
(:class:`workers.models.classification_networks.SmallClassifier3D`) sees the whole field
of view resized to 48 x 48 x 24 voxels (x, y, z), the same preprocessing the node runs
(:func:`workers.models.classification.classification_preprocessing`), so training and
serving agree by construction.

Run: ``python -m training.classification.nodule_presence OUT_BUNDLE [--cache DIR]`` (writes configs, weights and a
model card with the validation figures).

What made it learn (it stayed at 0.50, a constant answer, before): the labels and inputs were
right (nodules of about -60 HU in -820 HU lung, 3-4 voxels across at 48 x 48 x 24), but
BatchNorm with batches of a few volumes trained on batch statistics and evaluated on running
statistics that did not match them (validation swung between 0.50 and 0.81 while training
accuracy rose), and average pooling diluted the one nodule over the chest. With InstanceNorm,
global max pooling only (:class:`SmallClassifier3D`), 400 training phantoms, batches of 8 and
AdamW 1e-3, the shipped run reached validation accuracy 0.99 (epoch 13 of 20) and **test accuracy
0.93** (46/50 absent, 47/50 present) in 392 s on 2 shared CPU threads, phantoms included. The epoch
is chosen on the validation phantoms (seeds 9000...); the figures of the model card come from
separate test phantoms (seeds 20000...) never used for any choice. The explanation is HiResCAM on
``features.2.conv`` (Grad-CAM on the last convolution peaked far from the nodules, see the card).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.palette import palette_colour
from training.bundle import ct_network_data_format
from training.loop import Optimisation, Validation, fit
from training.phantoms.chest import ChestPhantom, PhantomConfig, generate_chest_phantom
from workers.models.classification import classification_preprocessing
from workers.models.classification_networks import SmallClassifier3D
from workers.volume import FrameRef, Volume

__all__ = ["CLASS_LABELS", "PHANTOM_SHAPE", "PHANTOM_SPACING_MM", "main", "phantom_config", "phantom_volume", "train",
           "write_nodule_presence_bundle"]

logger = logging.getLogger(__name__)

#: The phantom grid (z, y, x): a 355 mm field of view, 240 mm scan range.
PHANTOM_SHAPE = (32, 96, 96)
PHANTOM_SPACING_MM = (7.5, 3.7, 3.7)
#: Network input (x, y, z after RAS) and HU window.
ROI_SIZE = (48, 48, 24)
WINDOW_HU = (-1000.0, 400.0)
#: Nodule sizes of the "present" class: at 7 mm voxels, nodules below about 18 mm look like the hilar vessels
#: (trained at 10-30 mm, the network stayed at chance for 12 epochs).
NODULE_DIAMETER_MM = (18.0, 30.0)
#: Solid nodules only: a ground-glass nodule (about -600 HU) averaged into 7 mm voxels of -850 HU lung is
#: too faint for a network of this size trained in minutes.
NODULE_KIND_WEIGHTS = (1.0, 0.0, 0.0)

_NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
#: The classes as the bundle's dicom_node.labels: code = the answer (CID 241 Present / Absent),
#: category = the question (SCT 27925004 Nodule), bundle_value = the network output; colours: green and
#: orange of the node's palette (:mod:`dicom_node.palette`).
CLASS_LABELS: tuple[dict[str, Any], ...] = (
    {"value": 1, "bundle_value": 0, "name": "nodule absent",
     "code": {"value": "272519000", "scheme": "SCT", "meaning": "Absent"}, "category": _NODULE,
     "color_rgb": list(palette_colour(3))},
    {"value": 2, "bundle_value": 1, "name": "nodule present",
     "code": {"value": "52101004", "scheme": "SCT", "meaning": "Present"}, "category": _NODULE,
     "color_rgb": list(palette_colour(5))},
)


def phantom_config(positive: bool) -> PhantomConfig:
    """The phantom of one class: no nodule, or one to three solid ones of 18-30 mm."""
    return PhantomConfig(shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING_MM,
                         nodule_count=(1, 3) if positive else (0, 0), nodule_diameter_mm=NODULE_DIAMETER_MM,
                         nodule_kind_weights=NODULE_KIND_WEIGHTS)


def phantom_volume(phantom: ChestPhantom, uid: str = "2.25.1") -> Volume:
    """A phantom as the workers' :class:`Volume` (axial, LPS), without writing DICOM files."""
    axes = np.asarray([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # slice, row, column directions
    return Volume(
        array=phantom.volume_hu.astype(np.float32), spacing_mm=tuple(float(v) for v in phantom.spacing_mm),
        origin_mm=tuple(float(v) for v in phantom.origin_xyz_mm), axes=axes, series_instance_uid=uid,
        study_instance_uid=uid, frame_of_reference_uid=uid, modality="CT",
        frames=tuple(FrameRef(f"{uid}.{k + 1}") for k in range(phantom.shape[0])), datasets=(),
    )


def _cases(count: int, first_seed: int, cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` network inputs (half of each class, alternating) and their classes (kept in ``cache`` if given)."""
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if len(saved["classes"]) == count:
            return saved["images"], saved["classes"]
    preprocessing = classification_preprocessing(WINDOW_HU, ROI_SIZE)
    images, classes = [], []
    for i in range(count):
        positive = i % 2 == 1
        phantom = generate_chest_phantom(phantom_config(positive), seed=first_seed + i)
        image = preprocessing({"image": _metatensor(phantom)})["image"]
        images.append(image.as_tensor().float())
        classes.append(int(positive and bool(phantom.nodules)))
    result = torch.stack(images), torch.as_tensor(classes)
    if cache is not None:
        torch.save({"images": result[0], "classes": result[1]}, cache)
    return result


def _metatensor(phantom: ChestPhantom) -> Any:
    from workers.models.monai_bundle import volume_to_metatensor

    return volume_to_metatensor(phantom_volume(phantom))


def _accuracy(network: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor) -> float:
    network.eval()
    with torch.no_grad():
        predicted = torch.cat([network(images[i:i + 16]).argmax(dim=1) for i in range(0, len(images), 16)])
    return float((predicted == classes).float().mean())


def _confusion(network: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor) -> dict[str, int]:
    """Counts of (true class, predicted class) pairs: ``{"absent_as_absent": n, "absent_as_present": n, ...}``."""
    network.eval()
    with torch.no_grad():
        predicted = torch.cat([network(images[i:i + 16]).argmax(dim=1) for i in range(0, len(images), 16)])
    names = ("absent", "present")
    return {f"{names[t]}_as_{names[p]}": int(((classes == t) & (predicted == p)).sum()) for t in (0, 1) for p in (0, 1)}


def train(train_cases: int = 400, val_cases: int = 80, test_cases: int = 100, epochs: int = 20, batch_size: int = 8,
          lr: float = 1e-3, seed: int = 0, cache_dir: Path | None = None) -> tuple[SmallClassifier3D, dict[str, Any]]:
    """Train on ``train_cases`` phantoms (seeds 1000...), choose the epoch on ``val_cases`` (seeds 9000...).

    Keeps the weights of the epoch with the best validation accuracy (the later epoch on a tie),
    then measures them on ``test_cases`` phantoms (seeds 20000...) that took part in no choice.
    Returns the network and its figures (test accuracy and confusion counts, validation accuracy,
    epochs, time).
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    train_x, train_y = _cases(train_cases, 1000, cache_dir / "train.pt" if cache_dir else None)
    val_x, val_y = _cases(val_cases, 9000, cache_dir / "val.pt" if cache_dir else None)
    test_x, test_y = _cases(test_cases, 20000, cache_dir / "test.pt" if cache_dir else None)
    logger.info("cases ready in %.1f s", time.perf_counter() - started)
    network = SmallClassifier3D(num_classes=2)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    optimisation = Optimisation(optimiser)

    def train_epoch(epoch: int) -> dict[str, Any]:
        network.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            batch = train_x[index].clone()
            flip = torch.rand(len(index), generator=generator) < 0.5  # left-right mirror: nodules on either side
            batch[flip] = batch[flip].flip(dims=(2,))
            loss = torch.nn.functional.cross_entropy(network(batch), train_y[index])
            optimisation.step(loss)
            total += float(loss.detach()) * len(index)
        return {"loss": total / len(order)}

    def validate(epoch: int) -> Validation:
        accuracy = _accuracy(network, val_x, val_y)
        return Validation(accuracy, {"validation_accuracy": accuracy}, f"accuracy {accuracy:.3f}")

    fitted = fit(network, epochs=epochs, train_epoch=train_epoch, validate=validate, ties="later",
                 name="nodule presence")
    assert fitted.best is not None  # every epoch validates
    best, best_epoch = fitted.best.score, fitted.best_epoch
    confusion = _confusion(network, test_x, test_y)
    absent = confusion["absent_as_absent"] + confusion["absent_as_present"]
    present = confusion["present_as_absent"] + confusion["present_as_present"]
    figures = {
        "test_accuracy": round((confusion["absent_as_absent"] + confusion["present_as_present"]) / len(test_y), 4),
        "test_accuracy_absent": round(confusion["absent_as_absent"] / max(absent, 1), 4),
        "test_accuracy_present": round(confusion["present_as_present"] / max(present, 1), 4),
        "test_confusion": confusion,
        "test_cases": {"absent": absent, "present": present},
        "validation_accuracy": round(best, 4),
        "validation_cases": {"absent": int((val_y == 0).sum()), "present": int((val_y == 1).sum())},
        "training_cases": len(train_x), "epochs": epochs, "best_epoch": best_epoch, "batch_size": batch_size,
        "learning_rate": lr, "training_seconds": round(time.perf_counter() - started, 1), "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    return network, figures


def _inference_config() -> dict[str, Any]:
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": WINDOW_HU[0], "a_max": WINDOW_HU[1],
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "Resized", "keys": "@image_key", "spatial_size": list(ROI_SIZE), "mode": "area"},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "workers.models.classification_networks.SmallClassifier3D", "in_channels": 1,
                        "num_classes": 2, "channels": [8, 16, 32, 48]},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
    }


def _metadata(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first version: nodule present/absent on chest phantoms"},
        "name": "Lung nodule presence (demo classifier)",
        "task": "Is there a lung nodule in this chest CT? (series-level classification)",
        "description": "A small 3D CNN (SmallClassifier3D) on the whole chest CT resized to 48x48x24; trained on "
                       "synthetic chest phantoms only. A demonstration of the node's classification path; not "
                       "for diagnosis.",
        "authors": "dicom-node training package (training/classification/nodule_presence.py)",
        "copyright": "see LICENSE of the repository",
        "monai_version": __import__("monai").__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "data_source": "training.phantoms.chest, seeds 1000... (train) and 9000... (validation)",
        "image_classes": "single channel CT in HU, RAS, whole field of view resized to 48x48x24, [-1000, 400] HU "
                         "scaled to [0, 1]",
        "label_classes": "0: nodule absent, 1: nodule present",
        "pred_classes": "2 logits (softmax: probabilities of absent, present)",
        "eval_metrics": {"accuracy": figures["test_accuracy"]},
        "intended_use": "Demonstration and testing of the dicom-node classification path. Not for clinical use.",
        "network_data_format": ct_network_data_format(
            ROI_SIZE, {"type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [2],
                       "dtype": "float32", "value_range": [0, 1], "is_onehot": False,
                       "channel_def": {"0": "nodule absent", "1": "nodule present"}},
            is_patch_data=False),
        "training": figures,
        "dicom_node": {
            "kind": "classification",
            "input": {"modality": "CT", "intensity_window_hu": list(WINDOW_HU), "roi_size": list(ROI_SIZE)},
            "labels": list(CLASS_LABELS),
            "explanation": {"method": "hirescam", "layer": "features.2.conv"},
            "evaluation": figures,
        },
    }


def _model_card(figures: dict[str, Any]) -> str:
    """docs/README.md: what the model is, its classes and codes, how it was trained and validated, its limits."""
    val, test, confusion = figures["validation_cases"], figures["test_cases"], figures["test_confusion"]
    return f"""# Lung nodule presence (demo classifier) 0.1.0

**Demo only, not for diagnosis.** A demonstration of the dicom-node classification path, trained on synthetic
chest phantoms only (`training.phantoms.chest`); it has never seen a patient's CT, and its figures below say
how it does on more phantoms, nothing about patients.

## What it answers

Is there a lung nodule in this chest CT series? Two classes (network outputs), coded as the answer to the
question SCT 27925004 "Nodule" (the classes' `category`):

| output | class | coded value (`code`) |
|---|---|---|
| 0 | nodule absent | SCT 272519000 "Absent" |
| 1 | nodule present | SCT 52101004 "Present" |

Present/Absent are the values of DICOM CID 241 "Present-Absent Only", the same the node's SR uses for a
label that was looked for and not found. The SR (TID 1500) states the winner as a qualitative evaluation
"Nodule" = Present/Absent with Certainty of Finding (DCM 111012) = its probability in %, and each class's
probability (DCM 122157 "Probability", %).

## Input and network

Axial CT in HU, oriented to RAS, HU window [{WINDOW_HU[0]:g}, {WINDOW_HU[1]:g}] scaled to 0..1, the **whole field of
view resized to {ROI_SIZE[0]} x {ROI_SIZE[1]} x {ROI_SIZE[2]}** voxels (x, y, z; `Resized`, area interpolation): about
7.4 x 7.4 x 10 mm voxels for a 355 mm field of view and a 240 mm scan. The bundle's `preprocessing` is the chain
the trainer used (`workers.models.classification.classification_preprocessing`). `SmallClassifier3D`
(`workers/models/classification_networks.py`): four conv-InstanceNorm-ReLU blocks (8, 16, 32, 48 channels, max
pooling between), global max pooling, a linear layer to 2 logits; the node applies the softmax. Explanation:
HiResCAM (gradient x activation per voxel; `dicom_node.explanation` method `hirescam`) on the third convolution
(`features.2.conv`, a grid of 12 x 12 x 6, about 30 mm a cell in-plane), resampled to the series' grid. Why not
Grad-CAM on the last convolution: behind global max pooling its per-channel mean gradient spread the weight over
the chest, and its peak lay 60-150 mm from the nodule on 8 phantoms; HiResCAM on `features.2.conv` peaked
14-57 mm from the nearest nodule on the same 8.

## Data, training and validation

- Phantoms of {PHANTOM_SHAPE[0]} x {PHANTOM_SHAPE[1]} x {PHANTOM_SHAPE[2]} voxels (z, y, x) at
  {PHANTOM_SPACING_MM[0]} x {PHANTOM_SPACING_MM[1]} x {PHANTOM_SPACING_MM[2]} mm; class "present": 1-3 solid nodules
  of {NODULE_DIAMETER_MM[0]:g}-{NODULE_DIAMETER_MM[1]:g} mm; class "absent": no nodule. Half of each class.
- {figures['training_cases']} training phantoms (seeds 1000...), left-right mirrored at random; AdamW, learning rate
  {figures['learning_rate']:g}, batches of {figures['batch_size']}, {figures['epochs']} epochs on the CPU
  ({figures['torch_threads']} threads, {figures['training_seconds']} s including generating the phantoms).
- Epoch chosen on {val['absent'] + val['present']} validation phantoms (seeds 9000...): epoch
  {figures['best_epoch']}, validation accuracy {figures['validation_accuracy']:.3f} (optimistic: it made the choice).
- Measured on {test['absent'] + test['present']} **test** phantoms (seeds 20000..., {test['absent']} absent,
  {test['present']} present) that took part in no training or choice:

| test figure | value |
|---|---|
| accuracy | {figures['test_accuracy']:.3f} |
| accuracy on "absent" phantoms (specificity) | {figures['test_accuracy_absent']:.3f} |
| accuracy on "present" phantoms (sensitivity) | {figures['test_accuracy_present']:.3f} |

| true \\ predicted | absent | present |
|---|---|---|
| absent | {confusion['absent_as_absent']} | {confusion['absent_as_present']} |
| present | {confusion['present_as_absent']} | {confusion['present_as_present']} |

## Limits

- Phantom anatomy, phantom noise and a phantom-like field of view (about 350 mm) only; a real CT, another field of
  view (which changes the scale the network sees) or another body region is outside what it was trained on.
- Solid nodules of {NODULE_DIAMETER_MM[0]:g} mm and more only; ground-glass and part-solid nodules, and nodules below
  about 18 mm, are below what a 7 mm grid and this network see: "absent" means "no large solid nodule seen".
- The probabilities are a small network's softmax, not calibrated.
- The explanation map points at the region that drove the answer at about 30 mm resolution; it is no
  segmentation.

Retrain: `python -m training.classification.nodule_presence OUT_BUNDLE [--cache DIR]`.
"""


def write_nodule_presence_bundle(out: Path, network: SmallClassifier3D, figures: dict[str, Any]) -> Path:
    """Write the bundle (configs, ``models/model.pt``, ``docs/README.md``) to ``out``."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "inference.json").write_text(json.dumps(_inference_config(), indent=4) + "\n")
    (out / "configs" / "metadata.json").write_text(json.dumps(_metadata(figures), indent=4) + "\n")
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, out / "models" / "model.pt")
    (out / "docs" / "README.md").write_text(_model_card(figures))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Train and write the bundle; prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the generated cases in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    network, figures = train(args.train, args.val, args.test, args.epochs, lr=args.lr, cache_dir=args.cache)
    write_nodule_presence_bundle(args.out, network, figures)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
