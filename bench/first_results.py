"""Time to the first result of each study when several chest CTs arrive back to back (job scheduling).

Generates one chest CT phantom (``--slices`` x 512 x 512 over 300 mm, the phantom of
bench/e2e.py) and writes it as ``--studies`` studies with fresh UIDs; starts a real
Orthanc and ``dicom-node serve`` (embedded worker, Orthanc as the default destination,
the demo rule: segmentation and detection on every CT); pushes a 64-slice warm-up study
and waits for its results (model first-call costs stay out of the figures, and the node
has finished jobs to learn durations from, like a site that has run before); then pushes
the studies back to back, each with its own DCMTK ``storescu`` association, without
waiting for results.

For each study it prints, from the node's database, the seconds from its last instance
acknowledged (``storescu`` returned) to its first job finished, to its first result
delivered to Orthanc (the delivery acknowledged by Orthanc), and to its last result
delivered; then the order in which the worker started the jobs, and the load average.
At the end it checks that Orthanc holds every result object the node recorded.

    python bench/first_results.py [--studies 10] [--slices 200] [--quiet-seconds 1.0] [--timeout 1500] [--keep]

Run it on the code before and after a scheduling change, on an otherwise idle machine,
and compare the tables (docs/operations.md, "How jobs are ordered").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e import push  # noqa: E402
from bench.e2e_peers import (  # noqa: E402
    BenchError,
    NodePeer,
    check_models,
    db_time,
    make_phantom,
    median,
    node_running,
    orthanc_running,
    tail,
    write_study,
)
from tests.integration.peers import Orthanc  # noqa: E402

PIPELINES = ("chest-ct-segmentation", "lung-nodule-detection")
SHORT_NAMES = {"chest-ct-segmentation": "seg", "lung-nodule-detection": "det"}
#: Slices of the warm-up study (300 mm / 64 = 4.7 mm: the demo models decline slices thicker than 6 mm).
WARMUP_SLICES = 64
#: The smallest --slices the demo models accept (300 mm / 50 = 6 mm slice spacing).
MIN_SLICES = 50
POLL_SECONDS = 0.2
FINAL_JOB_STATES = ("succeeded", "not_applicable", "held", "released", "discarded", "dead", "cancelled")
FINAL_DELIVERY_STATES = ("delivered", "dead")


@dataclass
class StudyFigures:
    """One pushed study: when its push returned, and its jobs' and deliveries' times (epoch seconds)."""

    number: int
    study_uid: str
    acknowledged: float
    jobs: list[tuple[int, str, str, float | None, float | None]]  # id, pipeline, state, started, finished
    loads: dict[int, float]  # job id -> seconds of its load stage (about 0 when the volume was held already)
    deliveries: list[tuple[int, str, float | None]]  # job id, state, delivered_at

    def first_finished(self) -> tuple[float, str] | None:
        done = [(finished, pipeline) for _, pipeline, _, _, finished in self.jobs if finished is not None]
        return min(done) if done else None

    def delivered(self) -> list[tuple[float, str]]:
        pipelines = {job_id: pipeline for job_id, pipeline, *_ in self.jobs}
        return sorted((at, pipelines[job_id]) for job_id, state, at in self.deliveries
                      if state == "delivered" and at is not None)


def study_id(node: NodePeer, study_uid: str) -> int | None:
    rows = node.query("SELECT id, state FROM studies WHERE study_instance_uid = ?", [study_uid])
    if rows and rows[0][1] == "ignored":
        raise BenchError(f"study {study_uid} was ignored by routing (see {node.log_path})")
    return int(rows[0][0]) if rows else None


def read_figures(node: NodePeer, number: int, study_uid: str, acknowledged: float) -> StudyFigures:
    sid = study_id(node, study_uid)
    rows = [] if sid is None else node.query(
        "SELECT id, pipeline, state, started_at, finished_at, stage_seconds FROM jobs WHERE study_id = ? ORDER BY id",
        [sid])
    jobs = [(int(job_id), str(pipeline), str(state), db_time(started), db_time(finished))
            for job_id, pipeline, state, started, finished, _ in rows]
    loads = {int(row[0]): float(json.loads(row[5])["load"]) for row in rows
             if row[5] and "load" in json.loads(row[5])}
    deliveries = [] if sid is None else [
        (int(job_id), str(state), db_time(delivered))
        for job_id, state, delivered in node.query(
            "SELECT d.job_id, d.state, d.delivered_at FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE j.study_id = ? ORDER BY d.id", [sid])
    ]
    return StudyFigures(number, study_uid, acknowledged, jobs, loads, deliveries)


def finished(figures: StudyFigures) -> bool:
    """Every job of the study ended and every delivery it made ended (delivered or dead)."""
    return bool(figures.jobs) and all(state in FINAL_JOB_STATES for _, _, state, _, _ in figures.jobs) and all(
        state in FINAL_DELIVERY_STATES for _, state, _ in figures.deliveries)


def wait_all(node: NodePeer, pushed: Sequence[tuple[str, float]], timeout: float) -> list[StudyFigures]:
    """Poll the node's database until every pushed study's jobs and deliveries have ended."""
    deadline = time.monotonic() + timeout
    while True:
        node.check_alive()
        figures = [read_figures(node, n + 1, uid, ack) for n, (uid, ack) in enumerate(pushed)]
        if all(finished(f) for f in figures):
            return figures
        if time.monotonic() > deadline:
            left = [f.number for f in figures if not finished(f)]
            raise BenchError(f"studies {left} not finished after {timeout:g} s:\n{tail(node.log_path)}")
        time.sleep(POLL_SECONDS)


def check_in_orthanc(node: NodePeer, orthanc: Orthanc, figures: Sequence[StudyFigures]) -> int:
    """Every result object of a delivered job is in Orthanc; returns how many were checked."""
    checked = 0
    for study in figures:
        for job_id, state, _ in study.deliveries:
            if state != "delivered":
                continue
            for (uid,) in node.query("SELECT sop_instance_uid FROM result_objects WHERE job_id = ?", [job_id]):
                if orthanc.lookup_instance(uid) is None:
                    raise BenchError(f"study {study.number}: result {uid} of job {job_id} is not in Orthanc")
                checked += 1
    return checked


def seconds(value: float | None, since: float) -> str:
    return "-" if value is None else f"{value - since:.1f}"


def print_report(figures: Sequence[StudyFigures], started_pushing: float) -> None:
    """Per study: pushed at, first job finished, first result delivered, last result delivered; then medians."""
    print("\nseconds after the study's last instance was acknowledged (storescu returned):")
    print("| study | pushed at | first job finished | first result in Orthanc | last result in Orthanc | jobs |")
    print("|---|---|---|---|---|---|")
    firsts, first_results, lasts = [], [], []
    for study in figures:
        first = study.first_finished()
        delivered = study.delivered()
        states = ", ".join(f"{SHORT_NAMES.get(p, p)} {s}" for _, p, s, _, _ in study.jobs)
        first_text = "-" if first is None else f"{first[0] - study.acknowledged:.1f} ({SHORT_NAMES.get(first[1])})"
        result_text = "-" if not delivered else \
            f"{delivered[0][0] - study.acknowledged:.1f} ({SHORT_NAMES.get(delivered[0][1])})"
        print(f"| {study.number} | {study.acknowledged - started_pushing:.1f} | {first_text} | {result_text} "
              f"| {seconds(delivered[-1][0] if delivered else None, study.acknowledged)} | {states} |")
        if first is not None:
            firsts.append(first[0] - study.acknowledged)
        if delivered:
            first_results.append(delivered[0][0] - study.acknowledged)
            lasts.append(delivered[-1][0] - study.acknowledged)
    for label, values in (("median", median), ("max", max)):
        print(f"| **{label}** | | {values(firsts):.1f} | {values(first_results):.1f} | {values(lasts):.1f} | |")
    every_end = [at for study in figures for at, _ in study.delivered()]
    if every_end:
        print(f"\nall results delivered {max(every_end) - figures[-1].acknowledged:.1f} s after the last study "
              f"was acknowledged ({max(every_end) - started_pushing:.1f} s after the first push began)")
    started = sorted((start, SHORT_NAMES.get(pipeline, pipeline), study.number)
                     for study in figures for _, pipeline, _, start, _ in study.jobs if start is not None)
    print("order in which the worker started the jobs: " + " ".join(f"{name}{n}" for _, name, n in started))
    runs: dict[str, list[float]] = {}
    for study in figures:
        for _, pipeline, _, start, end in study.jobs:
            if start is not None and end is not None:
                runs.setdefault(SHORT_NAMES.get(pipeline, pipeline), []).append(end - start)
    print("job wall time, median: " + ", ".join(f"{name} {median(v):.1f} s" for name, v in sorted(runs.items())))
    loads = [seconds for study in figures for seconds in study.loads.values()]
    fresh = [seconds for seconds in loads if seconds >= 0.05]
    print(f"volumes loaded {len(fresh)} times for {len(loads)} jobs (median load {median(fresh):.2f} s; the others "
          "used the volume the worker held)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10, help="studies pushed back to back (default 10)")
    parser.add_argument("--slices", type=int, default=200,
                        help=f"slices of 512x512 over 300 mm per study (default 200; at least {MIN_SLICES})")
    parser.add_argument("--quiet-seconds", type=float, default=1.0, help="the node's completion.quiet_seconds")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds to wait for every study's results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args()
    if args.studies < 1 or args.slices < MIN_SLICES:
        parser.error(f"--studies must be >= 1 (got {args.studies}) and --slices >= {MIN_SLICES} (got {args.slices}; "
                     "the demo models decline thicker slices)")
    try:
        check_models(PIPELINES)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} before the run")
    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-first-results-"))
    try:
        started = time.perf_counter()
        phantom = make_phantom(args.slices, seed=2024)
        studies = [write_study(phantom, workdir / f"study-{n}", seed=3000 + n) for n in range(args.studies)]
        warm_files, warm_uid = write_study(make_phantom(WARMUP_SLICES, seed=7), workdir / "warmup", seed=7)
        print(f"{args.studies} studies of {args.slices} slices written in {time.perf_counter() - started:.1f} s; "
              f"work directory {workdir}", flush=True)
        with orthanc_running(workdir / "orthanc") as orthanc, \
                node_running(workdir / "node", orthanc, PIPELINES, args.quiet_seconds) as node:
            print(f"warm-up: {len(warm_files)}-slice study ...", flush=True)
            warm = wait_all(node, [(warm_uid, push(node, warm_files))], args.timeout)[0]
            print(f"  warm-up done: jobs {', '.join(f'{p} {s}' for _, p, s, _, _ in warm.jobs)}", flush=True)
            load_before = os.getloadavg()
            started_pushing = time.time()
            pushed = []
            for files, uid in studies:
                pushed.append((uid, push(node, files)))
            print(f"pushed {args.studies} studies in {time.time() - started_pushing:.1f} s; waiting for results ...",
                  flush=True)
            figures = wait_all(node, pushed, args.timeout)
            load_after = os.getloadavg()
            checked = check_in_orthanc(node, orthanc, figures)
        print_report(figures, started_pushing)
        print(f"{checked} result objects checked in Orthanc")
        print(f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in load_before)} when the pushes began, "
              f"{', '.join(f'{v:.2f}' for v in load_after)} at the end (the node itself keeps about 2 busy)")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"(work directory kept: {workdir})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
