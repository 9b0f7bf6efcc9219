"""Train the CenterNet lung nodule detector and export it as a MONAI bundle.

Why: the node's detection worker runs a MONAI bundle that finds lung nodules in a
CT and reports each as a box with a class and a confidence. :func:`train_detection`
trains the network of :mod:`workers.models.detection_network` (serving never
imports this package) on a Decathlon-layout dataset with a MONAI detection box
list (the synthetic chest phantoms of :mod:`training.phantoms`, or LUNA16-like
data) in :func:`training.loop.fit`: patches and targets from
:class:`~training.detection.data.PatchSampler`, the loss of
:mod:`training.detection.loss`, validation by FROC
(:mod:`training.detection.evaluate`) and hard-negative mining between epochs;
the bundle is written by :mod:`training.detection.export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data.split import split_cases
from training.detection.data import DetectionCase, PatchSampler, load_detection_cases
from training.detection.evaluate import LARGE_NODULE_MM, evaluate_cases, froc_summary, jsonable
from training.detection.export import write_detection_bundle
from training.detection.loss import centernet_loss
from training.loop import Optimisation, Validation, fit, seed_everything
from training.plots import plot_detection_training, plot_detections, plot_froc
from workers.models.detection_network import DetectorConfig, build_network, decode_heads, predict_heads

__all__ = ["mine_hard_negatives", "train_detection"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def mine_hard_negatives(
    network: nn.Module, sampler: PatchSampler, config: DetectorConfig, device: torch.device
) -> int:
    """Run the network on the next few training cases and remember their best false positives.

    A peak with a score of at least ``mine_min_score`` whose centre is not inside any
    nodule (radius: half its mean box size, plus one output voxel) is a false positive;
    the ``mine_per_case`` best of a case replace those mined from it before. Returns
    how many were found.
    """
    found = 0
    for ci in sampler.next_cases_to_mine(config.mine_cases):
        case = sampler.cases[ci]
        heads = predict_heads(network, case.image, config, device=device)
        centres, _, scores = decode_heads(
            heads, output_stride=config.output_stride, score_threshold=config.mine_min_score,
            max_detections=4 * config.mine_per_case, peak_kernel=config.peak_kernel,
        )
        spacing = case.grid.spacing
        keep = []
        for centre in centres:
            if len(case.centres_vox):
                dist = np.linalg.norm((case.centres_vox - centre) * spacing, axis=1)
                reach = case.sizes_mm.mean(axis=1) / 2 + config.output_stride * float(spacing.max())
                if np.any(dist <= reach):
                    continue
            keep.append(centre)
            if len(keep) == config.mine_per_case:
                break
        sampler.set_hard_negatives(ci, np.asarray(keep, dtype=np.float64).reshape(-1, 3))
        found += len(keep)
    return found


def train_detection(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 60,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 4,
    learning_rate: float = 2e-3,
    val_fraction: float | None = 0.2,
    progress: bool = True,
    steps_per_epoch: int = 16,
    val_interval: int = 10,
    config: DetectorConfig | None = None,
    cases: Sequence[DetectionCase] | None = None,
    calibrate_fp_per_scan: float | None = 1.0,
) -> dict[str, Any]:
    """Train the CenterNet detector on ``dataset_dir`` and write its bundle to ``out_dir``.

    ``dataset_dir``: Decathlon layout with ``boxes.json``; every listed case is pooled
    and split at random (``seed``) by ``val_fraction``, or, with ``val_fraction=None``,
    the box list's own "validation" section is the validation set. An epoch is ``steps_per_epoch``
    optimiser steps of ``batch_size`` patches (AdamW, warm-up then cosine decay of
    ``learning_rate``). Every ``val_interval`` epochs (and after the last) the whole
    validation volumes are run and scored by FROC; the checkpoint with the best
    sum of the CPMs of nodules >= 6 mm and of all nodules (ties: the later) is
    exported. Every ``config.mine_interval`` epochs the network runs on a few
    training cases in turn and their best false positives become centres of
    hard-negative patches.
    The exported ``score_threshold`` (the product's operating point) is calibrated on
    that validation: the lowest score with at most ``calibrate_fp_per_scan`` false
    positives per scan (all nodules counted; None keeps ``config.score_threshold``).
    Writes ``out_dir``: the bundle, ``metrics.json`` and ``plots/``; returns the
    metrics. ``cases`` (already loaded :class:`DetectionCase` s) replaces reading the
    dataset. Deterministic for a given ``seed`` on CPU.
    """
    if epochs < 1 or batch_size < 1 or steps_per_epoch < 1 or val_interval < 1:
        raise ValueError("epochs, batch_size, steps_per_epoch and val_interval must be >= 1")
    config = config or DetectorConfig()
    out = Path(out_dir)
    dev = torch.device(device)
    use_amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    seed_everything(seed)

    load_start = time.perf_counter()
    all_cases = list(cases) if cases is not None else load_detection_cases(dataset_dir, config)
    if val_fraction is None:
        train_cases = [c for c in all_cases if c.split != "validation"]
        val_cases = [c for c in all_cases if c.split == "validation"]
        if not train_cases or not val_cases:
            raise ValueError("val_fraction=None needs both training and validation cases in boxes.json")
    else:
        train_idx, val_idx = split_cases(len(all_cases), val_fraction, seed)
        train_cases = [all_cases[i] for i in train_idx]
        val_cases = [all_cases[i] for i in val_idx]
    load_seconds = time.perf_counter() - load_start
    logger.info("detection: %d training, %d validation cases", len(train_cases), len(val_cases))

    network = build_network(config).to(dev)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, min(total_steps // 20, 100))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t))

    optimisation = Optimisation(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
                                scale_loss=use_amp and amp_dtype == torch.float16, clip_norm=10.0)
    sampler = PatchSampler(train_cases, config, seed)

    record: dict[str, Any] = {
        "kind": "detection",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dataset": str(dataset_dir),
        "train_cases": [c.name for c in train_cases],
        "validation_cases": [c.name for c in val_cases],
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "learning_rate": learning_rate,
            "val_fraction": val_fraction,
            "val_interval": val_interval,
            "amp": use_amp,
            "detector": config.to_dict(),
        },
        "load_seconds": load_seconds,
        "validations": [],
    }

    def train_epoch(epoch: int) -> dict[str, Any]:
        network.train()
        sums = {"loss": 0.0, "heatmap": 0.0, "size": 0.0, "offset": 0.0}
        for _ in range(steps_per_epoch):
            batch = {k: v.to(dev) for k, v in sampler.batch(batch_size).items()}
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                output = network(batch["image"])
            losses = centernet_loss(
                output, batch["heatmap"], batch["size"], batch["offset"], batch["mask"],
                size_weight=config.size_loss_weight, offset_weight=config.offset_loss_weight,
            )
            optimisation.step(losses["loss"])
            for key in sums:
                sums[key] += float(losses[key].detach())
        return {**{key: value / steps_per_epoch for key, value in sums.items()},
                "learning_rate": optimisation.learning_rate}

    def validate(epoch: int) -> Validation:
        detections, result = evaluate_cases(network, val_cases, config, dev)
        record["validations"].append({"epoch": epoch, "all": result["all"].to_dict(),
                                      "large": result["large"].to_dict()})
        cpm, cpm_large = result["all"].cpm, result["large"].cpm
        # CPM >= 6 mm plus CPM of all nodules: the larger count makes the choice less noisy
        return Validation((_nan_low(cpm_large) + _nan_low(cpm), _nan_low(cpm_large)),
                          {"validation_cpm": cpm, "validation_cpm_large": cpm_large},
                          f"CPM {cpm:.3f}, >= {LARGE_NODULE_MM:g} mm {cpm_large:.3f}", keep=(detections, result))

    def mine(epoch: int, entry: dict[str, Any]) -> None:
        if config.hard_negative_fraction > 0 and epoch % config.mine_interval == 0 and epoch < epochs:
            started = time.perf_counter()
            entry["hard_negatives_found"] = mine_hard_negatives(network, sampler, config, dev)
            entry["hard_negative_pool"] = sampler.hard_negative_count
            entry["mining_seconds"] = time.perf_counter() - started

    fitted = fit(network, epochs=epochs, train_epoch=train_epoch, validate=validate, val_interval=val_interval,
                 ties="later", after_epoch=mine, name="detection", progress=progress)
    assert fitted.best is not None  # the last epoch always validates
    best_detections, best_froc = fitted.best.keep
    record.update(epochs=fitted.epochs, training_seconds=fitted.seconds, best_epoch=fitted.best_epoch)
    record["seconds_per_epoch"] = float(np.mean([e["train_seconds"] for e in fitted.epochs]))
    record["seconds_per_validation"] = float(np.mean([e["validation_seconds"] for e in fitted.epochs
                                                      if "validation_seconds" in e]))
    record["validation"] = {
        "epoch": fitted.best_epoch,
        "cases": len(val_cases),
        "all": froc_summary(best_froc["all"]),
        "large": froc_summary(best_froc["large"]),
        "large_min_diameter_mm": LARGE_NODULE_MM,
    }

    network.eval()
    export_config = config
    if calibrate_fp_per_scan is not None:
        threshold = best_froc["all"].threshold_at(calibrate_fp_per_scan)
        if threshold is not None:
            threshold = float(min(max(threshold, config.froc_score_threshold), 0.95))
            export_config = dataclasses.replace(config, score_threshold=threshold)
    record["operating_point"] = {
        "fp_per_scan_target": calibrate_fp_per_scan,
        "score_threshold": export_config.score_threshold,
        "calibrated": export_config is not config,
        "validation_sensitivity_all": best_froc["all"].sensitivity_at(calibrate_fp_per_scan or 1.0),
        "validation_sensitivity_large": best_froc["large"].sensitivity_at(calibrate_fp_per_scan or 1.0),
    }
    record["bundle"] = write_detection_bundle(out, network.to("cpu"), export_config, record, dataset_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(jsonable(record), indent=2) + "\n")
    plots = out / "plots"
    plot_detection_training(record, plots / "loss.png", large_mm=LARGE_NODULE_MM)
    plot_froc({"all nodules": best_froc["all"], f">= {LARGE_NODULE_MM:g} mm": best_froc["large"]},
              plots / "froc.png", title=f"validation FROC (epoch {fitted.best_epoch}, {len(val_cases)} scans)")
    plot_detections(val_cases, best_detections, plots / "validation_detections.png")
    return record


def _nan_low(value: float | None) -> float:
    """``value``, with None and NaN as minus infinity (the lowest score)."""
    return -math.inf if value is None or math.isnan(value) else float(value)
