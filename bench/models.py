"""Model formats benchmark: load time, inference time and peak memory of each format on a full-size CT.

For each format whose loader is there (found by trying the registry's own build,
``workers.models.registry.build_model``; the Zoo RetinaNet through its loader with random
weights), one subprocess per format and device:

* ``monai_bundle``: the demo chest segmentation bundle (``workers/bundles/chest_ct_segmentation``);
* ``torchscript``: that bundle's ``models/model.ts`` served as a TorchScript entry;
* ``onnx``: that bundle's network exported here with ``training.onnx_export`` (ONNX Runtime; CPU, or the
  CUDA provider on a GPU);
* ``nnunet``: an nnU-Net v2 results folder (``--nnunet PATH``, else the small one the tests build);
* ``retinanet``: the Model Zoo ``lung_nodule_ct_detection`` configs (``--zoo DIR``), random weights.

The CT: a chest phantom (``training.phantoms.chest``, 75 x 128 x 128 at 3.2 x 2.75 x 2.75 mm) repeated
4x along each axis to 300 x 512 x 512 at 0.8 x 0.69 x 0.69 mm (``--shape`` for another size). Load time:
``build_model``; inference: ``predict`` on the volume (``--repeat`` runs after none or one warm-up, the
median); peak memory: the child's maximum RSS (``ru_maxrss``; the volume alone is 300 MiB in float32, its
RSS before loading is printed too) and on the GPU ``torch.cuda.max_memory_allocated``. CPU always; the
GPU when ``torch.cuda.is_available()``. A format whose loader or files are missing is listed as
"not available" with the reason. Prints a table and the 1-minute load average before and after.

    python bench/models.py [--formats monai_bundle,torchscript,...] [--devices cpu,cuda] [--shape 300,512,512]
                           [--repeat 1] [--warmup] [--threads N] [--timeout 1800] [--nnunet PATH] [--zoo DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUNDLES = ROOT / "workers" / "bundles"
ZOO_CONFIGS = Path(os.environ.get("DICOM_NODE_ZOO_CONFIGS") or ROOT.parent / "shared" / "monai-bundles")
ZOO = ZOO_CONFIGS / "lung_nodule_ct_detection"
FORMATS = ("monai_bundle", "torchscript", "onnx", "nnunet", "retinanet")
#: The phantom before it is repeated 4x along each axis (z, y, x) and its spacing (mm).
BASE_SHAPE, BASE_SPACING = (75, 128, 128), (3.2, 2.75, 2.75)


class NotAvailable(Exception):
    """This format cannot be benchmarked here; the message says why."""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ct_volume(shape: tuple[int, int, int]):  # noqa: ANN201
    """A chest phantom CT of ``shape`` (z, y, x) as a :class:`workers.volume.Volume` (axial, LPS axes)."""
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom
    from workers.volume import FrameRef, Volume

    factors = [max(1, round(n / b)) for n, b in zip(shape, BASE_SHAPE)]
    base = tuple(max(8, n // f) for n, f in zip(shape, factors))
    phantom = generate_chest_phantom(PhantomConfig(shape=base, spacing_mm=BASE_SPACING), seed=11)
    array = np.asarray(phantom.volume_hu, dtype=np.float32)
    for axis, factor in enumerate(factors):
        array = np.repeat(array, factor, axis=axis)
    array = np.ascontiguousarray(array[: shape[0], : shape[1], : shape[2]])
    spacing = tuple(float(s / f) for s, f in zip(BASE_SPACING, factors))
    uid = "1.2.826.0.1.3680043.8.498.4242"
    return Volume(
        array=array, spacing_mm=spacing, origin_mm=tuple(float(v) for v in phantom.origin_xyz_mm),
        axes=np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        series_instance_uid=uid, study_instance_uid=uid + ".1", frame_of_reference_uid=uid + ".2",
        modality="CT", frames=tuple(FrameRef(f"{uid}.{k + 1}") for k in range(array.shape[0])), datasets=(),
    )


def _seg_labels() -> list[dict[str, Any]]:
    meta = json.loads((BUNDLES / "chest_ct_segmentation" / "configs" / "metadata.json").read_text())
    return list(meta["dicom_node"]["labels"])


def _entry(**fields: Any):  # noqa: ANN202
    from dicom_node.model_catalog import ModelEntry

    return ModelEntry.model_validate({"version": "bench", **fields})


def prepare(fmt: str, workdir: Path, args: argparse.Namespace, device: str):  # noqa: ANN201
    """A loader for ``fmt``: a function that builds the model on ``device`` (NotAvailable with the reason)."""
    from workers.models.registry import build_model

    seg = BUNDLES / "chest_ct_segmentation"
    ts_pre = {"spacing_mm": [2.2, 2.2, 2.5], "window_hu": [-1000, 500], "roi_size": [64, 64, 48], "sw_batch_size": 2}
    if fmt == "monai_bundle":
        entry = _entry(id="seg-bundle", kind="segmentation", format="monai_bundle", path=str(seg), version="0.1.0")
        return lambda: build_model(entry, seg, device)
    if fmt == "torchscript":
        path = seg / "models" / "model.ts"
        if not path.is_file():
            raise NotAvailable(f"no {path}")
        entry = _entry(id="seg-ts", kind="segmentation", format="torchscript", path=str(path),
                       preprocessing=ts_pre, labels=_seg_labels())
        return lambda: build_model(entry, path, device)
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise NotAvailable(f"onnxruntime is not installed ({exc})") from exc
        try:
            from training.onnx_export import export_bundle_onnx
        except ImportError as exc:
            raise NotAvailable(f"no ONNX export in training ({exc})") from exc
        export = export_bundle_onnx(seg, workdir / "seg.onnx")
        entry = _entry(id="seg-onnx", kind="segmentation", format="onnx", path=str(export.path),
                       preprocessing=export.preprocessing or ts_pre, labels=_seg_labels())
        return lambda: build_model(entry, export.path, device)
    if fmt == "nnunet":
        return _nnunet(workdir, args, device, build_model)
    if fmt == "retinanet":
        try:
            from workers.models.retinanet import RetinaNetBundleModel
        except ImportError as exc:
            raise NotAvailable(f"no RetinaNet loader ({exc})") from exc
        zoo = Path(args.zoo)
        if not (zoo / "configs" / "inference.json").is_file():
            raise NotAvailable(f"no Model Zoo configs at {zoo}")
        from dicom_node.model_catalog import BundleLabel

        nodule = BundleLabel.model_validate({
            "value": 1, "bundle_value": 0, "name": "nodule",
            "code": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
            "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"}})
        return lambda: RetinaNetBundleModel(zoo, device=device, labels={0: nodule.segment_label()},
                                            random_weights=True, model_id="zoo-retinanet", version="random")
    raise NotAvailable(f"unknown format {fmt!r}")


def _nnunet(workdir: Path, args: argparse.Namespace, device: str, build_model: Any):  # noqa: ANN202
    try:
        import workers.models.nnunet  # noqa: F401
    except ImportError as exc:
        raise NotAvailable(f"the nnU-Net loader does not import ({exc})") from exc
    folder = Path(args.nnunet) if args.nnunet else None
    if folder is None:
        try:
            from tests.unit.workers.nnunet_fixtures import build_results_folder

            folder = build_results_folder(workdir / "nnunet")  # nnunetv2's own tools, seeded random weights
        except Exception as exc:  # noqa: BLE001 - any failure to build the test folder means: not available
            raise NotAvailable(f"no nnU-Net results folder (--nnunet PATH; the tests' builder failed: {exc})") from exc
    dataset = json.loads((folder / "dataset.json").read_text())
    labels = [{"value": int(v), "bundle_value": int(v), "name": str(name),
               "code": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
               "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}}
              for name, v in dataset["labels"].items() if int(v) != 0]
    folds = sorted(p.name.removeprefix("fold_") for p in folder.glob("fold_*"))
    entry = _entry(id="nnunet", kind="segmentation", format="nnunet", path=str(folder), labels=labels,
                   nnunet={"folds": [int(f) if f.isdigit() else f for f in folds[:1]]})
    return lambda: build_model(entry, folder, device)


def child(args: argparse.Namespace) -> int:
    """Measure one format on one device; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"format": args.one, "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loader = prepare(args.one, Path(tmp), args, args.device)
        except NotAvailable as exc:
            print(json.dumps(result | {"available": False, "reason": str(exc)}))
            return 0
        shape = tuple(int(v) for v in args.shape.split(","))
        volume = ct_volume(shape)  # type: ignore[arg-type]
        result["rss_before_load_mib"] = round(_rss_mib(), 1)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        model = loader()
        result["load_s"] = round(time.perf_counter() - started, 2)
        result["rss_after_load_mib"] = round(_rss_mib(), 1)
        if args.warmup:
            model.predict(volume)
        times = []
        for _ in range(args.repeat):
            if cuda:
                torch.cuda.synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
            out = model.predict(volume)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            result["predict_cpu_s"] = round(time.process_time() - cpu_started, 1)
        result["predict_s"] = round(statistics.median(times), 2)
        result["peak_rss_mib"] = round(_rss_mib(), 1)
        if cuda:
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        labels = getattr(out, "label_map", None)
        result["result"] = (f"label map {tuple(labels.shape)}, values {sorted(int(v) for v in np.unique(labels))}"
                            if labels is not None else type(out).__name__ + (
                                f", {len(out.findings)} findings" if hasattr(out, "findings") else ""))
        result["available"] = True
        result["shape"] = list(shape)
    print(json.dumps(result))
    return 0


