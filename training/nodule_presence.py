"""Train and export the demo classifier "lung nodule present?" on chest phantoms (a MONAI bundle).

Why: the node serves classification models (class probabilities, an explanation map);
this trains the small one meant to show that path. Phantoms without nodules
(``nodule_count`` (0, 0)) are class 0 "nodule absent", phantoms with one to three nodules
of 18-30 mm class 1 "nodule present"; the network
(:class:`workers.models.classification_networks.SmallClassifier3D`) sees the whole field
of view resized to 48 x 48 x 24 voxels (x, y, z), the same preprocessing the node runs
(:func:`workers.models.classification.classification_preprocessing`), so training and
serving agree by construction.

Run: ``python -m training.nodule_presence OUT_BUNDLE [--cache DIR]`` (writes configs, weights and a
model card with the validation figures).

Status (no bundle shipped yet): on 200 training / 80 validation phantoms the network has not
generalised within a few CPU minutes - validation accuracy stayed at 0.50 for 7-12 epochs with
10-30 mm nodules (InstanceNorm, AdamW 2e-3, batch 8) and with 18-30 mm nodules (BatchNorm;
Adam 3e-3 batch 8, Adam 1e-3 batch 16 with shifts, no normalisation), and reached 0.65 (training
0.95: memorised) at epoch 8 with BatchNorm, Adam 1e-3, batch 16, no augmentation. At 7.4 mm
voxels a nodule is a 3-4 voxel bright blob like the hilar vessels; more phantoms or a finer grid
are the next things to try.
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
#: category = the question (SCT 27925004 Nodule), bundle_value = the network output.
CLASS_LABELS: tuple[dict[str, Any], ...] = (
    {"value": 1, "bundle_value": 0, "name": "nodule absent",
     "code": {"value": "272519000", "scheme": "SCT", "meaning": "Absent"}, "category": _NODULE,
     "color_rgb": [0, 160, 0]},
    {"value": 2, "bundle_value": 1, "name": "nodule present",
     "code": {"value": "52101004", "scheme": "SCT", "meaning": "Present"}, "category": _NODULE,
     "color_rgb": [255, 200, 0]},
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


def train(train_cases: int = 200, val_cases: int = 80, epochs: int = 16, batch_size: int = 16, lr: float = 1e-3,
          seed: int = 0, cache_dir: Path | None = None) -> tuple[SmallClassifier3D, dict[str, Any]]:
    """Train on ``train_cases`` phantoms (seeds 1000...), validate on ``val_cases`` (seeds 9000...).

    Keeps the weights of the epoch with the best validation accuracy. Returns the network and
    its figures (validation accuracy, per-class accuracy, epochs, time).
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    train_x, train_y = _cases(train_cases, 1000, cache_dir / "train.pt" if cache_dir else None)
    val_x, val_y = _cases(val_cases, 9000, cache_dir / "val.pt" if cache_dir else None)
    logger.info("cases ready in %.1f s", time.perf_counter() - started)
    network = SmallClassifier3D(num_classes=2, dropout=0.0)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, epochs + 1):
        network.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for first in range(0, len(order), batch_size):
            index = order[first:first + batch_size]
            batch = train_x[index].clone()
            flip = torch.rand(len(index), generator=generator) < 0.5  # left-right mirror: nodules on either side
            batch[flip] = batch[flip].flip(dims=(2,))
            shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=generator)]  # a few voxels in-plane
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(network(batch), train_y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        accuracy = _accuracy(network, val_x, val_y)
        logger.info("epoch %d: loss %.4f, validation accuracy %.3f", epoch, total / len(order), accuracy)
        if accuracy > best:
            best, best_epoch = accuracy, epoch
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    assert best_state is not None
    network.load_state_dict(best_state)
    network.eval()
    with torch.no_grad():
        predicted = network(val_x).argmax(dim=1)
    figures = {
        "validation_accuracy": round(best, 4),
        "validation_accuracy_absent": round(float((predicted[val_y == 0] == 0).float().mean()), 4),
        "validation_accuracy_present": round(float((predicted[val_y == 1] == 1).float().mean()), 4),
        "validation_cases": {"absent": int((val_y == 0).sum()), "present": int((val_y == 1).sum())},
        "training_cases": len(train_x), "epochs": epochs, "best_epoch": best_epoch,
        "training_seconds": round(time.perf_counter() - started, 1), "device": "cpu",
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
                        "num_classes": 2},
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
        "authors": "dicom-node training package (training/nodule_presence.py)",
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
        "eval_metrics": {"accuracy": figures["validation_accuracy"]},
        "intended_use": "Demonstration and testing of the dicom-node classification path. Not for clinical use.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": list(ROI_SIZE), "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2,
                                 "spatial_shape": [2], "dtype": "float32", "value_range": [0, 1],
                                 "is_onehot": False,
                                 "channel_def": {"0": "nodule absent", "1": "nodule present"}}},
        },
        "training": figures,
        "dicom_node": {
            "kind": "classification",
            "input": {"modality": "CT", "intensity_window_hu": list(WINDOW_HU), "roi_size": list(ROI_SIZE)},
            "labels": list(CLASS_LABELS),
            "explanation": {"method": "grad-cam", "layer": "features.3.conv"},
            "evaluation": figures,
        },
    }


