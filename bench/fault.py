"""Fault benchmark: the long fuzz campaign and the kill -9 trials of issue 20, as counts.

Runs the same code as the CI fault suite (``tests/fault``), at length: seeded C-STORE
dataset cases and raw-PDU cases in batches against one ``dicom-node serve`` process
(restarted, and counted as a crash, if it dies), deflate bombs, and after every batch the
node's invariants (C-ECHO within 2 s, no association left open, /readyz ready, nothing
written outside data_dir, a valid study received and routed); then ``--kill-trials``
kill -9 trials of ``crash_trials.run_kill9_trials`` (a sender records each acknowledged
instance; after the kill and restart every one of them must be indexed with a good file).

Prints: cases, statuses (and raw-PDU reactions) by code, wrong successes, crashes, hangs,
leaked slots, acknowledged instances lost, every other broken invariant with its first
cases, the time taken and the load average.

    python bench/fault.py [--cases 10000] [--kill-trials 100] [--seed N] [--batch 250]
                          [--bomb-mb 2048] [--bombs 4] [--keep]

``--cases`` is the total of fuzz cases, half dataset, half raw-PDU. A full run (10,000
cases, 100 trials) takes about 20 minutes on 2 cores; the exit status is 1 when any
invariant broke.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "fault"), str(REPO / "tests" / "integration")]

from crash_trials import TrialCounts, run_kill9_trials  # noqa: E402
from fuzz_campaign import (  # noqa: E402
    ASSOCIATION_REFUSED,
    HUNG,
    STALL_KEPT,
    WRONG_SUCCESS,
    Tally,
    bomb_batch,
    pdu_batch,
    store_batch,
)
from fuzz_node import LEAKED, FuzzNode, running_node  # noqa: E402
from fuzz_pdu_cases import make_pdu_case  # noqa: E402
from fuzz_store_cases import deflate_bomb, load_bases, make_case  # noqa: E402

def campaign(node: FuzzNode, batches: list[Callable[[], Tally]], what: str) -> Tally:
    """Run ``batches`` in order; a node that died is counted, restarted and the campaign goes on."""
    total = Tally()
    started = time.monotonic()
    for number, batch in enumerate(batches, 1):
        tally = batch()
        total.add(tally)
        if not node.is_running():  # died (counted by the batch, or now): restart it on the same data
            total.crashes += 0 if tally.crashes else 1
            node.start()
        print(f"  {what} batch {number}/{len(batches)}: {tally.cases} cases, "
              f"{sum(len(m) for m in tally.failures.values())} broken invariants "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="fuzz cases in all, half of each fuzzer")
    parser.add_argument("--kill-trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--batch", type=int, default=250, help="cases between two invariant checks")
    parser.add_argument("--bomb-mb", type=int, default=2048, help="inflated size of each deflate bomb")
    parser.add_argument("--bombs", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-fault-"))
    started = time.monotonic()
    print(f"seed {args.seed}; work in {workdir}", flush=True)
    bases = load_bases(workdir / "bases")
    series_dir = workdir / "valid-studies"
    store_cases, pdu_cases = args.cases - args.cases // 2, args.cases // 2

    with running_node(workdir / "fuzz-node") as node:
        store_batches: list[Callable[[], Tally]] = [
            (lambda first=first: store_batch(node, [make_case(bases, args.seed, i) for i in
                                                     range(first, min(first + args.batch, store_cases))], series_dir))
            for first in range(0, store_cases, args.batch)
        ]
        store = campaign(node, store_batches, "C-STORE")
        base = next(b for b in bases if b.name == "CT_small.dcm")
        bombs = [deflate_bomb(base, args.seed, store_cases + k, args.bomb_mb << 20, consistent=k % 2 == 0)
                 for k in range(args.bombs)]
        store.add(campaign(node, [lambda: bomb_batch(node, bombs, series_dir, timeout=600)], "bomb"))
        pdu_batches: list[Callable[[], Tally]] = [
            (lambda first=first: pdu_batch(node, [make_pdu_case(args.seed, i) for i in
                                                  range(first, min(first + args.batch, pdu_cases))], series_dir))
            for first in range(0, pdu_cases, args.batch)
        ]
        pdu = campaign(node, pdu_batches, "raw-PDU")

    trials = run_kill9_trials(args.kill_trials, args.seed, workdir / "kill9") if args.kill_trials else TrialCounts()
    everything = Tally()
    everything.add(store)
    everything.add(pdu)
    elapsed = time.monotonic() - started

    print(f"\nfault campaign, seed {args.seed}")
    print(f"cases:                       {everything.cases} ({store.cases} C-STORE incl. {args.bombs} bombs, "
          f"{pdu.cases} raw-PDU)")
    print("C-STORE statuses:            " + ", ".join(f"{k} x{v}" for k, v in sorted(store.outcomes.items())))
    print("raw-PDU node reactions:      " + ", ".join(f"{k} x{v}" for k, v in sorted(pdu.outcomes.items())))
    print(f"wrong successes:             {everything.count(WRONG_SUCCESS)}")
    print(f"crashes:                     {everything.crashes} (node process deaths, each restarted)")
    print(f"hangs:                       {everything.count(HUNG) + everything.count(STALL_KEPT)} "
          f"({everything.count(HUNG)} C-STORE unanswered in time, {everything.count(STALL_KEPT)} stalled peers kept)")
    print(f"leaked slots:                {everything.count(LEAKED)} "
          f"({everything.count(ASSOCIATION_REFUSED)} associations refused meanwhile)")
    print(f"kill -9 trials:              {trials.summary()}")
    print(f"acknowledged instances lost: {trials.lost} of {trials.acknowledged}")
    print(f"time:                        {elapsed:.0f} s")
    print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    broken = bool(everything.failures) or trials.lost or trials.bad_files or trials.partial_files
    if everything.failures:
        print("\nbroken invariants, first cases of each:\n" + everything.report(per_invariant=5))
    for problem in trials.problems[:20]:
        print(f"  kill -9: {problem}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
