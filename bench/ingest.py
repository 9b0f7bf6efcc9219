"""Ingest benchmark: our node against DCMTK's storescp, same series, same sender, same run.

Generates a 300-slice 512x512 CT series, then pushes it on loopback with DCMTK
``storescu`` (TCP_NODELAY=1) to (a) ``dicom-node serve`` with its default durability
(fsync of every file and directory, indexed before success) and (b) DCMTK ``storescp``
(writes files, no fsync), with one association and with four parallel associations
(the series split in four). Prints images/s for each and the ratio ours/storescp. The
node also runs with ``storage.fsync: false``, like for like with storescp, to show how
much of the difference is the price of durability (the disk) and how much is software.
Each node row is measured twice: with pynetdicom's public API (the default) and with
``dicom.accelerate: true`` (docs/receive-acceleration.md). ``--targets`` runs a subset.

The disk's floor is measured in the same run: the node's own spool writes each file of
the series durably (staged, fsync'd, renamed into its series directory, directory
fsync'd: what a C-STORE must wait for before its success status), with no network, no
parsing and no index, from one thread and from four. No receiver that makes every
instance durable before answering can be faster than that on this disk; the table
gives each node row against it too.

The node runs without its embedded worker (``queue.embedded_worker_queues: []``), so
that, like storescp, it only receives: a node started for each run would otherwise load
and warm up its models while the series arrives, and on a 2-core machine that measures
the models, not the receive path (``--with-worker`` measures that case).

    python bench/ingest.py [--repeat 3] [--slices 300] [--targets NAME,...] [--with-worker] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_node.spool import Spool  # noqa: E402
from tests.integration.peers import peer_env  # noqa: E402  (read at each start: PYTHONPATH reaches the node)
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series  # noqa: E402

#: Whether the measured nodes run their embedded worker too (``--with-worker``).
WITH_WORKER = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_echo(port: int, ae_title: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["echoscu", "-aec", ae_title, "127.0.0.1", str(port)], env=peer_env(), capture_output=True
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on port {port} as {ae_title}")


@contextmanager
def our_node(workdir: Path, fsync: bool = True, accelerate: bool = False) -> Iterator[tuple[int, str]]:
    """``dicom-node serve`` on free ports in ``workdir``, receiving only unless ``WITH_WORKER`` is set."""
    port = free_port()
    data = workdir / "node-data"
    log = (workdir / "node.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("dicom-node")), "serve", "--data-dir", str(data), "--port", str(port),
         "--web-port", str(free_port())],
        env={
            **peer_env(),
            "DICOM_NODE_STORAGE__MIN_FREE_MB": "0",
            "DICOM_NODE_STORAGE__FSYNC": str(fsync).lower(),
            "DICOM_NODE_DICOM__ACCELERATE": str(accelerate).lower(),
            "DICOM_NODE_LOG_LEVEL": "WARNING",
            **({} if WITH_WORKER else {"DICOM_NODE_QUEUE__EMBEDDED_WORKER_QUEUES": "[]"}),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_echo(port, "DICOM_NODE")
        yield port, "DICOM_NODE"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


@contextmanager
def storescp(workdir: Path, fork: bool) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = workdir / ("storescp-fork" if fork else "storescp")
    out.mkdir()
    command = ["storescp", "--output-directory", str(out), "--accept-all"]
    if fork:
        command.append("--fork")
    process = subprocess.Popen([*command, str(port)], env=peer_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_echo(port, "ANY-SCP")
        yield port, "ANY-SCP"
    finally:
        process.terminate()
        process.wait(timeout=30)


def push(port: int, ae_title: str, files: list[Path], associations: int) -> float:
    """Send ``files`` split over ``associations`` parallel storescu processes; return images/s."""
    return push_parts(port, ae_title, [files[i::associations] for i in range(associations)])


def push_parts(port: int, ae_title: str, parts: Sequence[Sequence[Path]]) -> float:
    """Send each of ``parts`` with a storescu process of its own (one association each), all at once;
    return images/s over all of them (bench/scale.py sends whole studies per part this way)."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, part)],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    for sender in senders:
        _, errors = sender.communicate(timeout=3600)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {errors.decode(errors='replace')[-500:]}")
    return sum(len(part) for part in parts) / (time.perf_counter() - started)


