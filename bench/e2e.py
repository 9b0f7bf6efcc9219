"""End-to-end latency benchmark: last instance acknowledged -> last result stored in a real Orthanc.

Generates a realistic chest CT (``generate_chest_phantom``, 300 slices of 512x512 at
1.0 x 0.7 x 0.7 mm, 2-3 nodules of 8-20 mm) written as DICOM with
``write_dicom_case``; starts a real Orthanc (its own JSON config, TCP_NODELAY) and
``dicom-node serve`` (embedded worker, Orthanc as the default destination, a routing
rule that runs ``--pipelines`` on every CT study); pushes a small warm-up study (model
loading and first-call costs stay out of the figures), then ``--repeat`` fresh studies
(new UIDs each) with DCMTK ``storescu`` over one association (``--slices N`` keeps the
300 mm scan range with thicker slices). The clock starts when
``storescu`` returns (the last instance acknowledged) and stops when Orthanc's REST
API holds every result object the node made for the study (polled every 50 ms).

The time in between is split by stage from the node's own database, as contiguous
segments of the critical path:

    completion wait   storescu returned -> study complete (the configured quiet period)
    routing           study complete -> first job queued
    queue             time after the first job was queued when no job of the study was running
    load, model_load, inference, encoding (+outbox)   the job's own stage timers
    checks            the job's applicability (before the model) and plausibility (after it) checks
    encoder wait      a job's model done, waiting for the worker's encoder to take its objects (the
                      previous job's still being encoded: worker.pending_encodes)
    job bookkeeping   job started -> finished, minus its stage timers (claim, commit, lease)
    overlap           minus the time two jobs of the study ran at once (a job's objects encoded while
                      the next job's model ran), so that the stages add up to the total
    delivery          last job finished -> last delivery acknowledged by Orthanc
    seen in Orthanc   last delivery -> the poll that saw every object (<= 50 ms poll; slightly
                      negative when the poll sees the objects before the node commits delivered_at)
    unaccounted       total - all of the above (overlaps, clock steps)

and ``overhead = total - completion wait - inference`` is checked against the product
target of 2 s (issue 26; routing counts as overhead here, not as completion wait).

Peers in the same run, on the same files: the delivery stage against DCMTK ``storescu``
sending the same result files to the same Orthanc (the objects are deleted from
Orthanc first, so it stores them anew), and against our own C-STORE SCU called
in-process (the send alone, without queue and bookkeeping); the load stage against a
plain pydicom read of the same spool files into a float32 volume, and against
``workers.volume.load_series`` run in this process. Prints medians and ratios.

    python bench/e2e.py [--repeat 3] [--slices 300] [--pipelines chest-ct-segmentation,lung-nodule-detection]
                        [--quiet-seconds 1.0] [--pending-encodes N] [--timeout 1200] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e_peers import (  # noqa: E402
    ENV,
    LOCALHOST,
    NODE_AE,
    ORTHANC_AE,
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

ALL_PIPELINES = ("chest-ct-segmentation", "lung-nodule-detection")
#: Result kinds each demo pipeline makes (GSPS only when something was detected, KO only with a nodule).
EXPECTED_KINDS = {"chest-ct-segmentation": ("SEG", "SR", "KO"), "lung-nodule-detection": ("SR", "GSPS", "KO")}
POLL_SECONDS = 0.05
TARGET_SECONDS = 2.0
#: Slices of the warm-up study: few, but no thicker than the demo models accept (300 mm / 64 = 4.7 mm; they
#: declare slice spacing up to 6 mm and decline a thicker study, which then has no results to wait for).
WARMUP_SLICES = 64
STAGES = (
    "completion wait",
    "routing",
    "queue",
    "load",
    "model_load",
    "checks",
    "inference",
    "encoding (+outbox)",
    "encoder wait",
    "job bookkeeping",
    "overlap",
    "delivery",
    "seen in Orthanc",
    "unaccounted",
)


# -- one measured push -------------------------------------------------------------


@dataclass
class JobTimes:
    job_id: int
    pipeline: str
    queued_at: float
    started_at: float
    finished_at: float
    stages: dict[str, float]


@dataclass
class DeliveryTimes:
    job_id: int
    delivered_at: float
    job_finished_at: float
    objects_sent: int


@dataclass
class RunResult:
    """One study end to end: the stage breakdown, what came back, and the peer comparisons."""

    total: float
    stages: dict[str, float]
    jobs: list[JobTimes]
    deliveries: list[DeliveryTimes]
    kinds_in_orthanc: dict[str, int]
    megabytes: dict[str, float]
    peers: dict[str, float] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        return self.total - self.stages["completion wait"] - self.stages["inference"]


def push(node: NodePeer, files: Sequence[Path]) -> float:
    """Send ``files`` with one storescu association; returns the wall time (epoch s) when it returned."""
    done = subprocess.run(
        ["storescu", "-aet", "BENCH_PACS", "-aec", NODE_AE, LOCALHOST, str(node.port), *map(str, files)],
        env=ENV, capture_output=True, text=True, timeout=900,
    )
    acknowledged = time.time()
    if done.returncode != 0:
        raise BenchError(f"storescu to the node failed ({done.returncode}): {done.stderr[-1000:]}")
    return acknowledged


def study_row(node: NodePeer, study_uid: str) -> tuple[int, str, str | None] | None:
    rows = node.query("SELECT id, state, completed_at FROM studies WHERE study_instance_uid = ?", [study_uid])
    return (int(rows[0][0]), str(rows[0][1]), rows[0][2]) if rows else None


def wait_for_results(node: NodePeer, orthanc: Orthanc, study_uid: str, timeout: float) -> tuple[float, int]:
    """Poll the node's DB and Orthanc every 50 ms until Orthanc holds every result of the study.

    Returns (wall time the last object was seen, the study's row id). Fails at once,
    with the node's reason, when the study is ignored or a job/delivery failed.
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        node.check_alive()
        study = study_row(node, study_uid)
        if study is not None:
            study_id, state, _ = study
            if state == "ignored":
                raise BenchError(f"study {study_uid} was ignored by routing: {study_events(node, study_id)}")
            jobs = node.query("SELECT id, pipeline, state, error FROM jobs WHERE study_id = ?", [study_id])
            bad = [job for job in jobs if job[2] in ("failed", "dead", "cancelled")]
            if bad:
                reasons = "; ".join(f"{pipeline} {state}: {error}" for _, pipeline, state, error in bad)
                raise BenchError(f"study {study_uid}: job(s) failed: {reasons}")
            failed_deliveries = node.query(
                "SELECT d.id, d.state, d.error FROM deliveries d JOIN jobs j ON j.id = d.job_id "
                "WHERE j.study_id = ? AND d.state IN ('failed', 'dead')", [study_id])
            if failed_deliveries:
                raise BenchError(f"study {study_uid}: delivery failed: {failed_deliveries}")
            if jobs and all(job[2] == "succeeded" for job in jobs):
                expected = [row[0] for row in node.query(
                    "SELECT r.sop_instance_uid FROM result_objects r JOIN jobs j ON j.id = r.job_id "
                    "WHERE j.study_id = ?", [study_id])]
                for uid in expected:
                    if uid not in seen:
                        found = orthanc.lookup_instance(uid)
                        if found is None:
                            break
                        seen[uid] = found
                else:
                    return time.time(), study_id
        time.sleep(POLL_SECONDS)
    raise BenchError(f"study {study_uid}: results not all in Orthanc after {timeout:g} s "
                     f"(seen {len(seen)}):\n{tail(node.log_path)}")


def study_events(node: NodePeer, study_id: int) -> str:
    rows = node.query("SELECT kind, detail FROM study_events WHERE study_id = ? ORDER BY id", [study_id])
    return "; ".join(f"{kind}: {detail}" for kind, detail in rows)


def read_jobs(node: NodePeer, study_id: int) -> tuple[list[JobTimes], list[DeliveryTimes]]:
    """The study's jobs (in start order) and deliveries, timestamps as epoch seconds."""
    jobs = []
    finished_by_id: dict[int, float] = {}
    for job_id, pipeline, queued, started, finished, stages in node.query(
        "SELECT id, pipeline, queued_at, started_at, finished_at, stage_seconds FROM jobs "
        "WHERE study_id = ? ORDER BY started_at", [study_id]
    ):
        times = JobTimes(int(job_id), pipeline, db_time(queued) or 0.0, db_time(started) or 0.0,
                         db_time(finished) or 0.0, {k: float(v) for k, v in json.loads(stages or "{}").items()})
        jobs.append(times)
        finished_by_id[int(job_id)] = times.finished_at
    deliveries = [
        DeliveryTimes(int(job_id), db_time(delivered) or 0.0, finished_by_id[int(job_id)], int(sent))
        for job_id, delivered, sent in node.query(
            "SELECT d.job_id, d.delivered_at, d.objects_sent FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE j.study_id = ? AND d.state = 'delivered'", [study_id])
    ]
    return jobs, deliveries


def breakdown(acknowledged: float, seen: float, completed_at: float, jobs: Sequence[JobTimes],
              deliveries: Sequence[DeliveryTimes]) -> dict[str, float]:
    """Split ``seen - acknowledged`` into the contiguous stages of the critical path (module docstring)."""
    if not jobs or not deliveries:
        raise BenchError(f"no jobs ({len(jobs)}) or deliveries ({len(deliveries)}) to break down")
    stages = dict.fromkeys(STAGES, 0.0)
    stages["completion wait"] = completed_at - acknowledged
    first_queued = min(job.queued_at for job in jobs)
    stages["routing"] = first_queued - completed_at
    running = union_seconds([(job.started_at, job.finished_at) for job in jobs])
    stages["queue"] = max(job.finished_at for job in jobs) - first_queued - running
    for job in jobs:
        timed = 0.0
        for name, seconds in job.stages.items():
            key = {"encoding": "encoding (+outbox)", "outbox": "encoding (+outbox)", "encoder_wait": "encoder wait",
                   "applicability": "checks", "plausibility": "checks"}.get(name, name)
            if key not in stages:
                key = "job bookkeeping"
            stages[key] += seconds
            timed += seconds
        stages["job bookkeeping"] += job.finished_at - job.started_at - timed
    stages["overlap"] = running - sum(job.finished_at - job.started_at for job in jobs)
    last_delivered = max(d.delivered_at for d in deliveries)
    stages["delivery"] = last_delivered - max(job.finished_at for job in jobs)
    stages["seen in Orthanc"] = seen - last_delivered
    stages["unaccounted"] = (seen - acknowledged) - sum(v for k, v in stages.items() if k != "unaccounted")
    return stages


def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the ``(start, end)`` intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def results_in_orthanc(node: NodePeer, orthanc: Orthanc, study_id: int) -> tuple[dict[str, int], dict[str, float]]:
    """Count the study's result objects in Orthanc by kind (checking Orthanc's SOP Class UID of each); MB by kind."""
    counts: dict[str, int] = {}
    megabytes: dict[str, float] = {}
    for kind, sop_class, sop_uid, path in node.query(
        "SELECT r.kind, r.sop_class_uid, r.sop_instance_uid, r.path FROM result_objects r "
        "JOIN jobs j ON j.id = r.job_id WHERE j.study_id = ?", [study_id]
    ):
        orthanc_id = orthanc.lookup_instance(sop_uid)
        if orthanc_id is None:
            raise BenchError(f"{kind} {sop_uid} is not in Orthanc")
        stored_class = orthanc.sop_class(orthanc_id)
        if stored_class != sop_class:
            raise BenchError(f"{kind} {sop_uid}: Orthanc has SOP class {stored_class}, the node made {sop_class}")
        counts[kind] = counts.get(kind, 0) + 1
        megabytes[kind] = megabytes.get(kind, 0.0) + (node.data_dir / "outbox" / path).stat().st_size / 1e6
    return counts, megabytes


# -- peer comparisons ---------------------------------------------------------------


def last_delivery_files(node: NodePeer, study_id: int) -> list[tuple[str, Path]]:
    """(SOP Instance UID, outbox file) of the job whose delivery finished last."""
    rows = node.query(
        "SELECT d.job_id FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE j.study_id = ? "
        "ORDER BY d.delivered_at DESC LIMIT 1", [study_id])
    outbox = node.data_dir / "outbox"
    return [(uid, outbox / path) for uid, path in
            node.query("SELECT sop_instance_uid, path FROM result_objects WHERE job_id = ?", [rows[0][0]])]


def remove_from_orthanc(orthanc: Orthanc, uids: Sequence[str]) -> None:
    for uid in uids:
        orthanc_id = orthanc.lookup_instance(uid)
        if orthanc_id is not None:
            orthanc.delete_instance(orthanc_id)


def time_storescu(orthanc: Orthanc, files: Sequence[Path]) -> float:
    """Seconds for DCMTK storescu (required contexts only, one association) to store ``files`` in Orthanc."""
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-R", "-aet", NODE_AE, "-aec", ORTHANC_AE, LOCALHOST, str(orthanc.dicom_port), *map(str, files)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"storescu to Orthanc failed ({done.returncode}): {done.stderr[-1000:]}")
    return elapsed


def time_echoscu(orthanc: Orthanc) -> float:
    """Seconds for DCMTK echoscu to Orthanc: the process start and association that storescu's time includes."""
    started = time.perf_counter()
    done = subprocess.run(["echoscu", "-aec", ORTHANC_AE, LOCALHOST, str(orthanc.dicom_port)], env=ENV,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"echoscu to Orthanc failed ({done.returncode}): {done.stderr[-1000:]}")
    return elapsed


def time_our_scu(orthanc: Orthanc, files: Sequence[Path]) -> float:
    """Seconds for the node's C-STORE SCU (``dicom_node.scu.send_dicom``), in this process, to store ``files``."""
    from dicom_node.destinations import DicomDestination
    from dicom_node.scu import send_dicom

    destination = DicomDestination(name="pacs", ae_title=ORTHANC_AE, host=LOCALHOST, port=orthanc.dicom_port)
    started = time.perf_counter()
    report = send_dicom(destination, list(files), calling_ae_title=NODE_AE)
    elapsed = time.perf_counter() - started
    if not report.ok:
        raise BenchError(f"our SCU to Orthanc failed: {report.summary()}")
    return elapsed


def spool_files(node: NodePeer, study_id: int) -> list[Path]:
    """The spool files of the series the first job ran on (what the load stage read)."""
    series_uid = node.query("SELECT series_instance_uid FROM jobs WHERE study_id = ? LIMIT 1", [study_id])[0][0]
    spool = node.data_dir / "spool"
    return [spool / row[0] for row in node.query(
        "SELECT i.path FROM instances i JOIN series s ON s.id = i.series_id WHERE s.series_instance_uid = ?",
        [series_uid])]


def pydicom_volume(files: Sequence[Path]) -> npt.NDArray[np.float32]:
    """The reference load: dcmread every file, sort by position along the normal, rescale to HU, stack."""
    datasets = [pydicom.dcmread(path) for path in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.empty((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.float32)
    for index, ds in enumerate(datasets):
        volume[index] = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return volume


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def compare_with_peers(node: NodePeer, orthanc: Orthanc, study_id: int) -> dict[str, float]:
    """Time storescu and our SCU on the last delivery's files, pydicom and load_series on the spool files."""
    from workers.volume import load_series

    deliver = last_delivery_files(node, study_id)
    uids = [uid for uid, _ in deliver]
    files = [path for _, path in deliver]
    remove_from_orthanc(orthanc, uids)
    peers: dict[str, float] = {"objects": float(len(files))}
    peers |= {"storescu send": time_storescu(orthanc, files), "echoscu": time_echoscu(orthanc)}
    remove_from_orthanc(orthanc, uids)
    peers["our SCU send"] = time_our_scu(orthanc, files)
    series = spool_files(node, study_id)
    peers["pydicom read"] = timed(lambda: pydicom_volume(series))
    peers["load_series here"] = timed(lambda: load_series(series))
    return peers


def measure(node: NodePeer, orthanc: Orthanc, files: Sequence[Path], study_uid: str, timeout: float) -> RunResult:
    """Push one study, wait for its results in Orthanc, break the time down, run the peer comparisons."""
    acknowledged = push(node, files)
    seen, study_id = wait_for_results(node, orthanc, study_uid, timeout)
    study = study_row(node, study_uid)
    completed = db_time(study[2]) if study is not None else None
    if completed is None:
        raise BenchError(f"study {study_uid} has results but no completed_at")
    jobs, deliveries = read_jobs(node, study_id)
    deadline = time.monotonic() + 10  # delivered_at is committed just after Orthanc acknowledged
    while len(deliveries) < len(jobs) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        jobs, deliveries = read_jobs(node, study_id)
    result = RunResult(seen - acknowledged, breakdown(acknowledged, seen, completed, jobs, deliveries), jobs,
                       deliveries, *results_in_orthanc(node, orthanc, study_id))
    last = max(deliveries, key=lambda d: d.delivered_at)
    result.peers = compare_with_peers(node, orthanc, study_id)
    result.peers["delivery stage"] = last.delivered_at - last.job_finished_at
    result.peers["load stage"] = median([job.stages.get("load", float("nan")) for job in jobs])
    return result


# -- report ------------------------------------------------------------------------


def print_report(runs: Sequence[RunResult], pipelines: Sequence[str]) -> None:
    """Stage table (every run and the median), overhead against the target, peer ratios."""
    header = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    print(f"\nstage breakdown, seconds (pipelines: {', '.join(pipelines)}):")
    print(f"| stage | {header} | median |")
    print("|---|" + "---|" * (len(runs) + 1))
    for stage in STAGES:
        values = [run.stages[stage] for run in runs]
        print(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {median(values):.3f} |")
    totals = [run.total for run in runs]
    overheads = [run.overhead for run in runs]
    print("| **total** | " + " | ".join(f"{v:.3f}" for v in totals) + f" | {median(totals):.3f} |")
    print("| overhead (total - completion wait - inference) | " + " | ".join(f"{v:.3f}" for v in overheads)
          + f" | {median(overheads):.3f} |")
    verdict = "met" if median(overheads) < TARGET_SECONDS else "NOT met"
    print(f"\noverhead {median(overheads):.2f} s against the {TARGET_SECONDS:g} s target: {verdict}")

    print("\nper job (median over runs), seconds:")
    print("| pipeline | load | model_load | inference | encoding (+outbox) | encoder wait "
          "| delivery (finished -> delivered) |")
    print("|---|---|---|---|---|---|---|")
    for pipeline in pipelines:
        jobs = [job for run in runs for job in run.jobs if job.pipeline == pipeline]
        if not jobs:
            continue
        ids = {job.job_id for job in jobs}
        sends = [d.delivered_at - d.job_finished_at for run in runs for d in run.deliveries if d.job_id in ids]
        print(f"| {pipeline} | {median([j.stages.get('load', 0) for j in jobs]):.3f} "
              f"| {median([j.stages.get('model_load', 0) for j in jobs]):.3f} "
              f"| {median([j.stages.get('inference', 0) for j in jobs]):.3f} "
              f"| {median([j.stages.get('encoding', 0) + j.stages.get('outbox', 0) for j in jobs]):.3f} "
              f"| {median([j.stages.get('encoder_wait', 0) for j in jobs]):.3f} "
              f"| {median(sends):.3f} |")

    def peer(name: str) -> float:
        return median([run.peers[name] for run in runs])

    print("\npeers in the same run (medians), seconds:")
    print("| ours | s | peer | s | ratio ours/peer |")
    print("|---|---|---|---|---|")
    storescu = "storescu -R, same files, same Orthanc"
    pydicom_read = "pydicom dcmread + stack, same spool files"
    rows = [
        ("delivery stage (queue + send + commit)", "delivery stage", storescu, "storescu send"),
        ("our C-STORE SCU alone (in-process)", "our SCU send", storescu, "storescu send"),
        ("load stage (in the node)", "load stage", pydicom_read, "pydicom read"),
        ("load_series (in this process)", "load_series here", pydicom_read, "pydicom read"),
    ]
    for ours_label, ours_key, peer_label, peer_key in rows:
        ours, theirs = peer(ours_key), peer(peer_key)
        print(f"| {ours_label} | {ours:.3f} | {peer_label} | {theirs:.3f} | {ours / theirs:.2f} |")
    print(f"(storescu's time includes starting the process and the association: echoscu to the same Orthanc "
          f"takes {peer('echoscu'):.3f} s; storescu sends {median([run.peers['objects'] for run in runs]):.0f} "
          "objects, those of the last delivery)")
    last = runs[-1]
    print("\nresults in Orthanc per study: " + ", ".join(
        f"{kind} {n} ({last.megabytes[kind]:.2f} MB)" for kind, n in sorted(last.kinds_in_orthanc.items())))
    print("(the delivery stage is the last job's; earlier jobs' deliveries run while the next job computes)")


def check_kinds(result: RunResult, pipelines: Sequence[str]) -> None:
    """Warn when the study's results are not the usual set (e.g. no GSPS because nothing was detected)."""
    expected: dict[str, int] = {}
    for pipeline in pipelines:
        for kind in EXPECTED_KINDS.get(pipeline, ()):
            expected[kind] = expected.get(kind, 0) + 1
    if result.kinds_in_orthanc != expected:
        print(f"  note: results {result.kinds_in_orthanc}, usual set {expected}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="measured studies (medians are printed)")
    parser.add_argument("--slices", type=int, default=300, help="slices of 512x512 over 300 mm (default 300)")
    parser.add_argument("--pipelines", default=",".join(ALL_PIPELINES), help="comma-separated model ids")
    parser.add_argument("--quiet-seconds", type=float, default=1.0, help="the node's completion.quiet_seconds")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for one study's results")
    parser.add_argument("--pending-encodes", type=int, default=None,
                        help="the node's worker.pending_encodes (default: its default, 1); 0 encodes each job in its "
                        "job slot, before the next model starts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args()
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    if args.repeat < 1 or args.slices < 16:
        parser.error(f"--repeat must be >= 1 (got {args.repeat}) and --slices >= 16 (got {args.slices})")

    import torch

    try:
        check_models(pipelines)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, torch.cuda.is_available() = {cuda}"
          + (f" ({torch.cuda.get_device_name(0)})" if cuda else "; the node runs the models on the CPU"))
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} before the run")

    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-e2e-"))
    try:
        started = time.perf_counter()
        phantom = make_phantom(args.slices, seed=2024)
        generation = time.perf_counter() - started
        warmup_phantom = make_phantom(WARMUP_SLICES, seed=7)
        print(f"phantom {args.slices}x512x512 generated in {generation:.1f} s "
              f"({len(phantom.nodules)} nodules); work directory {workdir}", flush=True)
        with orthanc_running(workdir / "orthanc") as orthanc, \
                node_running(workdir / "node", orthanc, pipelines, args.quiet_seconds, args.pending_encodes) as node:
            files, study_uid = write_study(warmup_phantom, workdir / "warmup", seed=7)
            print(f"warm-up: {len(files)}-slice study (model loading, first calls) ...", flush=True)
            warm = measure(node, orthanc, files, study_uid, args.timeout)
            first_calls = ", ".join(f"{job.pipeline} {job.stages.get('inference', 0):.1f} s" for job in warm.jobs)
            print(f"  warm-up total {warm.total:.2f} s; inference with first-call costs: {first_calls}", flush=True)
            runs = []
            for attempt in range(args.repeat):
                files, study_uid = write_study(phantom, workdir / f"study-{attempt}", seed=1000 + attempt)
                size_mb = sum(path.stat().st_size for path in files) / 1e6
                result = measure(node, orthanc, files, study_uid, args.timeout)
                runs.append(result)
                print(f"  run {attempt + 1}: {len(files)} files ({size_mb:.0f} MB): total {result.total:.2f} s, "
                      f"overhead {result.overhead:.2f} s, inference {result.stages['inference']:.2f} s", flush=True)
                check_kinds(result, pipelines)
                if not args.keep:
                    shutil.rmtree(workdir / f"study-{attempt}", ignore_errors=True)
        print_report(runs, pipelines)
        print(f"\nload average {os.getloadavg()[0]:.2f} after the run (other processes share these cores)")
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
