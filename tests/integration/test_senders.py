"""Sending results: C-STORE (:func:`dicom_node.scu.send_dicom`) and STOW-RS (:func:`dicom_node.stow.send_dicomweb`).

Real peers:

* Orthanc with the DICOMweb plugin, HTTP authentication and ``DicomCheckCalledAet``:
  a CT series sent by C-STORE and another by STOW-RS are held by Orthanc with every
  data set byte-identical to the file sent; the C-STORE socket has TCP_NODELAY set
  (read back with getsockopt from the connected socket); a wrong called AE title is a
  permanent rejection; a wrong password a permanent HTTP 401.
* DCMTK ``storescp``: bit-preserving, it writes the same data set bytes; accepting only
  Implicit VR LE, it gets the Explicit VR files converted (same content) while RLE files,
  for which it accepts no context, are reported as permanent per-file failures; with
  TLS and a required client certificate, a send with the client certificate succeeds,
  one without it or with an untrusted server certificate fails permanently.
* Nothing listening, a listener that never answers: retryable DeliveryErrors.

Scripted peers, for answers the real ones cannot be made to give: a pynetdicom
Storage SCP that answers chosen statuses (warning, 0xA700, 0xA900, 0xC000) or aborts
mid-association, and a small HTTP server giving a STOW-RS 202 with a FailedSOPSequence,
a 503 with Retry-After and a redirect.
"""

from __future__ import annotations

import json
import pickle
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import LOCALHOST, PEER_LOGS, Orthanc, dataset_bytes, free_port, peer_env, split_part10, wait_for
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt

from dicom_node.delivery_types import DeliveryError, SendReport
from dicom_node.destinations import DestinationSet, DicomDestination, DicomTLS, DicomWebDestination
from dicom_node.scu import send_dicom
from dicom_node.stow import send_dicomweb
from training.phantoms.ct_series import GeneratedSeries, SeriesGeometry, generate_ct_series

pytestmark = pytest.mark.slow

NODE_AE = "DICOM_NODE"
ORTHANC_USER, ORTHANC_PASSWORD = "node", "s3cret"
GEOMETRY = SeriesGeometry(rows=64, columns=64, slices=8, pixel_spacing=(2.0, 2.0), slice_spacing=5.0)