def measure(target, workdir: Path, files: list[Path], associations: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median images/s over ``repeat`` pushes (each to a fresh receiver, after a warm-up)."""
    rates = []
    for attempt in range(repeat):
        run_dir = workdir / f"run-{associations}-{attempt}-{time.monotonic_ns()}"
        run_dir.mkdir()
        with target(run_dir) as (port, ae_title):
            push(port, ae_title, files[:4], 1)  # warm-up: imports, first association
            rates.append(push(port, ae_title, files, associations))
        shutil.rmtree(run_dir, ignore_errors=True)
    return statistics.median(rates)


#: The name of the disk floor's figures in :func:`measure_targets`' results.
DISK_FLOOR = "disk floor"


def disk_floor(workdir: Path, files: list[Path], associations: int, repeat: int) -> float:
    """Median files/s the node's spool makes durable (as :meth:`Spool.write` does for each instance) from
    ``associations`` threads, the files' bytes read beforehand: the floor under any receiver that fsyncs."""
    blobs = [path.read_bytes() for path in files]
    rates = []
    for attempt in range(repeat):
        spool = Spool(workdir / f"floor-{associations}-{attempt}-{time.monotonic_ns()}", fsync=True)
        parts = [list(range(len(blobs)))[i::associations] for i in range(associations)]

        def write(indexes: list[int], spool: Spool = spool) -> None:
            for index in indexes:
                spool.write(spool.relative_path("1.2.3", "1.2.3.4", f"1.2.3.4.{index}"), (blobs[index],))

        threads = [threading.Thread(target=write, args=(part,)) for part in parts]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates.append(len(blobs) / (time.perf_counter() - started))
        shutil.rmtree(spool.root, ignore_errors=True)
    return statistics.median(rates)


TARGETS = {
    "dicom-node": our_node,
    "dicom-node no-fsync": lambda d: our_node(d, fsync=False),
    "dicom-node accelerate": lambda d: our_node(d, accelerate=True),
    "dicom-node accelerate no-fsync": lambda d: our_node(d, fsync=False, accelerate=True),
    "storescp": lambda d: storescp(d, fork=False),
    "storescp --fork": lambda d: storescp(d, fork=True),
}


def ingest_series(workdir: Path, slices: int) -> list[Path]:
    """The measured series: ``slices`` CT slices of 512x512 written under ``workdir``/series."""
    return generate_ct_series(
        workdir / "series", geometry=SeriesGeometry(rows=512, columns=512, slices=slices), seed=2024
    ).paths


def measure_targets(chosen: Sequence[str], workdir: Path, files: list[Path], repeat: int,
                    show: Callable[[str], None] = partial(print, flush=True)) -> dict[tuple[str, int], float]:
    """(target name, associations) -> median images/s, for each of ``chosen`` (names of :data:`TARGETS`)
    and for the disk floor (:func:`disk_floor`), with 1 and 4 associations; each figure is shown as it comes."""
    results: dict[tuple[str, int], float] = {}
    for associations in (1, 4):
        results[DISK_FLOOR, associations] = disk_floor(workdir, files, associations, repeat)
        show(f"  {DISK_FLOOR + ' (fsync, no network)':<30} {associations} assoc: "
             f"{results[DISK_FLOOR, associations]:7.0f} files/s")
        for name in chosen:
            results[name, associations] = measure(TARGETS[name], workdir, files, associations, repeat)
            show(f"  {name:<30} {associations} assoc: {results[name, associations]:7.0f} images/s")
    return results


def ratio_table(results: dict[tuple[str, int], float], chosen: Sequence[str]) -> list[str]:
    """The markdown table of each node target against storescp, storescp --fork and the disk floor (those measured)."""
    lines = ["| node | associations | img/s | storescp img/s | ratio | storescp --fork img/s | ratio "
             "| disk floor files/s | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in (name for name in chosen if name.startswith("dicom-node")):
        for associations in (1, 4):
            ours = results[name, associations]
            cells = [f"| {name} | {associations} | {ours:.0f} "]
            for peer in ("storescp", "storescp --fork", DISK_FLOOR):
                theirs = results.get((peer, associations))
                cells.append(f"| {theirs:.0f} | {ours / theirs:.2f} " if theirs else "| - | - ")
            lines.append("".join(cells) + "|")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--targets", default="", help=f"comma-separated subset of: {', '.join(TARGETS)}")
    parser.add_argument("--with-worker", action="store_true",
                        help="run the node's embedded worker too (it loads the models while the series arrives)")
    args = parser.parse_args()
    global WITH_WORKER
    WITH_WORKER = args.with_worker
    chosen = [name.strip() for name in args.targets.split(",") if name.strip()] or list(TARGETS)
    unknown = sorted(set(chosen) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; choose from {', '.join(TARGETS)}")

    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    print(f"generating {args.slices}-slice 512x512 CT series in {workdir} ...", flush=True)
    files = ingest_series(workdir, args.slices)
    size_mb = sum(path.stat().st_size for path in files) / 1e6
    print(f"{len(files)} files, {size_mb:.0f} MB; median of {args.repeat} runs each; node "
          f"{'with' if WITH_WORKER else 'without'} its embedded worker; load average {_load()}\n", flush=True)

    results = measure_targets(chosen, workdir, files, args.repeat)
    print("\nratios against storescp (no fsync, serial associations), storescp --fork and the disk floor:")
    for line in ratio_table(results, chosen):
        print(line)
    print(f"\nload average at the end: {_load()}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
