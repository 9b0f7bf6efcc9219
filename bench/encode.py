"""Encode benchmark: how long the DICOM result builders take on a full-size CT study.

Generates a 300-slice 512x512 phantom CT series into a temporary directory,
loads it with ``workers.volume.load_series`` (as the workers do), makes a
5-label chest label map (nested body / lung / heart / bone / nodule shapes
covering realistic fractions of the volume) and 10 nodule detections, then
times each stage - the segment measurements, ``build_seg``, ``build_sr`` (one
SegmentationFindings with the SEG plus one DetectionFindings), ``build_gsps``, the
key images (KO) of the segmentation's nodules and of the detections, the preview
picture of each, and writing each object to bytes (as the pipeline does, :func:`dicom_bytes`) -
and prints the median of ``--repeat`` runs per stage with the size of each object.
The label map is handed over as a model gives it (:class:`SegmentationResult`, which
holds it in C order); ``--fortran-labels`` hands it over transposed, as the demo
segmentation bundle gave it before its lookup was fixed, to see what that costs when
a builder walks it directly.

Why: the product budget for everything outside inference (load + encode +
write + deliver) is 3 s for a 300-slice 512x512 study; this is the one command
that says where the builders stand against it.

    python bench/encode.py [--repeat 3] [--slices 300] [--size 512] [--profile STAGE] [--freeze-gc]
                           [--fortran-labels]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_node.contracts import AlgorithmInfo, Detection  # noqa: E402
from tests.unit.workers.outputs_fixtures import LABELS  # noqa: E402
from training.phantoms.ct_series import generate_ct_series  # noqa: E402
from workers.models.base import DetectionResult, SegmentationResult  # noqa: E402
from workers.outputs.common import SeriesIdentity  # noqa: E402
from workers.outputs.gsps import build_gsps  # noqa: E402
from workers.outputs.key_images import build_key_object_selection  # noqa: E402
from workers.outputs.measurements import measure_segments  # noqa: E402
from workers.outputs.preview import render_preview  # noqa: E402
from workers.outputs.seg import build_seg  # noqa: E402
from workers.outputs.sr import DetectionFindings, SegmentationFindings, build_sr  # noqa: E402
from workers.outputs.writing import dicom_bytes  # noqa: E402
from workers.volume import Volume, load_series  # noqa: E402

SEGMENTER = AlgorithmInfo(name="Chest organs bench net", version="1.0.0", model_id="chest-organs-bench")
DETECTOR = AlgorithmInfo(name="Nodule detector bench net", version="1.0.0", model_id="nodule-detector-bench")
SEG_SERIES = SeriesIdentity(series_number=901, series_description="AI segmentation")
SR_SERIES = SeriesIdentity(series_number=902, series_description="AI measurements")
GSPS_SERIES = SeriesIdentity(series_number=903, series_description="AI nodule marks")
KO_SERIES = SeriesIdentity(series_number=904, series_description="AI key images")
NODULE = LABELS[4]


def chest_label_map(shape: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Body ellipse (1) holding two lungs (2), a heart (3), a spine/sternum (4) and a few nodule spheres (5).

    Fractions of the volume: body (what no other label claims) about 33 %,
    lungs about 10 %, heart about 1 %, bone about 0.6 %, nodules a few
    thousand voxels; the body, lungs and bone span nearly every slice, as in
    a real chest segmentation (so every SEG segment has frames to encode).
    """
    slices, rows, columns = shape
    k, r, c = np.ogrid[:slices, :rows, :columns]
    kn, rn, cn = (k + 0.5) / slices, (r + 0.5) / rows, (c + 0.5) / columns
    labels = np.zeros(shape, dtype=np.uint8)
    along = (kn > 0.03) & (kn < 0.97)
    labels[along & (((rn - 0.5) / 0.34) ** 2 + ((cn - 0.5) / 0.44) ** 2 <= 1.0)] = 1
    for side in (0.32, 0.68):
        lung = ((rn - 0.46) / 0.2) ** 2 + ((cn - side) / 0.13) ** 2 + ((kn - 0.5) / 0.45) ** 2 <= 1.0
        labels[lung] = 2
    labels[((rn - 0.52) / 0.09) ** 2 + ((cn - 0.47) / 0.1) ** 2 + ((kn - 0.45) / 0.25) ** 2 <= 1.0] = 3
    labels[along & (((rn - 0.76) / 0.04) ** 2 + ((cn - 0.5) / 0.035) ** 2 <= 1.0)] = 4
    labels[along & (((rn - 0.2) / 0.015) ** 2 + ((cn - 0.5) / 0.05) ** 2 <= 1.0)] = 4
    for centre in ((0.3, 0.4, 0.3), (0.55, 0.45, 0.7), (0.7, 0.35, 0.28)):
        sphere = sum(((x - m) * n) ** 2 for x, m, n in zip((kn, rn, cn), centre, (slices, rows, columns), strict=True))
        labels[sphere <= 36.0] = 5  # radius of 6 voxels
    return labels


def detections(volume: Volume, count: int = 10) -> tuple[Detection, ...]:
    """``count`` nodules of 4-20 mm spread through the lungs, scores 0.95 down to 0.5."""
    rng = np.random.default_rng(7)
    shape = np.asarray(volume.shape, dtype=float)
    found = []
    for i in range(count):
        column = rng.choice([0.3, 0.68]) + rng.uniform(-0.05, 0.05)  # in the left or the right lung
        index = shape * [rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.6), column]
        diameter = float(rng.uniform(4.0, 20.0))
        centre = volume.index_to_world(index)
        found.append(
            Detection(
                centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                size_mm=(diameter, diameter, diameter),
                diameter_mm=diameter,
                score=round(0.95 - 0.05 * i, 3),
                label=NODULE,
            )
        )
    return tuple(found)


