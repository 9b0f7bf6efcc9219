"""ONNX export and INT8 quantisation of the demo models: CPU inference time and agreement on phantom volumes.

What it measures, on phantom chest CTs of the bundle's own grid (default 96 x 160 x 160 at 2.5 x 2.2 x 2.2 mm;
--shape/--spacing for others) generated here, seed --seed:

* time of ``predict`` (median of --repeat runs after one warm-up) of the chest segmentation bundle (PyTorch),
  its TorchScript file served as a TorchScript entry, its ONNX export served as an ONNX entry (ONNX Runtime,
  float32) and the INT8 quantisation of that export (static QDQ, calibrated on windows of --calibration
  other phantoms; and dynamic), all on --threads CPU threads;
* agreement, Dice per label (labels present in either map):
  ONNX float vs the bundle (the served chains differ: see training.onnx_export), ONNX float vs the same
  network in PyTorch without the small-nodule stage through the same chain (the conversion alone), INT8 vs
  ONNX float;
* the detection bundle's network: export, and the largest difference of its raw output maps from PyTorch
  on one window.

    python bench/onnx_int8.py [--threads 2] [--repeat 3] [--seed 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUNDLES = ROOT / "workers" / "bundles"


def phantom_volume(seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    """A chest phantom as a :class:`workers.volume.Volume` (axial, LPS axes)."""
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom
    from workers.volume import FrameRef, Volume

    phantom = generate_chest_phantom(PhantomConfig(shape=shape, spacing_mm=spacing), seed=seed)
    uid = f"1.2.826.0.1.{seed}"
    return Volume(
        array=np.asarray(phantom.volume_hu, dtype=np.float32),
        spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in phantom.origin_xyz_mm),  # type: ignore[arg-type]
        axes=np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        series_instance_uid=uid, study_instance_uid=uid + ".1", frame_of_reference_uid=uid + ".2",
        modality="CT", frames=tuple(FrameRef(f"{uid}.{k + 1}") for k in range(shape[0])), datasets=(),
    )


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    """Dice of each label value present in ``a`` or ``b`` (background excluded)."""
    out = {}
    for value in sorted(set(np.unique(a)) | set(np.unique(b))):
        if value == 0:
            continue
        x, y = a == value, b == value
        out[int(value)] = round(float(2 * (x & y).sum() / (x.sum() + y.sum())), 4)
    return out


def timed(predict, volume, repeat: int) -> tuple[np.ndarray, float, float]:
    """The label values of ``predict(volume)``, the median wall and CPU seconds of ``repeat`` runs after a warm-up.

    CPU seconds are the whole process's (every thread of PyTorch or ONNX Runtime): on a loaded machine they say
    more than the wall time.
    """
    values = predict(volume)
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        predict(volume)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return values, statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--calibration", type=int, default=3, help="phantoms whose windows calibrate static INT8")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 160, 160), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 2.2, 2.2), metavar=("Z", "Y", "X"))
    parser.add_argument("--out", type=Path, default=None, help="keep the .onnx files and results.json here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # ONNX Runtime's quantiser warns once per tensor

    import torch

    from dicom_node.model_catalog import (
        TorchScriptPreprocessing,
        label_mapping,
        metadata_labels,
        read_bundle_json,
    )
    from training.onnx_export import (
        _exportable,
        bundle_network,
        export_bundle_onnx,
        quantize_int8,
        sliding_windows,
    )
    from workers.models.monai_bundle import (
        InferencePipeline,
        MonaiBundleModel,
        volume_to_metatensor,
    )
    from workers.models.onnx_model import OnnxSegmentationModel
    from workers.models.torchscript import (
        TorchScriptSegmentationModel,
        pipeline_transforms,
    )

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    seg_bundle = BUNDLES / "chest_ct_segmentation"
    results: dict[str, object] = {"threads": args.threads, "shape_zyx": list(args.shape),
                                  "spacing_zyx_mm": list(args.spacing), "seed": args.seed}

    started = time.perf_counter()
    export = export_bundle_onnx(seg_bundle, out / "chest_ct_segmentation.onnx")
    results["export_s"] = round(time.perf_counter() - started, 2)
    results["left_out"] = list(export.left_out)
    pre = TorchScriptPreprocessing(**export.preprocessing)  # type: ignore[arg-type]
    print("preprocessing:", json.dumps(export.preprocessing))

    # Calibration windows: other phantoms through the same preprocessing chain.
    chain, _ = pipeline_transforms(pre, "image", "pred")
    images = (chain({"image": volume_to_metatensor(phantom_volume(1000 + k, tuple(args.shape), tuple(args.spacing)))})
              ["image"].numpy() for k in range(args.calibration))
    started = time.perf_counter()
    int8 = quantize_int8(export.path, out / "chest_ct_segmentation.int8.onnx", mode="static",
                         calibration=sliding_windows(images, pre.roi_size, per_image=8))
    results["quantize_static_s"] = round(time.perf_counter() - started, 2)
    int8_dynamic = quantize_int8(export.path, out / "chest_ct_segmentation.int8-dynamic.onnx", mode="dynamic")
    results["size_mb"] = {p.name: round(p.stat().st_size / 1e6, 2) for p in (export.path, int8, int8_dynamic)}

    volume = phantom_volume(args.seed, tuple(args.shape), tuple(args.spacing))
    bundle = MonaiBundleModel(seg_bundle, device="cpu")
    mapping = label_mapping(metadata_labels(read_bundle_json(seg_bundle, "metadata.json"), "bench"), "bench")
    models = {
        "bundle (PyTorch)": bundle.predict_values,
        "TorchScript": TorchScriptSegmentationModel(seg_bundle / "models" / "model.ts", preprocessing=pre,
                                                    labels=mapping, device="cpu").predict_values,
        "ONNX float": OnnxSegmentationModel(export.path, preprocessing=pre, labels=mapping, device="cpu",
                                            threads=args.threads).predict_values,
        "ONNX INT8 static": OnnxSegmentationModel(int8, preprocessing=pre, labels=mapping, device="cpu",
                                                  threads=args.threads).predict_values,
        "ONNX INT8 dynamic": OnnxSegmentationModel(int8_dynamic, preprocessing=pre, labels=mapping, device="cpu",
                                                   threads=args.threads).predict_values,
    }
    # The exported network in PyTorch through the ONNX model's chain: what the conversion alone changes.
    dense, _ = _exportable(bundle_network(seg_bundle)[0])
    chain_pre, chain_post = pipeline_transforms(pre, "image", "pred")
    from monai.inferers import SlidingWindowInferer

    torch_chain = InferencePipeline(
        source="dense PyTorch", preprocessing=chain_pre, network=dense,
        inferer=SlidingWindowInferer(roi_size=list(pre.roi_size), sw_batch_size=pre.sw_batch_size,
                                     overlap=pre.overlap, mode="gaussian", padding_mode=pre.padding_mode),
        postprocessing=chain_post, device=torch.device("cpu"), amp=False,
    )
    models["PyTorch, exported network, ONNX chain"] = torch_chain.label_values

    values: dict[str, np.ndarray] = {}
    timing: dict[str, dict[str, float]] = {}
    for name, predict in models.items():
        values[name], wall, cpu = timed(predict, volume, args.repeat)
        timing[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                        "load_avg_1min": round(os.getloadavg()[0], 1)}
        print(f"{name:40s} {wall:7.2f} s wall {cpu:7.2f} s CPU (load {os.getloadavg()[0]:.1f})", flush=True)
    results["predict"] = timing
    results["dice"] = {
        "ONNX float vs bundle": dice_per_label(values["ONNX float"], values["bundle (PyTorch)"]),
        "ONNX float vs TorchScript (same chain, TorchScript has the small-nodule stage)":
            dice_per_label(values["ONNX float"], values["TorchScript"]),
        "ONNX float vs PyTorch exported network (same chain)":
            dice_per_label(values["ONNX float"], values["PyTorch, exported network, ONNX chain"]),
        "INT8 static vs ONNX float": dice_per_label(values["ONNX INT8 static"], values["ONNX float"]),
        "INT8 dynamic vs ONNX float": dice_per_label(values["ONNX INT8 dynamic"], values["ONNX float"]),
    }
    results["voxels_differing"] = {
        name: int((values[name] != values["ONNX float"]).sum()) for name in values if name != "ONNX float"
    }

    # Detection: does the CenterNet network export, and do its maps agree?
    det_bundle = BUNDLES / "lung_nodule_detection"
    try:
        det = export_bundle_onnx(det_bundle, out / "lung_nodule_detection.onnx")
        import onnxruntime as ort

        net, _ = bundle_network(det_bundle)
        window = torch.rand(1, 1, 96, 96, 64)
        session = ort.InferenceSession(str(det.path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": window.numpy()})
        with torch.no_grad():
            want = net(window)
        want_list = list(want.values()) if isinstance(want, dict) else list(want) if isinstance(want, (tuple, list)) \
            else [want]
        results["detection"] = {
            "exported": True, "size_mb": round(det.path.stat().st_size / 1e6, 2),
            "max_abs_diff": float(max(np.abs(g - w.numpy()).max() for g, w in zip(got, want_list))),
        }
    except RuntimeError as exc:
        results["detection"] = {"exported": False, "reason": str(exc)}
    print(json.dumps(results, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("files in", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
