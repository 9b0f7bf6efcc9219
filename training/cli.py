"""Command-line glue for training, evaluation and phantom data, mounted by the product CLI.

Why: ``dicom-node train|evaluate|phantom`` are the user-facing way to make and
check the bundles the node serves, but the node must not depend on the training
code (nor the training code on the node). The product CLI calls
:func:`add_training_commands` and :func:`add_phantom_command` on its subparsers;
each sub-command sets ``handler`` (``args -> exit code``), so the product's main
only needs::

    if getattr(args, "handler", None) is not None:
        return args.handler(args)

Heavy modules (torch, MONAI, the detection code) are imported by the handlers,
not here, so building the parser stays fast. ``python -m training.cli ...`` runs
the same commands without the product.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.sampling import NODULE_SAMPLINGS

__all__ = [
    "add_phantom_command",
    "add_training_commands",
    "build_parser",
    "evaluate_command",
    "export_onnx_command",
    "main",
    "phantom_command",
    "train_command",
]

logger = logging.getLogger(__name__)


def add_training_commands(subparsers: Any) -> None:
    """Add ``train``, ``evaluate`` and ``export-onnx`` to an ``argparse`` subparsers object."""
    train = subparsers.add_parser(
        "train",
        help="train a segmentation or detection network and export it as a MONAI bundle",
        description="Train on a Decathlon-layout dataset (e.g. from `phantom`) and write a MONAI bundle "
        "(configs/, models/model.pt, models/model.ts, docs/) with metrics.json and plots/.",
    )
    train.add_argument("kind", choices=("segmentation", "nodule-branch", "small-nodules", "detection"),
                       help="what to train (nodule-branch: the binary nodule stage of a segmentation bundle; "
                       "small-nodules: the candidate classifier that adds nodules under 6 mm to a bundle with a "
                       "nodule branch)")
    train.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="Decathlon-layout dataset")
    train.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="where the bundle is written")
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's)")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--batch-size", type=int, default=None, help="patches per optimiser step")
    train.add_argument("--learning-rate", type=float, default=None, help="peak learning rate")
    train.add_argument("--val-fraction", type=float, default=None, help="share of the cases used for validation")
    train.add_argument("--val-interval", type=int, default=None, help="validate every N epochs (and after the last)")
    train.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    seg = train.add_argument_group("segmentation options")
    seg.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                     help="training patch / sliding window in voxels, multiples of 8")
    seg.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                     help="target voxel spacing in mm (nodule-branch: the branch's grid, the base bundle's "
                     "spacing divided by whole numbers; default the base's)")
    seg.add_argument("--init-filters", type=int, help="SegResNet width (multiple of 8)")
    seg.add_argument("--class-ratios", type=float, nargs="+", metavar="R",
                     help="how often patches centre on each label value 0..N (default: nodules 6x; nodule-branch: "
                     "0 1 6 0.5 0.5 5)")
    seg.add_argument("--class-weights", type=float, nargs="+", metavar="W",
                     help="loss weight of each label value 0..N (default: all 1)")
    seg.add_argument("--init-bundle", type=Path, metavar="BUNDLE_DIR",
                     help="start from this bundle's weights (fine-tuning; nodule-branch: its branch) instead of "
                     "random ones")
    branch = train.add_argument_group("nodule-branch and small-nodules options")
    branch.add_argument("--base-bundle", type=Path, metavar="BUNDLE_DIR",
                        help="segmentation bundle whose anatomy network the branch joins, or (small-nodules) the "
                        "bundle with a nodule branch the stage is added to (required)")
    branch.add_argument("--nodule-sampling", choices=NODULE_SAMPLINGS, default=None,
                        help="draw nodule patches for every nodule equally often, centred up to half a patch "
                        "from it (per-nodule-anywhere, the default) or on it (per-nodule), or for every nodule "
                        "voxel equally often, which favours large nodules (per-voxel)")
    branch.add_argument("--lesion-loss-weight", type=float, default=None, metavar="W",
                        help="add W x the per-lesion Dice loss, which weighs small nodules as much as large "
                        "ones (default 0)")
    branch.add_argument("--mirror-axes", type=int, nargs="*", choices=(0, 1, 2), default=None, metavar="AXIS",
                        help="the exported network also runs the branch on the input mirrored along each of "
                        "these axes (0 x, 1 y, 2 z) and averages; default 0 1 2, none with no value")
    branch.add_argument("--full-resolution-channels", type=int, default=None, metavar="C",
                        help="give the branch a first level of C channels on the input grid (MONAI's UNet "
                        "otherwise starts at half resolution; default none)")
    det = train.add_argument_group("detection options")
    det.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch")
    train.set_defaults(handler=train_command)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="measure a bundle on a labelled dataset (Dice for segmentation, FROC for detection)",
        description="The bundle's metadata (dicom_node.kind) chooses the evaluation; figures go to "
        "BUNDLE/evaluation/ (or --out) and a summary to standard output.",
    )
    evaluate.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle directory")
    evaluate.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="Decathlon-layout dataset")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    evaluate.add_argument("--out", type=Path, default=None, metavar="DIR", help="where figures and plots go")
    evaluate.add_argument("--record", action="store_true",
                          help="store the figures in the bundle's metadata as dicom_node.evaluation.held_out")
    evaluate.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    evaluate.set_defaults(handler=evaluate_command)

    export = subparsers.add_parser(
        "export-onnx",
        help="export a bundle's network to ONNX (optionally also INT8-quantised) for an onnx registry entry",
        description="Write the bundle's network with its weights as ONNX (dynamic batch and spatial axes) and "
        "print the registry entry's 'preprocessing' for it; parts that do not export are named. --int8 also "
        "writes FILE with .int8.onnx, quantised by ONNX Runtime (static: calibrated on phantom volumes).",
    )
    export.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle directory")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--int8", choices=("static", "dynamic"), default=None,
                        help="also write an INT8 quantisation (static: QDQ calibrated on phantoms; dynamic: "
                        "weights only, leaves 3D convolutions in float)")
    export.add_argument("--calibration", type=int, default=2, metavar="N",
                        help="phantom volumes whose sliding windows calibrate static INT8 (default 2)")
    export.set_defaults(handler=export_onnx_command)


def add_phantom_command(subparsers: Any) -> None:
    """Add ``phantom`` (write a synthetic chest CT dataset) to an ``argparse`` subparsers object."""
    phantom = subparsers.add_parser(
        "phantom",
        help="write a synthetic chest CT dataset (Decathlon NIfTI, boxes.json, DICOM CT + SEG)",
    )
    phantom.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    phantom.add_argument("--cases", type=int, required=True, metavar="N", help="number of phantoms")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the first case (case i uses seed + i)")
    phantom.add_argument("--no-dicom", action="store_true", help="skip the DICOM CT series and SEG")
    phantom.add_argument("--validation-fraction", type=float, default=0.0,
                         help="share of cases listed as validation in boxes.json")
    phantom.add_argument("--nodules", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                         help="nodules per case, inclusive range (default 0 4)")
    phantom.add_argument("--nodule-diameter", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                         help="nodule diameters in mm, log-uniform (default 3 30)")
    phantom.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                         help="voxel spacing in mm (default 2.2 2.2 2.5); the field of view stays 352 x 352 x 240 mm")
    phantom.add_argument("--workers", type=int, default=1, help="processes generating cases side by side")
    phantom.set_defaults(handler=phantom_command)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _set_threads(threads: int | None) -> None:
    from training.loop import set_threads  # torch: only when a command runs

    set_threads(threads)


def _accepted(function: Callable[..., Any], options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``options`` (None = not given) into those ``function`` takes and those it does not."""
    parameters = inspect.signature(function).parameters
    given = {k: v for k, v in options.items() if v is not None}
    return {k: v for k, v in given.items() if k in parameters}, [k for k in given if k not in parameters]


