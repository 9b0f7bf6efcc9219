"""Scale benchmark: studies per hour by worker count, peak memory by slice count, ingest against storescp.

One command, three parts (``--parts``, default all three), each printed as a markdown table
with the load average at its start and end:

throughput
    The distributed deployment of docs/operations.md on one machine: ``dicom-node serve`` on
    a throw-away PostgreSQL database (``--postgres``, as the tests make them) and Redis
    (``--redis-url``, a database number of its own, emptied before and after), sending results
    itself (``queue.embedded_worker_queues: [io]``) to a real Orthanc; N ``dicom-node worker
    --queues gpu`` processes (``--workers``, default 1,2,4), on the node's data directory
    (``--node-access shared_filesystem``) or each with its own, reaching the node over HTTP with a
    worker account's token (``http``). Once every worker has loaded its models, M studies
    (``--studies``, default 8) of a chest CT phantom (``--slices`` x 512 x 512 over 300 mm) go in
    from ``--senders`` (4) concurrent DCMTK ``storescu`` processes (TCP_NODELAY=1), each sending
    its share of the studies over one association. The clock runs from the first byte sent to
    the moment Orthanc holds every result object of every study (bench/e2e.py's wait); each N
    gets a fresh database, node and Orthanc, the same study files. Prints studies/hour, the
    speed-up against one worker and the load average at the end of each run.

    Every worker runs the models on this machine's GPU when there is one (several workers
    share it), else on the CPU: on a 2-core machine more workers do not make CPU inference
    faster (each model already uses both cores); the figure that matters is the one measured
    on a GPU machine.

memory
    bench/memory.py's measurement (peak resident memory and seconds per stage of the worker's
    path, one subprocess per model and size) for ``--memory-slices`` (default 100,300,600,1000).

ingest
    bench/ingest.py's measurement: ``dicom-node serve`` (receiving only) against DCMTK
    ``storescp`` (and ``storescp --fork``) with 1 and 4 associations on a ``--slices`` series,
    median of ``--repeat``; ours/storescp ratios.

Child processes get this checkout first on PYTHONPATH, so the node and its workers run this
tree's code whichever installation the ``dicom-node`` command belongs to.

    python bench/scale.py [--parts throughput,memory,ingest] [--workers 1,2,4] [--studies 8] [--slices 300]
                          [--pipelines chest-ct-segmentation,lung-nodule-detection] [--node-access shared_filesystem]
                          [--memory-slices 100,300,600,1000] [--repeat 3] [--timeout 3600] [--keep]

A quick run: ``--parts throughput --slices 60 --studies 4 --workers 1,2 --pipelines lung-nodule-detection``.
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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import ingest, memory  # noqa: E402
from bench.e2e import wait_for_results  # noqa: E402
from bench.e2e_peers import (  # noqa: E402
    BenchError,
    check_models,
    make_phantom,
    orthanc_running,
    write_routing_files,
    write_study,
)
from tests.integration.peers import (  # noqa: E402
    NODE_COMMAND,
    PostgresNode,
    WorkerProcess,
    postgres_database,
)

PARTS = ("throughput", "memory", "ingest")
DEFAULT_PIPELINES = ("chest-ct-segmentation", "lung-nodule-detection")
#: A Redis database number no test uses (tests use 8, 11, 12, 13).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
#: Fewest slices over the 300 mm scan range that the demo models accept (slice spacing up to 6 mm).
MIN_SLICES = 50


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as one string."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# -- throughput -------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One study the senders push: its files and Study Instance UID."""

    files: list[Path]
    uid: str


@dataclass(frozen=True)
class ThroughputRun:
    """What one deployment of N workers did with the studies."""

    workers: int
    studies: int
    seconds: float
    jobs: int
    inference_median_s: float
    load_at_end: float

    @property
    def studies_per_hour(self) -> float:
        return self.studies * 3600.0 / self.seconds


