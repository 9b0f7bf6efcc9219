"""Train the binary nodule branch of the chest CT segmentation model and export the joined bundle.

Why: the anatomy SegResNet (:mod:`training.segmentation.train`) segments body, lungs,
heart and bone well but, trained as one softmax over all labels, never learns
the nodule class (about 1e-4 of the voxels). This second stage trains a small
binary network on nodule-rich patches with its own Dice+BCE loss, keeps the
anatomy network frozen, and exports both as one
:class:`~workers.models.segmentation_networks.AnatomyWithNoduleBranch` bundle: same input, same
preprocessing, same multi-class output, so the node serves it like any other
segmentation bundle.

What: :func:`train_nodule_branch` - data, preprocessing and patch sampling as in
:func:`training.segmentation.train.train_segmentation` (patch centres drawn per label,
nodules and lung most often, so the branch sees nodules and the vessels it
must not call nodules; nodule patches per nodule, not per nodule voxel);
validation by sliding window over whole validation cases, Dice of the branch's
``sigmoid > 0.5`` against the nodule label per case (a case without nodules
scores 1 only if nothing is predicted); the best
checkpoint, its threshold and size filter, is joined with the base bundle's anatomy network and written with
:func:`training.bundle.write_bundle`, with ``metrics.json`` and plots.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import read_bundle_metadata, target_name, with_current_targets, write_bundle
from training.data.split import split_cases
from training.labels import LabelSpec, label_by_name
from training.loop import Validation, fit, seed_everything
from training.losses import LesionDiceLoss
from training.metrics import dice_per_label
from training.plots import plot_segmentation_training
from training.sampling import NODULE_SAMPLINGS
from training.segmentation.data import labelled_cases, parse_config, plain, preprocessing_config, train_transforms
from training.segmentation.network import load_bundle
from training.segmentation.train import loader_epoch, one_cycle, plot_validation_slices
from workers.models.postprocessing import DropSmallComponentsd, component_sizes
from workers.models.segmentation_networks import AnatomyWithNoduleBranch, mirror_axes, nodule_branch_def

__all__ = ["DEFAULT_BRANCH_PATCH_SIZE", "DEFAULT_MIRROR_AXES", "SIZE_FILTER", "train_nodule_branch"]

logger = logging.getLogger(__name__)

#: Training patch of the branch (x, y, z voxels): 10.5 x 10.5 x 8 cm at the default spacing, room for the
#: largest (30 mm) nodule and its surroundings; inference uses the base bundle's sliding window.
DEFAULT_BRANCH_PATCH_SIZE: tuple[int, int, int] = (48, 48, 32)
#: How often a patch centres on each label value: background, body, lung, heart, bone, nodule.
_DEFAULT_RATIOS: tuple[float, ...] = (0.0, 1.0, 6.0, 0.5, 0.5, 5.0)
#: Voxels between a nodule patch's edge and the nodule voxel it was drawn for: the patch centre moves up to
#: half the patch less this margin from that voxel, so the branch learns nodules anywhere in a window.
_NODULE_PATCH_MARGIN = 4
#: Axes (0 x, 1 y, 2 z) along which the exported network also runs the branch on the mirrored input: on 16
#: development phantoms (seeds 300000-), four passes instead of one raised the nodule Dice per case with
#: nodules from 0.58 to 0.63, and per nodule of 8 mm or more from 0.81 to 0.88.
DEFAULT_MIRROR_AXES: tuple[int, ...] = (0, 1, 2)
#: Branch probabilities tried as the nodule decision threshold on the validation cases.
_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
#: Smallest nodule components (mm³) tried as the postprocessing's size filter on the validation cases: up to
#: 72 mm³, a 5 mm sphere; on the 2.2 x 2.2 x 2.5 mm grid 1, 2, 3, 4 and 6 voxels.
_MIN_VOLUMES_MM3: tuple[float, ...] = (0.0, 12.0, 24.0, 36.0, 48.0, 72.0)


def _min_sizes(spacing_mm: Sequence[float]) -> list[int]:
    """:data:`_MIN_VOLUMES_MM3` in voxels of ``spacing_mm`` (at least 1, each once)."""
    voxel_mm3 = float(np.prod([float(v) for v in spacing_mm]))
    return sorted({max(1, math.ceil(v / voxel_mm3 - 1e-6)) for v in _MIN_VOLUMES_MM3})


def _base_network(
    bundle_dir: Path, device: torch.device
) -> tuple[dict[str, Any], torch.nn.Module, dict[str, Any], tuple[int, int, int]]:
    """(inference.json, anatomy network with weights, its network_def, input voxels per anatomy voxel) of the base.

    A base bundle that already has a nodule branch gives its anatomy part (and
    its pool, when its input grid is finer than the anatomy's), so the branch can
    be retrained on a shipped model.
    """
    inference = with_current_targets(json.loads((bundle_dir / "configs" / "inference.json").read_text()))
    _, network = load_bundle(bundle_dir, device)
    network_def = copy.deepcopy(inference["network_def"])
    pool: tuple[int, int, int] = (1, 1, 1)
    if isinstance(network, AnatomyWithNoduleBranch):
        network, network_def, pool = network.anatomy, network_def["anatomy"], network.anatomy_pool
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return inference, network.eval(), network_def, pool


def _branch_state(bundle_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The nodule branch weights of a joined bundle (one this trainer wrote), to start from."""
    if not (bundle_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"init bundle {bundle_dir} has no models/model.pt")
    try:
        _, network = load_bundle(bundle_dir, device)
    except RuntimeError as exc:  # weights that do not fit the network its inference.json builds
        raise ValueError(f"init bundle {bundle_dir} cannot be loaded: {str(exc).splitlines()[0]}") from exc
    if not isinstance(network, AnatomyWithNoduleBranch):
        raise ValueError(f"init bundle {bundle_dir} has no nodule branch to start from "
                         f"(its network is a {type(network).__name__})")
    return network.nodule.state_dict()


@torch.no_grad()
def _branch_dice(
    branch: Callable[[torch.Tensor], torch.Tensor], val_ds: Any, inferer: Any, nodule_value: int, dev: torch.device,
    thresholds: Sequence[float] = (0.5,), min_sizes: Sequence[int] = (1,),
) -> dict[tuple[float, int], tuple[float, float | None]]:
    """``{(threshold, min size): (mean nodule Dice over all validation cases, mean over the cases with nodules)}``.

    ``branch`` gives nodule logits (B, 1, X, Y, Z) of an image batch, in eval mode.
    A voxel is nodule where the branch's probability exceeds the threshold and
    its 26-connected component of such voxels has at least ``min size`` voxels.
    """
    every: dict[tuple[float, int], list[float]] = {(t, m): [] for t in thresholds for m in min_sizes}
    with_nodules: dict[tuple[float, int], list[float]] = {key: [] for key in every}
    for item in val_ds:
        probability = torch.sigmoid(inferer(plain(item["image"])[None].to(dev), branch)[0, 0]).cpu().numpy()
        ref = np.asarray(item["label"][0]).round().astype(np.uint8) == nodule_value
        for t in thresholds:
            components, sizes = component_sizes(probability > t)
            for m in min_sizes:
                score = dice_per_label(sizes[components] >= m, ref, [True])[1]
                every[(t, m)].append(score)
                if ref.any():
                    with_nodules[(t, m)].append(score)
    return {key: (float(np.mean(every[key])), float(np.mean(with_nodules[key])) if with_nodules[key] else None)
            for key in every}


def train_nodule_branch(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    base_bundle: str | Path,
    epochs: int = 250,
    device: str = "cpu",
    seed: int = 0,
    patch_size: Sequence[int] = DEFAULT_BRANCH_PATCH_SIZE,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    val_fraction: float = 0.15,
    class_ratios: Sequence[float] | None = None,
    val_interval: int = 1,
    sw_batch_size: int = 2,
    nodule_sampling: str = NODULE_SAMPLINGS[0],
    lesion_loss_weight: float = 0.0,
    init_bundle: str | Path | None = None,
    spacing_mm: Sequence[float] | None = None,
    nodule_mirror_axes: Sequence[int] = DEFAULT_MIRROR_AXES,
    full_resolution_channels: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a nodule branch on ``dataset_dir`` for ``base_bundle``'s anatomy network; bundle to ``out_dir``.

    The base bundle gives the preprocessing (spacing, intensity window), the
    sliding window, the labels and the frozen anatomy network; only the branch
    learns. One epoch visits every training case once with ``batch_size`` patches
    per step. ``nodule_sampling`` "per-nodule-anywhere" (the default): nodule patches
    are drawn for every nodule of a case equally often, so 3 mm nodules are trained
    on as often as 30 mm ones, each centred up to half a patch (less a 4-voxel
    margin) from the nodule, so a small nodule is not always at the exact patch
    centre, as it never is in a sliding window; "per-nodule": centred on the nodule;
    "per-voxel": on every nodule voxel equally often, which favours large nodules.
    ``lesion_loss_weight`` adds that multiple of the per-lesion Dice loss
    (:class:`training.losses.LesionDiceLoss`), which weighs a 7 mm nodule as much as a
    25 mm one. ``init_bundle`` (a joined bundle) starts the branch from its branch
    instead of random weights, for fine-tuning. ``spacing_mm`` (x, y, z) puts the
    branch, and the joined bundle's input, on a finer grid than the base's: each
    base spacing divided by a whole number (the anatomy network then sees the
    input average-pooled by those numbers, see :class:`AnatomyWithNoduleBranch`);
    the sliding window grows by the same numbers, training and validation use the
    lungs' bounding box of each case (with a margin), where every nodule lies, and
    the joined network skips the branch on windows without lung.
    The checkpoint with the best mean validation nodule Dice is exported with the
    decision threshold (branch probability, built into the joined network) and the
    nodule size filter (in the bundle's postprocessing) that together score best on
    the same validation cases. ``nodule_mirror_axes`` (0 x, 1 y, 2 z; default all
    three): the exported network averages the branch's probability over the input
    and its mirror images along these axes, and threshold and size filter are chosen
    with that averaging; the checkpoint itself is picked without it (4x cheaper).
    ``full_resolution_channels`` > 0 gives the branch a first level of that many
    channels on the input grid (see :func:`~workers.models.segmentation_networks.nodule_branch_def`).
    Returns the training record, also in ``out_dir/metrics.json``. Deterministic
    for a given ``seed`` on CPU.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import SlidingWindowInferer
    from monai.losses import DiceCELoss
    from monai.transforms import Compose

    dataset_dir, out, base = Path(dataset_dir), Path(out_dir), Path(base_bundle)
    patch_size = tuple(int(v) for v in patch_size)
    if len(patch_size) != 3 or any(v <= 0 or v % 8 for v in patch_size):
        raise ValueError(f"patch_size must be 3 positive multiples of 8 (x, y, z), got {patch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if nodule_sampling not in NODULE_SAMPLINGS:
        raise ValueError(f"nodule_sampling must be one of {NODULE_SAMPLINGS}, got {nodule_sampling!r}")
    mirrors = mirror_axes(nodule_mirror_axes)
    branch_def = nodule_branch_def(full_resolution_channels=full_resolution_channels)  # refuses a bad count early
    if not (lesion_loss_weight >= 0 and math.isfinite(lesion_loss_weight)):
        raise ValueError(f"lesion_loss_weight must be a finite number >= 0, got {lesion_loss_weight}")
    if not (base / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"base bundle {base} has no configs/inference.json")
    meta = read_bundle_metadata(base)
    node = meta["dicom_node"]
    if node.get("kind") != "segmentation":
        raise ValueError(f"base bundle {base} is a {node.get('kind')!r} bundle, not a segmentation one")
    try:
        labels = [label_by_name(str(entry["name"])) for entry in node["labels"]]
    except KeyError as exc:
        raise ValueError(f"base bundle {base} has a label this trainer does not know: {exc}") from exc
    nodules = [spec for spec in labels if spec.name == "nodule"]
    if not nodules:
        raise ValueError(f"base bundle {base} has no 'nodule' label (labels: {[s.name for s in labels]})")
    nodule: LabelSpec = nodules[0]
    n_classes = 1 + max(spec.value for spec in labels)
    ratios = list(class_ratios) if class_ratios is not None else list(_DEFAULT_RATIOS)
    if len(ratios) != n_classes:
        raise ValueError(f"class_ratios needs {n_classes} values (one per label value), got {len(ratios)}")
    window_hu = node["input"]["intensity_window_hu"]
    dev = torch.device(device)
    use_amp = dev.type == "cuda"

    seed_everything(seed)
    inference, anatomy, anatomy_def, base_pool = _base_network(base, dev)
    spacing_mm, pool = _branch_grid([float(s) * p for s, p in zip(node["input"]["spacing_mm"], base_pool)],
                                    spacing_mm)
    cases = labelled_cases(dataset_dir)
    train_idx, val_idx = split_cases(len(cases), val_fraction, seed)
    train_cases, val_cases = [cases[i] for i in train_idx], [cases[i] for i in val_idx]
    logger.info("nodule branch: %d training, %d validation cases", len(train_cases), len(val_cases))

    preprocess = parse_config(preprocessing_config(image_key="image", label_key="label", spacing_mm=spacing_mm,
                                                   window_hu=window_hu))
    # On a finer grid (~20 M voxels per chest) train on the lungs' box only, and let the exported network skip
    # the branch where the anatomy sees no lung: there the branch is most of the inference cost.
    lung = next((spec.value for spec in labels if spec.name == "lung"), None) if pool != (1, 1, 1) else None
    if lung is not None:
        preprocess = Compose([*preprocess.transforms, _lung_box(lung, nodule.value, patch_size)])
    offset = [v // 2 - _NODULE_PATCH_MARGIN for v in patch_size] if nodule_sampling == "per-nodule-anywhere" else None
    det, rnd = train_transforms(patch_size, n_classes, ratios, batch_size,
                                balance_label=None if nodule_sampling == "per-voxel" else nodule.value,
                                balance_offset=offset)
    files = lambda cs: [{"image": c["image"], "label": c["label"]} for c in cs]  # noqa: E731
    train_transform = Compose([*preprocess.transforms, *det, *rnd])
    train_transform.set_random_state(seed=seed)
    train_ds = CacheDataset(files(train_cases), transform=train_transform, num_workers=0, progress=False)
    val_ds = CacheDataset(files(val_cases), transform=preprocess, num_workers=0, progress=False)
    train_loader = DataLoader(train_ds, batch_size=1, shuffle=True, num_workers=0,
                              generator=torch.Generator().manual_seed(seed))

    torch.manual_seed(seed)  # the branch's start must not depend on what building the base network drew
    branch = parse_config(branch_def).to(dev)
    if init_bundle is not None:
        try:
            branch.load_state_dict(_branch_state(Path(init_bundle), dev))
        except RuntimeError as exc:
            raise ValueError(f"init bundle {init_bundle}'s nodule branch does not fit this trainer's branch "
                             f"network: {str(exc).splitlines()[0]}") from exc
    # Dice over the whole batch: per-patch Dice (each small nodule weighing as much as a large one) overfitted
    # the tiny nodules and validated worse (best 0.47 in 220 epochs, against 0.52 on the same cases).
    dice_ce = DiceCELoss(sigmoid=True, batch=True)
    lesion_dice = LesionDiceLoss()
    loss_fn = (dice_ce if lesion_loss_weight == 0
               else lambda logits, target: dice_ce(logits, target) + lesion_loss_weight * lesion_dice(logits, target))
    optimisation = one_cycle(branch, learning_rate, epochs * len(train_loader), use_amp)
    is_nodule = lambda labels: (labels.round() == nodule.value).float()  # noqa: E731
    inference = _on_grid(inference, spacing_mm, [p / b for p, b in zip(pool, base_pool)])
    window = inference["inferer"]
    inferer = SlidingWindowInferer(roi_size=list(window["roi_size"]), sw_batch_size=sw_batch_size,
                                   overlap=float(window.get("overlap", 0.25)), mode="gaussian",
                                   padding_mode="replicate")

    record: dict[str, Any] = {
        "kind": "nodule-branch",
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dataset": str(dataset_dir),
        "base_bundle": str(base),
        "train_cases": [c["name"] for c in train_cases],
        "validation_cases": [c["name"] for c in val_cases],
        "settings": {
            "epochs": epochs,
            "patch_size": list(patch_size),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "class_ratios": [float(v) for v in ratios],
            "nodule_patch_centres": {
                "per-nodule": "each nodule equally often",
                "per-nodule-anywhere": f"each nodule equally often, up to {offset} voxels from it",
                "per-voxel": "each nodule voxel equally often",
            }[nodule_sampling],
            "val_fraction": val_fraction,
            "network": branch_def,
            "loss": "Dice + BCE (sigmoid, batch Dice)"
            + (f" + {lesion_loss_weight:g} x per-lesion Dice" if lesion_loss_weight else ""),
            "lesion_loss_weight": lesion_loss_weight,
            "init_bundle": str(init_bundle) if init_bundle is not None else None,
            "spacing_mm": spacing_mm,
            "anatomy_pool": list(pool),
            "nodule_mirror_axes": list(mirrors),
            "amp": use_amp,
        },
    }

    def validate(epoch: int) -> Validation:
        branch.eval()
        every, with_nodules = _branch_dice(branch, val_ds, inferer, nodule.value, dev)[(0.5, 1)]
        return Validation(every, {"validation_dice": {nodule.name: every}, "validation_mean_dice": every,
                                  "validation_dice_cases_with_nodules": with_nodules}, f"nodule Dice {every:.4f}")

    fitted = fit(branch, epochs=epochs, val_interval=val_interval, validate=validate, name="nodule branch",
                 progress=progress,
                 train_epoch=loader_epoch(branch, train_loader, loss_fn, is_nodule, optimisation, dev,
                                          use_amp=use_amp, progress=progress))
    record.update(epochs=fitted.epochs, training_seconds=fitted.seconds, best_epoch=fitted.best_epoch)
    # The decision threshold and size filter of the best checkpoint, picked on the validation cases (ties:
    # the threshold nearest 0.5, then the smallest filter) with the mirroring the exported network does.
    mirrored = AnatomyWithNoduleBranch(anatomy, branch, nodule.value, nodule_mirror_axes=mirrors).to(dev).eval()
    by_choice = _branch_dice(mirrored.branch_logits, val_ds, inferer, nodule.value, dev, _THRESHOLDS,
                             _min_sizes(spacing_mm))
    threshold, min_voxels = max(by_choice, key=lambda k: (by_choice[k][0], -abs(k[0] - 0.5), -k[1]))
    best_score, best_with = by_choice[(threshold, min_voxels)]
    record["validation_dice_by_threshold"] = {
        f"{t} min {m}": {"all_cases": a, "cases_with_nodules": w} for (t, m), (a, w) in by_choice.items()
    }
    record["nodule_threshold"] = threshold
    record["nodule_min_voxels"] = min_voxels
    record["best_validation_dice"] = {nodule.name: best_score}
    record["best_validation_mean_dice"] = best_score
    record["best_validation_dice_cases_with_nodules"] = best_with
    joined = AnatomyWithNoduleBranch(anatomy, branch, nodule.value, threshold, pool, lung, mirrors).to(dev).eval()
    joined_def = {
        "_target_": target_name(AnatomyWithNoduleBranch),
        "anatomy": anatomy_def,
        "nodule": branch_def,
        "nodule_channel": nodule.value,
        "nodule_threshold": threshold,
        **({"anatomy_pool": list(pool)} if pool != (1, 1, 1) else {}),
        **({"lung_channel": lung} if lung is not None else {}),
        **({"nodule_mirror_axes": list(mirrors)} if mirrors else {}),
    }
    write_bundle(
        out,
        network=joined,
        network_def=joined_def,
        inference_config=_with_size_filter({k: v for k, v in inference.items() if k != "network_def"},
                                           nodule.value, min_voxels),
        metadata=_joined_metadata(meta, record, nodule, len(val_cases), window["roi_size"]),
        example_input=torch.rand(1, 1, *(int(v) for v in window["roi_size"])),
    )
    record["bundle"] = str(out)
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_segmentation_training(record, [nodule], out / "plots")
    plot_validation_slices(joined, val_ds, inferer, labels, dev, out / "plots" / "validation_slices.png",
                            window_hu=window_hu)
    return record


#: The nodule size filter's ``_target_`` (a base bundle's, once read through ``with_current_targets``).
SIZE_FILTER = target_name(DropSmallComponentsd)


def _branch_grid(
    base_spacing: Sequence[float], spacing: Sequence[float] | None
) -> tuple[list[float], tuple[int, int, int]]:
    """(branch spacing x, y, z in mm, anatomy pool per axis); the base's grid and (1, 1, 1) without ``spacing``.

    Each base spacing must be a whole multiple of the branch's, so that average
    pooling gives the anatomy network exactly the grid it was trained on.
    """
    base = [float(v) for v in base_spacing]
    if spacing is None:
        return base, (1, 1, 1)
    fine = [float(v) for v in spacing]
    if len(fine) != 3 or min(fine) <= 0:
        raise ValueError(f"spacing must be 3 positive values in mm (x, y, z), got {tuple(spacing)}")
    ratios = [b / f for b, f in zip(base, fine)]
    pool = tuple(round(r) for r in ratios)
    if any(p < 1 or abs(r - p) > 1e-3 for r, p in zip(ratios, pool)):
        raise ValueError(f"spacing {tuple(fine)} mm must divide the base bundle's spacing {tuple(base)} mm "
                         f"by whole numbers (ratios {tuple(round(r, 3) for r in ratios)})")
    return fine, pool  # type: ignore[return-value]


def _on_grid(inference: dict[str, Any], spacing_mm: Sequence[float], scale: Sequence[float]) -> dict[str, Any]:
    """``inference`` resampling to ``spacing_mm``, its sliding window ``scale`` times as large per axis.

    The anatomy network inside the window then sees the window it was trained on.
    """
    out = copy.deepcopy(inference)
    steps = out["preprocessing"]["transforms"]
    resample = [step for step in steps if step.get("_target_") == "Spacingd"]
    if len(resample) != 1:
        raise ValueError(f"the base bundle's preprocessing needs exactly one Spacingd, it has {len(resample)}")
    resample[0]["pixdim"] = [float(v) for v in spacing_mm]
    out["inferer"]["roi_size"] = [round(int(v) * f) for v, f in zip(out["inferer"]["roi_size"], scale)]
    return out


class _InLabels:
    """``select_fn`` of a foreground crop: voxels whose label value is one of ``values``."""

    def __init__(self, values: Sequence[int]) -> None:
        self.values = [float(v) for v in values]

    def __call__(self, label: Any) -> Any:
        return sum((label == v) for v in self.values) > 0


def _lung_box(lung: int, nodule: int, patch_size: Sequence[int]) -> Any:
    """A transform cropping image and label to the box of the ``lung`` and ``nodule`` labels plus half a patch.

    Why: on a thin-slice grid whole chests are ~20 M voxels; the lungs' box is
    about a third of that and holds every nodule and the vessels the branch must
    learn to leave alone.
    """
    from monai.transforms import CropForegroundd

    return CropForegroundd(["image", "label"], source_key="label", select_fn=_InLabels([lung, nodule]),
                           margin=[int(v) // 2 for v in patch_size], allow_smaller=True)


def _with_size_filter(inference: dict[str, Any], channel: int, min_voxels: int) -> dict[str, Any]:
    """``inference`` whose postprocessing drops nodule components under ``min_voxels`` before the argmax.

    A filter already there (a base that was itself a joined bundle) is replaced;
    ``min_voxels`` 1 means no filter.
    """
    out = copy.deepcopy(inference)
    steps = [step for step in out["postprocessing"]["transforms"] if step.get("_target_") != SIZE_FILTER]
    if min_voxels > 1:
        after = next((i + 1 for i, step in enumerate(steps) if step.get("_target_") == "Activationsd"), None)
        if after is None:
            raise ValueError("the base bundle's postprocessing has no Activationsd to put the nodule size filter after")
        steps.insert(after, {"_target_": SIZE_FILTER, "keys": "pred", "channel": channel, "min_voxels": min_voxels})
    out["postprocessing"]["transforms"] = steps
    return out


def _grid_note(spacing_mm: Sequence[float], pool: Sequence[int]) -> str:
    """The description's sentence on the two grids of a joined network."""
    fine = " x ".join(f"{v:g}" for v in spacing_mm)
    coarse = " x ".join(f"{v * p:g}" for v, p in zip(spacing_mm, pool))
    return (f" Input and branch are on a {fine} mm grid (thin-slice CT); the anatomy network sees the input "
            f"average-pooled to its own {coarse} mm grid and its logits are interpolated back.")


def _joined_metadata(
    base_meta: Mapping[str, Any], record: Mapping[str, Any], nodule: LabelSpec, validation_cases: int,
    roi_size: Sequence[int],
) -> dict[str, Any]:
    """The base bundle's metadata, describing the joined network, its training and validation figures.

    Held-out figures of the base are dropped: they describe another network. A
    base that is itself a joined bundle contributes its anatomy's description and
    training only, not its old branch's.
    """
    meta = copy.deepcopy(dict(base_meta))
    branch_note = f" The {nodule.name} channel comes from a binary 3D UNet branch"
    anatomy_description = str(base_meta.get("description", "")).split(branch_note)[0].rstrip()
    anatomy_training = dict(meta.get("training", {}))
    while "nodule_branch" in anatomy_training:  # a joined base; loop: an older re-export nested it twice
        anatomy_training = dict(anatomy_training.get("anatomy", {}))
    meta["dicom_node"]["input"]["spacing_mm"] = record["settings"]["spacing_mm"]
    for side in ("inputs", "outputs"):
        for entry in meta.get("network_data_format", {}).get(side, {}).values():
            if "spatial_shape" in entry:
                entry["spatial_shape"] = [int(v) for v in roi_size]
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "optional_packages_version", "required_packages_version", "schema"):
        meta.pop(key, None)
    meta["name"] = "Chest CT segmentation (SegResNet + nodule branch)"
    meta["description"] = (
        anatomy_description
        + branch_note + f" ({target_name(AnatomyWithNoduleBranch)}) trained on nodule-rich patches with Dice+BCE"
        + (" and a per-lesion Dice term" if record["settings"].get("lesion_loss_weight") else "")
        + " while the anatomy network stayed frozen (training/segmentation/nodule_branch.py)."
        + (_grid_note(record["settings"]["spacing_mm"], record["settings"]["anatomy_pool"])
           if any(p != 1 for p in record["settings"]["anatomy_pool"]) else "")
        + " configs/inference.json builds "
        "that class, so `python -m monai.bundle run` needs the dicom-node package importable; models/model.ts does not."
    )
    meta["training"] = {
        "anatomy": anatomy_training,
        "nodule_branch": {
            "dataset": record["dataset"],
            **record["settings"],
            "seed": record["seed"],
            "best_epoch": record["best_epoch"],
            "training_seconds": round(record["training_seconds"], 1),
            "device": record["device"],
        },
    }
    evaluation = dict(meta["dicom_node"].get("evaluation", {}))
    evaluation.pop("held_out", None)
    dice = dict(evaluation.get("dice", {}))
    dice[nodule.name] = record["best_validation_mean_dice"]
    evaluation.update({
        "split": "validation",
        "note": "anatomy labels: the base network's validation figures; nodule: the branch's validation "
        "cases (used to pick its checkpoint); see held_out for figures on data never seen in training",
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))),
        "nodule_branch_validation_cases": validation_cases,
        "nodule_dice_cases_with_nodules": record["best_validation_dice_cases_with_nodules"],
    })
    meta["dicom_node"]["evaluation"] = evaluation
    return meta