def _row(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['format']:<13} {r['device']:<6} DID NOT FINISH: {r['error']}"
    if not r.get("available"):
        return f"{r['format']:<13} {r['device']:<6} not available: {r.get('reason')}"
    gpu = f"{r['peak_gpu_mib']:>8.0f}" if "peak_gpu_mib" in r else f"{'-':>8}"
    return (f"{r['format']:<13} {r['device']:<6} {r['load_s']:>7.2f} {r['predict_s']:>9.2f} {r['predict_cpu_s']:>8.1f} "
            f"{r['rss_before_load_mib']:>8.0f} {r['peak_rss_mib']:>8.0f} {gpu}  {r['result']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--devices", default=None, help="cpu and/or cuda (default: cpu, and cuda when available)")
    parser.add_argument("--shape", default="300,512,512", help="z,y,x of the CT")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--warmup", action="store_true", help="one untimed predict first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per format and device")
    parser.add_argument("--nnunet", help="an nnU-Net v2 results folder (default: the tests' small one)")
    parser.add_argument("--zoo", default=str(ZOO), help="the Model Zoo lung_nodule_ct_detection folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.one:
        return child(args)
    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); CT {args.shape} (z,y,x); "
          f"torch {torch.__version__}" + (f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""))
    rows = []
    print(f"{'FORMAT':<13} {'DEVICE':<6} {'LOAD s':>7} {'INFER s':>9} {'CPU s':>8} {'RSS0 MiB':>8} {'PEAK MiB':>8} "
          f"{'GPU MiB':>8}  RESULT", flush=True)
    for device in devices:
        for fmt in args.formats.split(","):
            command = [sys.executable, __file__, "--one", fmt, "--device", device, "--shape", args.shape,
                       "--repeat", str(args.repeat), "--threads", str(args.threads), "--zoo", args.zoo]
            command += ["--warmup"] if args.warmup else []
            command += ["--nnunet", args.nnunet] if args.nnunet else []
            started = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT,
                                      check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                    "format": fmt, "device": device, "available": True,
                    "error": f"failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}"}
            except subprocess.TimeoutExpired:
                row = {"format": fmt, "device": device, "available": True,
                       "error": f"timed out after {args.timeout} s (--timeout)"}
            row["wall_s"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(_row(row), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}; RSS0 = the child's peak RSS with the CT in memory, "
          "before the model loads; PEAK = its peak RSS after inference; CPU s = process CPU time of one predict")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
