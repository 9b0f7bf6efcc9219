"""The node under fuzzing, as a real ``dicom-node serve`` process, and the checks made on it.

A crash must be a dead process the suite can count, not a dead pytest, so the node runs
as a subprocess (:class:`peers.NodeProcess`) with short timeouts (a stalled peer must be
dropped in seconds), no embedded worker (no model runs) and no free-space floor. Its
directories are laid out so that "the node wrote nothing outside its data directory"
can be checked by listing them::

    root/node/            the process's working directory: node.yaml, node.log, data/
    root/node/data/       data_dir: database, spool, quarantine, outbox
    root/tmp/             TMPDIR of the process, expected to stay empty

After each batch of cases :meth:`FuzzNode.invariant_failures` checks what the issue asks
for: C-ECHO answered within 2 s, no association left open once every fuzz connection is
closed and the node's timeouts have passed, ``/readyz`` 200 with its DICOM listener
check passing, nothing written outside ``data_dir``, and a valid study still received
and routed. A failure is a sentence naming the invariant, the value seen and, for a
leaked association, the fuzz case that opened it.
"""

from __future__ import annotations

import glob
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from fuzz_store_cases import ESCAPE_MARKER
from peers import COMPLETED_STATES, NodeProcess, run_tool
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

#: The largest instance (raw or inflated) a fuzzed node accepts, MiB: far below a deflate bomb,
#: so that a bomb must be refused (0xA701) after inflating this much at most.
MAX_INSTANCE_MB = 64
#: Settings of every fuzzed node: timeouts short enough that a stalled peer is dropped in seconds.
FUZZ_SETTINGS: dict[str, Any] = {
    "log_level": "INFO",
    "dicom.acse_timeout_seconds": 2.0,
    "dicom.dimse_timeout_seconds": 3.0,
    "dicom.network_timeout_seconds": 2.0,
    "dicom.max_instance_mb": MAX_INSTANCE_MB,
    "storage.min_free_mb": 0,
    "storage.fsync": False,  # durability is the crash suite's subject; here it only costs time
    "completion.quiet_seconds": 1.0,
    "completion.check_interval_seconds": 0.2,
    "queue.embedded_worker_queues": [],
}
ECHO_LIMIT_SECONDS = 2.0
#: Margin on top of the node's own timeouts before an association still open counts as leaked
#: (generous: two cores shared with other test runs).
SETTLE_MARGIN_SECONDS = 10.0
ROUTE_TIMEOUT_SECONDS = 30.0

# Invariants, as failure messages name them.
ECHO_SLOW = "C-ECHO not answered within 2 s"
LEAKED = "association left open"
NOT_READY = "/readyz not ready"
OUTSIDE = "written outside data_dir"
NOT_ROUTED = "valid study not received and routed"
CRASHED = "node process died"


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throw-away server certificate and key for 127.0.0.1 (openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = run_tool(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
                       "-out", "server.pem", "-days", "2", "-subj", "/CN=127.0.0.1"], cwd=folder)
    if result.returncode != 0:
        raise RuntimeError(f"openssl could not make a test certificate: {result.stderr}")
    return folder / "server.pem", folder / "server.key"


