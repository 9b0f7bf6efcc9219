"""The SCP against pynetdicom clients: access control, bad input, compression, concurrency, TLS.

Each test runs a real node in-process (real sockets, real spool, real SQLite) and checks
the DICOM status the client got, what is on disk and what the admin can read back.
"""

from __future__ import annotations

import copy
import io
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityWorklistInformationFind, Verification
from sqlalchemy import select

from dicom_node.db import repo
from dicom_node.db.models import AssociationRecord, IngestError, Instance
from dicom_node.app.node import Node
from peers import COMPLETED_STATES
from tests.conftest import NodeFactory
from training.phantoms.ct_series import GeneratedSeries, encode_series


@pytest.fixture
def node_factory(node_factory: NodeFactory, request: pytest.FixtureRequest) -> NodeFactory:
    """Nodes on pynetdicom's public API; ``indirect`` parametrization with "accelerated" sets ``dicom.accelerate``.

    Access control, contexts and the ingest checks are the same code in both receive
    paths; the tests that exercise the wire (compression, bad data sets, garbage on the
    socket, parallel associations, TLS) run in both (the whole set in both settings is
    in test_listener_hardening.py).
    """
    accelerate = getattr(request, "param", "public") == "accelerated"

    def start(**overrides: Any) -> Node:
        return node_factory(**{"dicom.accelerate": accelerate, **overrides})

    return start


BOTH_PATHS = pytest.mark.parametrize("node_factory", ["public", "accelerated"], indirect=True)


