"""Runs the web apps (admin app, and the monitoring app on its own port if configured) in threads.

With ``web.tls`` the admin app serves HTTPS itself (uvicorn's TLS, TLS 1.2 or later), so that
GPU workers and STOW-RS clients on other machines reach it encrypted without a proxy. Its
files are checked before the server starts, naming the setting, the path and what is wrong
(an encrypted key is refused: OpenSSL would otherwise ask for its password on the terminal).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

from dicom_node.settings import WebTLSSettings
from dicom_node.tls_files import client_certificate_problems

__all__ = ["WebServer", "check_tls_files"]

logger = logging.getLogger(__name__)

#: Forward-secret AEAD suites for TLS 1.2 (TLS 1.3's are OpenSSL's own); older uvicorn releases default to "TLSv1".
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"


def check_tls_files(tls: WebTLSSettings) -> None:
    """Raise :class:`RuntimeError` naming every ``web.tls`` file that cannot be used."""
    assert tls.certificate is not None and tls.private_key is not None
    problems = [message for _, message in client_certificate_problems(tls.certificate, tls.private_key,
                                                                      prefix="web.tls.")]
    if problems:
        raise RuntimeError("; ".join(problems))


class WebServer:
    """One uvicorn server in a daemon thread; ``start`` returns once it accepts connections."""

    def __init__(self, app: FastAPI, host: str, port: int, name: str = "web", tls: WebTLSSettings | None = None) -> None:
        https = tls is not None and tls.enabled
        if https:
            assert tls is not None
            check_tls_files(tls)
        # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from 127.0.0.1 (or anyone in
        # FORWARDED_ALLOW_IPS); the app decides itself, from web.trusted_proxies (web.client_address).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, server_header=False, proxy_headers=False,
                                ssl_certfile=str(tls.certificate) if https and tls else None,
                                ssl_keyfile=str(tls.private_key) if https and tls else None,
                                ssl_version=ssl.PROTOCOL_TLS_SERVER, ssl_ciphers=_CIPHERS)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self._where = f"{'https' if https else 'http'}://{host}:{port}"
        self.name = name

    @property
    def url(self) -> str:
        """Where it listens, ``http(s)://host:port``."""
        return self._where

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the {self.name} server could not start on {self._where} (port in use?)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} server did not start on {self._where} within {timeout:g} s")
            time.sleep(0.02)
        logger.info("%s server listening on %s", self.name, self._where)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
