"""Measure a segmentation bundle on a labelled dataset, through MONAI's bundle API as the node runs it.

Why: the figures a bundle ships (``dicom_node.evaluation.held_out``) must describe
the bundle as served - its own preprocessing, sliding window and postprocessing,
the prediction compared in each case's original grid - not the training code's
view of it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.bundle import read_bundle_metadata, record_evaluation
from training.labels import LESION_CATEGORY_VALUE
from training.metrics import (
    LesionMatch,
    dice_per_label,
    lesion_band,
    lesion_band_names,
    lesion_matches,
    lesion_summary,
)
from training.plots import LesionCrop, PlotLabel, lesion_crop, overlay_figure, plot_lesion_gallery
from training.segmentation.data import labelled_cases
from training.segmentation.network import load_bundle

__all__ = ["evaluate_segmentation", "record_lesions"]


def evaluate_segmentation(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    *,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    record: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a segmentation bundle on every labelled case of ``dataset_dir`` and measure Dice per label.

    The bundle is loaded through MONAI's bundle API (``ConfigParser`` on its
    ``configs/inference.json``, weights from ``models/model.pt``) and run with its own
    preprocessing, inferer and postprocessing (all but ``SaveImaged``), so the
    prediction is compared with the reference label map in the case's original
    grid. ``dice`` is the mean over cases of each case's Dice (a label absent from
    both scores 1, see :func:`training.metrics.dice_per_label`); ``dice_pooled`` the
    Dice of all cases' voxels taken together; ``dice_cases_with_label`` the mean over
    the cases whose reference holds the label, and ``false_positive_cases`` how many
    cases without it got some of it predicted. Labels of the lesion category
    (SNOMED CT 49755003) also get lesion-wise figures (``lesions``, see
    :func:`training.metrics.lesion_summary`): which lesions were found, their own Dice
    and the false-positive lesions, by lesion size. Writes ``segmentation_evaluation.json``,
    ``overlay.png`` and (with a lesion label) ``lesions.png`` to ``out_dir`` (default
    ``BUNDLE/evaluation``); with ``record`` the figures also go into the bundle's metadata
    (``dicom_node.evaluation.held_out``).
    """
    from monai.transforms import Compose, LoadImage, Orientation, SaveImaged
    from tqdm.auto import tqdm

    bundle, dataset_dir = Path(bundle_dir), Path(dataset_dir)
    out = Path(out_dir) if out_dir is not None else bundle / "evaluation"
    dev = torch.device(device)
    meta = read_bundle_metadata(bundle)
    node = meta.get("dicom_node", {})
    labels = [
        (int(e["value"]), str(e["name"]), tuple(e.get("color_rgb", (255, 0, 0)))) for e in node.get("labels", [])
    ]
    if not labels:
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        labels = [(int(k), str(v), (255, 0, 0)) for k, v in channels.items() if int(k) != 0]
    lesion_names = [str(e["name"]) for e in node.get("labels", [])
                    if (e.get("category") or {}).get("value") == LESION_CATEGORY_VALUE]
    specs = [PlotLabel(v, n, c) for v, n, c in labels]
    parser, network = load_bundle(bundle, dev)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveImaged)])
    image_key = parser.get("image_key", "image")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    ras = Orientation(axcodes="RAS")

    cases = labelled_cases(dataset_dir, include_test=True)
    per_case = []
    lesions: dict[str, list[LesionMatch]] = {name: [] for name in lesion_names}
    gallery: dict[str, list[LesionCrop]] = {band: [] for band in lesion_band_names()}
    pooled = {name: np.zeros(2, dtype=np.int64) for _, name, _ in labels}  # (2 |P & R|, |P| + |R|) summed
    rows = []
    started = time.perf_counter()
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        data = preprocessing({image_key: case["image"]})
        with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            data["pred"] = inferer(data[image_key][None].to(dev), network)[0]
        data = postprocessing(data)
        pred = data["pred"]
        ref = load(case["label"])
        if tuple(pred.shape) != tuple(ref.shape):
            raise ValueError(f"{case['name']}: prediction shape {tuple(pred.shape)} != label shape {tuple(ref.shape)}")
        pred_np = np.asarray(pred.cpu()[0]).round().astype(np.uint8)
        ref_np = np.asarray(ref[0]).round().astype(np.uint8)
        scores = dice_per_label(pred_np, ref_np, [v for v, _, _ in labels])
        per_case.append({"case": case["name"], "dice": {n: scores[v] for v, n, _ in labels},
                         "reference_voxels": {n: int((ref_np == v).sum()) for v, n, _ in labels},
                         "lesions": {}, "false_positive_lesions": {}})
        pred_ras, ref_ras = ras(pred.cpu()), ras(ref)
        # The CT is read only for pictures (lesion crops, the first overlays), and then once per case.
        ct_ras = functools.cache(lambda path=case["image"]: np.asarray(ras(load(path))[0]))
        record_lesions(case["name"], pred_ras, ref_ras, ct_ras, labels,
                        lesions, per_case[-1], gallery, lesion_names[0] if lesion_names else None)
        for value, name, _ in labels:
            p, r = pred_np == value, ref_np == value
            pooled[name] += np.array([2 * np.logical_and(p, r).sum(), p.sum() + r.sum()], dtype=np.int64)
        if len(rows) < 3:
            rows.append((case["name"], ct_ras(),
                         np.asarray(pred_ras[0]).round().astype(np.uint8),
                         np.asarray(ref_ras[0]).round().astype(np.uint8)))
    dice = {n: float(np.mean([c["dice"][n] for c in per_case])) for _, n, _ in labels}
    # Per-case Dice only over the cases whose reference has the label (the usual lesion Dice), and how
    # many cases without it got some predicted anyway (false-positive cases).
    with_label = {
        n: [c["dice"][n] for c in per_case if c["reference_voxels"][n] > 0] for _, n, _ in labels
    }
    result = {
        "kind": "segmentation",
        "bundle": str(bundle),
        "dataset": str(dataset_dir),
        "device": str(dev),
        "cases": len(per_case),
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))),
        # Dice of all cases' voxels together: large structures weigh more; no case is "empty".
        "dice_pooled": {n: float(a / b) if b else 1.0 for n, (a, b) in pooled.items()},
        "dice_cases_with_label": {n: float(np.mean(v)) if v else None for n, v in with_label.items()},
        "cases_with_label": {n: len(v) for n, v in with_label.items()},
        "false_positive_cases": {
            n: sum(1 for c in per_case if c["reference_voxels"][n] == 0 and c["dice"][n] < 1.0) for _, n, _ in labels
        },
        "lesions": {n: lesion_summary(found, [c["false_positive_lesions"][n] for c in per_case])
                    for n, found in lesions.items()},
        "per_case": per_case,
        "seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmentation_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    overlay_figure(rows, specs, out / "overlay.png")
    if lesion_names:
        plot_lesion_gallery([(f"{lesion_names[0]}s {band}", crops) for band, crops in gallery.items()],
                            out / "lesions.png", color_rgb=next(c for _, n, c in labels if n == lesion_names[0]))
    if record:
        record_evaluation(bundle, "held_out",
                          {k: result[k] for k in ("dataset", "cases", "dice", "mean_dice", "dice_pooled",
                                                  "dice_cases_with_label", "cases_with_label",
                                                  "false_positive_cases", "lesions")})
    return result


