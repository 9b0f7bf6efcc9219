"""FROC of the detector: on validation cases during training, and of an exported bundle on a dataset.

Why: LUNA16-style FROC (sensitivity at 1/8..8 false positives per scan, CPM) is
how nodule detectors are compared; the same figures choose the training
checkpoint and describe the shipped bundle, for all nodules and for those of
6 mm or more (LUNA16's size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.detection.data import DetectionCase, load_detection_cases
from training.metrics import DEFAULT_FP_RATES, FrocResult, Reference, froc
from training.plots import plot_froc
from workers.models.detection_network import Detection, DetectorConfig, detections_on_grid, load_detector, predict_heads

__all__ = ["LARGE_NODULE_MM", "evaluate_cases", "evaluate_detection", "froc_pair", "froc_summary", "jsonable"]

#: Diameter (mm) from which nodules count for the "large" FROC figures (LUNA16's >= 6 mm).
LARGE_NODULE_MM = 6.0


def froc_pair(
    detections: Sequence[Sequence[Detection]], references: Sequence[Sequence[Reference]]
) -> dict[str, FrocResult]:
    """FROC of the detections of each scan against its references: all nodules, and >= :data:`LARGE_NODULE_MM`."""
    return {
        "all": froc(detections, references, DEFAULT_FP_RATES),
        "large": froc(detections, references, DEFAULT_FP_RATES, min_diameter_mm=LARGE_NODULE_MM),
    }


def evaluate_cases(
    network: nn.Module | torch.jit.ScriptModule,
    cases: Sequence[DetectionCase],
    config: DetectorConfig,
    device: str | torch.device,
    *,
    progress: bool = False,
) -> tuple[list[list[Detection]], dict[str, FrocResult]]:
    """(detections of each case, :func:`froc_pair`) of ``network`` run on whole cases, at the FROC's low threshold."""
    from tqdm.auto import tqdm

    detections = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        heads = predict_heads(network, case.image, config, device=device)
        detections.append(
            detections_on_grid(heads, case.grid, config, config.froc_score_threshold, config.froc_max_detections)
        )
    return detections, froc_pair(detections, [c.references for c in cases])


def froc_summary(result: FrocResult) -> dict[str, Any]:
    """The headline figures of a FROC: sensitivities at the FP rates, CPM, their thresholds, counts."""
    d = result.to_dict()
    return {
        "sensitivity_at": d["sensitivity_at"],
        "cpm": d["cpm"],
        "threshold_at": d["threshold_at"],
        "n_references": d["n_references"],
        "n_scans": d["n_scans"],
    }


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as None and NumPy scalars as Python ones, for strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
    return value


def evaluate_detection(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    *,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    prefer_torchscript: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """FROC of a detection bundle on every case of ``dataset_dir`` (all nodules and >= 6 mm).

    Loads the bundle with :func:`~workers.models.detection_network.load_detector` (TorchScript by default), runs
    whole-volume inference on every case listed in the dataset's ``boxes.json``
    and writes ``metrics.json`` (with the full FROC curves), ``detections.json``
    and ``froc.png`` to ``out_dir`` (default: ``<bundle_dir>/evaluation``). Returns
    the summary: sensitivity at 1/8..8 FPs per scan, CPM and the score thresholds of
    those operating points, for all nodules (``all``) and >= 6 mm (``large``).
    """
    network, config = load_detector(bundle_dir, device=device, prefer_torchscript=prefer_torchscript)
    out = Path(out_dir) if out_dir is not None else Path(bundle_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cases = load_detection_cases(dataset_dir, config)
    detections, result = evaluate_cases(network, cases, config, device, progress=progress)
    seconds = time.perf_counter() - started
    summary = {
        "kind": "detection",
        "bundle": str(bundle_dir),
        "dataset": str(dataset_dir),
        "device": str(device),
        "model": "torchscript" if isinstance(network, torch.jit.ScriptModule) else "state_dict",
        "cases": len(cases),
        "seconds": round(seconds, 2),
        "seconds_per_case": round(seconds / len(cases), 3),
        "large_min_diameter_mm": LARGE_NODULE_MM,
        "all": froc_summary(result["all"]),
        "large": froc_summary(result["large"]),
        "metrics": str(out / "metrics.json"),
    }
    metrics = {**summary, "froc": {"all": result["all"].to_dict(), "large": result["large"].to_dict()}}
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
    (out / "detections.json").write_text(
        json.dumps(
            {c.name: {"detections": [d.to_dict() for d in dets],
                      "references": [dataclasses.asdict(r) for r in c.references]}
             for c, dets in zip(cases, detections)},
            indent=1,
        )
        + "\n"
    )
    plot_froc({"all nodules": result["all"], f">= {LARGE_NODULE_MM:g} mm": result["large"]}, out / "froc.png",
               title=f"FROC on {Path(dataset_dir).name} ({len(cases)} scans)")
    return jsonable(summary)