class FuzzNode(NodeProcess):
    """``dicom-node serve`` laid out for the fuzz invariants (see the module docstring)."""

    def __init__(self, root: Path, *, tls: bool = False, overrides: Mapping[str, Any] | None = None,
                 label: str = "fuzzed-node") -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        settings = dict(FUZZ_SETTINGS)
        self.tls_certificate: Path | None = None
        if tls:
            self.tls_certificate, key = self_signed_certificate(self.root.parent / f"{self.root.name}-tls")
            settings.update({"dicom.tls.enabled": True, "dicom.tls.certificate": str(self.tls_certificate),
                             "dicom.tls.private_key": str(key)})
        settings.update(overrides or {})
        super().__init__(self.root / "node", overrides=settings, label=label, env={"TMPDIR": str(self.tmp_dir)})
        self.valid_studies = 0
        self._root_entries = {"node", "tmp"}
        self._work_entries = {"node.yaml", "node.log", self.data_dir.name}

    @property
    def timeouts(self) -> float:
        """The longest of the node's ACSE, DIMSE and network timeouts (seconds)."""
        dicom = self.config["dicom"]
        return max(float(dicom[key]) for key in
                   ("acse_timeout_seconds", "dimse_timeout_seconds", "network_timeout_seconds"))

    # -- DICOM, with TLS when the node has it --------------------------------------------
    def client_ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_certificate is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_certificate))
        context.check_hostname = False
        return context

    def _ae(self, *contexts: str) -> AE:
        ae = AE(ae_title="FUZZ_CHECK")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.connection_timeout = 10  # bounds the TCP connect and, with TLS, the handshake
        for context in contexts:
            ae.add_requested_context(context, [ExplicitVRLittleEndian])
        return ae

    def _associate(self, ae: AE):  # type: ignore[no-untyped-def]
        context = self.client_ssl_context()
        return ae.associate("127.0.0.1", self.port, ae_title=self.ae_title,
                            tls_args=(context, None) if context is not None else None)

    def echo_seconds(self) -> float | None:
        """Seconds a pynetdicom C-ECHO (association, echo, release) took; None when it failed."""
        started = time.monotonic()
        assoc = self._associate(self._ae(Verification))
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        ok = status is not None and getattr(status, "Status", None) == 0x0000
        return time.monotonic() - started if ok else None

    def echo(self, called_ae: str | None = None, calling_ae: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
        """The start-up probe: a pynetdicom echo (over TLS when the node has it), as a CompletedProcess."""
        seconds = self.echo_seconds()
        return subprocess.CompletedProcess([], 0 if seconds is not None else 1, "", "no C-ECHO answer")

    # -- checks --------------------------------------------------------------------------
    def association_rows(self, after_id: int = 0) -> list[tuple[int, int, str]]:
        """(id, peer port, outcome) of every association recorded after ``after_id``."""
        return [(int(a), int(b), str(c)) for a, b, c in self.query(
            "SELECT id, peer_port, outcome FROM associations WHERE id > ? ORDER BY id", [after_id])]

    def last_association_id(self) -> int:
        rows = self.query("SELECT COALESCE(MAX(id), 0) FROM associations")
        return int(rows[0][0])

    def peak_memory_kib(self) -> int:
        """The process's resident-memory high-water mark (VmHWM), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmHWM in /proc/{self.pid}/status")

    def leaked_associations(self, after_id: int, cases_by_port: Mapping[int, str]) -> list[str]:
        """Associations after ``after_id`` still open once the node's timeouts and a margin have passed."""
        deadline = time.monotonic() + self.timeouts + SETTLE_MARGIN_SECONDS
        while True:
            open_rows = [row for row in self.association_rows(after_id) if row[2] == "open"]
            if not open_rows or time.monotonic() > deadline or not self.is_running():
                break
            time.sleep(0.2)
        return [
            f"{LEAKED}: association {row_id} from port {port} still open {self.timeouts + SETTLE_MARGIN_SECONDS:g} s "
            f"after its peer went, opened by {cases_by_port.get(port, 'no fuzz case (a check of the suite)')}"
            for row_id, port, _ in open_rows
        ]

    def readiness_failure(self) -> str | None:
        try:
            response = requests.get(f"http://127.0.0.1:{self.web_port}/readyz", timeout=10)
        except requests.RequestException as exc:
            return f"{NOT_READY}: {type(exc).__name__}: {exc}"
        listener = None
        try:
            listener = next((c for c in response.json().get("checks", []) if c.get("name") == "dicom listener"), None)
        except ValueError:
            pass
        if response.status_code != 200 or listener is None or not listener.get("ok"):
            return f"{NOT_READY}: HTTP {response.status_code}, dicom listener check {listener}, body {response.text[:400]}"
        return None

    def stray_files(self) -> list[str]:
        """What appeared outside data_dir: in the work dir, the root, the private TMPDIR, or escaped to /tmp."""
        found = [str(p) for p in self.root.iterdir() if p.name not in self._root_entries]
        found += [str(p) for p in self.work_dir.iterdir() if p.name not in self._work_entries]
        found += [str(p) for p in self.tmp_dir.iterdir()]
        found += glob.glob(f"/tmp/{ESCAPE_MARKER}*")
        found += [str(p) for p in self.root.rglob(f"*{ESCAPE_MARKER}*") if not p.is_relative_to(self.data_dir)]
        return [f"{OUTSIDE}: {path}" for path in sorted(set(found))]

    def valid_study_failure(self, series_dir: Path) -> str | None:
        """Send a fresh small CT study with pynetdicom; it must be stored and reach a completed state."""
        self.valid_studies += 1
        series = generate_ct_series(
            series_dir / f"valid-{self.valid_studies}",
            geometry=SeriesGeometry(rows=16, columns=16, slices=3, pixel_spacing=(16.0, 16.0), slice_spacing=5.0),
            seed=90_000 + self.valid_studies,
        )
        assoc = self._associate(self._ae(CTImageStorage))
        if not assoc.is_established:
            return f"{NOT_ROUTED}: association for study {series.study_uid} not established"
        statuses = []
        for path in series.paths:
            answer = assoc.send_c_store(path)
            statuses.append(getattr(answer, "Status", None))
        assoc.release()
        if statuses != [0x0000] * len(series.paths):
            return f"{NOT_ROUTED}: study {series.study_uid} answered {statuses}"
        deadline = time.monotonic() + ROUTE_TIMEOUT_SECONDS
        state = None
        while time.monotonic() < deadline:
            rows = self.query("SELECT state FROM studies WHERE study_instance_uid = ?", [series.study_uid])
            state = rows[0][0] if rows else None
            if state in COMPLETED_STATES:
                return None
            time.sleep(0.25)
        return f"{NOT_ROUTED}: study {series.study_uid} still in state {state} after {ROUTE_TIMEOUT_SECONDS:g} s"

    def invariant_failures(self, after_id: int, cases_by_port: Mapping[int, str], series_dir: Path) -> list[str]:
        """Every invariant of the module docstring, checked now; [] when all hold."""
        if not self.is_running():
            return [f"{CRASHED}: exit status {self.process.returncode if self.process else None}"]
        failures: list[str] = []
        seconds = [self.echo_seconds() for _ in range(2)]  # the better of two: one slow moment is not a fault
        answered = [s for s in seconds if s is not None]
        if not answered or min(answered) > ECHO_LIMIT_SECONDS:
            failures.append(f"{ECHO_SLOW}: two tries took {seconds} s (None: no answer)")
        failures += self.leaked_associations(after_id, cases_by_port)
        failure = self.readiness_failure()
        if failure:
            failures.append(failure)
        failures += self.stray_files()
        failure = self.valid_study_failure(series_dir)
        if failure:
            failures.append(failure)
        if not self.is_running():
            failures.append(f"{CRASHED}: exit status {self.process.returncode if self.process else None}")
        return failures


@contextmanager
def running_node(root: Path, **kwargs: Any) -> Iterator[FuzzNode]:
    """A started :class:`FuzzNode` (``kwargs`` go to it), stopped and its log forgotten afterwards."""
    node = FuzzNode(root, **kwargs)
    try:
        node.start()
        yield node
    finally:
        node.close()
