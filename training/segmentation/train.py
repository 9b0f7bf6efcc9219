"""Train the chest CT SegResNet on a Decathlon-layout dataset and export it as a MONAI bundle.

Why: the node's segmentation worker runs a MONAI bundle; :func:`train_segmentation`
produces one from a dataset (the synthetic chest phantoms of :mod:`training.phantoms`,
or any CT set with the same labels): DiceCE training on random patches
(class-balanced crops oversample nodules) in :func:`training.loop.fit`,
sliding-window validation with per-label Dice, the best checkpoint exported with
:func:`training.bundle.write_bundle`, ``metrics.json`` and plots (``plots/loss.png``,
``plots/dice.png``, ``plots/validation_slices.png``).

:func:`loader_epoch` and :func:`one_cycle` are the epoch and the optimiser the
nodule branch (:mod:`training.segmentation.nodule_branch`) trains with as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import write_bundle
from training.data.split import split_cases
from training.labels import CHEST_LABELS, LabelSpec
from training.loop import Optimisation, Validation, fit, seed_everything
from training.metrics import dice_per_label
from training.plots import overlay_figure, plot_segmentation_training
from training.segmentation.data import (
    DEFAULT_PATCH_SIZE,
    DEFAULT_SPACING_MM,
    DEFAULT_WINDOW_HU,
    labelled_cases,
    parse_config,
    plain,
    preprocessing_config,
    train_transforms,
)
from training.segmentation.export import (
    BODY_TISSUE_LABELS,
    INSIDE_BODY_LABELS,
    bundle_metadata,
    inference_config,
    label_values,
)
from training.segmentation.network import network_def, predict_labels

__all__ = ["loader_epoch", "one_cycle", "plot_validation_slices", "train_segmentation", "validation_dice"]

logger = logging.getLogger(__name__)


def train_segmentation(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 20,
    device: str = "cpu",
    seed: int = 0,
    patch_size: Sequence[int] = DEFAULT_PATCH_SIZE,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    val_fraction: float = 0.2,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
    init_filters: int = 8,
    class_ratios: Sequence[float] | None = None,
    class_weights: Sequence[float] | None = None,
    val_interval: int = 1,
    sw_batch_size: int = 2,
    progress: bool = True,
    init_bundle: str | Path | None = None,
) -> dict[str, Any]:
    """Train a SegResNet on ``dataset_dir`` (Decathlon layout) and write its bundle to ``out_dir``.

    ``init_bundle``: start from the weights of an earlier bundle of the same network
    (fine-tuning, e.g. a second stage that teaches small lesions to a network that
    already knows the anatomy) instead of random ones.

    One epoch visits every training case once; each optimiser step uses
    ``batch_size`` patches of ``patch_size`` voxels cropped from one case, their
    centres drawn per label with ``class_ratios`` (default: nodules 6 times as
    often as each other label); ``class_weights`` weigh the labels in the DiceCE loss. The checkpoint with the best
    mean foreground validation Dice (ties: the earlier) is exported. Returns the training record, also written to
    ``out_dir/metrics.json``. Deterministic for a given ``seed`` on CPU.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss
    from monai.transforms import Compose

    dataset_dir, out = Path(dataset_dir), Path(out_dir)
    patch_size = tuple(int(v) for v in patch_size)
    if len(patch_size) != 3 or any(v <= 0 or v % 8 for v in patch_size):
        raise ValueError(f"patch_size must be 3 positive multiples of 8 (x, y, z), got {patch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = tuple(CHEST_LABELS)
    n_classes = 1 + max(spec.value for spec in labels)
    if class_ratios is None:
        class_ratios = [1.0] * n_classes
        class_ratios[max(spec.value for spec in labels if spec.name == "nodule")] = 6.0
    if len(class_ratios) != n_classes:
        raise ValueError(f"class_ratios needs {n_classes} values (one per label value), got {len(class_ratios)}")
    if class_weights is not None and len(class_weights) != n_classes:
        raise ValueError(f"class_weights needs {n_classes} values (one per label value), got {len(class_weights)}")
    dev = torch.device(device)
    use_amp = dev.type == "cuda"

    seed_everything(seed)
    cases = labelled_cases(dataset_dir)
    train_idx, val_idx = split_cases(len(cases), val_fraction, seed)
    train_cases = [cases[i] for i in train_idx]
    val_cases = [cases[i] for i in val_idx]
    logger.info("segmentation: %d training, %d validation cases", len(train_cases), len(val_cases))

    preprocess = parse_config(preprocessing_config(image_key="image", label_key="label", spacing_mm=spacing_mm,
                                                   window_hu=window_hu))
    det, rnd = train_transforms(patch_size, n_classes, class_ratios, batch_size)
    files = lambda cs: [{"image": c["image"], "label": c["label"]} for c in cs]  # noqa: E731
    train_transform = Compose([*preprocess.transforms, *det, *rnd])
    train_transform.set_random_state(seed=seed)
    train_ds = CacheDataset(files(train_cases), transform=train_transform, num_workers=0, progress=False)
    val_ds = CacheDataset(files(val_cases), transform=preprocess, num_workers=0, progress=False)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=1, shuffle=True, num_workers=0, generator=generator)

    net_config = network_def(out_channels=n_classes, init_filters=init_filters)
    network = parse_config(net_config).to(dev)
    if init_bundle is not None:
        weights = Path(init_bundle) / "models" / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"init_bundle {init_bundle} has no models/model.pt")
        try:
            network.load_state_dict(torch.load(weights, map_location=dev, weights_only=True))
        except RuntimeError as exc:
            raise ValueError(f"init_bundle {init_bundle}: weights do not fit this network ({exc})") from exc
    weight = torch.as_tensor(list(class_weights), dtype=torch.float32, device=dev) if class_weights else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
    optimisation = one_cycle(network, learning_rate, epochs * len(train_loader), use_amp)
    inferer = SlidingWindowInferer(roi_size=list(patch_size), sw_batch_size=sw_batch_size, overlap=0.25,
                                   mode="gaussian", padding_mode="replicate")

    record: dict[str, Any] = {
        "kind": "segmentation",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dataset": str(dataset_dir),
        "train_cases": [c["name"] for c in train_cases],
        "validation_cases": [c["name"] for c in val_cases],
        "settings": {
            "epochs": epochs,
            "patch_size": list(patch_size),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "spacing_mm": [float(v) for v in spacing_mm],
            "window_hu": [float(v) for v in window_hu],
            "init_filters": init_filters,
            "class_ratios": [float(v) for v in class_ratios],
            "class_weights": [float(v) for v in class_weights] if class_weights else None,
            "val_fraction": val_fraction,
            "amp": use_amp,
            "init_bundle": str(init_bundle) if init_bundle is not None else None,
        },
    }

    def validate(epoch: int) -> Validation:
        dice = validation_dice(network, val_ds, inferer, labels, dev, use_amp)
        mean = float(np.mean(list(dice.values())))
        return Validation(mean, {"validation_dice": dice, "validation_mean_dice": mean},
                          "Dice " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))

    fitted = fit(network, epochs=epochs, val_interval=val_interval, validate=validate, name="segmentation",
                 progress=progress,
                 train_epoch=loader_epoch(network, train_loader, loss_fn, lambda labels: labels, optimisation, dev,
                                          use_amp=use_amp, progress=progress))
    assert fitted.best is not None  # the last epoch always validates
    best_dice, best_score = fitted.best.fields["validation_dice"], fitted.best.score
    record.update(epochs=fitted.epochs, training_seconds=fitted.seconds, best_epoch=fitted.best_epoch,
                  best_validation_dice=best_dice, best_validation_mean_dice=best_score)
    network.eval()
    evaluation = {
        "split": "validation",
        "note": "validation cases of the training run (used to pick the checkpoint); "
        "see held_out for figures on data never seen in training",
        "cases": len(val_cases),
        "dice": best_dice,
        "mean_dice": best_score,
    }
    training = {
        "dataset": str(dataset_dir),
        "cases": {"train": len(train_cases), "validation": len(val_cases)},
        **record["settings"],
        "seed": seed,
        "best_epoch": fitted.best_epoch,
        "training_seconds": round(record["training_seconds"], 1),
        "device": str(dev),
    }
    write_bundle(
        out,
        network=network,
        network_def=net_config,
        inference_config=inference_config(spacing_mm=spacing_mm, window_hu=window_hu, roi_size=patch_size,
                                          sw_batch_size=sw_batch_size,
                                          inside_labels=label_values(labels, INSIDE_BODY_LABELS),
                                          body_labels=label_values(labels, BODY_TISSUE_LABELS)),
        metadata=bundle_metadata(labels=labels, spacing_mm=spacing_mm, window_hu=window_hu, patch_size=patch_size,
                                 evaluation=evaluation, training=training),
        example_input=torch.rand(1, 1, *patch_size),
    )
    record["bundle"] = str(out)
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_segmentation_training(record, labels, out / "plots")
    plot_validation_slices(network, val_ds, inferer, labels, dev, out / "plots" / "validation_slices.png")
    return record


