"""The real OHIF v3 viewer and a real Orthanc's DICOMweb, served from one origin for the browser tests.

Why one origin: OHIF reads studies over DICOMweb with ``fetch``; a viewer and a
DICOMweb server on two origins need CORS headers Orthanc does not send. Here a
small threaded HTTP server (:class:`OhifServer`) serves OHIF's built viewer
(``dist`` of the npm package ``@ohif/app``, installed by ``tests/install-peers.sh``
into :data:`OHIF_DIST`) at ``/``, its own ``app-config.js`` (the one data source
is the DICOMweb root of this origin, no authentication), and passes every request
under ``/dicom-web/`` on to Orthanc's DICOMweb plugin, with the ``Host`` header of
this origin so that the bulk data URIs Orthanc writes into the metadata point back
here. Any other path that is not a file is the single-page app's ``index.html``
(OHIF routes ``/viewer?StudyInstanceUIDs=...`` itself).

The viewer's pages are sent cross-origin isolated (COOP ``same-origin``, COEP
``require-corp``), as OHIF's own server setups do, so that its volume loading may
use ``SharedArrayBuffer``.
"""

from __future__ import annotations

import http.server
import json
import logging
import mimetypes
import os
import threading
from pathlib import Path
from typing import Any

import requests

__all__ = ["OHIF_DIST", "OHIF_VERSION", "OhifServer", "app_config"]

logger = logging.getLogger(__name__)

#: The pinned viewer version; ``tests/install-peers.sh`` unpacks its ``dist`` into :data:`OHIF_DIST`.
OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(os.environ.get("OHIF_DIST", f"/opt/ohif-{OHIF_VERSION}/dist"))

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                         "transfer-encoding", "upgrade", "content-length", "content-encoding"})
_ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
              "Cross-Origin-Resource-Policy": "same-origin"}


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source at ``dicomweb_root`` (this origin), no auth, no study list
    look-ups it does not need, no service worker."""
    source: dict[str, Any] = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class OhifServer:
    """OHIF's ``dist`` + ``/dicom-web`` of ``orthanc_url`` on ``http://127.0.0.1:<port>``; see the module docstring.

    ``start()`` serves on a thread, ``stop()`` ends it. Raises FileNotFoundError when ``dist`` holds no viewer.
    """

    def __init__(self, orthanc_url: str, *, dist: Path = OHIF_DIST, port: int = 0) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF viewer at {dist} (index.html missing): run tests/install-peers.sh")
        self.dist = dist.resolve()
        self.orthanc_url = orthanc_url.rstrip("/")
        self.http = requests.Session()
        self.requests_seen: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                logger.debug("ohif server: " + format, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._answer(self)

            def do_HEAD(self) -> None:  # noqa: N802
                server._answer(self)

            def do_POST(self) -> None:  # noqa: N802
                server._answer(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def viewer_url(self, study_instance_uid: str) -> str:
        """The URL a radiologist opens to see one study in OHIF's basic viewer mode."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"

    def start(self) -> "OhifServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.http.close()

    # --- one request -------------------------------------------------------------------------------------------

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests_seen.append(f"{handler.command} {handler.path}")
        try:
            if path.startswith("/dicom-web/"):
                self._forward(handler)
            elif path == "/app-config.js":
                self._send(handler, 200, app_config(f"{self.url}/dicom-web").encode(), "application/javascript")
            else:
                self._file(handler, path)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("ohif server: the browser closed the connection for %s", handler.path)

    def _file(self, handler: http.server.BaseHTTPRequestHandler, path: str) -> None:
        target = (self.dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.dist) or not target.is_file():
            target = self.dist / "index.html"  # the single-page app's own routes (/viewer, /)
        kind = "application/wasm" if target.suffix == ".wasm" else mimetypes.guess_type(target.name)[0]
        self._send(handler, 200, target.read_bytes(), kind or "application/octet-stream")

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {key: value for key, value in handler.headers.items()
                   if key.lower() not in _HOP_BY_HOP and key.lower() != "host"}
        headers["Host"] = handler.headers.get("Host", self.url.removeprefix("http://"))
        answer = self.http.request(handler.command, f"{self.orthanc_url}{handler.path}", data=body,
                                   headers=headers, timeout=60)
        kept = {key: value for key, value in answer.headers.items() if key.lower() not in _HOP_BY_HOP}
        self._send(handler, answer.status_code, answer.content, None, kept)

    def _send(self, handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, kind: str | None,
              headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for key, value in {**(headers or {}), **_ISOLATION}.items():
            handler.send_header(key, value)
        if kind is not None:
            handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
