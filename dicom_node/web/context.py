"""What every web route needs, built once by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.stow_intake import StowIntake
from dicom_node.web.client_address import TrustedProxies
from dicom_node.web.passwords import verify_password

__all__ = ["PasswordVerifier", "ReadinessCheck", "WebContext", "get_context", "load_or_create_secret"]

logger = logging.getLogger(__name__)

#: A named check /readyz runs: returns (ok, detail).
ReadinessCheck = tuple[str, Callable[[], tuple[bool, str]]]
#: Checks a password against a stored hash (None: no such user, still spend the time): True if it matches.
PasswordVerifier = Callable[[str | None, str], bool]


@dataclass
class WebContext:
    """Settings, database and clock of the web app, plus the probes the node lends it.

    ``verify_password`` is the one function login uses to check a password (argon2 by
    default); ``proxies`` the reverse proxies whose ``X-Forwarded-For`` is believed;
    ``stow`` receives STOW-RS requests into the node's ingest service.
    """

    settings: Settings
    sessions: sessionmaker[Session]
    clock: Callable[[], datetime]
    secret_key: bytes
    readiness: Sequence[ReadinessCheck] = field(default_factory=tuple)
    verify_password: PasswordVerifier = verify_password
    proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    stow: StowIntake | None = None  # STOW-RS into the node's ingest (None: the monitoring app takes none)


def get_context(request: Request) -> WebContext:
    """FastAPI dependency: the app's :class:`WebContext`."""
    return request.app.state.context  # type: ignore[no-any-return]


def load_or_create_secret(settings: Settings) -> bytes:
    """The cookie-signing key from ``web.secret_key_file`` (or data_dir/web-secret.key), created if missing.

    A key made here is written with mode 0600, so restarts keep users logged in.
    """
    path = settings.web.secret_key_file or (settings.data_dir / "web-secret.key")
    path = Path(path)
    if path.is_file():
        key = path.read_bytes().strip()
        if len(key) < 32:
            raise ValueError(f"web secret key file {path} holds {len(key)} bytes; it needs at least 32")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    logger.info("created the web secret key %s", path)
    return key