def encoded(dataset: Any) -> bytes:
    """The object as a DICOM file in memory, the way the pipeline encodes it (:func:`dicom_bytes`)."""
    return dicom_bytes(dataset)


class Stages:
    """Wall times per stage over the runs, object sizes, and an optional cProfile of one stage."""

    def __init__(self, profile_stage: str | None = None) -> None:
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.sizes: dict[str, int] = {}
        self.profile_stage = profile_stage
        self.profile: cProfile.Profile | None = None

    def run(self, stage: str, call: Callable[[], Any]) -> Any:
        """Run ``call`` once, recording its wall time (and its profile when it is the profiled stage)."""
        profiler = cProfile.Profile() if stage == self.profile_stage and self.profile is None else None
        start, cpu_start = time.perf_counter(), time.process_time()
        if profiler is not None:
            value = profiler.runcall(call)
            self.profile = profiler
        else:
            value = call()
        self.times.setdefault(stage, []).append(time.perf_counter() - start)
        self.cpu.setdefault(stage, []).append(time.process_time() - cpu_start)
        return value


def one_run(volume: Volume, result: SegmentationResult, found: tuple[Detection, ...], stages: Stages) -> None:
    """Every builder stage once, in the order the pipeline runs them."""
    labels = result.label_map
    stages.run("measurements", lambda: measure_segments(volume, labels, [label.value for label in LABELS]))
    seg = stages.run("build_seg", lambda: build_seg(volume, result, SEGMENTER, SEG_SERIES))
    stages.sizes["SEG"] = len(stages.run("write_seg", lambda: encoded(seg)))
    findings = [SegmentationFindings(SEGMENTER, result, seg), DetectionFindings(DETECTOR, found, (NODULE,))]
    sr = stages.run("build_sr", lambda: build_sr(volume, findings, SR_SERIES))
    stages.sizes["SR"] = len(stages.run("write_sr", lambda: encoded(sr)))
    gsps = stages.run("build_gsps", lambda: build_gsps(volume, found, DETECTOR, GSPS_SERIES))
    stages.sizes["GSPS"] = len(stages.run("write_gsps", lambda: encoded(gsps)))
    detected = DetectionResult(found)
    ko = stages.run("build_ko", lambda: (build_key_object_selection(volume, result, SEGMENTER, KO_SERIES),
                                         build_key_object_selection(volume, detected, DETECTOR, KO_SERIES)))
    stages.sizes["KO"] = len(stages.run("write_ko", lambda: b"".join(encoded(k) for k in ko if k is not None)))
    stages.run("previews", lambda: (render_preview(volume, result, SEGMENTER), render_preview(volume, detected, DETECTOR)))


def main() -> None:
    """Generate, load, run the stages ``--repeat`` times, print the table (and a profile of one stage)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--profile", metavar="STAGE", help="print a cProfile of the first run of this stage")
    parser.add_argument(
        "--freeze-gc",
        action="store_true",
        help="gc.freeze() once the inputs are ready, as a worker could after loading its model: full garbage "
        "collections (about 0.1-0.2 s each here) then no longer scan every long-lived object",
    )
    parser.add_argument("--fortran-labels", action="store_true",
                        help="hand the builders the label map transposed (Fortran order), bypassing SegmentationResult")
    args = parser.parse_args()

    stages = Stages(args.profile)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        start = time.perf_counter()
        series = generate_ct_series(Path(tmp), slices=args.slices, rows=args.size, columns=args.size, seed=11)
        generated = time.perf_counter() - start
        for _ in range(args.repeat):
            volume = stages.run("load_series", lambda: load_series(series.paths))
    labels = chest_label_map(volume.shape)
    found = detections(volume)
    fractions = np.bincount(labels.ravel(), minlength=6) / labels.size
    print(f"series: {args.slices} x {args.size} x {args.size} generated in {generated:.1f} s; label fractions "
          + ", ".join(f"{label.name} {fractions[label.value]:.3%}" for label in LABELS)
          + f"; {len(found)} detections")

    if args.freeze_gc:
        gc.collect()
        gc.freeze()
    result = SegmentationResult(label_map=labels, labels=LABELS)
    if args.fortran_labels:  # as a loader that bypassed the C-order copy would hand it over
        object.__setattr__(result, "label_map", np.asfortranarray(labels))
    for _ in range(args.repeat):
        one_run(volume, result, found, stages)

    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs "
          "(cpu s = this process's CPU time: close to the wall time of an idle machine)")
    print(f"\n{'stage':<14}{'median s':>10}{'min s':>9}{'max s':>9}{'cpu s':>9}   size")
    object_of = {"write_seg": "SEG", "write_sr": "SR", "write_gsps": "GSPS", "write_ko": "KO"}
    for stage, values in stages.times.items():
        size = f"{stages.sizes[object_of[stage]] / 2**20:.2f} MiB" if stage in object_of else ""
        cpu = statistics.median(stages.cpu[stage])
        spread = f"{statistics.median(values):>10.3f}{min(values):>9.3f}{max(values):>9.3f}"
        print(f"{stage:<14}{spread}{cpu:>9.3f}   {size}")
    encode = sum(statistics.median(v) for k, v in stages.times.items() if k != "load_series")
    encode_cpu = sum(statistics.median(v) for k, v in stages.cpu.items() if k != "load_series")
    print(f"{'encode total':<14}{encode:>10.3f}{'':>18}{encode_cpu:>9.3f}   (measurements + builds + writes + previews, medians)")
    if stages.profile is not None:
        print(f"\ncProfile of {args.profile} (first run), by cumulative time:")
        pstats.Stats(stages.profile).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
