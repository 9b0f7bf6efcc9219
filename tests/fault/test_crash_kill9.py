"""``kill -9`` of the node while it receives: no acknowledged instance is lost.

"Success means on disk": every instance whose C-STORE was answered 0x0000 before the
kill must be indexed after the restart, with a complete spool file holding the dataset
bytes that were sent. A write interrupted by the kill leaves no ``*.part`` file behind
once the node has restarted, no indexed path points at a missing or truncated file, the
interrupted association is recorded as ``interrupted``, the study still completes, and
sending the rest of the series afterwards brings it to its full count. The senders are
processes of their own that fsync each acknowledged UID (:mod:`acking_sender`).

:func:`test_kill_9_trials` repeats the kill at random moments (:mod:`crash_trials`;
``bench/fault.py`` runs a hundred of them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from acking_sender import read_acks, read_failures, start_sender
from crash_trials import check_spool, run_kill9_trials
from peers import LOCALHOST, NodeProcess, wait_for
from training.phantoms.ct_series import GeneratedSeries, generate_ct_series

pytestmark = pytest.mark.slow

SLICES = 120
KILL_TRIALS = 4


@pytest.fixture(scope="module")
def large_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """120 slices of 256x256 (about 16 MB), enough to kill the node mid-association."""
    return generate_ct_series(tmp_path_factory.mktemp("large_series"), slices=SLICES, rows=256, columns=256, seed=21)


def test_kill_9_mid_association_loses_no_acknowledged_instance(
    tmp_path: Path, large_series: GeneratedSeries
) -> None:
    # A quiet period long enough that the re-send below (one instance per fsync'd acknowledgement)
    # never pauses past it on a loaded machine: the study must reopen once, not twice.
    node = NodeProcess(tmp_path / "node", label="crash-node", overrides={"completion.quiet_seconds": 3.0})
    sources = dict(zip(large_series.sop_instance_uids, large_series.paths))
    try:
        node.start()

        # 1. Push, and kill -9 once about half the series has been acknowledged.
        acks = tmp_path / "crash.acks"
        sender = start_sender(large_series.paths, host=LOCALHOST, port=node.port, called_ae=node.ae_title,
                              acks=acks, calling_ae="CRASHTEST", log=tmp_path / "crash-sender.log")
        wait_for("half the series acknowledged",
                 lambda: len(read_acks(acks)) >= SLICES // 2 or sender.poll() is not None, timeout=60, interval=0.001)
        node.kill9()
        acked_at_kill = len(read_acks(acks))
        assert sender.wait(timeout=30) == 1, (tmp_path / "crash-sender.log").read_text()
        acked = read_acks(acks)
        assert SLICES // 2 <= len(acked) < SLICES, (
            f"the kill did not land mid-association: {len(acked)} acknowledged "
            f"(at kill {acked_at_kill}), failed={read_failures(acks)}"
        )
        partial_before_restart = sorted(p.name for p in node.spool_dir.rglob("*.part"))

        # 2. Restart on the same data dir and port.
        node.start()
        assert "marked interrupted" in node.log_text()
        if partial_before_restart:
            assert "partial file" in node.log_text(), partial_before_restart
        check = check_spool(node, sources, acked)
        assert not check.problems, check.problems
        indexed = check.indexed
        print(
            f"kill -9 after {len(acked)} acknowledged; {len(indexed)} indexed after restart; "
            f"*.part before restart: {partial_before_restart}"
        )
        rows = node.instances()
        assert len(rows) == len(indexed)

        crash = [a for a in node.associations() if a["calling_ae_title"] == "CRASHTEST"]
        assert len(crash) == 1, node.associations()
        assert crash[0]["outcome"] == "interrupted"
        assert node.query("SELECT ended_at FROM associations WHERE id = ?", [crash[0]["id"]])[0][0] is not None
        assert {row["association_id"] for row in rows} == {crash[0]["id"]}

        study = node.wait_for_study(large_series.study_uid, state="complete", timeout=30)
        assert study["instances"] == len(indexed) >= len(acked)
        assert study["late_instances"] == 0

        # 3. The rest of the series goes through, and the count is the full series.
        remaining = [path for uid, path in sources.items() if uid not in set(acked)]
        resend_acks = tmp_path / "resume.acks"
        resender = start_sender(remaining, host=LOCALHOST, port=node.port, called_ae=node.ae_title,
                                acks=resend_acks, calling_ae="RESUME", log=tmp_path / "resume-sender.log")
        assert resender.wait(timeout=120) == 0, (tmp_path / "resume-sender.log").read_text()
        assert len(read_acks(resend_acks)) == len(remaining)
        resume = [a for a in node.settled_associations() if a["calling_ae_title"] == "RESUME"]
        assert len(resume) == 1 and resume[0]["outcome"] == "released", resume
        assert resume[0]["instances_stored"] == len(remaining)

        final = node.wait_for_study(large_series.study_uid, state="complete", instances=SLICES, timeout=30)
        # The first re-sent instance arrived after completion (late) and reopened the
        # study; the rest arrived while it was receiving again.
        assert final["late_instances"] == 1
        check = check_spool(node, sources, large_series.sop_instance_uids)
        assert not check.problems, check.problems
        assert check.indexed == set(large_series.sop_instance_uids)
        assert node.terminate() == 0
    finally:
        node.close()


def test_kill_9_trials(tmp_path: Path) -> None:
    """kill -9 at random moments of a push, restart, count: 0 acknowledged instances lost, 0 partial files."""
    counts = run_kill9_trials(KILL_TRIALS, seed=20, workdir=tmp_path)
    print(counts.summary())
    assert counts.trials == KILL_TRIALS
    assert counts.acknowledged > 0 and counts.kills_mid_push >= KILL_TRIALS // 2, counts.summary()
    assert (counts.lost, counts.bad_files, counts.partial_files) == (0, 0, 0), "\n".join(counts.problems)