def _series(tmp_path_factory: pytest.TempPathFactory, seed: int, **kwargs: Any) -> GeneratedSeries:
    return generate_ct_series(tmp_path_factory.mktemp(f"series{seed}"), geometry=GEOMETRY, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def dicomweb_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb, HTTP basic authentication and a called AE title check."""
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc-senders"),
        aet="ORTHANC",
        plugins=["libOrthancDicomWeb.so"],
        extra_config={
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "DicomCheckCalledAet": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
        label="orthanc-senders",
    )
    server.http.auth = (ORTHANC_USER, ORTHANC_PASSWORD)  # its REST helpers need the credentials too
    server.start()
    yield server
    server.stop()


def _orthanc_destination(orthanc: Orthanc, **changes: Any) -> DicomDestination:
    values: dict[str, Any] = {"name": "orthanc", "ae_title": orthanc.aet, "host": LOCALHOST, "port": orthanc.dicom_port}
    return DicomDestination(**(values | changes))


def _stow_destination(orthanc: Orthanc, password: str = ORTHANC_PASSWORD) -> DicomWebDestination:
    return DicomWebDestination.model_validate(
        {
            "type": "dicomweb",
            "name": "orthanc-web",
            "url": f"{orthanc.url}/dicom-web/",
            "auth": {"type": "basic", "username": ORTHANC_USER, "password": password},
            "timeout_seconds": 30,
        }
    )


def _assert_all_stored(report: SendReport, series: GeneratedSeries) -> None:
    assert report.ok, report.summary()
    assert [outcome.sop_instance_uid for outcome in report.outcomes] == series.sop_instance_uids
    assert all(outcome.status == 0x0000 and outcome.error is None for outcome in report.outcomes), report


def _assert_orthanc_holds(orthanc: Orthanc, series: GeneratedSeries) -> list[dict[str, Any]]:
    """Every instance of ``series`` is in Orthanc with the data set bytes of the file sent."""
    study_id = orthanc.lookup_study(series.study_uid)
    assert study_id is not None, f"Orthanc has no study {series.study_uid}"
    instances = orthanc.study_instances(study_id)
    by_uid = {instance["MainDicomTags"]["SOPInstanceUID"]: instance for instance in instances}
    assert sorted(by_uid) == sorted(series.sop_instance_uids)
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        held = split_part10(orthanc.instance_file(by_uid[uid]["ID"]))[1]
        assert held == dataset_bytes(path), f"{uid}: the data set Orthanc holds differs from {path}"
    return instances


def test_c_store_to_orthanc_is_byte_identical_over_one_nodelay_socket(
    dicomweb_orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=31)
    sockets: list[dict[str, Any]] = []

    def observe(sock: socket.socket) -> None:
        sockets.append(
            {
                "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                "peer": sock.getpeername(),
                "type": sock.type,
            }
        )

    report = send_dicom(
        _orthanc_destination(dicomweb_orthanc), series.paths, calling_ae_title=NODE_AE, on_connect=observe
    )

    _assert_all_stored(report, series)
    assert report.peer == f"ORTHANC@{LOCALHOST}:{dicomweb_orthanc.dicom_port}" and report.http_status is None
    assert len(sockets) == 1, f"expected one association for {len(series.paths)} files, saw {sockets}"
    assert sockets[0]["type"] == socket.SOCK_STREAM
    assert sockets[0]["peer"] == (LOCALHOST, dicomweb_orthanc.dicom_port)
    assert sockets[0]["nodelay"] != 0, "TCP_NODELAY is not set on the association's socket"
    instances = _assert_orthanc_holds(dicomweb_orthanc, series)
    origin = dicomweb_orthanc.get(f"/instances/{instances[0]['ID']}/metadata?expand")
    assert origin["RemoteAET"] == NODE_AE and origin["CalledAET"] == "ORTHANC", origin


def test_stow_rs_to_orthanc_is_byte_identical(
    dicomweb_orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=32)

    report = send_dicomweb(_stow_destination(dicomweb_orthanc), series.paths)

    _assert_all_stored(report, series)
    assert report.http_status == 200 and report.peer == f"{dicomweb_orthanc.url}/dicom-web"
    instances = _assert_orthanc_holds(dicomweb_orthanc, series)
    origin = dicomweb_orthanc.get(f"/instances/{instances[0]['ID']}/metadata?expand")
    assert origin["Origin"] == "Plugins", origin  # it came in through the DICOMweb plugin


def test_stow_rs_with_a_wrong_password_is_a_permanent_401(
    dicomweb_orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=33)

    with pytest.raises(DeliveryError) as caught:
        send_dicomweb(_stow_destination(dicomweb_orthanc, password="wrong"), series.paths)

    error = caught.value
    assert error.retryable is False and error.destination == "orthanc-web"
    assert "HTTP 401" in str(error) and "orthanc-web" in str(error) and "/dicom-web/studies" in str(error)
    assert "wrong" not in str(error), "the password leaked into the message"
    assert dicomweb_orthanc.lookup_study(series.study_uid) is None


def test_wrong_called_ae_title_is_a_permanent_rejection(
    dicomweb_orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=34)
    destination = _orthanc_destination(dicomweb_orthanc, ae_title="NOT_ORTHANC")

    with pytest.raises(DeliveryError) as caught:
        send_dicom(destination, series.paths, calling_ae_title=NODE_AE)

    message = str(caught.value)
    assert caught.value.retryable is False, message
    assert "Called AE title not recognised" in message and "'NOT_ORTHANC'" in message, message
    assert f"{NODE_AE} -> NOT_ORTHANC@{LOCALHOST}:{dicomweb_orthanc.dicom_port}" in message
    assert "Rejected Permanent (result 0x01)" in message and "(0x07)" in message
    assert dicomweb_orthanc.lookup_study(series.study_uid) is None


def test_nothing_listening_is_retryable(tmp_path_factory: pytest.TempPathFactory) -> None:
    series = _series(tmp_path_factory, seed=35)
    port = free_port()
    destination = DicomDestination(name="gone", ae_title="PACS", host=LOCALHOST, port=port, timeout_seconds=5)

    with pytest.raises(DeliveryError) as caught:
        send_dicom(destination, series.paths, calling_ae_title=NODE_AE)

    error = caught.value
    assert error.retryable is True and error.report is None
    assert f"{NODE_AE} -> PACS@{LOCALHOST}:{port}" in str(error) and "refused" in str(error)
    copy = pickle.loads(pickle.dumps(error))  # Celery moves exceptions between processes
    assert (copy.destination, str(copy), copy.retryable) == ("gone", str(error), True)

    web = DicomWebDestination(name="gone-web", url=f"http://{LOCALHOST}:{port}/dicom-web")
    with pytest.raises(DeliveryError) as caught_web:
        send_dicomweb(web, series.paths)
    assert caught_web.value.retryable is True and "refused" in str(caught_web.value)


def test_a_host_name_that_does_not_resolve_is_a_readable_retryable_error(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    series = _series(tmp_path_factory, seed=36)
    destination = DicomDestination(name="typo", ae_title="PACS", host="pacs.invalid", port=104, timeout_seconds=5)
    with pytest.raises(DeliveryError) as caught:
        send_dicom(destination, series.paths[:1], calling_ae_title=NODE_AE)
    assert caught.value.retryable is True and "cannot resolve host 'pacs.invalid'" in str(caught.value)


def test_a_peer_that_never_answers_times_out_retryable(tmp_path_factory: pytest.TempPathFactory) -> None:
    series = _series(tmp_path_factory, seed=43)
    with socket.create_server((LOCALHOST, 0)) as silent:  # accepts the TCP connection, never answers
        port = silent.getsockname()[1]
        destination = DicomDestination(name="silent", ae_title="PACS", host=LOCALHOST, port=port, timeout_seconds=1)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as caught:
            send_dicom(destination, series.paths, calling_ae_title=NODE_AE)
        elapsed = time.monotonic() - started
    assert caught.value.retryable is True
    assert "no answer to the association request within 1 s" in str(caught.value)
    assert elapsed < 10, f"the 1 s timeout took {elapsed:.1f} s"


# -- DCMTK storescp ------------------------------------------------------------------------


StorescpFactory = Callable[..., tuple[int, Path]]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StorescpFactory]:
    """Start ``storescp -aet STORESCP [options] -od DIR PORT``; returns (port, DIR)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, Path]:
        port = free_port()
        out = tmp_path / f"storescp{len(started)}"
        out.mkdir()
        log = tmp_path / f"storescp{len(started)}.log"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                ["storescp", "-aet", "STORESCP", *options, "-od", str(out), str(port)],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        started.append(process)
        PEER_LOGS[f"storescp ({log})"] = log

        def listening() -> bool:
            assert process.poll() is None, f"storescp exited: {log.read_text()}"
            with socket.socket() as probe:
                return probe.connect_ex((LOCALHOST, port)) == 0

        wait_for(f"storescp on port {port}", listening, timeout=10)
        return port, out

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)
    for label in [label for label in PEER_LOGS if label.startswith("storescp (")]:
        PEER_LOGS.pop(label)