def train_command(args: argparse.Namespace) -> int:
    """Handler of ``train``: returns 0 on success, 2 on bad arguments or data."""
    if not args.dataset.is_dir():
        return _error(f"--dataset {args.dataset} is not a directory")
    _set_threads(args.threads)
    options: dict[str, Any] = {
        "epochs": args.epochs,
        "device": args.device,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "val_fraction": args.val_fraction,
        "val_interval": args.val_interval,
        "progress": not args.no_progress,
    }
    if args.kind == "segmentation":
        options.update(
            patch_size=tuple(args.patch_size) if args.patch_size else None,
            spacing_mm=tuple(args.spacing) if args.spacing else None,
            init_filters=args.init_filters,
            class_ratios=args.class_ratios,
            class_weights=args.class_weights,
            init_bundle=args.init_bundle,
        )
        misplaced = {"--steps-per-epoch": args.steps_per_epoch, "--base-bundle": args.base_bundle,
                     "--nodule-sampling": args.nodule_sampling, "--lesion-loss-weight": args.lesion_loss_weight,
                     "--mirror-axes": args.mirror_axes, "--full-resolution-channels": args.full_resolution_channels}
    elif args.kind == "nodule-branch":
        if args.base_bundle is None:
            return _error("--base-bundle is required when training nodule-branch")
        options.update(base_bundle=args.base_bundle, class_ratios=args.class_ratios,
                       patch_size=tuple(args.patch_size) if args.patch_size else None,
                       lesion_loss_weight=args.lesion_loss_weight, init_bundle=args.init_bundle,
                       spacing_mm=tuple(args.spacing) if args.spacing else None)
        if args.nodule_sampling is not None:
            options["nodule_sampling"] = args.nodule_sampling
        if args.mirror_axes is not None:
            options["nodule_mirror_axes"] = tuple(args.mirror_axes)
        if args.full_resolution_channels is not None:
            options["full_resolution_channels"] = args.full_resolution_channels
        misplaced = {"--steps-per-epoch": args.steps_per_epoch, "--init-filters": args.init_filters,
                     "--class-weights": args.class_weights}
    elif args.kind == "small-nodules":
        if args.base_bundle is None:
            return _error("--base-bundle is required when training small-nodules")
        options["base_bundle"] = args.base_bundle
        misplaced = {"--steps-per-epoch": args.steps_per_epoch, "--val-interval": args.val_interval,
                     "--patch-size": args.patch_size, "--spacing": args.spacing, "--init-filters": args.init_filters,
                     "--class-ratios": args.class_ratios, "--class-weights": args.class_weights,
                     "--init-bundle": args.init_bundle, "--nodule-sampling": args.nodule_sampling,
                     "--lesion-loss-weight": args.lesion_loss_weight, "--mirror-axes": args.mirror_axes,
                     "--full-resolution-channels": args.full_resolution_channels}
    else:
        options["steps_per_epoch"] = args.steps_per_epoch
        misplaced = {"--patch-size": args.patch_size, "--spacing": args.spacing, "--init-filters": args.init_filters,
                     "--class-ratios": args.class_ratios, "--class-weights": args.class_weights,
                     "--init-bundle": args.init_bundle, "--base-bundle": args.base_bundle,
                     "--nodule-sampling": args.nodule_sampling, "--lesion-loss-weight": args.lesion_loss_weight,
                     "--mirror-axes": args.mirror_axes, "--full-resolution-channels": args.full_resolution_channels}
    given = [flag for flag, value in misplaced.items() if value is not None]
    if given:
        return _error(f"{', '.join(given)} not supported when training {args.kind}")
    if args.kind == "segmentation":
        from training.segmentation.train import train_segmentation as trainer
    elif args.kind == "nodule-branch":
        from training.segmentation.nodule_branch import train_nodule_branch as trainer
    elif args.kind == "small-nodules":
        from training.segmentation.small_nodules import train_small_nodule_stage as trainer
    else:
        from training.detection import train_detection as trainer
    kwargs, unknown = _accepted(trainer, options)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        return _error(f"{flags} not supported when training {args.kind}")
    try:
        record = trainer(args.dataset, args.out, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc))
    summary = {
        k: record[k]
        for k in ("bundle", "device", "training_seconds", "best_epoch", "best_validation_dice",
                  "best_validation_mean_dice")
        if k in record
    }
    print(json.dumps(summary or {"bundle": str(args.out)}, indent=2))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Handler of ``evaluate``: the bundle's ``dicom_node.kind`` picks Dice or FROC; 0 on success."""
    from training.bundle import read_bundle_metadata, record_evaluation

    try:
        meta = read_bundle_metadata(args.bundle)
    except (FileNotFoundError, ValueError) as exc:
        return _error(f"--bundle {args.bundle}: {exc}")
    kind = meta.get("dicom_node", {}).get("kind")
    if kind not in ("segmentation", "detection"):
        return _error(f"--bundle {args.bundle}: metadata has no dicom_node.kind (segmentation or detection)")
    if not args.dataset.is_dir():
        return _error(f"--dataset {args.dataset} is not a directory")
    _set_threads(args.threads)
    try:
        if kind == "segmentation":
            from training.segmentation.evaluate import evaluate_segmentation

            result = evaluate_segmentation(args.bundle, args.dataset, device=args.device, out_dir=args.out,
                                           record=args.record)
            summary = {k: result[k] for k in ("kind", "cases", "dice", "mean_dice", "dice_pooled", "lesions")}
        else:
            from training.detection import evaluate_detection

            result = evaluate_detection(args.bundle, args.dataset, device=args.device, out_dir=args.out)
            if args.record:
                record_evaluation(args.bundle, "held_out", result)
            summary = result
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def export_onnx_command(args: argparse.Namespace) -> int:
    """Handler of ``export-onnx``: prints the files, the entry's preprocessing and what was left out; 0 on success."""
    from training.onnx_export import (
        calibration_windows,
        export_bundle_onnx,
        quantize_int8,
    )

    if args.calibration < 1:
        return _error(f"--calibration must be >= 1, got {args.calibration}")
    try:
        export = export_bundle_onnx(args.bundle, args.out)
        summary: dict[str, Any] = {"onnx": str(export.path), "kind": export.kind,
                                   "preprocessing": export.preprocessing, "left_out": list(export.left_out)}
        if args.int8 is not None:
            target = export.path.with_suffix(".int8.onnx")
            windows = None
            if args.int8 == "static":
                if export.preprocessing is None:
                    return _error(f"--int8 static needs a segmentation bundle, {args.bundle} is {export.kind}")
                windows = calibration_windows(export.preprocessing, args.calibration)
            summary["int8"] = str(quantize_int8(export.path, target, mode=args.int8, calibration=windows))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return _error(str(exc))
    print(json.dumps(summary, indent=2))
    return 0


def phantom_command(args: argparse.Namespace) -> int:
    """Handler of ``phantom``: writes the dataset, prints its path; 0 on success."""
    if args.cases < 1:
        return _error(f"--cases must be >= 1, got {args.cases}")
    from training.phantoms.chest import PhantomConfig
    from training.phantoms.dataset import write_phantom_dataset

    try:
        changes: dict[str, Any] = {}
        if args.nodules is not None:
            changes["nodule_count"] = tuple(args.nodules)
        if args.nodule_diameter is not None:
            changes["nodule_diameter_mm"] = tuple(args.nodule_diameter)
        config = PhantomConfig(**changes)
        if args.spacing is not None:
            config = config.with_spacing(tuple(reversed(args.spacing)))
        out = write_phantom_dataset(args.out, args.cases, args.seed, config, dicom=not args.no_dicom,
                                    validation_fraction=args.validation_fraction, workers=args.workers)
    except ValueError as exc:
        return _error(str(exc))
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with ``train``, ``evaluate`` and ``phantom`` (``python -m training.cli``)."""
    parser = argparse.ArgumentParser(prog="python -m training.cli", description="dicom-node training tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_training_commands(subparsers)
    add_phantom_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
