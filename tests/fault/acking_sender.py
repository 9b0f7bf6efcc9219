"""A C-STORE sender in a process of its own that records, durably, which instances were acknowledged.

Why a process: the node is killed (``kill -9``) or its database restarted while this
sends, and what the test must know afterwards is exactly which SOP Instances were
answered 0x0000 before that. The sender appends each acknowledged SOP Instance UID
to an acknowledgement file and ``fsync``s it *before* it sends the next instance, so
the file is the sender's own record, as a PACS's would be, whatever happens to either
process. Instances answered with a failure status are written to a second file
(``UID 0xSTATUS``) and, unless ``--stop-on-failure``, sending goes on with the next
one; an association that dies (no response) ends the run. ``--interval`` paces the
sending (a slow link), so that a fault can be made to fall in the middle of a push.

Run as a script (see :func:`start_sender`); the exit status is 0 when every instance
was acknowledged, 1 when some were not, 2 when no association could be made.
Nagle's algorithm is off on the socket, as for every sender in the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pydicom

__all__ = ["read_acks", "read_failures", "start_sender"]


def start_sender(
    files: Sequence[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    acks: Path,
    calling_ae: str = "ACKSENDER",
    stop_on_failure: bool = False,
    interval_seconds: float = 0.0,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start this module as a process sending ``files`` to ``host``:``port``; acknowledgements go to ``acks``.

    Failures go to ``acks`` with the suffix ``.failed``; the sender's own output to ``log``.
    """
    listing = acks.with_suffix(".files")
    listing.write_text("".join(f"{path}\n" for path in files))
    command = [sys.executable, str(Path(__file__).resolve()), "--host", host, "--port", str(port), "--called-ae", called_ae,
               "--calling-ae", calling_ae, "--acks", str(acks), "--files-from", str(listing)]
    if stop_on_failure:
        command.append("--stop-on-failure")
    if interval_seconds:
        command += ["--interval", str(interval_seconds)]
    output: IO[bytes] | int = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    finally:
        if not isinstance(output, int):
            output.close()


def read_acks(acks: Path) -> list[str]:
    """The SOP Instance UIDs acknowledged so far, in sending order."""
    if not acks.exists():
        return []
    return [line for line in acks.read_text().splitlines() if line]


def read_failures(acks: Path) -> list[tuple[str, str]]:
    """(SOP Instance UID, status or "no response") of the instances not acknowledged."""
    failed = acks.with_suffix(".failed")
    if not failed.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in failed.read_text().splitlines() if line]  # type: ignore[misc]


def _append_durably(stream: IO[str], line: str) -> None:
    stream.write(line + "\n")
    stream.flush()
    os.fsync(stream.fileno())


def _send(args: argparse.Namespace) -> int:
    from pynetdicom import AE, evt

    def nodelay(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    files = [Path(line) for line in Path(args.files_from).read_text().splitlines() if line]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    ae = AE(ae_title=args.calling_ae)
    for sop_class, syntax in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}):
        ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    acks, failures = Path(args.acks), Path(args.acks).with_suffix(".failed")
    sent = 0
    with acks.open("a") as acked, failures.open("a") as failed:
        assoc = ae.associate(args.host, args.port, ae_title=args.called_ae,
                             evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
        if not assoc.is_established:
            print(f"no association with {args.called_ae} at {args.host}:{args.port}", file=sys.stderr)
            return 2
        try:
            for index, (path, header) in enumerate(zip(files, headers)):
                if index and args.interval:
                    time.sleep(args.interval)
                uid = str(header.SOPInstanceUID)
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                if code == 0x0000:
                    _append_durably(acked, uid)
                    sent += 1
                    continue
                _append_durably(failed, f"{uid} {'no response' if code is None else f'0x{code:04X}'}")
                if code is None or args.stop_on_failure or not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    print(f"{sent} of {len(files)} acknowledged")
    return 0 if sent == len(files) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--called-ae", required=True)
    parser.add_argument("--calling-ae", default="ACKSENDER")
    parser.add_argument("--acks", required=True, help="file the acknowledged SOP Instance UIDs are appended to")
    parser.add_argument("--files-from", required=True, help="file listing the DICOM files to send, one a line")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds to wait between two instances")
    return _send(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
