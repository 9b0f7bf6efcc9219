"""The hospital systems a node notifies, as real servers for tests: an HL7 v2 MLLP listener and a FHIR endpoint.

* :class:`MllpListener` is hl7apy's own ``MLLPServer`` (a threading TCP server that unframes MLLP and
  routes by MSH-9) with a handler that keeps every message it receives and answers an ACK built with
  hl7apy: the scripted MSA-1 codes first (``AE`` to make the node retry, ...), then ``AA``.
* :class:`FhirServer` is an ``http.server`` that keeps every request and answers the scripted HTTP
  statuses first (503, ...), then a ``transaction-response`` Bundle (200) built with fhir.resources;
  ``GET /metadata`` answers a CapabilityStatement.

Neither judges what it receives: the tests parse and validate it with the libraries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

__all__ = ["FhirServer", "MllpListener"]

LOCALHOST = "127.0.0.1"


class MllpListener:
    """A real MLLP server on a free port; ``messages`` holds the ER7 text of every message received."""

    def __init__(self, answers: Iterable[str] = (), *, text: str = "scripted error") -> None:
        self.messages: list[str] = []
        self.answers = list(answers)
        self.text = text
        self._lock = threading.Lock()
        listener = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                return listener._acknowledge(self.incoming_message)

        self.server = MLLPServer(LOCALHOST, 0, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="mllp-listener", daemon=True)

    def _acknowledge(self, incoming: str) -> str:
        with self._lock:
            self.messages.append(incoming)
            code = self.answers.pop(0) if self.answers else "AA"
        received = parse_message(incoming, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        ack = Message("ACK", version="2.5", validation_level=VALIDATION_LEVEL.STRICT)
        ack.msh.msh_3 = "TEST_RIS"
        ack.msh.msh_5 = received.msh.msh_3.value
        ack.msh.msh_7 = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = f"ACK{len(self.messages)}"
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = received.msh.msh_10.value
        if code != "AA":
            ack.msa.msa_3 = self.text
        return "\x0b" + str(ack.to_er7()) + "\x1c\r"

    def __enter__(self) -> MllpListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FhirServer:
    """A real HTTP server taking FHIR transactions on a free port; ``requests`` holds (method, path, headers, body)."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append(("GET", self.path, dict(self.headers), b""))
                self._answer(200, {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                                   "date": "2026-01-01", "fhirVersion": "4.0.1", "format": ["json"]})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.requests.append(("POST", self.path, dict(self.headers), body))
                status = server.statuses.pop(0) if server.statuses else 200
                if status != 200:
                    self._answer(status, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "transient", "diagnostics": f"scripted HTTP {status}"}]})
                    return
                entries = json.loads(body).get("entry", [])
                response = Bundle.model_validate({"resourceType": "Bundle", "type": "transaction-response", "entry": [
                    {"response": {"status": "201 Created",
                                  "location": f"{e['resource']['resourceType']}/{n}/_history/1"}}
                    for n, e in enumerate(entries, start=1)]})
                self._answer(200, json.loads(response.model_dump_json()))

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.url = f"http://{LOCALHOST}:{self.server.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fhir-server", daemon=True)

    def posted(self) -> list[bytes]:
        return [body for method, _, _, body in self.requests if method == "POST"]

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
