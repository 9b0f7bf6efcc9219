"""``kill -9`` trials: push a series, kill the node at a random moment, restart it, count what was lost.

"Success means on disk": an instance answered 0x0000 must be indexed, with its complete
file, after any crash. One trial starts (or restarts) ``dicom-node serve`` as a real
process, pushes a fresh CT series with :mod:`acking_sender` (a separate process that
fsyncs each acknowledged SOP Instance UID before sending the next instance), kills the
node with SIGKILL once a random number of instances has been acknowledged plus a random
fraction of one instance's time (so the kill lands anywhere in a C-STORE: receiving,
writing, fsync, indexing, answering), restarts it on the same data directory and port,
and checks the spool and the index against what the sender was told.

:func:`run_kill9_trials` is what the CI test runs with a few trials and
``bench/fault.py`` with a hundred; it returns :class:`TrialCounts`. Callers outside
pytest put ``tests/integration`` (for ``peers``) and this directory on ``sys.path``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from acking_sender import read_acks, start_sender
from dicom_node.spool import uid_to_filename
from peers import LOCALHOST, NodeProcess, dataset_bytes, wait_for
from training.phantoms.ct_series import generate_ct_series

__all__ = ["SpoolCheck", "TrialCounts", "check_spool", "run_kill9_trials"]

logger = logging.getLogger(__name__)


@dataclass
class SpoolCheck:
    """How the node's spool and index compare with what was sent and acknowledged."""

    indexed: set[str] = field(default_factory=set)
    #: Acknowledged SOP Instance UIDs that are not indexed (lost acknowledged instances).
    lost: list[str] = field(default_factory=list)
    #: Indexed instances whose file is missing, truncated or differs from the source's dataset bytes.
    bad_files: list[str] = field(default_factory=list)
    #: ``*.part`` files (interrupted writes) still in the spool.
    part_files: list[str] = field(default_factory=list)
    #: ``*.dcm`` files in the spool that no index row points at.
    unindexed_files: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every broken invariant, one line each (empty when all hold)."""
        return ([f"acknowledged but not indexed: {uid}" for uid in self.lost]
                + [f"indexed with a bad file: {what}" for what in self.bad_files]
                + [f"partial file left in the spool: {name}" for name in self.part_files]
                + [f"spool file not indexed: {name}" for name in self.unindexed_files])


def check_spool(node: NodeProcess, sources: Mapping[str, Path], acknowledged: Iterable[str],
                study_uid: str | None = None) -> SpoolCheck:
    """Compare the (stopped or running) node's index and spool with ``sources`` and the ``acknowledged`` UIDs.

    ``sources`` maps SOP Instance UID -> the file that was sent; the node stores the
    dataset bytes exactly as sent, so every indexed file of a sent instance must carry
    the source's dataset bytes, and be as long as its index row says. With
    ``study_uid`` only that study's rows and directory are checked (``*.part`` files
    are looked for in the whole spool).
    """
    check = SpoolCheck()
    rows = [row for row in node.instances() if study_uid is None or row["study_instance_uid"] == study_uid]
    for row in rows:
        uid = row["sop_instance_uid"]
        check.indexed.add(uid)
        path = node.spool_file(row["path"])
        if not path.is_file():
            check.bad_files.append(f"{uid}: {row['path']} is missing")
        elif path.stat().st_size != row["size_bytes"]:
            check.bad_files.append(f"{uid}: {row['path']} has {path.stat().st_size} bytes, indexed {row['size_bytes']}")
        elif uid in sources and dataset_bytes(path) != dataset_bytes(sources[uid]):
            check.bad_files.append(f"{uid}: {row['path']} differs from the file sent")
    check.lost = [uid for uid in acknowledged if uid not in check.indexed]
    check.part_files = sorted(p.relative_to(node.spool_dir).as_posix() for p in node.spool_dir.rglob("*.part"))
    indexed_paths = {row["path"] for row in rows}
    top = node.spool_dir / uid_to_filename(study_uid) if study_uid is not None else node.spool_dir
    for path in sorted(top.rglob("*.dcm")):
        relative = path.relative_to(node.spool_dir).as_posix()
        if path.is_file() and relative not in indexed_paths:
            check.unindexed_files.append(relative)
    return check


@dataclass
class TrialCounts:
    """What :func:`run_kill9_trials` measured, summed over the trials."""

    trials: int = 0
    #: Instances the sender was told were stored (0x0000) before the kill.
    acknowledged: int = 0
    #: Acknowledged instances not indexed (with a good file) after the restart: must be 0.
    lost: int = 0
    #: Indexed instances whose file is missing, truncated or wrong, after the restart: must be 0.
    bad_files: int = 0
    #: ``*.part`` files and unindexed ``*.dcm`` files in the spool after the restart: must be 0.
    partial_files: int = 0
    #: Trials whose kill landed while the sender still had instances to send.
    kills_mid_push: int = 0
    #: Interrupted writes (``*.part``) seen between the kill and the restart (the restart removes them).
    part_files_at_kill: int = 0
    seconds: float = 0.0
    #: One line per broken invariant: trial number, seed and what was wrong.
    problems: list[str] = field(default_factory=list)
    #: ``*.part`` files already counted (one left behind is counted once, not once per later trial).
    seen_part_files: set[str] = field(default_factory=set, repr=False)

    def summary(self) -> str:
        return (f"{self.trials} kill -9 trials ({self.kills_mid_push} mid-push) in {self.seconds:.1f} s: "
                f"{self.acknowledged} acknowledged, {self.lost} lost, {self.bad_files} bad indexed files, "
                f"{self.partial_files} partial/unindexed files after restart "
                f"({self.part_files_at_kill} *.part at the kills)")


def run_kill9_trials(
    n: int,
    seed: int,
    workdir: Path,
    *,
    slices: int = 40,
    rows: int = 256,
    node_overrides: Mapping[str, object] | None = None,
) -> TrialCounts:
    """Run ``n`` kill -9 trials against one node (data in ``workdir``); seeded by ``seed``.

    Every trial sends a new series (``slices`` images of ``rows`` x ``rows``, about
    ``rows * rows * 2`` bytes each) on one association. The node runs without a worker
    (receiving is what is under test), with the test defaults of :class:`NodeProcess`.
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    node = NodeProcess(workdir / "node", overrides=node_overrides, label="kill9-node")
    counts = TrialCounts()
    started = time.monotonic()
    try:
        node.start()
        for trial in range(n):
            _one_trial(node, trial, seed, rng, workdir, slices, rows, counts)
        node.terminate()
    finally:
        node.close()
    counts.seconds = time.monotonic() - started
    return counts


