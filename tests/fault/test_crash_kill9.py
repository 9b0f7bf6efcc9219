"""``kill -9`` in the middle of an association, then restart on the same data dir.

"Success means on disk": every instance whose C-STORE was answered 0x0000 before the
kill must be indexed after the restart, with a complete spool file whose pixel data is
the source's. A write interrupted by the kill leaves no ``*.part`` file behind once the
node has restarted, no indexed path points at a missing or truncated file, the
interrupted association is recorded as ``interrupted``, the study still completes, and
sending the rest of the series afterwards brings it to its full count.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from peers import NodeProcess, wait_for
from training.phantoms.ct_series import GeneratedSeries, generate_ct_series

pytestmark = pytest.mark.slow

SLICES = 120


@pytest.fixture(scope="module")
def large_series(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSeries:
    """120 slices of 256x256 (about 16 MB), enough to kill the node mid-association."""
    return generate_ct_series(tmp_path_factory.mktemp("large_series"), slices=SLICES, rows=256, columns=256, seed=21)


class AckingSender(threading.Thread):
    """A pynetdicom C-STORE SCU that records each SOP Instance UID answered 0x0000.

    It stops at the first instance not answered with success (the node was killed).
    ``acked`` only grows, and is read by the test thread while this one runs.
    """

    def __init__(self, node: NodeProcess, paths: list[Path], calling_ae: str) -> None:
        super().__init__(name=f"sender-{calling_ae}", daemon=True)
        self.node = node
        self.paths = paths
        self.calling_ae = calling_ae
        self.acked: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.error: BaseException | None = None
        self.established = threading.Event()
        self.uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]

    def run(self) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        try:
            assoc = ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
            if not assoc.is_established:
                self.error = RuntimeError("association not established")
                return
            self.established.set()
            try:
                for path, uid in zip(self.paths, self.uids):
                    status = assoc.send_c_store(path)
                    code = getattr(status, "Status", None)
                    if code == 0x0000:
                        self.acked.append(uid)
                    else:
                        self.failed.append((uid, "no response" if code is None else f"0x{code:04X}"))
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc
        finally:
            self.established.set()
            ae.shutdown()


def _check_indexed_files(node: NodeProcess, sources: dict[str, Path]) -> list[dict[str, Any]]:
    """Every indexed instance has its complete spool file, with the source's pixel data."""
    rows = node.instances()
    for row in rows:
        path = node.spool_file(row["path"])
        assert path.is_file(), f"indexed {row['sop_instance_uid']} points at missing {row['path']}"
        assert path.stat().st_size == row["size_bytes"], f"{row['path']} is truncated"
        stored = pydicom.dcmread(path)
        assert stored.SOPInstanceUID == row["sop_instance_uid"]
        assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        source = pydicom.dcmread(sources[row["sop_instance_uid"]])
        assert stored.PixelData == source.PixelData, f"{row['sop_instance_uid']}: pixel data differs from the source"
    return rows


def test_kill_9_mid_association_loses_no_acknowledged_instance(
    tmp_path: Path, large_series: GeneratedSeries
) -> None:
    node = NodeProcess(tmp_path / "node", label="crash-node")
    sources = dict(zip(large_series.sop_instance_uids, large_series.paths))
    try:
        node.start()

        # 1. Push, and kill -9 once about half the series has been acknowledged.
        sender = AckingSender(node, large_series.paths, calling_ae="CRASHTEST")
        sender.start()
        wait_for(
            "half the series acknowledged",
            lambda: len(sender.acked) >= SLICES // 2 or sender.failed or sender.error or not sender.is_alive(),
            timeout=60,
            interval=0.001,
        )
        node.kill9()
        acked_at_kill = len(sender.acked)
        sender.join(timeout=30)
        assert not sender.is_alive(), "the sender did not notice the node was killed"
        acked = list(sender.acked)
        assert SLICES // 2 <= len(acked) < SLICES, (
            f"the kill did not land mid-association: {len(acked)} acknowledged "
            f"(at kill {acked_at_kill}), failed={sender.failed}, error={sender.error!r}"
        )
        assert sender.failed or sender.error, "the sender kept succeeding after the kill"
        partial_before_restart = sorted(p.name for p in node.spool_dir.rglob("*.part"))

        # 2. Restart on the same data dir and port.
        node.start()
        assert "marked interrupted" in node.log_text()
        if partial_before_restart:
            assert "partial file" in node.log_text(), partial_before_restart
        assert not list(node.spool_dir.rglob("*.part")), "a *.part file survived the restart"

        rows = _check_indexed_files(node, sources)
        indexed = {row["sop_instance_uid"] for row in rows}
        missing = [uid for uid in acked if uid not in indexed]
        assert not missing, f"{len(missing)} acknowledged instance(s) are not indexed after the restart: {missing[:3]}"
        assert len(rows) == len(indexed)
        print(
            f"kill -9 after {len(acked)} acknowledged; {len(indexed)} indexed after restart; "
            f"*.part before restart: {partial_before_restart}"
        )

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
        resender = AckingSender(node, remaining, calling_ae="RESUME")
        resender.start()
        resender.join(timeout=120)
        assert resender.error is None and not resender.failed, (resender.error, resender.failed)
        assert len(resender.acked) == len(remaining)
        resume = [a for a in node.settled_associations() if a["calling_ae_title"] == "RESUME"]
        assert len(resume) == 1 and resume[0]["outcome"] == "released", resume
        assert resume[0]["instances_stored"] == len(remaining)

        final = node.wait_for_study(large_series.study_uid, state="complete", instances=SLICES, timeout=30)
        # The first re-sent instance arrived after completion (late) and reopened the
        # study; the rest arrived while it was receiving again.
        assert final["late_instances"] == 1
        rows = _check_indexed_files(node, sources)
        assert {row["sop_instance_uid"] for row in rows} == set(large_series.sop_instance_uids)
        spooled = {str(p.relative_to(node.spool_dir)) for p in node.spool_dir.rglob("*.dcm")}
        assert spooled == {row["path"] for row in rows}, "spool files and index disagree"
        assert not list(node.spool_dir.rglob("*.part"))
        assert node.terminate() == 0
    finally:
        node.close()