def one_cycle(network: torch.nn.Module, learning_rate: float, total_steps: int, use_amp: bool) -> Optimisation:
    """AdamW (weight decay 1e-5) with a one-cycle learning rate over ``total_steps``, AMP loss scaling on CUDA."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=total_steps, pct_start=min(0.1, 50 / total_steps + 0.01),
    )
    return Optimisation(optimizer, scheduler, scale_loss=use_amp)


def loader_epoch(
    network: torch.nn.Module,
    loader: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    targets_of: Callable[[torch.Tensor], torch.Tensor],
    optimisation: Optimisation,
    dev: torch.device,
    *,
    use_amp: bool,
    progress: bool,
) -> Callable[[int], dict[str, Any]]:
    """The ``train_epoch`` of :func:`training.loop.fit` for a loader of ``{"image", "label"}`` patch batches.

    ``targets_of`` turns a batch's label patches into the loss's targets. An epoch
    is one pass over ``loader``, one optimiser step per batch (float16 autocast with
    ``use_amp``); its entry holds the mean and each step's loss and the learning rate.
    """
    from tqdm.auto import tqdm

    def epoch(number: int) -> dict[str, Any]:
        network.train()
        losses = []
        for batch in tqdm(loader, desc=f"epoch {number}", unit="step", leave=False, disable=not progress):
            # Plain tensors: MetaTensor's per-operation metadata handling costs ~10% of a CPU step.
            images, targets = plain(batch["image"]).to(dev), targets_of(plain(batch["label"])).to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(network(images), targets)
            optimisation.step(loss)
            losses.append(float(loss.detach()))
        return {"loss": float(np.mean(losses)), "step_losses": losses, "learning_rate": optimisation.learning_rate}

    return epoch


def validation_dice(
    network: torch.nn.Module, val_ds: Any, inferer: Any, labels: Sequence[LabelSpec], dev: torch.device, use_amp: bool
) -> dict[str, float]:
    """Mean Dice per label name over the validation cases (in the preprocessed grid)."""
    per_label: dict[str, list[float]] = {spec.name: [] for spec in labels}
    for item in val_ds:
        pred = predict_labels(network, item["image"], inferer, dev, use_amp)
        ref = np.asarray(item["label"][0]).astype(np.uint8)
        scores = dice_per_label(pred, ref, [spec.value for spec in labels])
        for spec in labels:
            per_label[spec.name].append(scores[spec.value])
    return {name: float(np.mean(values)) for name, values in per_label.items()}


def plot_validation_slices(
    network: torch.nn.Module, val_ds: Any, inferer: Any, labels: Sequence[LabelSpec], dev: torch.device, path: Path,
    *, window_hu: Sequence[float] = DEFAULT_WINDOW_HU, max_cases: int = 2,
) -> None:
    """Axial slices of the first ``max_cases`` validation cases: the network's labels over the reference's."""
    rows = []
    lo, hi = float(window_hu[0]), float(window_hu[1])
    for i in range(min(max_cases, len(val_ds))):
        item = val_ds[i]
        pred = predict_labels(network, item["image"], inferer, dev, dev.type == "cuda")
        ct = np.asarray(item["image"][0]) * (hi - lo) + lo  # back to HU (clipped to the window)
        rows.append((f"validation {i}", ct, pred, np.asarray(item["label"][0]).astype(np.uint8)))
    overlay_figure(rows, labels, path)