def _received(out: Path, expected: list[str]) -> dict[str, Path]:
    """The files storescp wrote to ``out`` by SOP Instance UID, once they are the ``expected`` ones."""

    def probe() -> dict[str, Path] | None:
        files = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in out.iterdir()}
        return files if sorted(files) == sorted(expected) else None

    return wait_for(f"storescp to write {len(expected)} files to {out}", probe)


def test_dcmtk_storescp_receives_the_same_data_set_bytes(
    storescp: StorescpFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=36)
    port, out = storescp("+B")  # bit-preserving: writes the data set as received

    report = send_dicom(
        DicomDestination(name="dcmtk", ae_title="STORESCP", host=LOCALHOST, port=port),
        series.paths,
        calling_ae_title=NODE_AE,
    )

    _assert_all_stored(report, series)
    received = _received(out, series.sop_instance_uids)
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        assert dataset_bytes(received[uid]) == dataset_bytes(path), f"{uid}: storescp wrote other bytes"


def test_hundreds_of_instances_go_over_one_association_without_a_stall(
    storescp: StorescpFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Regression: pynetdicom's reactor race lost about one C-STORE response in 3,000 (see scu._ReactorCheckpoint)."""
    geometry = SeriesGeometry(rows=16, columns=16, slices=600, pixel_spacing=(8.0, 8.0), slice_spacing=1.0)
    series = generate_ct_series(tmp_path_factory.mktemp("many"), geometry=geometry, seed=44)
    port, _ = storescp("--ignore")  # answers success without writing files
    connections: list[socket.socket] = []

    report = send_dicom(
        DicomDestination(name="dcmtk", ae_title="STORESCP", host=LOCALHOST, port=port, timeout_seconds=5),
        series.paths,
        calling_ae_title=NODE_AE,
        on_connect=connections.append,
    )

    _assert_all_stored(report, series)
    assert len(connections) == 1
    rate = len(series.paths) / report.elapsed_seconds
    assert report.elapsed_seconds < 10, (
        f"{len(series.paths)} instances took {report.elapsed_seconds:.1f} s ({rate:.0f}/s)"
    )


def test_implicit_only_peer_gets_converted_data_and_compressed_files_fail_permanently(
    storescp: StorescpFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    explicit = _series(tmp_path_factory, seed=37)
    rle = _series(tmp_path_factory, seed=38, transfer_syntax_uid=RLELossless)
    port, out = storescp("+xi")  # accepts Implicit VR Little Endian only

    report = send_dicom(
        DicomDestination(name="dcmtk", ae_title="STORESCP", host=LOCALHOST, port=port),
        [*explicit.paths, *rle.paths],
        calling_ae_title=NODE_AE,
    )

    assert not report.ok and not report.retryable
    assert [o.ok for o in report.outcomes] == [True] * len(explicit.paths) + [False] * len(rle.paths)
    for outcome in report.failed:
        assert outcome.status is None and not outcome.retryable
        assert "no accepted presentation context for CT Image Storage" in (outcome.error or "")
        assert "RLE Lossless (1.2.840.10008.1.2.5)" in (outcome.error or "")
    summary = report.summary()
    assert f"{len(explicit.paths)} of {len(report.outcomes)} instances stored" in summary, summary
    assert f"{len(rle.paths)} failed (permanent)" in summary, summary
    received = _received(out, explicit.sop_instance_uids)  # and none of the RLE files
    for path, uid in zip(explicit.paths, explicit.sop_instance_uids, strict=True):
        got, sent = pydicom.dcmread(received[uid]), pydicom.dcmread(path)
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert got.PixelData == sent.PixelData and got == sent, f"{uid}: content changed in the conversion"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    folder = tmp_path_factory.mktemp("pki")

    def openssl(command: str) -> None:
        result = subprocess.run(["openssl", *command.split()], cwd=folder, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"openssl {command}: {result.stderr}"

    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-CA")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}")
        extra = " -extfile server.ext" if name == "server" else ""
        openssl(f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt{extra}")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_tls_with_a_client_certificate_and_the_two_ways_it_is_refused(
    storescp: StorescpFactory, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=39)
    port, out = storescp("+tls", str(pki["server.key"]), str(pki["server.crt"]), "+cf", str(pki["ca.crt"]), "-rc")
    base: dict[str, Any] = {"name": "tls", "ae_title": "STORESCP", "host": LOCALHOST, "port": port}
    ca, certificate, key = pki["ca.crt"], pki["client.crt"], pki["client.key"]

    report = send_dicom(
        DicomDestination(**base, tls=DicomTLS(ca_certificates=ca, certificate=certificate, private_key=key)),
        series.paths,
        calling_ae_title=NODE_AE,
    )
    _assert_all_stored(report, series)
    _received(out, series.sop_instance_uids)

    with pytest.raises(DeliveryError) as no_client_certificate:
        send_dicom(DicomDestination(**base, tls=DicomTLS(ca_certificates=ca)), series.paths, calling_ae_title=NODE_AE)
    assert no_client_certificate.value.retryable is False
    assert "CERTIFICATE_REQUIRED" in str(no_client_certificate.value), str(no_client_certificate.value)

    with pytest.raises(DeliveryError) as untrusted_server:  # the system's CAs do not know the test CA
        send_dicom(
            DicomDestination(**base, tls=DicomTLS(certificate=certificate, private_key=key)),
            series.paths,
            calling_ae_title=NODE_AE,
        )
    assert untrusted_server.value.retryable is False
    assert "certificate this node does not trust" in str(untrusted_server.value), str(untrusted_server.value)


# -- scripted DICOM peer: statuses and aborts ----------------------------------------------


@pytest.fixture
def scripted_scp() -> Iterator[Callable[[dict[int, int | str]], int]]:
    """A pynetdicom Storage SCP answering per InstanceNumber: a status, or "abort"; 0x0000 otherwise."""
    servers: list[AE] = []

    def start(script: dict[int, int | str]) -> int:
        def on_store(event: evt.Event) -> int | Dataset:
            action = script.get(int(event.dataset.InstanceNumber), 0x0000)
            if action == "abort":
                event.assoc.abort()
                return 0x0000
            status = Dataset()
            status.Status = int(action)
            if action:
                status.ErrorComment = f"scripted 0x{int(action):04X}"
            return status

        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(CTImageStorage)
        port = free_port()
        ae.start_server((LOCALHOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        servers.append(ae)
        return port

    yield start
    for ae in servers:
        ae.shutdown()


def test_instance_statuses_become_outcomes(
    scripted_scp: Callable[[dict[int, int | str]], int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=40)
    not_dicom = series.paths[0].with_name("notes.txt")
    not_dicom.write_text("not a DICOM file")
    port = scripted_scp({2: 0xB000, 3: 0xA700, 4: 0xA900, 5: 0xC000, 6: 0xB007})

    report = send_dicom(
        DicomDestination(name="scripted", ae_title="SCRIPTED", host=LOCALHOST, port=port),
        [*series.paths, not_dicom],
        calling_ae_title=NODE_AE,
    )

    statuses = [outcome.status for outcome in report.outcomes]
    assert statuses == [0x0000, 0xB000, 0xA700, 0xA900, 0xC000, 0xB007, 0x0000, 0x0000, None]
    assert [o.ok for o in report.outcomes] == [True, True, False, False, False, True, True, True, False]
    assert [o.retryable for o in report.outcomes] == [False, False, True] + [False] * 6
    assert [o.warning for o in report.outcomes][:2] == [False, True]
    assert not report.ok and report.retryable and len(report.warnings) == 2
    assert report.outcomes[2].error == "0xA700 (refused: out of resources): scripted 0xA700"
    assert report.outcomes[3].error == "0xA900 (error: data set does not match SOP class): scripted 0xA900"
    assert "0xC000 (error: cannot understand)" in report.summary()
    unreadable = report.outcomes[8]
    assert unreadable.sop_instance_uid is None and "notes.txt: cannot read as a DICOM Part 10 file" in str(
        unreadable.error
    )


def test_an_abort_mid_association_is_retryable_with_the_partial_report(
    scripted_scp: Callable[[dict[int, int | str]], int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=41)
    port = scripted_scp({4: "abort"})

    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        send_dicom(
            DicomDestination(name="scripted", ae_title="SCRIPTED", host=LOCALHOST, port=port, timeout_seconds=5),
            series.paths,
            calling_ae_title=NODE_AE,
        )
    elapsed = time.monotonic() - started

    error = caught.value
    assert elapsed < 4, f"{elapsed:.1f} s: the sender waited for the DIMSE timeout after the abort"
    assert error.retryable is True and error.report is not None, str(error)
    assert "3 of 8 instances answered, 5 not" in str(error), str(error)
    assert [o.status for o in error.report.outcomes[:3]] == [0x0000] * 3
    assert all(o.status is None and o.retryable for o in error.report.outcomes[3:])


# -- scripted STOW-RS server -----------------------------------------------------------------


class _ScriptedStow(ThreadingHTTPServer):
    """Answers each POST with the next (status, headers, body) of ``answers``; keeps the requests."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        super().__init__((LOCALHOST, 0), _StowHandler)


class _StowHandler(BaseHTTPRequestHandler):
    server: _ScriptedStow

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((self.path, dict(self.headers.items()), body))
        status, headers, answer = self.server.answers.pop(0)
        self.send_response(status)
        for key, value in {"Content-Length": str(len(answer)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stow_server() -> Iterator[Callable[..., _ScriptedStow]]:
    """``start(answers, tls=None)``: a scripted STOW-RS server, over https with ``tls`` (a server SSLContext)."""
    servers: list[_ScriptedStow] = []

    def start(answers: list[tuple[int, dict[str, str], bytes]], tls: ssl.SSLContext | None = None) -> _ScriptedStow:
        server = _ScriptedStow(answers)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _sop_item(uid: str, reason_tag: str | None = None, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if reason_tag is not None:
        item[reason_tag] = {"vr": "US", "Value": [reason]}
    return item


def test_stow_request_format_partial_failures_and_http_errors(
    stow_server: Callable[..., _ScriptedStow], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=42)
    uids = series.sop_instance_uids
    partial = {
        "00081199": {
            "vr": "SQ",
            "Value": [_sop_item(uid) for uid in uids[:5]] + [_sop_item(uids[5], "00081196", 0xB000)],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [_sop_item(uids[6], "00081197", 0xA700), _sop_item(uids[7], "00081197", 0xC000)],
        },
    }
    dicom_json = {"Content-Type": "application/dicom+json"}
    server = stow_server(
        [
            (202, dicom_json, json.dumps(partial).encode()),
            (503, {"Retry-After": "7"}, b"busy"),
            (302, {"Location": "https://elsewhere/dicom-web/studies"}, b""),
        ]
    )
    destination = DicomWebDestination.model_validate(
        {
            "name": "web",
            "url": f"http://{LOCALHOST}:{server.server_port}/dicom-web",
            "auth": {"type": "bearer", "token": "t0ken"},
        }
    )

    report = send_dicomweb(destination, series.paths)

    path, headers, body = server.requests[0]
    assert path == "/dicom-web/studies" and headers["Authorization"] == "Bearer t0ken"
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.split("boundary=", 1)[1].encode()
    parts = body.split(b"--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == len(series.paths) + 2
    for part, sent in zip(parts[1:-1], series.paths, strict=True):
        assert part == b"\r\nContent-Type: application/dicom\r\n\r\n" + sent.read_bytes() + b"\r\n"
    assert report.http_status == 202 and not report.ok and report.retryable
    assert [o.status for o in report.outcomes] == [0, 0, 0, 0, 0, 0xB000, 0xA700, 0xC000]
    assert [o.ok for o in report.outcomes] == [True] * 6 + [False, False]
    assert [o.retryable for o in report.outcomes[6:]] == [True, False]

    with pytest.raises(DeliveryError) as busy:
        send_dicomweb(destination, series.paths[:1])
    assert busy.value.retryable is True and busy.value.retry_after_seconds == 7.0
    assert "HTTP 503: busy" in str(busy.value)

    with pytest.raises(DeliveryError) as moved:
        send_dicomweb(destination, series.paths[:1])
    assert moved.value.retryable is False and "https://elsewhere/dicom-web/studies" in str(moved.value)
    assert len(server.requests) == 3, "the redirect was followed"


def test_stow_over_https_verifies_the_server_certificate(
    stow_server: Callable[..., _ScriptedStow], pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    series = _series(tmp_path_factory, seed=45)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki["server.crt"], pki["server.key"])
    server = stow_server([(200, {}, b"")] * 2, tls=tls)
    url = f"https://{LOCALHOST}:{server.server_port}/dicom-web"

    trusted = send_dicomweb(DicomWebDestination(name="https", url=url, ca_certificates=pki["ca.crt"]), series.paths)
    assert trusted.ok and trusted.http_status == 200 and len(server.requests) == 1  # 200, no body: all stored
    with pytest.raises(DeliveryError) as untrusted:
        send_dicomweb(DicomWebDestination(name="https", url=url), series.paths)  # the system CAs only
    assert untrusted.value.retryable is False and "TLS certificate is not trusted" in str(untrusted.value)
    unverified = send_dicomweb(DicomWebDestination(name="https", url=url, verify_tls=False), series.paths)
    assert unverified.ok and len(server.requests) == 2


# -- destination definitions -------------------------------------------------------------------


def test_destination_definitions_validate_and_name_the_wrong_value() -> None:
    def dicom(**changes: Any) -> dict[str, Any]:
        return {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "pacs.local", "port": 104} | changes

    def web(**changes: Any) -> dict[str, Any]:
        return {"type": "dicomweb", "name": "web", "url": "https://dw.local/dicom-web/"} | changes

    basic = {"type": "basic", "username": "u", "password": "hunter2"}
    parsed = DestinationSet.model_validate({"destinations": [dicom(default=True), web(outputs=["SEG"], auth=basic)]})
    pacs, archive = parsed.destinations
    assert isinstance(pacs, DicomDestination) and isinstance(archive, DicomWebDestination)
    assert pacs.outputs == {"SEG", "SR", "GSPS", "KO"} and pacs.calling_ae_title is None and parsed.defaults() == [pacs]
    assert archive.url == "https://dw.local/dicom-web" and archive.accepts("SEG") and not archive.accepts("SR")
    assert "hunter2" not in repr(archive) and "hunter2" not in archive.model_dump_json()
    assert json.loads(archive.model_dump_json(context={"reveal_secrets": True}))["auth"]["password"] == "hunter2"
    assert parsed.by_name("web") is archive

    bad = [
        (dicom(ae_title="A\\B"), "'A\\\\B'"),
        (dicom(ae_title="SEVENTEEN_LETTERS"), "'SEVENTEEN_LETTERS'"),
        (dicom(port=70000), "70000"),
        (dicom(name="bad name"), "'bad name'"),
        (dicom(host="pacs local"), "'pacs local'"),
        (dicom(tls={"certificate": "node.pem"}), "node.pem"),
        (web(url="ftp://x/dicom-web"), "'ftp://x/dicom-web'"),
        (web(url="https://admin:s3cret@dw.local/dicom-web"), "must not carry credentials"),
        (web(outputs=["SEG", "PDF"]), "'PDF'"),
        (web(outputs=[]), "outputs is empty"),
        (web(retries=3), "retries"),
        (web(auth={"type": "basic", "username": "a:b", "password": "p"}), "'a:b'"),
        ({"type": "smtp", "name": "mail"}, "'smtp'"),
    ]
    for definition, named in bad:
        with pytest.raises(ValidationError) as caught:
            DestinationSet.model_validate({"destinations": [definition]})
        assert named in str(caught.value), f"{definition}: {caught.value}"
    with pytest.raises(ValidationError, match="destination name 'pacs' is used twice"):
        DestinationSet.model_validate({"destinations": [dicom(), dicom(port=105)]})
