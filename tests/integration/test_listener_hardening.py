"""The listener against peers that misbehave: no connection, PDU or instance can lock it up or exhaust it.

Each test reproduces one way a broken modality or an attacker held the node on earlier
code (leaked association slots, a TLS accept loop stuck on a silent socket, a stalled
PDU, silent sockets crowding out real ones, a deflate bomb, a C-STORE with a blank UID
that was never answered, a full disk) and checks the node answers as a PACS admin would
expect: a precise status or a closed connection, the slot freed, the row recorded.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import ssl
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicom_node.db.models import AssociationRecord, IngestError, Study
from dicom_node.app.node import Node
from dicom_node.scp import error_comment
from peers import COMPLETED_STATES
from tests.conftest import NodeFactory
from training.phantoms.ct_series import GeneratedSeries


@pytest.fixture(params=["public", "accelerated"])
def node_factory(node_factory: NodeFactory, request: pytest.FixtureRequest) -> NodeFactory:
    """Every hardening test runs against both receive paths: pynetdicom's public API and ``dicom.accelerate``."""
    accelerate = request.param == "accelerated"

    def start(**overrides: Any) -> Node:
        return node_factory(**{"dicom.accelerate": accelerate, **overrides})

    return start


def client(*syntaxes: str) -> AE:
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, list(syntaxes) or [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def associate(node: Node, *syntaxes: str, **kwargs) -> Association:  # type: ignore[no-untyped-def]
    assoc = client(*syntaxes).associate("127.0.0.1", node.scp.port, ae_title=node.settings.dicom.ae_title, **kwargs)
    assert assoc.is_established, "the node refused a well-behaved association"
    return assoc


def echo_seconds(node: Node) -> float:
    """Seconds a fresh association took to answer a C-ECHO; fails if it did not."""
    started = time.monotonic()
    assoc = associate(node)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return time.monotonic() - started


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def open_rows(node: Node) -> int:
    with node.sessions() as session:
        return len(list(session.scalars(select(AssociationRecord).where(AssociationRecord.outcome == "open"))))


def reject_reasons(node: Node) -> list[str]:
    with node.sessions() as session:
        return [row.reject_reason or "" for row in session.scalars(select(AssociationRecord))]


def study_states(node: Node) -> list[str]:
    with node.sessions() as session:
        return list(session.scalars(select(Study.state)))


def raw_socket(assoc: Association) -> socket.socket:
    """Take over the TCP socket of an established requestor association."""
    return assoc.dul.socket.socket  # type: ignore[union-attr,return-value]


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, bytes) items."""
    items = b"".join(struct.pack(">IBB", len(data) + 2, cx, header) + data for cx, header, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def command_set(sop_class: bytes, sop_instance: bytes, message_id: int = 7) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian) with the UIDs exactly as given."""
    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, elem, len(value)) + value

    body = b"".join((
        element(0x0002, sop_class), element(0x0100, b"\x01\x00"), element(0x0110, struct.pack("<H", message_id)),
        element(0x0700, b"\x00\x00"), element(0x0800, b"\x00\x00"), element(0x1000, sop_instance),
    ))
    return element(0x0000, struct.pack("<I", len(body))) + body


def body_of(dataset: Dataset, deflate: bool = False) -> bytes:
    buffer = io.BytesIO()
    dataset = copy.deepcopy(dataset)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.preamble = None
    pydicom.dcmwrite(buffer, dataset, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def store_raw(assoc: Association, command: bytes, dataset: bytes, chunk: int = 16_000) -> Dataset:
    """Send one C-STORE built by hand on an established association; return the node's response."""
    context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
    sock = raw_socket(assoc)
    assoc._reactor_checkpoint.clear()
    try:
        sock.sendall(p_data((context_id, 0x03, command)))
        for start in range(0, len(dataset), chunk):
            last = start + chunk >= len(dataset)
            sock.sendall(p_data((context_id, 0x02 if last else 0x00, dataset[start : start + chunk])))
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None, "no C-STORE response within the DIMSE timeout"
    status = Dataset()
    status.Status = response.Status
    status.ErrorComment = response.ErrorComment or ""
    return status


def test_garbage_command_sets_and_release_then_data_leak_no_slot(node_factory: NodeFactory) -> None:
    """16 associations that send a garbage command set (or A-RELEASE-RQ, then P-DATA) once locked the node."""
    node = node_factory(**{"dicom.max_associations": 4})
    for trial in range(10):
        assoc = associate(node)
        sock = raw_socket(assoc)
        try:
            if trial % 2:
                sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
                sock.sendall(p_data((1, 0x03, os.urandom(14))))
            else:
                sock.sendall(struct.pack(">BBI", 4, 0, 206) + b"\x00\x00\x00\xca\x01\x03" + os.urandom(200))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered the release (or aborted) and closed first: that is fine
        time.sleep(0.05)
        sock.close()
        assoc.kill()
    wait_for(lambda: node.scp.open_associations() == 0, what="every slot free")
    wait_for(lambda: open_rows(node) == 0, what="every association row closed")
    assert echo_seconds(node) < 2
    assert node.scp.listener_status()[0]


def test_a_silent_tcp_connection_does_not_block_tls(node_factory: NodeFactory, tls_files: dict[str, Path]) -> None:
    node = node_factory(**{
        "dicom.tls.enabled": True,
        "dicom.tls.certificate": tls_files["server.pem"],
        "dicom.tls.private_key": tls_files["server.key"],
        "dicom.acse_timeout_seconds": 2,
    })
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files["ca.pem"]))
    with socket.create_connection(("127.0.0.1", node.scp.port)):
        time.sleep(0.2)
        started = time.monotonic()
        assoc = associate(node, tls_args=(context, "localhost"))
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 2
        wait_for(lambda: any("no TLS handshake within 2 s" in reason for reason in reject_reasons(node)),
                 timeout=10, what="the silent TLS connection recorded")


