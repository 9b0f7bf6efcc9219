"""Where a worker writes a job's result files: the ``Outbox`` seam, and its HTTP implementation.

Why: a worker on a machine that shares no filesystem with the node uploads each result
object and preview file to the node (``PUT /api/v1/outbox/<path>``, see
:mod:`dicom_node.web.routes.outbox_upload` for why not STOW-RS), which writes it into its
outbox under the same relative path, so the job's result rows and the node's deliveries
read them as if the worker had written them there. :class:`dicom_node.spool.Spool` is
the shared-filesystem implementation (the default). Writes are idempotent: a retried
job uploads the same paths again and replaces what is there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from dicom_node.node_client import NodeClient, NodeHttpError, quote_path

__all__ = ["OUTBOX_BASE", "HttpOutbox", "Outbox"]

logger = logging.getLogger(__name__)

#: Where the node takes uploads (dicom_node.web.routes.outbox_upload; the web layer is not imported here).
OUTBOX_BASE = "/api/v1/outbox"
#: Tries of one upload that meets a network failure or a 5xx before the job fails (and is retried as a whole).
UPLOAD_TRIES = 3


class Outbox(Protocol):
    """The node's outbox as a worker writes to it: files by path relative to the outbox (``job-<id>/<name>``)."""

    def write(self, relative: str, chunks: list[bytes] | tuple[bytes, ...]) -> object:
        """Store ``chunks`` durably under ``relative``, replacing any file already there."""
        ...

    def remove(self, relative: str) -> None:
        """Remove the file at ``relative`` (nothing happens when there is none)."""
        ...


class HttpOutbox:
    """The node's outbox reached over HTTP with a worker account's API token."""

    def __init__(self, client: NodeClient) -> None:
        self._client = client

    def write(self, relative: str, chunks: Sequence[bytes]) -> None:
        data = b"".join(chunks)
        for attempt in range(1, UPLOAD_TRIES + 1):
            try:
                self._client.put(OUTBOX_BASE + quote_path(*relative.split("/")), data)
                break
            except NodeHttpError as exc:
                if not exc.retryable or attempt == UPLOAD_TRIES:
                    raise
                logger.warning("upload of %s failed (try %d of %d), trying again: %s", relative, attempt,
                               UPLOAD_TRIES, exc)
                time.sleep(attempt)
        logger.debug("uploaded %s (%d bytes) to the node's outbox", relative, len(data))

    def remove(self, relative: str) -> None:
        self._client.delete(OUTBOX_BASE + quote_path(*relative.split("/")))
