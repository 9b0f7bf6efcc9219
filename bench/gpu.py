"""GPU benchmark: each shipped model on a 300-slice CT with AMP and cuDNN benchmark mode, and the end-to-end time.

On a machine where ``torch.cuda.is_available()``; elsewhere it says so and exits with status 2.

models
    A chest CT phantom of ``--slices`` (300) x 512 x 512 at 1.0 x 0.7 x 0.7 mm (tests/gpu/cases.py, the CT of
    the GPU tests), held in memory as the workers' ``Volume``. Each shipped model (``--models``: the two demo
    models and the nodule-presence classifier) is loaded on ``cuda`` as a worker loads it - AMP where its
    loader uses it, ``torch.backends.cudnn.benchmark`` as ``worker.cudnn_benchmark`` sets it (``--cudnn``
    on, off or both) - and ``predict`` (preprocessing on the CPU, the network on the GPU, postprocessing) is
    timed to the end of its GPU work: the first call (cuDNN times its algorithms there) and the median of
    ``--repeat`` warmed calls; with the peak device memory (``torch.cuda.max_memory_allocated``) of each,
    and the dtype of the convolutions' outputs (float16: AMP ran). The target of issue 26 is checked:
    segmentation of a 300-slice CT under 2 s (warmed median).

end to end (``--e2e``)
    ``full``: ``bench/e2e.py`` (DCMTK storescu -> ``dicom-node serve`` with its embedded worker on the GPU ->
    a real Orthanc), which needs Orthanc, DCMTK and the ``dicom-node`` command on this machine. ``worker``: the
    worker's own path in this process, without queue or network: ``load_series`` of the CT written as DICOM
    files, both demo models' ``predict``, then the result objects (bench/encode.py's stages: measurements,
    SEG, SR, GSPS, each built and written to bytes). ``auto`` (default): ``full`` when its peers are there,
    else ``worker``. ``none``: skip.

    python bench/gpu.py [--models ID,...] [--slices 300] [--repeat 5] [--cudnn on|off|both] [--e2e auto]
                        [--e2e-repeat 2]

About 3-5 minutes on an H100 (the phantom takes about a minute to generate on the CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Issue 26: segmentation of a 300-slice CT under 2 s on an H100.
SEGMENTATION_TARGET_S = 2.0
SEGMENTATION_ID, DETECTION_ID = "chest-ct-segmentation", "lung-nodule-detection"


def measure_models(model_ids: list[str], volume: Any, repeat: int, cudnn_modes: list[bool],
                   device: str = "cuda") -> list[dict[str, Any]]:
    """One row per model and cuDNN mode: load, first and warmed ``predict`` seconds, peak device memory, dtypes."""
    from tests.gpu.cases import load, shipped_registry, timed_predict

    registry = shipped_registry()
    rows = []
    for benchmark in cudnn_modes:
        for model_id in model_ids:
            started = time.perf_counter()
            cached = any(row["model"] == model_id for row in rows)
            model = load(registry, model_id, device, cudnn_benchmark=benchmark)  # loaded once, then cached
            loaded = None if cached else time.perf_counter() - started
            first = timed_predict(model, volume)
            warm = [timed_predict(model, volume) for _ in range(repeat)]
            rows.append({"model": model_id, "cudnn_benchmark": benchmark, "load_s": loaded, "first_s": first.seconds,
                         "first_mib": first.peak_mib, "warm_s": statistics.median(t.seconds for t in warm),
                         "warm_min_s": min(t.seconds for t in warm),
                         "warm_mib": None if first.peak_mib is None else max(t.peak_mib or 0 for t in warm),
                         "dtypes": ",".join(sorted(first.dtypes)) or "-"})
            print(f"  {model_id} (cuDNN benchmark {'on' if benchmark else 'off'}): first {first.seconds:.2f} s, "
                  f"warmed median {rows[-1]['warm_s']:.3f} s of {repeat}", flush=True)
    return rows


def models_table(rows: list[dict[str, Any]], repeat: int) -> list[str]:
    lines = [f"| model | cuDNN benchmark | load s | first call s | warmed median s ({repeat}) | warmed min s "
             "| peak device MiB first / warmed | convolutions ran in |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load_s = "(loaded above)" if r["load_s"] is None else f"{r['load_s']:.1f}"
        lines.append(f"| {r['model']} | {'on' if r['cudnn_benchmark'] else 'off'} | {load_s} "
                     f"| {r['first_s']:.2f} | {r['warm_s']:.3f} | {r['warm_min_s']:.3f} "
                     f"| {_mib(r['first_mib'])} / {_mib(r['warm_mib'])} | {r['dtypes']} |")
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def worker_path(slices: int, workdir: Path, device: str = "cuda") -> list[str]:
    """The worker's path in this process on the CT written as DICOM: load, both demo models, result objects."""
    import torch

    from bench import encode, memory
    from tests.gpu.cases import load, shipped_registry
    from workers.volume import load_series

    memory.generate(slices, workdir)  # bench/memory.py's phantom, as DICOM files
    files = sorted((workdir / "series").glob("*.dcm"))
    registry = shipped_registry()
    models = {model_id: load(registry, model_id, device) for model_id in (SEGMENTATION_ID, DETECTION_ID)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stages = encode.Stages()
    for _ in range(2):  # the first round warms up (cuDNN timing, first calls); the second is reported
        stages = encode.Stages()
        volume = stages.run("load_series", lambda: load_series(files))
        results = {}
        for model_id, model in models.items():
            results[model_id] = stages.run(f"predict {model_id}", lambda: (model.predict(volume), sync())[0])
        found = results[DETECTION_ID].detections or encode.detections(volume)
        encode.one_run(volume, results[SEGMENTATION_ID].label_map, found, stages)
    lines = ["| stage (worker path, in process, warmed) | s |", "|---|---|"]
    lines += [f"| {stage} | {values[-1]:.3f} |" for stage, values in stages.times.items()]
    total = sum(values[-1] for values in stages.times.values())
    lines.append(f"| **total** (no queue, database or network) | {total:.3f} |")
    return lines


def full_e2e_available() -> str | None:
    """None when bench/e2e.py can run here, else what is missing."""
    missing = [tool for tool in ("Orthanc", "storescu", "echoscu") if shutil.which(tool) is None
               and not (tool == "Orthanc" and Path("/usr/sbin/Orthanc").exists())]
    if not Path(sys.executable).with_name("dicom-node").exists() and shutil.which("dicom-node") is None:
        missing.append("the dicom-node command")
    return ", ".join(missing) or None


def main() -> int:
    from tests.gpu.cases import MODEL_IDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_IDS), help="comma-separated model ids")
    parser.add_argument("--slices", type=int, default=300, help="slices of 512 x 512 (over 300 mm)")
    parser.add_argument("--repeat", type=int, default=5, help="warmed calls per model (the median is shown)")
    parser.add_argument("--cudnn", choices=("on", "off", "both"), default="both",
                        help="torch.backends.cudnn.benchmark for the model runs (both: on, then off)")
    parser.add_argument("--e2e", choices=("auto", "full", "worker", "none"), default="auto")
    parser.add_argument("--e2e-repeat", type=int, default=2, help="studies of bench/e2e.py (full)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check this script on a machine without "
                        "a GPU (the figures are then CPU figures, and --e2e full is not run)")
    args = parser.parse_args()
    model_ids = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(model_ids) - set(MODEL_IDS))
    if unknown:
        parser.error(f"--models: unknown {unknown} (shipped: {', '.join(MODEL_IDS)})")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device on this machine (torch {torch.__version__}: torch.cuda.is_available() "
              "is False); nothing measured. Run it on a GPU machine; bench/models.py and bench/memory.py measure "
              "the CPU.", file=sys.stderr)
        return 2
    from tests.gpu.cases import chest_ct

    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{args.device} (no GPU figures)"
    print(f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}; {os.cpu_count()} CPU cores; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    started = time.perf_counter()
    volume = chest_ct(shape=(args.slices, 512, 512))
    print(f"CT phantom {volume.array.shape} generated in {time.perf_counter() - started:.0f} s", flush=True)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.cudnn]
    rows = measure_models(model_ids, volume, args.repeat, modes, args.device)
    del volume

    e2e_lines: list[str] = []
    mode = args.e2e
    if mode == "auto":
        missing = full_e2e_available()
        mode = "worker" if missing or not args.device.startswith("cuda") else "full"
        why = "bench/e2e.py" if mode == "full" else f"the worker path in process ({missing or 'not on a GPU'})"
        print(f"end to end: {why}", flush=True)
    if mode == "full":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        code = subprocess.run([sys.executable, str(REPO / "bench" / "e2e.py"), "--repeat", str(args.e2e_repeat),
                               "--slices", str(args.slices)], env=env).returncode
        if code != 0:
            print(f"bench/e2e.py exited with status {code}", file=sys.stderr)
    elif mode == "worker":
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            e2e_lines = worker_path(args.slices, Path(tmp), args.device)

    print(f"\n### models on {where}, {args.slices}-slice CT\n")
    print("\n".join(models_table(rows, args.repeat)))
    segmentation = [r["warm_s"] for r in rows if r["model"] == SEGMENTATION_ID and r["cudnn_benchmark"]]
    if segmentation and args.slices == 300:
        verdict = "met" if segmentation[0] < SEGMENTATION_TARGET_S else "NOT met"
        print(f"\nsegmentation of a 300-slice CT, warmed, cuDNN benchmark on: {segmentation[0]:.2f} s against the "
              f"{SEGMENTATION_TARGET_S:g} s target: {verdict}")
    if e2e_lines:
        print("\n### end to end: the worker's path\n")
        print("\n".join(e2e_lines))
    print(f"\nload average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