def _one_trial(node: NodeProcess, trial: int, seed: int, rng: random.Random, workdir: Path, slices: int,
               rows: int, counts: TrialCounts) -> None:
    series_seed = seed * 100_003 + trial
    series = generate_ct_series(workdir / f"trial{trial:03d}", slices=slices, rows=rows, columns=rows, seed=series_seed)
    sources = dict(zip(series.sop_instance_uids, series.paths))
    acks = workdir / f"trial{trial:03d}.acks"
    kill_after = rng.randrange(0, slices)  # acknowledged instances to wait for
    jitter = rng.random()  # then this fraction of one instance's sending time
    sender = start_sender(series.paths, host=LOCALHOST, port=node.port, called_ae=node.ae_title, acks=acks,
                          calling_ae=f"KILL9T{trial % 1000:03d}", log=workdir / f"trial{trial:03d}.sender.log")
    try:
        began = time.monotonic()
        wait_for(f"trial {trial}: {kill_after} instance(s) acknowledged",
                 lambda: len(read_acks(acks)) >= kill_after or sender.poll() is not None, timeout=120, interval=0.001)
        per_instance = (time.monotonic() - began) / max(1, kill_after)
        time.sleep(jitter * min(per_instance, 0.05))
        node.kill9()
        sender.wait(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=10)
    acknowledged = read_acks(acks)
    counts.trials += 1
    counts.acknowledged += len(acknowledged)
    counts.kills_mid_push += len(acknowledged) < slices
    counts.part_files_at_kill += sum(1 for _ in node.spool_dir.rglob("*.part"))
    node.start()
    check = check_spool(node, sources, acknowledged, study_uid=series.study_uid)
    check.part_files = [name for name in check.part_files if name not in counts.seen_part_files]
    counts.seen_part_files.update(check.part_files)
    counts.lost += len(check.lost)
    counts.bad_files += len(check.bad_files)
    counts.partial_files += len(check.part_files) + len(check.unindexed_files)
    counts.problems += [f"trial {trial} (seed {seed}, series seed {series_seed}, kill after {kill_after} acks): {p}"
                        for p in check.problems]
    logger.info("kill -9 trial %d: %d of %d acknowledged, %d problem(s)", trial, len(acknowledged), slices,
                len(check.problems))
