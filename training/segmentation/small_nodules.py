"""Train the small-nodule stage of a joined segmentation bundle and export the bundle with it.

Why: see :mod:`workers.models.small_nodules`. The blob filter needs no training;
the candidate classifier and the two thresholds do: the blob strength above
which a local maximum is a candidate, and the classifier probability at which a
candidate becomes a nodule.

What: :func:`train_small_nodule_stage` - candidates (blob maxima inside the
reference lungs) of the training cases, each labelled nodule when a reference
nodule voxel lies in its 3 x 3 x 3 neighbourhood; a MONAI ``Classifier`` trained
on their patches with BCE, positives drawn as often as negatives and mirrored
and turned at random (eight mirror images, x and y swapped); then, on the
validation cases, the base bundle's own nodule output joined with the stage's
painted voxels for every pair of thresholds tried, and the pair with the best
mean nodule Dice over all validation cases (a nodule-free case scores 1 only if
nothing is marked) is built into the exported network.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import read_bundle_metadata, target_name, with_current_targets, write_bundle
from training.data.split import split_cases
from training.loop import Optimisation, fit, seed_everything
from training.metrics import dice_per_label
from training.segmentation.data import labelled_cases, parse_config, plain, preprocessing_config
from training.segmentation.network import load_bundle
from training.segmentation.nodule_branch import SIZE_FILTER
from workers.models.blobness import DEFAULT_BLOB_SIGMAS_MM, HessianBlobness
from workers.models.postprocessing import drop_small_components
from workers.models.segmentation_networks import CERTAIN_NODULE_PROBABILITY, AnatomyWithNoduleBranch
from workers.models.small_nodules import (
    DEFAULT_CANDIDATE_PATCH,
    SmallNoduleStage,
    candidate_classifier_def,
    candidate_patches,
    candidate_peaks,
)

__all__ = ["train_small_nodule_stage"]

logger = logging.getLogger(__name__)

#: Blob strengths tried as the candidate threshold (in units of the 0..1 intensity window: 0.06 is a
#: sigma-normalised curvature of 90 HU); training uses the candidates above the lowest.
_CANDIDATE_THRESHOLDS: tuple[float, ...] = (0.04, 0.045, 0.05, 0.06, 0.07)
#: Classifier probabilities tried as the acceptance threshold.
_ACCEPT_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
#: Candidates per training case at most (the strongest): enough for every vessel crossing of a chest.
_TRAINING_CANDIDATES_PER_CASE = 400


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool))


@torch.no_grad()
def _case_candidates(
    image: torch.Tensor, allowed: np.ndarray, nodule: np.ndarray, blobness: HessianBlobness, threshold: float,
    patch: Sequence[int], max_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(peaks (N, 4), patches (N, 2, *patch), strength (X, Y, Z), is nodule (N,)) of a preprocessed image (1, X, Y, Z)."""
    x = image[None].float()
    strength = blobness(x)
    peaks = candidate_peaks(strength, torch.from_numpy(allowed)[None, None], threshold, max_candidates)
    patches = candidate_patches(x, strength, peaks, list(patch)).half()
    near = torch.from_numpy(_dilate(nodule))
    is_nodule = near[peaks[:, 1], peaks[:, 2], peaks[:, 3]] if len(peaks) else torch.zeros(0, dtype=torch.bool)
    return peaks, patches, strength[0, 0], is_nodule