def test_a_peer_that_stalls_mid_pdu_is_disconnected(node_factory: NodeFactory) -> None:
    node = node_factory(**{"dicom.network_timeout_seconds": 2, "dicom.max_associations": 1})
    assoc = associate(node)
    raw_socket(assoc).sendall(struct.pack(">BBI", 4, 0, 1000) + b"\x00" * 10)  # 1000 announced, 10 sent
    wait_for(lambda: node.scp.open_associations() == 0, timeout=10, what="the stalled association's slot freed")
    wait_for(lambda: open_rows(node) == 0, what="its row closed")
    assert echo_seconds(node) < 2  # the single slot is usable again
    assoc.kill()


def test_silent_sockets_never_crowd_out_a_pacs(node_factory: NodeFactory) -> None:
    """More silent connections than pynetdicom's own limit used to count: associations still start at once."""
    node = node_factory(**{"dicom.max_pending_connections": 8})
    silent = [socket.create_connection(("127.0.0.1", node.scp.port)) for _ in range(100)]
    try:
        time.sleep(1.5)  # past the grace period a new connection has to send its association request
        assert echo_seconds(node) < 2
        wait_for(lambda: sum(_closed_by_peer(s) for s in silent) >= 92, what="the oldest silent sockets closed")
        wait_for(lambda: any("too many connections" in reason for reason in reject_reasons(node)),
                 what="evictions recorded")
    finally:
        for sock in silent:
            sock.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(
    node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:
    node = node_factory(**{"dicom.max_instance_mb": 64})
    sent = pydicom.dcmread(small_series.paths[0])
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(body_of(sent)) + compressor.compress(b"\0" * (256 << 20)) + compressor.flush()
    assert len(bomb) < 1 << 20
    assoc = associate(node, DeflatedExplicitVRLittleEndian)
    before = _peak_rss_bytes()
    status = store_raw(assoc, command_set(CTImageStorage.encode(), sent.SOPInstanceUID.encode()), bomb)
    assert status.Status == 0xA701 and "64 MiB" in status.ErrorComment
    assert _peak_rss_bytes() - before < 64 << 20  # never held inflated
    assoc.release()
    assert not list(node.spool.root.rglob("*.dcm"))


def test_an_instance_over_the_limit_gets_its_status_and_the_association_goes_on(
    node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:
    node = node_factory(**{"dicom.max_instance_mb": 1})
    large = pydicom.dcmread(small_series.paths[0])
    large.PixelData = bytes(1200 * 1000)
    large.Rows, large.Columns = 1000, 600
    assoc = associate(node)
    status = assoc.send_c_store(large)
    assert status.Status == 0xA701
    assert assoc.send_c_store(pydicom.dcmread(small_series.paths[1])).Status == 0x0000
    assoc.release()
    assert not list((node.spool.root / node.spool.STAGING).iterdir())
    with node.sessions() as session:
        [error] = session.scalars(select(IngestError)).all()
    assert error.status == 0xA701 and "limit of 1 MiB" in error.reason


@pytest.mark.parametrize("uid, status", [(b"", 0xC220), (b"\x00", 0xC220), (b"  ", 0xC220),
                                         (b"1." + b"2" * 70, 0xC222), (b"1.2\x01.3", 0xC222)])
def test_a_request_with_a_blank_or_invalid_instance_uid_is_answered(
    node_factory: NodeFactory, small_series: GeneratedSeries, uid: bytes, status: int
) -> None:
    node = node_factory()
    assoc = associate(node)
    sent = pydicom.dcmread(small_series.paths[0])
    answer = store_raw(assoc, command_set(CTImageStorage.encode(), uid), body_of(sent))
    assert answer.Status == status
    assert "Affected SOP Instance UID" in answer.ErrorComment
    assert assoc.send_c_store(sent).Status == 0x0000  # the association is still usable
    assoc.release()


def test_images_without_whole_pixel_data_are_refused_over_the_wire(
    node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:
    node = node_factory()
    sent = pydicom.dcmread(small_series.paths[0])
    body = body_of(sent)
    no_pixels = copy.deepcopy(sent)
    del no_pixels.PixelData
    assoc = associate(node)
    command = command_set(CTImageStorage.encode(), sent.SOPInstanceUID.encode())
    assert store_raw(assoc, command, body_of(no_pixels)).Status == 0xC230
    pixel_element = body.index(b"\xe0\x7f\x10\x00")
    assert store_raw(assoc, command, body[:pixel_element]).Status == 0xC230  # cut at an element boundary
    assert store_raw(assoc, command, body[:-1]).Status == 0xC230
    assoc.release()
    assert not list(node.spool.root.rglob("*.dcm"))


def test_error_comments_are_cut_between_words() -> None:
    reason = "no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID in the dataset received from the scanner"
    comment = error_comment(reason)
    assert len(comment) <= 64 and comment.endswith("...")
    assert reason.startswith(comment[:-3]) and reason[len(comment) - 3] == " "
    assert error_comment("short reason") == "short reason"
    assert "\\" not in error_comment("a\\b")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs the node's data directory lives on, so the disk can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_association_heals_without_a_restart(
    small_disk: Path, node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:  # small_disk first: it is unmounted after the node has stopped
    node = node_factory(**{"data_dir": small_disk / "data", "completion.quiet_seconds": 0.5})
    assoc = associate(node)
    paths = small_series.paths
    assert assoc.send_c_store(pydicom.dcmread(paths[0])).Status == 0x0000
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # another process fills the disk
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    assert assoc.send_c_store(pydicom.dcmread(paths[1])).Status == 0xA700
    assoc.release()
    time.sleep(1.5)  # the node tries to record the end of the association and cannot
    filler.unlink()  # the admin frees space; nothing is restarted
    wait_for(lambda: open_rows(node) == 0, what="the association's end recorded once there is room")
    wait_for(lambda: study_states(node) and study_states(node)[0] in COMPLETED_STATES, timeout=20,
             what="the study complete")
    assert node.scp.open_associations() == 0


def test_readiness_says_when_every_slot_is_taken(node_factory: NodeFactory) -> None:
    import requests

    node = node_factory(**{"dicom.max_associations": 1})
    url = f"http://127.0.0.1:{node.settings.web.port}/readyz"
    assert requests.get(url, timeout=10).status_code == 200
    holder = associate(node)
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 503
    assert any("all 1 association slots in use" in check["detail"] for check in answer.json()["checks"])
    holder.release()
    wait_for(lambda: requests.get(url, timeout=10).status_code == 200, what="ready again")


def test_an_indexed_instance_whose_file_vanished_is_stored_again(
    node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:
    """A row without its file (a commit reported lost, a disk restored from backup) must not turn a
    re-send into "duplicate, success" while nothing is on disk."""
    node = node_factory()
    sent = pydicom.dcmread(small_series.paths[0])
    assoc = associate(node)
    assert assoc.send_c_store(sent).Status == 0x0000
    [stored] = list(node.spool.root.rglob("*.dcm"))
    stored.unlink()
    assert assoc.send_c_store(sent).Status == 0x0000
    assoc.release()
    assert pydicom.dcmread(stored).SOPInstanceUID == sent.SOPInstanceUID


def test_stopping_lets_a_sender_finish_within_the_drain_time(
    node_factory: NodeFactory, small_series: GeneratedSeries
) -> None:
    import threading

    node = node_factory()
    port = node.scp.port
    finishing, idle = associate(node), associate(node)
    started = time.monotonic()
    stopper = threading.Thread(target=node.scp.stop, kwargs={"drain_seconds": 4.0})
    stopper.start()
    time.sleep(0.3)
    late = client().associate("127.0.0.1", port, ae_title=node.settings.dicom.ae_title)
    assert not late.is_established  # no new association once stopping
    assert finishing.send_c_store(pydicom.dcmread(small_series.paths[0])).Status == 0x0000
    finishing.release()
    stopper.join(timeout=10)
    assert 3.5 < time.monotonic() - started < 8  # the idle one was given the drain time, then aborted
    assert idle.is_aborted or not idle.is_established
    with node.sessions() as session:
        outcomes = sorted(row.outcome for row in session.scalars(select(AssociationRecord)))
    assert outcomes == ["aborted", "released"]