def record_lesions(
    case_name: str, pred_ras: Any, ref_ras: Any, load_ct: Callable[[], np.ndarray],
    labels: Sequence[tuple[int, str, Any]], lesions: dict[str, list[LesionMatch]], case_record: dict[str, Any],
    gallery: dict[str, list[LesionCrop]], gallery_label: str | None, per_band: int = 4,
) -> None:
    """One case's lesion-wise matches of every lesion label into ``lesions`` and ``case_record``.

    ``pred_ras`` and ``ref_ras`` are the RAS-oriented label maps (MetaTensors), so each
    lesion's centre is given in RAS millimetres. The first ``per_band`` lesions of
    ``gallery_label`` in each size band go to ``gallery`` as crops of the RAS CT
    array that ``load_ct`` gives (called only then).
    """
    pred_np = np.asarray(pred_ras[0]).round().astype(np.uint8)
    ref_np = np.asarray(ref_ras[0]).round().astype(np.uint8)
    affine = np.asarray(ref_ras.affine, dtype=np.float64)
    for value, name, _ in labels:
        if name not in lesions:
            continue
        matches, false_positives = lesion_matches(pred_np == value, ref_np == value,
                                                  [float(v) for v in ref_ras.pixdim])
        lesions[name] += matches
        case_record["lesions"][name] = [
            {**m.to_dict(), "centre_ras_mm": [round(float(v), 1) for v in (affine @ [*m.centre_voxel, 1.0])[:3]]}
            for m in matches
        ]
        case_record["false_positive_lesions"][name] = false_positives
        if name != gallery_label:
            continue
        for m in matches:
            band = gallery.get(lesion_band(m.diameter_mm) or "")
            if band is None or len(band) >= per_band:
                continue
            band.append(lesion_crop(load_ct(), ref_np == value, pred_np == value, m.centre_voxel,
                                    f"{case_name} {m.diameter_mm:.1f} mm, Dice {m.dice:.2f}"))