class ScaleNode(PostgresNode):
    """The benchmarked node: its database is PostgreSQL; alive only while it and its workers are."""

    workers: list[WorkerProcess]

    def check_alive(self) -> None:
        """Raise :class:`BenchError` with the log's end when the node or every worker has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"dicom-node serve exited with status {self.process.returncode}:\n"
                             f"{self.log_text()[-3000:]}")
        if self.workers and all(worker.process.poll() is not None for worker in self.workers):
            raise BenchError(f"every dicom-node worker exited; the last log:\n{self.workers[-1].log()[-3000:]}")


def _cli(node: ScaleNode, *args: str, stdin: str | None = None) -> str:
    """``dicom-node ARGS`` on the node's settings and data; its output (raises naming the command on failure)."""
    done = subprocess.run([NODE_COMMAND, *args, "--config", str(node.config_path), "--data-dir", str(node.data_dir)],
                          input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BenchError(f"dicom-node {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


def start_workers(node: ScaleNode, count: int, node_access: str, work: Path, shared: dict[str, Any]) -> None:
    """``count`` ``dicom-node worker --queues gpu`` processes, on the node's data directory or (``http``) each on
    its own, reaching the node's web app with a worker account's token; ``shared``: their database and queue."""
    import yaml

    token = ""
    if node_access == "http":
        _cli(node, "users", "create", "bench-workers", "--role", "worker", "--password-stdin",
             stdin="a-password-never-used-123\n")
        token = _cli(node, "tokens", "create", "bench-workers", "--name", "bench/scale.py").strip()
    for k in range(count):
        label = f"worker-{k + 1}"
        if node_access == "shared_filesystem":
            node.workers.append(WorkerProcess(node, work, label, queues="gpu"))
            continue
        data_dir = work / label / "data"
        data_dir.mkdir(parents=True)
        config = work / label / "worker.yaml"
        config.write_text(yaml.safe_dump({**shared, "log_level": "INFO", "worker": {
            "node_access": "http", "node_url": f"http://127.0.0.1:{node.web_port}", "token": token}}))
        node.workers.append(WorkerProcess(node, work / label, label, config=config, data_dir=data_dir, queues="gpu"))


def wait_until_consuming(node: ScaleNode, timeout: float) -> float:
    """Wait until every worker has loaded (and warmed up) its models and consumes its queue; the seconds it took."""
    started = time.monotonic()
    while not all("consuming" in worker.log() for worker in node.workers):
        node.check_alive()
        for worker in node.workers:
            if worker.process.poll() is not None:
                raise BenchError(f"{worker.log_path.name} exited ({worker.process.returncode}) while starting:\n"
                                 f"{worker.log()[-3000:]}")
        if time.monotonic() - started > timeout:
            raise BenchError(f"workers not consuming after {timeout:g} s (loading their models)")
        time.sleep(0.5)
    return time.monotonic() - started


def _redis_flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@contextmanager
def deployment(work: Path, workers: int, args: argparse.Namespace) -> Iterator[tuple[ScaleNode, Any]]:
    """A fresh database, Redis database, Orthanc, node and ``workers`` workers; everything stopped afterwards."""
    pipelines = _csv(args.pipelines)
    with ExitStack() as stack:
        database_url = stack.enter_context(postgres_database("dicom_node_scale"))
        _redis_flush(args.redis_url)
        stack.callback(_redis_flush, args.redis_url)
        orthanc = stack.enter_context(orthanc_running(work / "orthanc"))
        work.mkdir(parents=True, exist_ok=True)
        rules, destinations = write_routing_files(work, orthanc, pipelines)
        shared = {"database_url": database_url,
                  "queue": {"broker_url": args.redis_url, "sweep_interval_seconds": 0.1}}
        node = ScaleNode(work / "node", database_url=database_url, label="scale-node", overrides={
            **shared, "queue": {**shared["queue"], "embedded_worker_queues": ["io"]},
            "completion": {"quiet_seconds": args.quiet_seconds, "check_interval_seconds": 0.1},
            "routing": {"rules_file": str(rules), "destinations_file": str(destinations)},
        })
        node.workers = []
        node.start(timeout=120)
        stack.callback(node.close)
        stack.callback(lambda: [worker.stop() for worker in node.workers])
        start_workers(node, workers, args.node_access, work, shared)
        yield node, orthanc


def measure_throughput(studies: Sequence[Study], workers: int, work: Path, args: argparse.Namespace) -> ThroughputRun:
    """Push every study from ``args.senders`` storescu processes at once; seconds until Orthanc holds all results."""
    with deployment(work, workers, args) as (node, orthanc):
        ready = wait_until_consuming(node, args.timeout)
        print(f"  {workers} worker(s) consuming after {ready:.0f} s (models loaded and warmed up); "
              f"load average {load_average()}", flush=True)
        senders = max(1, min(args.senders, len(studies)))
        parts = [[path for study in studies[i::senders] for path in study.files] for i in range(senders)]
        started = time.time()
        ingest.push_parts(node.port, node.ae_title, parts)
        print(f"  {len(studies)} studies sent in {time.time() - started:.1f} s", flush=True)
        seen = max(wait_for_results(node, orthanc, study.uid, args.timeout)[0] for study in studies)
        inference = [float(row[0]) for row in node.query(
            "SELECT (stage_seconds::json->>'inference')::float FROM jobs WHERE state = 'succeeded'")
            if row[0] is not None]
        return ThroughputRun(workers, len(studies), seen - started, len(inference),
                             statistics.median(inference) if inference else float("nan"), os.getloadavg()[0])


def throughput_table(runs: Sequence[ThroughputRun], slices: int) -> list[str]:
    """The markdown table of the throughput part; speed-up against the run with one worker (if measured)."""
    base = next((run for run in runs if run.workers == 1), None)
    lines = ["| workers | studies | slices | seconds | studies/hour | speed-up vs 1 worker | jobs "
             "| median inference s | load average (1 min) at the end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        speed_up = f"{run.studies_per_hour / base.studies_per_hour:.2f}" if base else "-"
        lines.append(f"| {run.workers} | {run.studies} | {slices} | {run.seconds:.1f} | {run.studies_per_hour:.0f} "
                     f"| {speed_up} | {run.jobs} | {run.inference_median_s:.1f} | {run.load_at_end:.2f} |")
    return lines


def throughput_part(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Write the studies once, measure each worker count; the table."""
    import torch

    check_models(_csv(args.pipelines))
    cuda = torch.cuda.is_available()
    print(f"devices: {os.cpu_count()} CPU cores; torch.cuda.is_available() = {cuda}"
          + (f" ({torch.cuda.get_device_name(0)}; every worker uses it)" if cuda else
             " (workers run the models on the CPU: on a machine with few cores more workers share the same "
             "cores and cannot raise the throughput; measure on a GPU machine for the figure that matters)"),
          flush=True)
    started = time.perf_counter()
    phantom = make_phantom(args.slices, seed=2024)
    studies = [Study(*write_study(phantom, workdir / "studies" / f"study-{k}", seed=3000 + k))
               for k in range(args.studies)]
    size_mb = sum(path.stat().st_size for study in studies for path in study.files) / 1e6
    print(f"{args.studies} studies of {args.slices} x 512 x 512 ({size_mb:.0f} MB) written in "
          f"{time.perf_counter() - started:.0f} s; pipelines {args.pipelines}; workers reach the node by "
          f"{args.node_access}", flush=True)
    runs = []
    for count in (int(n) for n in _csv(args.workers)):
        runs.append(measure_throughput(studies, count, workdir / f"workers-{count}", args))
        print(f"  {count} worker(s): {runs[-1].seconds:.1f} s, {runs[-1].studies_per_hour:.0f} studies/hour",
              flush=True)
    return throughput_table(runs, args.slices)


# -- memory and ingest: bench/memory.py and bench/ingest.py ------------------------------


def memory_part(args: argparse.Namespace, workdir: Path) -> list[str]:
    """bench/memory.py's figures for ``--memory-slices`` and ``--memory-models``."""
    options = argparse.Namespace(threads=args.threads, device=args.device, timeout=args.timeout,
                                 keep=workdir / "memory" if args.keep else None)
    print(f"memory: torch threads {args.threads}, device {args.device}", flush=True)
    rows = memory.measure_sizes([int(n) for n in _csv(args.memory_slices)], _csv(args.memory_models), options)
    return memory.markdown_table(rows)


def ingest_part(args: argparse.Namespace, workdir: Path) -> list[str]:
    """bench/ingest.py's figures for ``--ingest-targets``: images/s with 1 and 4 associations, ratios."""
    files = ingest.ingest_series(workdir / "ingest", args.slices)
    print(f"ingest: {len(files)} files, median of {args.repeat}", flush=True)
    targets = _csv(args.ingest_targets)
    return ingest.ratio_table(ingest.measure_targets(targets, workdir / "ingest", files, args.repeat), targets)


PART_FUNCTIONS = {"throughput": throughput_part, "memory": memory_part, "ingest": ingest_part}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--slices", type=int, default=300, help="slices of the throughput studies and the ingest "
                        f"series (512 x 512; the studies cover 300 mm, so at least {MIN_SLICES})")
    group = parser.add_argument_group("throughput")
    group.add_argument("--workers", default="1,2,4", help="worker counts to measure, comma-separated")
    group.add_argument("--studies", type=int, default=8, help="studies pushed per worker count")
    group.add_argument("--senders", type=int, default=4, help="concurrent storescu processes")
    group.add_argument("--pipelines", default=",".join(DEFAULT_PIPELINES), help="models every study runs")
    group.add_argument("--node-access", choices=("shared_filesystem", "http"), default="shared_filesystem",
                       help="how the workers reach the node's instances and outbox (worker.node_access)")
    group.add_argument("--quiet-seconds", type=float, default=1.0, help="the node's completion.quiet_seconds")
    group.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis database of the run (emptied)")
    group = parser.add_argument_group("memory")
    group.add_argument("--memory-slices", default="100,300,600,1000", help="CT sizes, comma-separated")
    group.add_argument("--memory-models", default="seg,det", help=f"subset of {','.join(memory.MODELS)}")
    group.add_argument("--threads", type=int, default=2, help="torch CPU threads of the memory children")
    group.add_argument("--device", default="cpu", help="where the memory children run the models (cpu, cuda)")
    group = parser.add_argument_group("ingest")
    group.add_argument("--repeat", type=int, default=3, help="pushes per figure (the median is shown)")
    group.add_argument("--ingest-targets", default="dicom-node,storescp,storescp --fork",
                       help=f"subset of: {', '.join(ingest.TARGETS)}")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a wait (workers, results, a memory "
                        "child) may take")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    parts = _csv(args.parts)
    problems = [f"--parts: unknown {name!r}" for name in parts if name not in PARTS]
    problems += [f"--ingest-targets: unknown {name!r}" for name in _csv(args.ingest_targets)
                 if name not in ingest.TARGETS]
    problems += [f"--memory-models: unknown {name!r}" for name in _csv(args.memory_models) if name not in memory.MODELS]
    if "throughput" in parts and args.slices < MIN_SLICES:
        problems.append(f"--slices {args.slices}: the studies cover 300 mm, the demo models take slices of at most "
                        f"6 mm: at least {MIN_SLICES}")
    if args.studies < 1 or args.senders < 1 or any(int(n) < 1 for n in _csv(args.workers)):
        problems.append(f"--studies ({args.studies}), --senders ({args.senders}) and --workers ({args.workers}) "
                        "must be at least 1")
    if problems:
        parser.error("; ".join(problems))
    args.parts = parts
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The node and workers are started as `dicom-node ...`: this checkout first, whichever installation that is.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-scale-"))
    print(f"work directory {workdir}; {os.cpu_count()} CPU cores", flush=True)
    tables: list[tuple[str, str, str, list[str]]] = []
    failed = None
    for part in args.parts:
        print(f"\n== {part}: load average {load_average()}", flush=True)
        before = load_average()
        try:
            lines = PART_FUNCTIONS[part](args, workdir)
        except BenchError as exc:
            failed = f"{part}: {exc}"
            break
        tables.append((part, before, load_average(), lines))
    for part, before, after, lines in tables:  # the parts that finished, also when a later one failed
        print(f"\n### {part} (load average {before} at the start, {after} at the end)\n")
        print("\n".join(lines))
    if failed is not None:
        print(f"error: {failed}\n(work directory kept: {workdir})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"\nwork directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
