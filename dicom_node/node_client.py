"""A GPU worker's HTTP client of the node's web app: its DICOMweb reads and its outbox uploads.

Why the standard library (``http.client`` + ``ssl``): a worker needs a handful of
requests per job, streamed both ways (a series of several hundred MB is read part by
part, a 50 MB SEG is sent from memory), and the node's base install has no HTTP client
dependency (as :mod:`dicom_node.stow`). One connection per request keeps it safe to
share between a worker's job threads; redirects are not followed (a token must not be
sent to another host).

Errors: :class:`NodeHttpError` carries the status and the node's ``detail``;
``retryable`` is true for network failures, 5xx, 408 and 429 (the job is retried),
false for the rest (a wrong token, a path the node refuses, a node certificate the
worker does not trust).
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = ["NodeClient", "NodeHttpError", "node_ssl_context", "quote_path"]

logger = logging.getLogger(__name__)

USER_AGENT = "dicom-node-worker/0.1"
_RETRYABLE = frozenset({408, 429})
_EXCERPT = 300


class NodeHttpError(RuntimeError):
    """A request to the node failed: its method, URL, status (None: no answer) and the node's reason."""

    def __init__(self, message: str, *, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def node_ssl_context(verify: bool, ca_certificates: Path | None) -> ssl.SSLContext:
    """TLS for an ``https`` node: the system's CAs or ``ca_certificates``; ``verify`` False trusts any certificate
    (a test installation only: the token then goes to whoever answers)."""
    context = ssl.create_default_context(cafile=str(ca_certificates) if ca_certificates else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class NodeClient:
    """Requests to the node at ``base_url`` (``http(s)://host:port``) with ``Authorization: Bearer <token>``."""

    base_url: str
    token: str
    timeout_seconds: float = 120.0
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"node URL {self.base_url!r} is not http(s)://host[:port]")
        if not self.token:
            raise ValueError(f"no API token for the node at {self.base_url}")

    def url(self, path: str, query: dict[str, Any] | None = None) -> str:
        """The full URL of ``path`` (already quoted) with ``query``."""
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{self.base_url.rstrip('/')}{path}{suffix}"

    def _connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.base_url)
        assert parts.hostname is not None
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=self.timeout_seconds,
                                               context=self.ssl_context or node_ssl_context(True, None))
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout_seconds)

    @contextmanager
    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: bytes | None = None,
                headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)) -> Iterator[http.client.HTTPResponse]:
        """Send one request and yield the response, whose status is in ``ok`` (else :class:`NodeHttpError`)."""
        prefix = urlsplit(self.base_url).path.rstrip("/")
        target = f"{prefix}{path}" + (f"?{urlencode(query)}" if query else "")
        sent = {"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT, **(headers or {})}
        what = f"{method} {self.url(path, query)}"
        connection = self._connection()
        try:
            try:
                connection.request(method, target, body=body, headers=sent)
                response = connection.getresponse()
            except ssl.SSLCertVerificationError as exc:  # retrying cannot help: the worker's settings must change
                raise NodeHttpError(f"{what}: the node's TLS certificate is not trusted ({exc.verify_message}); "
                                    "worker.ca_certificates must name the CA that signed it", status=None,
                                    retryable=False) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise NodeHttpError(f"{what}: the node did not answer: {type(exc).__name__}: {exc}", status=None,
                                    retryable=True) from exc
            if response.status not in ok:
                raise NodeHttpError(f"{what}: HTTP {response.status}: {_reason(response)}", status=response.status,
                                    retryable=response.status >= 500 or response.status in _RETRYABLE)
            yield response
        finally:
            connection.close()

    def get_json(self, path: str, query: dict[str, Any] | None = None) -> Any:
        """GET ``path`` and decode its JSON answer."""
        with self.request("GET", path, query=query, headers={"Accept": "application/dicom+json, application/json"}) \
                as response:
            return json.loads(response.read() or b"null")

    def put(self, path: str, data: bytes) -> None:
        """PUT ``data`` at ``path`` (the node answers 204 or 201)."""
        with self.request("PUT", path, body=data, ok=(200, 201, 204), headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(len(data))}) as response:
            response.read()

    def delete(self, path: str) -> None:
        """DELETE ``path``; one that is already gone (404) is fine."""
        with self.request("DELETE", path, ok=(200, 204, 404)) as response:
            response.read()


def quote_path(*segments: str) -> str:
    """``/a/b/c`` from path segments, each percent-quoted (a UID or file name never escapes its segment)."""
    return "".join("/" + quote(segment, safe="") for segment in segments)


def _reason(response: http.client.HTTPResponse) -> str:
    """The node's ``detail`` from an error answer, else the start of its body."""
    body = response.read(64 * 1024)
    try:
        detail = json.loads(body).get("detail")
        if isinstance(detail, str):
            return detail
    except (ValueError, AttributeError):
        pass
    return body[:_EXCERPT].decode("utf-8", "replace") or response.reason
