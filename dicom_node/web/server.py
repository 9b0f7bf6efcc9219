"""Runs the web apps (admin app, and the monitoring app on its own port if configured) in threads."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

__all__ = ["WebServer"]

logger = logging.getLogger(__name__)


class WebServer:
    """One uvicorn server in a daemon thread; ``start`` returns once it accepts connections."""

    def __init__(self, app: FastAPI, host: str, port: int, name: str = "web") -> None:
        # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from 127.0.0.1 (or anyone in
        # FORWARDED_ALLOW_IPS); the app decides itself, from web.trusted_proxies (web.client_address).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, server_header=False, proxy_headers=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self._where = f"http://{host}:{port}"
        self.name = name

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