def _augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``batch`` (N, C, X, Y, Z) mirrored along each axis with probability 1/2 and x, y swapped with 1/2."""
    for axis in (2, 3, 4):
        if rng.random() < 0.5:
            batch = torch.flip(batch, [axis])
    if batch.shape[2] == batch.shape[3] and rng.random() < 0.5:
        batch = batch.transpose(2, 3)
    return batch


def _train_classifier(
    classifier: torch.nn.Module, patches: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
    learning_rate: float, seed: int, dev: torch.device,
) -> list[dict[str, Any]]:
    """BCE training, each batch half positives, half negatives; one epoch = as many batches as negatives / half."""
    rng = np.random.default_rng(seed)
    positives, negatives = torch.nonzero(labels).flatten().numpy(), torch.nonzero(~labels).flatten().numpy()
    if positives.size == 0 or negatives.size == 0:
        raise ValueError(f"the training cases gave {positives.size} nodule and {negatives.size} other candidates; "
                         "the classifier needs both")
    half = batch_size // 2
    steps = max(1, negatives.size // half)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    optimisation = Optimisation(optimizer, torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def train_epoch(epoch: int) -> dict[str, Any]:
        classifier.train()
        order = rng.permutation(negatives)
        total = 0.0
        for step in range(steps):
            chosen = np.concatenate([rng.choice(positives, half), order[step * half:(step + 1) * half]])
            batch = _augment(patches[chosen].float(), rng).to(dev)
            target = labels[chosen].float()[:, None].to(dev)
            loss = loss_fn(classifier(batch), target)
            optimisation.step(loss)
            total += float(loss.detach())
        return {"loss": total / steps}

    return fit(classifier, epochs=epochs, train_epoch=train_epoch, name="candidate classifier").epochs


@torch.no_grad()
def _probabilities(classifier: torch.nn.Module, patches: torch.Tensor, dev: torch.device) -> np.ndarray:
    classifier.eval()
    out = [torch.sigmoid(classifier(patches[i:i + 256].float().to(dev)))[:, 0].cpu() for i in range(0, len(patches), 256)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _painted(strength: np.ndarray, peaks: np.ndarray, paint_fraction: float) -> np.ndarray:
    """The voxels accepted ``peaks`` (N, 4) paint in ``strength`` (X, Y, Z), as :class:`SmallNoduleStage` does."""
    out = np.zeros(strength.shape, dtype=bool)
    for _, i, j, k in peaks:
        sl = tuple(slice(max(v - 1, 0), v + 2) for v in (i, j, k))
        out[sl] |= strength[sl] >= paint_fraction * strength[i, j, k]
    return out


def train_small_nodule_stage(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    base_bundle: str | Path,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    val_fraction: float = 0.15,
    seed: int = 0,
    device: str = "cpu",
    patch: Sequence[int] = DEFAULT_CANDIDATE_PATCH,
    sigmas_mm: Sequence[float] = DEFAULT_BLOB_SIGMAS_MM,
    paint_fraction: float = 0.85,
    progress: bool = True,
) -> dict[str, Any]:
    """Add a trained small-nodule stage to ``base_bundle`` (a joined nodule-branch bundle); bundle to ``out_dir``.

    Returns the training record, also in ``out_dir/metrics.json``; the base's
    ``metrics.json`` goes along as ``metrics_nodule_branch.json``, and its other
    ``metrics_*.json`` (earlier stages) as they are. Deterministic for a given
    ``seed`` on CPU.
    """
    from monai.inferers import SlidingWindowInferer
    from tqdm.auto import tqdm

    dataset_dir, out, base = Path(dataset_dir), Path(out_dir), Path(base_bundle)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (half nodules, half not), got {batch_size}")
    if not (base / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"base bundle {base} has no configs/inference.json")
    meta = read_bundle_metadata(base)
    node = meta["dicom_node"]
    values = {str(entry["name"]): int(entry["value"]) for entry in node.get("labels", [])}
    if "nodule" not in values or "lung" not in values:
        raise ValueError(f"base bundle {base} needs 'lung' and 'nodule' labels, it has {sorted(values)}")
    nodule_value, lung_value = values["nodule"], values["lung"]
    dev = torch.device(device)
    inference = with_current_targets(json.loads((base / "configs" / "inference.json").read_text()))
    _, network = load_bundle(base, dev)
    if not isinstance(network, AnatomyWithNoduleBranch):
        raise ValueError(f"base bundle {base} has no nodule branch (its network is a {type(network).__name__}); "
                         "train one with `dicom-node train nodule-branch` first")
    network.eval()
    spacing_mm = [float(v) for v in node["input"]["spacing_mm"]]
    window_hu = node["input"]["intensity_window_hu"]
    min_voxels = next((int(step.get("min_voxels", 1)) for step in inference["postprocessing"]["transforms"]
                       if step.get("_target_") == SIZE_FILTER), 1)

    seed_everything(seed)
    cases = labelled_cases(dataset_dir)
    train_idx, val_idx = split_cases(len(cases), val_fraction, seed)
    preprocess = parse_config(preprocessing_config(image_key="image", label_key="label", spacing_mm=spacing_mm,
                                                   window_hu=window_hu))
    blobness = HessianBlobness(spacing_mm, sigmas_mm).to(dev)
    floor = min(_CANDIDATE_THRESHOLDS)
    started = time.perf_counter()

    patches, labels = [], []
    for i in tqdm(train_idx, desc="candidates", unit="case", disable=not progress):
        data = preprocess({"image": cases[i]["image"], "label": cases[i]["label"]})
        ref = np.asarray(data["label"][0]).round().astype(np.int64)
        allowed = _dilate((ref == lung_value) | (ref == nodule_value))
        _, p, _, y = _case_candidates(plain(data["image"]).to(dev), allowed, ref == nodule_value, blobness, floor,
                                      patch, _TRAINING_CANDIDATES_PER_CASE)
        patches.append(p.cpu())
        labels.append(y)
    all_patches, all_labels = torch.cat(patches), torch.cat(labels)
    extraction_seconds = time.perf_counter() - started
    logger.info("small-nodule stage: %d candidates, %d of them nodules, from %d cases", len(all_labels),
                int(all_labels.sum()), len(train_idx))

    torch.manual_seed(seed)
    classifier_def = candidate_classifier_def(patch)
    classifier = parse_config(classifier_def).to(dev)
    history = _train_classifier(classifier, all_patches, all_labels, epochs=epochs, batch_size=batch_size,
                                learning_rate=learning_rate, seed=seed, dev=dev)

    window = inference["inferer"]
    inferer = SlidingWindowInferer(roi_size=list(window["roi_size"]), sw_batch_size=2,
                                   overlap=float(window.get("overlap", 0.25)), mode="gaussian",
                                   padding_mode="replicate")
    grid = {(t, a): {"all": [], "with": []} for t in _CANDIDATE_THRESHOLDS for a in _ACCEPT_THRESHOLDS}
    base_scores: dict[str, list[float]] = {"all": [], "with": []}
    for i in tqdm(val_idx, desc="validation", unit="case", disable=not progress):
        data = preprocess({"image": cases[i]["image"], "label": cases[i]["label"]})
        image = plain(data["image"]).to(dev)
        logits = inferer(image[None], network)[0]
        probability = drop_small_components(torch.softmax(logits.float(), 0), nodule_value, min_voxels)
        ranked = probability.argmax(0).cpu().numpy()
        branch = ranked == nodule_value
        ref = np.asarray(data["label"][0]).round().astype(np.int64) == nodule_value
        score = dice_per_label(branch, ref, [True])[1]
        base_scores["all"].append(score)
        if ref.any():
            base_scores["with"].append(score)
        lung = (logits.argmax(0).cpu().numpy() == lung_value) | branch
        peaks, p, volume_strength, _ = _case_candidates(image, lung, ref, blobness, floor, patch, 10_000)
        chance = _probabilities(classifier, p, dev)
        strength = volume_strength.cpu().numpy()
        peaks = peaks.cpu().numpy()
        at_peaks = strength[peaks[:, 1], peaks[:, 2], peaks[:, 3]]
        for (t, a), scores in grid.items():
            chosen = peaks[(at_peaks > t) & (chance > a)]
            score = dice_per_label(branch | _painted(strength, chosen, paint_fraction), ref, [True])[1]
            scores["all"].append(score)
            if ref.any():
                scores["with"].append(score)
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    by_choice = {key: (mean(s["all"]), mean(s["with"])) for key, s in grid.items()}
    threshold, accept = max(by_choice, key=lambda k: (by_choice[k][0], by_choice[k][1] or 0.0, k[0], k[1]))

    stage_def = {
        "_target_": target_name(SmallNoduleStage),
        "classifier": classifier_def,
        "spacing_mm": spacing_mm,
        "candidate_threshold": threshold,
        "accept_threshold": accept,
        "lung_labels": [lung_value, nodule_value],
        "sigmas_mm": [float(s) for s in sigmas_mm],
        "patch": [int(v) for v in patch],
        "paint_fraction": paint_fraction,
    }
    stage = parse_config(stage_def)  # the exported config itself, with the trained classifier's weights
    stage.classifier.load_state_dict(classifier.state_dict())
    network.add_small_nodules(stage.eval())
    network_def = copy.deepcopy(inference["network_def"])
    network_def["small_nodules"] = stage_def
    record: dict[str, Any] = {
        "kind": "small-nodule-stage",
        "device": str(dev),
        "seed": seed,
        "dataset": str(dataset_dir),
        "base_bundle": str(base),
        "train_cases": [cases[i]["name"] for i in train_idx],
        "validation_cases": [cases[i]["name"] for i in val_idx],
        "candidates": {"total": int(len(all_labels)), "nodules": int(all_labels.sum())},
        "settings": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                     "val_fraction": val_fraction, "classifier": classifier_def, "sigmas_mm": list(stage_def["sigmas_mm"]),
                     "patch": stage_def["patch"], "paint_fraction": paint_fraction},
        "epochs": history,
        "candidate_threshold": threshold,
        "accept_threshold": accept,
        "validation_dice_without_stage": {"all_cases": mean(base_scores["all"]),
                                          "cases_with_nodules": mean(base_scores["with"])},
        "validation_dice_by_thresholds": {f"{t} accept {a}": {"all_cases": s[0], "cases_with_nodules": s[1]}
                                          for (t, a), s in by_choice.items()},
        "best_validation_dice": {"all_cases": by_choice[(threshold, accept)][0],
                                 "cases_with_nodules": by_choice[(threshold, accept)][1]},
        "candidate_seconds": round(extraction_seconds, 1),
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    # The base's training records stay with the bundle: its own as metrics_nodule_branch.json, older ones as named.
    earlier = {("metrics_nodule_branch.json" if f.name == "metrics.json" else f.name): f.read_text()
               for f in sorted(base.glob("metrics*.json"))}
    write_bundle(
        out,
        network=network,
        network_def=network_def,
        inference_config=_keeping_painted({k: v for k, v in inference.items() if k != "network_def"}),
        metadata=_stage_metadata(meta, record, len(val_idx)),
        example_input=torch.rand(1, 1, *(int(v) for v in window["roi_size"])),
    )
    record["bundle"] = str(out)
    for name, text in earlier.items():
        (out / name).write_text(text)
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _keeping_painted(inference: dict[str, Any]) -> dict[str, Any]:
    """``inference`` whose nodule size filter keeps the components the small-nodule stage painted."""
    out = copy.deepcopy(inference)
    for step in out["postprocessing"]["transforms"]:
        if step.get("_target_") == SIZE_FILTER:
            step["keep_probability"] = CERTAIN_NODULE_PROBABILITY
    return out


def _stage_metadata(base_meta: Mapping[str, Any], record: Mapping[str, Any], validation_cases: int) -> dict[str, Any]:
    """The base bundle's metadata with the stage's description, training and validation figures.

    Held-out figures of the base are dropped: they describe another network.
    """
    meta = copy.deepcopy(dict(base_meta))
    note = " Nodules under 6 mm come from a small-nodule stage"
    description = str(meta.get("description", "")).split(note)[0].rstrip()
    meta["description"] = (
        description + note + f" ({target_name(SmallNoduleStage)}): local maxima of a Hessian blob "
        "filter inside the lungs, kept by a 3D CNN classifier on a patch around each (training/segmentation/small_nodules.py)."
    )
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "optional_packages_version", "required_packages_version", "schema"):
        meta.pop(key, None)
    meta.setdefault("training", {})["small_nodule_stage"] = {
        "dataset": record["dataset"],
        **record["settings"],
        "seed": record["seed"],
        "candidates": record["candidates"],
        "candidate_threshold": record["candidate_threshold"],
        "accept_threshold": record["accept_threshold"],
        "training_seconds": record["training_seconds"],
        "device": record["device"],
    }
    evaluation = dict(meta["dicom_node"].get("evaluation", {}))
    evaluation.pop("held_out", None)
    best = record["best_validation_dice"]
    evaluation["small_nodule_stage_validation"] = {
        "cases": validation_cases,
        "nodule_dice": best["all_cases"],
        "nodule_dice_cases_with_nodules": best["cases_with_nodules"],
        "without_stage": record["validation_dice_without_stage"],
    }
    meta["dicom_node"]["evaluation"] = evaluation
    return meta