def client(calling: str = "TEST_SCU", contexts: list[tuple[str, list[str]]] | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for sop_class, syntaxes in contexts or [(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def associate(node: Node, ae: AE, called: str | None = None, **kwargs):  # type: ignore[no-untyped-def]
    return ae.associate("127.0.0.1", node.scp.port, ae_title=called or node.settings.dicom.ae_title, **kwargs)


def rows(node: Node, model):  # type: ignore[no-untyped-def]
    with node.sessions() as session:
        return list(session.scalars(select(model).order_by(model.id)))


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def stored_dataset(node: Node, sop_uid: str) -> pydicom.Dataset:
    found = repo.find_instance(node.sessions, sop_uid)
    assert found is not None, f"{sop_uid} not indexed"
    return pydicom.dcmread(node.spool.absolute(found.path))


@BOTH_PATHS
def test_store_success_means_on_disk_and_indexed(node_factory: NodeFactory, small_series: GeneratedSeries) -> None:
    node = node_factory()
    assoc = associate(node, client())
    assert assoc.is_established
    for path in small_series.paths:
        status = assoc.send_c_store(pydicom.dcmread(path))
        assert status.Status == 0x0000
        sent = pydicom.dcmread(path)
        kept = stored_dataset(node, sent.SOPInstanceUID)  # already there: success came after the write
        assert kept.PixelData == sent.PixelData and kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert kept.file_meta.SourceApplicationEntityTitle.strip() == "TEST_SCU"
    assoc.release()
    wait_for(lambda: [s.state in COMPLETED_STATES for s in repo.list_studies(node.sessions)] == [True])
    [study] = repo.list_studies(node.sessions)
    assert study.instance_count == len(small_series.paths)
    [record] = rows(node, AssociationRecord)
    assert (record.calling_ae_title, record.outcome, record.instances_stored) == ("TEST_SCU", "released", 12)
    assert record.bytes_received > 12 * 64 * 64 * 2


def test_echo(node_factory: NodeFactory) -> None:
    node = node_factory()
    assoc = associate(node, client(contexts=[(Verification, [ExplicitVRLittleEndian])]))
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_calling_ae_is_rejected_and_recorded(node_factory: NodeFactory, small_series: GeneratedSeries) -> None:
    node = node_factory(**{"dicom.allowed_callers": [{"ae_title": "PACS", "hosts": ["127.0.0.1"]}]})
    rejected = associate(node, client("STRANGER"))
    assert rejected.is_rejected
    allowed = associate(node, client("PACS"))
    assert allowed.is_established
    assert allowed.send_c_store(pydicom.dcmread(small_series.paths[0])).Status == 0x0000
    allowed.release()
    records = rows(node, AssociationRecord)
    assert records[0].outcome == "rejected" and "STRANGER" in (records[0].reject_reason or "")
    wait_for(lambda: rows(node, AssociationRecord)[1].outcome == "released")


def test_calling_ae_bound_to_another_address_is_rejected(node_factory: NodeFactory) -> None:
    node = node_factory(**{"dicom.allowed_callers": [{"ae_title": "PACS", "hosts": ["10.9.9.9"]}]})
    assert associate(node, client("PACS")).is_rejected
    [record] = rows(node, AssociationRecord)
    assert "not allowed from address 127.0.0.1" in (record.reject_reason or "")


def test_wrong_called_ae_is_rejected(node_factory: NodeFactory) -> None:
    node = node_factory()
    assoc = associate(node, client(), called="SOMEONE_ELSE")
    assert assoc.is_rejected
    [record] = rows(node, AssociationRecord)
    assert record.outcome == "rejected" and "SOMEONE_ELSE" in (record.reject_reason or "")


def test_unsupported_sop_class_context_is_refused(node_factory: NodeFactory) -> None:
    node = node_factory()
    ae = client(contexts=[(ModalityWorklistInformationFind, [ExplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])])
    assoc = associate(node, ae)
    assert assoc.is_established
    refused = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assert refused == {ModalityWorklistInformationFind: 0x03}  # abstract syntax not supported
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
    assoc.release()


def test_private_sop_class_is_refused(node_factory: NodeFactory) -> None:
    node = node_factory()
    assoc = associate(node, client(contexts=[("1.3.6.1.4.1.9590.100.1.1.999", [ExplicitVRLittleEndian])]))
    assert not assoc.accepted_contexts
    assoc.abort()


@BOTH_PATHS
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_transfer_syntaxes_are_stored_as_received(
    node_factory: NodeFactory, small_series: GeneratedSeries, syntax: str
) -> None:
    node = node_factory()
    [encoded] = encode_series([pydicom.dcmread(small_series.paths[1])], syntax)
    assoc = associate(node, client(contexts=[(CTImageStorage, [syntax])]))
    assert assoc.send_c_store(encoded).Status == 0x0000
    assoc.release()
    found = repo.find_instance(node.sessions, encoded.SOPInstanceUID)
    assert found is not None
    kept = pydicom.dcmread(node.spool.absolute(found.path))
    assert kept.file_meta.TransferSyntaxUID == syntax  # never transcoded
    if syntax != DeflatedExplicitVRLittleEndian:
        assert kept.PixelData == encoded.PixelData  # the compressed bytes as sent
    assert (kept.pixel_array == pydicom.dcmread(small_series.paths[1]).pixel_array).all()


def _raw_store(node: Node, dataset_bytes: bytes, sop_instance_uid: str) -> Dataset:
    """C-STORE exact bytes (bypassing pynetdicom's encoder) and return the response status dataset."""
    ae = client()
    assoc = associate(node, ae)
    context = assoc.accepted_contexts[0]
    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset_bytes)
    assoc._reactor_checkpoint.clear()
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assoc.release()
    status = Dataset()
    status.Status = response.Status
    if response.ErrorComment:
        status.ErrorComment = response.ErrorComment
    return status


def _body(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset = copy.deepcopy(dataset)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.preamble = None
    dcmwrite(buffer, dataset, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


@BOTH_PATHS
def test_truncated_dataset_is_refused_quarantined_and_recorded(node_factory: NodeFactory, small_series: GeneratedSeries) -> None:
    node = node_factory()
    sent = pydicom.dcmread(small_series.paths[2])
    status = _raw_store(node, _body(sent)[:-500], sent.SOPInstanceUID)
    assert status.Status == 0xC230
    assert "pixel data" in status.ErrorComment
    assert repo.find_instance(node.sessions, sent.SOPInstanceUID) is None
    [error] = rows(node, IngestError)
    assert error.status == 0xC230 and error.sop_instance_uid == sent.SOPInstanceUID and error.calling_ae_title == "TEST_SCU"
    assert error.quarantine_path and Path(error.quarantine_path).stat().st_size > 0
    assert not any(node.spool.root.rglob("*.dcm"))


def test_corrupt_dataset_is_refused(node_factory: NodeFactory) -> None:
    node = node_factory()
    status = _raw_store(node, b"\x08\x00\x18\x00UI\xff\x7f" + b"\xab" * 300, "1.2.3.4")
    assert status.Status in (0xC210, 0xC220)
    [error] = rows(node, IngestError)
    assert error.status == status.Status


def test_missing_study_uid_is_refused_with_its_name(node_factory: NodeFactory, small_series: GeneratedSeries) -> None:
    node = node_factory()
    sent = pydicom.dcmread(small_series.paths[3])
    del sent.StudyInstanceUID
    status = _raw_store(node, _body(sent), sent.SOPInstanceUID)
    assert status.Status == 0xC220 and "StudyInstanceUID" in status.ErrorComment


def test_disk_guard_answers_out_of_resources(node_factory: NodeFactory, small_series: GeneratedSeries) -> None:
    node = node_factory(**{"storage.min_free_mb": 1_000_000_000})
    assoc = associate(node, client())
    status = assoc.send_c_store(pydicom.dcmread(small_series.paths[0]))
    assoc.release()
    assert status.Status == 0xA700 and "disk space low" in status.ErrorComment
    assert not any(node.spool.root.rglob("*.dcm"))
    [error] = rows(node, IngestError)
    assert error.status == 0xA700 and error.quarantine_path is None


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_duplicates_never_make_two_copies(node_factory: NodeFactory, small_series: GeneratedSeries, policy: str) -> None:
    node = node_factory(**{"dicom.duplicate_policy": policy})
    first = pydicom.dcmread(small_series.paths[0])
    second = copy.deepcopy(first)
    second.SeriesDescription = "second copy"
    assoc = associate(node, client())
    assert assoc.send_c_store(first).Status == 0x0000
    assert assoc.send_c_store(second).Status == 0x0000
    assoc.release()
    kept = stored_dataset(node, first.SOPInstanceUID)
    assert kept.SeriesDescription == ("second copy" if policy == "replace" else first.SeriesDescription)
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
    [instance] = rows(node, Instance)
    assert instance.duplicates_received == 1
    assert repo.list_studies(node.sessions)[0].instance_count == 1


@BOTH_PATHS
def test_garbage_on_the_socket_ends_only_that_connection(
    node_factory: NodeFactory, small_series: GeneratedSeries, caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory()
    good = associate(node, client())
    assert good.is_established
    payloads = (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x01\x00\x00\x00\x00\x10" + b"\x00" * 16,
        b"\xff" * 64,
        b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 64,  # claims a 4 GiB PDU: refused, never allocated
    )
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as rogue:
            rogue.sendall(payload)
            rogue.shutdown(socket.SHUT_WR)
            try:
                rogue.recv(1024)
            except OSError:
                pass
    assert good.send_c_store(pydicom.dcmread(small_series.paths[0])).Status == 0x0000
    good.release()
    fresh = associate(node, client())
    assert fresh.send_c_store(pydicom.dcmread(small_series.paths[1])).Status == 0x0000
    fresh.release()
    wait_for(lambda: sum(r.reject_reason is not None and "without a valid association" in r.reject_reason for r in rows(node, AssociationRecord)) == 4)
    assert "claims 4294967280 bytes" in caplog.text


def test_association_limit(node_factory: NodeFactory) -> None:
    node = node_factory(**{"dicom.max_associations": 2})
    ae = client(contexts=[(Verification, [ExplicitVRLittleEndian])])
    first, second = associate(node, ae), associate(node, ae)
    assert first.is_established and second.is_established
    third = associate(node, ae)
    assert third.is_rejected
    first.release()
    wait_for(lambda: rows(node, AssociationRecord)[0].outcome == "released")
    fourth = associate(node, ae)
    assert fourth.is_established
    second.release()
    fourth.release()
    reasons = [r.reject_reason for r in rows(node, AssociationRecord) if r.outcome == "rejected"]
    assert reasons == ["2 associations open, the maximum is 2"]


@BOTH_PATHS
def test_many_parallel_associations(node_factory: NodeFactory, small_series: GeneratedSeries, second_series: GeneratedSeries) -> None:
    node = node_factory(**{"dicom.max_associations": 16})
    files = small_series.paths + second_series.paths
    results: list[int] = []
    lock = threading.Lock()

    def push(paths: list[Path]) -> None:
        assoc = associate(node, client())
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            with lock:
                results.append(status.Status)
        assoc.release()

    # 9 associations at once, each a slice of both studies; some instances sent twice.
    threads = [threading.Thread(target=push, args=(files[i::6] + files[:2],)) for i in range(6)]
    threads += [threading.Thread(target=push, args=(files[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results and set(results) == {0x0000}
    wait_for(lambda: [s.state in COMPLETED_STATES for s in repo.list_studies(node.sessions)] == [True, True])
    counts = sorted(s.instance_count for s in repo.list_studies(node.sessions))
    assert counts == sorted([len(small_series.paths), len(second_series.paths)])
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(files)


@BOTH_PATHS
def test_dicom_tls_with_client_certificates(node_factory: NodeFactory, tls_files: dict[str, Path], small_series: GeneratedSeries) -> None:
    node = node_factory(**{
        "dicom.tls.enabled": True,
        "dicom.tls.certificate": tls_files["server.pem"],
        "dicom.tls.private_key": tls_files["server.key"],
        "dicom.tls.ca_certificates": tls_files["ca.pem"],
        "dicom.tls.require_client_certificate": True,
    })
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files["ca.pem"]))
    context.load_cert_chain(str(tls_files["client.pem"]), str(tls_files["client.key"]))
    assoc = associate(node, client(), tls_args=(context, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(small_series.paths[0])).Status == 0x0000
    assoc.release()

    no_certificate = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_files["ca.pem"]))
    refused = associate(node, client(), tls_args=(no_certificate, "localhost"))
    assert not refused.is_established
    plain = associate(node, client())
    assert not plain.is_established
    wait_for(lambda: rows(node, AssociationRecord)[0].outcome == "released")
    assert rows(node, AssociationRecord)[0].tls is True


def test_acceleration_on_another_pynetdicom_version_falls_back_to_the_public_api(
    node_factory: NodeFactory, small_series: GeneratedSeries, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pynetdicom

    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    node = node_factory(**{"dicom.accelerate": True})
    assert "dicom.accelerate is true but pynetdicom 9.9.9 is installed" in caplog.text
    assert "receiving through pynetdicom's public API instead" in caplog.text
    assoc = associate(node, client())
    assert assoc.send_c_store(pydicom.dcmread(small_series.paths[0])).Status == 0x0000
    from pynetdicom.association import Association

    acceptors = [thread for thread in threading.enumerate() if isinstance(thread, Association) and thread.is_acceptor]
    assert acceptors and {type(thread).__name__ for thread in acceptors} == {"Association"}
    assoc.release()
