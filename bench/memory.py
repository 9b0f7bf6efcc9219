"""Memory benchmark: peak resident memory and seconds of segmentation and detection by slice count.

For each slice count (``--slices``, default 100, 300, 600, 1000) a chest CT phantom of
N x 512 x 512 at 1.0 x 0.7 x 0.7 mm (``generate_chest_phantom``, 2-3 nodules, so the scan
range grows with N as a whole-body CT's does; above 200 slices the anatomy is generated
on thicker slices, each repeated) is written as DICOM files once, by a subprocess of its own. Then one fresh subprocess per model and size runs the worker's
own path on it and reports, per stage, the seconds and the peak resident memory:

    load     ``load_series`` of the files (the float32 volume: 1 GiB at 1,000 slices)
    predict  ``model.predict(volume)`` of the demo bundle (``chest-ct-segmentation`` or
             ``lung-nodule-detection``, built by the registry as the worker builds it)
    seg      segmentation only: ``build_seg`` and writing it to bytes (what the outbox stores)

Peak memory is sampled every 10 ms from ``/proc/self/statm`` by a thread (the stage's
peak) and checked against ``ru_maxrss`` (the process's peak, which includes the model
load); with ``--device cuda`` the GPU's peak allocation during ``predict`` too.
``--threads`` sets torch's CPU threads (default 2: the CI machine). A child that
runs past ``--timeout`` or dies (out of memory) is reported as such.

    python bench/memory.py [--slices 100,300,600,1000] [--models seg,det] [--threads 2]
                           [--timeout 1800] [--device cpu] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {"seg": "chest-ct-segmentation", "det": "lung-nodule-detection"}
#: Slice spacing and pixel spacing (mm) of the phantoms: a thin-slice CT; 1,000 slices cover 1 m.
SPACING_MM = (1.0, 0.7, 0.7)
#: Most slices the phantom generator makes at once (see :func:`generate`).
GENERATED_SLICES = 200
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    """This process's resident memory now (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakSampler:
    """A thread that samples the resident memory every ``interval`` seconds and keeps the peak since :meth:`reset`."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def reset(self) -> None:
        self.peak = _rss_bytes()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stage(result: dict[str, Any], name: str, sampler: PeakSampler) -> Iterator[None]:
    """Record ``name``'s wall seconds and peak RSS (MiB) in ``result``."""
    sampler.reset()
    started = time.perf_counter()
    yield
    result[f"{name}_s"] = round(time.perf_counter() - started, 2)
    result[f"{name}_peak_mib"] = round(max(sampler.peak, _rss_bytes()) / 2**20)