def _model_card(figures: dict[str, Any]) -> str:
    """docs/README.md: what the model is, its classes and codes, how it was trained and validated, its limits."""
    cases = figures["validation_cases"]
    return f"""# Lung nodule presence (demo classifier) 0.1.0

**Not for diagnosis.** A demonstration of the dicom-node classification path, trained on synthetic chest
phantoms only (`training.phantoms.chest`); it has never seen a patient's CT.

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
7.4 x 7.4 x 10 mm voxels for a 355 mm field of view and a 240 mm scan. `SmallClassifier3D`
(`workers/models/classification_networks.py`): four conv-BatchNorm-ReLU blocks (8, 16, 32, 48 channels, max
pooling between), global average and max pooling, a linear layer to 2 logits; the node applies the softmax.
Explanation: Grad-CAM on the last convolution (`features.3.conv`, a grid of 6 x 6 x 3), resampled to the
series' grid.

## Training and validation

- Phantoms of {PHANTOM_SHAPE[0]} x {PHANTOM_SHAPE[1]} x {PHANTOM_SHAPE[2]} voxels (z, y, x) at
  {PHANTOM_SPACING_MM[0]} x {PHANTOM_SPACING_MM[1]} x {PHANTOM_SPACING_MM[2]} mm; class "present": 1-3 solid nodules
  of {NODULE_DIAMETER_MM[0]:g}-{NODULE_DIAMETER_MM[1]:g} mm; class "absent": no nodule.
- {figures['training_cases']} training phantoms (seeds 1000...), {cases['absent'] + cases['present']} validation phantoms
  (seeds 9000..., {cases['absent']} absent, {cases['present']} present), never trained on.
- {figures['epochs']} epochs on the CPU ({figures['training_seconds']} s including generating the phantoms), best
  epoch {figures['best_epoch']} by validation accuracy.

| validation figure | value |
|---|---|
| accuracy | {figures['validation_accuracy']:.3f} |
| accuracy on "absent" phantoms (specificity) | {figures['validation_accuracy_absent']:.3f} |
| accuracy on "present" phantoms (sensitivity) | {figures['validation_accuracy_present']:.3f} |

The best epoch was chosen on the same validation phantoms, so the accuracy is optimistic by the selection.

## Limits

Solid nodules of 18 mm and more only; ground-glass and part-solid nodules, and nodules below about 18 mm, are
below what a 7 mm grid and this network see. Phantom anatomy only. Retrain: `python -m training.nodule_presence
OUT_BUNDLE`.
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
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep the generated cases in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    network, figures = train(args.train, args.val, args.epochs, lr=args.lr, cache_dir=args.cache)
    write_nodule_presence_bundle(args.out, network, figures)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