def generate(slices: int, out_dir: Path) -> int:
    """Write the phantom of ``slices`` slices as DICOM files into ``out_dir``/series (run in a subprocess).

    The phantom generator holds about 24 bytes per voxel, too much for 1,000 x 512 x 512 on a
    24 GB machine: the anatomy is generated with at most :data:`GENERATED_SLICES` slices, each
    slice repeated to make 1 mm slices (a 1,000-slice CT: 200 slices of 5 mm, each written 5 times).
    """
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom
    from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, write_series

    repeat = -(-slices // GENERATED_SLICES)
    config = PhantomConfig(shape=(-(-slices // repeat), 512, 512),
                           spacing_mm=(SPACING_MM[0] * repeat, SPACING_MM[1], SPACING_MM[2]),
                           nodule_count=(2, 3), nodule_diameter_mm=(8.0, 20.0))
    phantom = generate_chest_phantom(config, seed=2024)
    volume = np.repeat(phantom.volume_hu, repeat, axis=0)[:slices]
    geometry = SeriesGeometry(rows=512, columns=512, slices=slices, pixel_spacing=SPACING_MM[1:],
                              slice_spacing=SPACING_MM[0], slice_thickness=SPACING_MM[0],
                              origin=phantom.origin_xyz_mm)
    write_series(ct_series_datasets(volume, geometry, seed=2024, series_description="bench/memory phantom"),
                 out_dir / "series")
    return 0


def child(model_key: str, series_dir: Path, threads: int, device: str) -> int:
    """Run one model on one series and print one JSON line of stage figures."""
    import torch

    from workers.models.registry import default_registry
    from workers.volume import load_series

    torch.set_num_threads(threads)
    result: dict[str, Any] = {"model": model_key}
    sampler = PeakSampler()
    registry = default_registry()
    with stage(result, "model_load", sampler):
        model = registry.load(MODELS[model_key], device=device)
    files = sorted(series_dir.glob("*.dcm"))
    with stage(result, "load", sampler):
        volume = load_series(files)
    result["shape"] = list(volume.shape)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with stage(result, "predict", sampler):
        out = model.predict(volume)
    if cuda:
        result["predict_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if model_key == "seg":
        result["labels"] = _label_summary(out.label_map)
        result["label_dtype"] = str(out.label_map.dtype)
        # uint8 values, whatever the dtype: the same digest before and after a change means the same label map.
        result["label_sha1"] = hashlib.sha1(np.ascontiguousarray(out.label_map, dtype=np.uint8).tobytes()).hexdigest()
        with stage(result, "seg", sampler):
            result["seg_mib"] = round(_seg_bytes(volume, out, model) / 2**20, 1)
    else:
        result["detections"] = len(out.detections)
        result["detections_sha1"] = hashlib.sha1(json.dumps(
            [[round(v, 4) for v in (*d.centre_mm, *d.size_mm, d.score)] for d in out.detections]).encode()).hexdigest()
    sampler.stop()
    result["maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result), flush=True)
    return 0


def _label_summary(label_map: Any) -> dict[str, int]:
    counts = np.bincount(np.asarray(label_map).ravel(), minlength=1)
    return {str(v): int(c) for v, c in enumerate(counts) if c and v}


def _seg_bytes(volume: Any, result: Any, model: Any) -> int:
    """Build the SEG of ``result`` and write it to memory as the outbox would; its size in bytes."""
    from pydicom.filebase import DicomBytesIO

    from workers.outputs.common import SeriesIdentity
    from workers.outputs.seg import build_seg

    identity = SeriesIdentity(series_number=9001, series_description="bench")
    seg = build_seg(volume, result, model.algorithm, identity)
    if seg is None:
        return 0
    buffer = DicomBytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(return code or None on timeout, stdout, stderr tail) of ``cmd``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", f"ran past {timeout:.0f} s"
    return done.returncode, done.stdout, done.stderr[-2000:]


def measure(model_key: str, series_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One child's figures, or ``error`` saying why there are none."""
    code, out, err = _run([sys.executable, __file__, "--child", model_key, str(series_dir),
                           "--threads", str(args.threads), "--device", args.device], args.timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        why = "timed out" if code is None else f"exit {code}" + (" (killed: out of memory?)" if code == -9 else "")
        return {"model": model_key, "error": f"{why}: {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return json.loads(lines[-1])


def markdown_table(rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """One markdown row per model and size: seconds and peak MiB per stage, and what the result was."""
    lines = ["| model | slices | load s | load MiB | predict s | predict MiB | seg s | seg MiB | maxrss MiB | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for slices, r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {slices} | DID NOT FINISH: {r['error']} |||||||||")
            continue
        seg = f"{r['seg_s']:.1f} | {r['seg_peak_mib']}" if "seg_s" in r else "- | -"
        what = (f"{r['label_dtype']} labels sha1 {r['label_sha1'][:10]}, SEG {r['seg_mib']} MiB" if r["model"] == "seg"
                else f"{r['detections']} detections, sha1 {r['detections_sha1'][:10]}")
        if "predict_gpu_mib" in r:
            what = f"GPU peak {r['predict_gpu_mib']} MiB; " + what
        lines.append(f"| {r['model']} | {slices} | {r['load_s']:.1f} | {r['load_peak_mib']} | {r['predict_s']:.1f} "
                     f"| {r['predict_peak_mib']} | {seg} | {r['maxrss_mib']} | {what} |")
    return lines


def measure_sizes(sizes: list[int], models: list[str], args: argparse.Namespace,
                  show: Callable[[str], None] = partial(print, flush=True)) -> list[tuple[int, dict[str, Any]]]:
    """(slices, figures) for each size and model (``args``: threads, device, timeout, keep), each size's phantom
    written once (or reused under ``args.keep``); each child's JSON line is shown as it comes."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        base = args.keep or Path(tmp)
        for slices in sizes:
            case = base / f"ct-{slices}"
            series_dir = case / "series"
            if not any(series_dir.glob("*.dcm")):
                started = time.perf_counter()
                code, _, err = _run([sys.executable, __file__, "--generate", str(slices), str(case)], args.timeout)
                if code != 0:
                    raise SystemExit(f"phantom of {slices} slices not written (exit {code}): {err}")
                show(f"phantom {slices} x 512 x 512 written in {time.perf_counter() - started:.0f} s")
            for model_key in models:
                r = measure(model_key, series_dir, args)
                rows.append((slices, r))
                show(json.dumps({"slices": slices, **r}))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", default="100,300,600,1000")
    parser.add_argument("--models", default="seg,det")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models run (GPU peak reported)")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the phantom series under this folder")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SERIES_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, metavar=("SLICES", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.threads, args.device)
    if args.generate:
        return generate(int(args.generate[0]), Path(args.generate[1]))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown} (known: {', '.join(MODELS)})")
    print(f"{os.cpu_count()} CPUs, torch threads {args.threads}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    rows = measure_sizes([int(v) for v in args.slices.split(",")], models, args)
    print(f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("\n".join(markdown_table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
