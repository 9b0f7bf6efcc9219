"""The accelerated acceptor reactor and C-STORE service.

The reactor waits on a ``threading.Event`` set by the DUL after every state-machine
action instead of sleeping 1 ms per loop; the rest of the loop (release, abort, DUL
liveness, network timeout, pause checkpoint) is pynetdicom 3.0.4's. The C-STORE service
is a copy of ``StorageServiceClass.SCP`` that copies the already validated UIDs into the
response instead of re-validating them, and answers every request whose data set
streamed to a sink, even one with missing or invalid UIDs.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, cast

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass, attempt
from pynetdicom.sop_class import uid_to_service_class

from dicom_node.scp_accel.dul import MAX_IDLE_WAIT

LOGGER = logging.getLogger(__name__)


class _FastAssociation(Association):
    """Acceptor whose reactor waits on a wake-up event instead of sleeping 1 ms."""

    _fp_wake: threading.Event

    def _run_reactor(self) -> None:
        """Same checks as pynetdicom's acceptor loop, event-driven."""
        self._is_paused = False
        wake = self._fp_wake
        dimse = self.dimse
        while not self._kill:
            wake.wait(MAX_IDLE_WAIT)
            wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                # There may be more queued messages: loop without waiting
                wake.set()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return

    def kill(self) -> None:  # noqa: D102
        super().kill()
        self._fp_wake.set()

    def _serve_request(self, msg: Any, context_id: int) -> None:  # noqa: D102
        # Fast path only for plain C-STORE requests served by the stock
        # StorageServiceClass; everything else goes through pynetdicom.
        # A request whose data set streamed to a sink is always answered by the
        # EVT_C_STORE handler, even with missing or invalid UIDs (pynetdicom would
        # ignore such a request and leave the peer waiting for its response).
        streamed = getattr(msg, "_fp_sink", None) is not None
        if (
            type(msg) is C_STORE
            and not self._sent_release
            and not _config.UNRESTRICTED_STORAGE_SERVICE
            and (msg.is_valid_request or (streamed and msg.MessageID is not None))
            and context_id in self._accepted_cx
        ):
            class_uid = cast(str, msg.AffectedSOPClassUID or "")
            try:
                class_uid = self.acceptor.accepted_common_extended[class_uid][0]
            except KeyError:
                pass
            if streamed or uid_to_service_class(class_uid) is StorageServiceClass:
                context = self._accepted_cx[context_id]
                service = StorageServiceClass(self)
                try:
                    self.dimse.cancel_req = {}
                    self._is_paused = True
                    _fast_store_scp(service, msg, context)
                    self._is_paused = False
                    self.dimse.cancel_req = {}
                except Exception as exc:  # same handling as pynetdicom
                    LOGGER.exception(exc)
                    self.abort()
                return
        super()._serve_request(msg, context_id)


def _fast_store_scp(
    service: StorageServiceClass, req: C_STORE, context: PresentationContext
) -> None:
    """``StorageServiceClass.SCP`` without re-validating UIDs for the response.

    Identical control flow to pynetdicom 3.0.4: the ``EVT_C_STORE`` handler is
    triggered inside pynetdicom's ``attempt`` context manager (so a raising
    handler produces status 0xC211), the returned status is validated with
    ``validate_status`` (int, Dataset with optional Error Comment/Offending
    Element, invalid return values -> 0xC001/0xC002) and the response is sent
    unless the handler released or aborted the association.
    """
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    # Already validated by the request primitive's setters
    rsp._affected_sop_instance_uid = req._affected_sop_instance_uid
    rsp._affected_sop_class_uid = req._affected_sop_class_uid

    cx_id = cast(int, context.context_id)
    with attempt(rsp, service.dimse, cx_id, service.assoc) as ctx:
        ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_STORE'"
        ctx.error_status = 0xC211
        attributes: dict[str, Any] = {"request": req, "context": context.as_tuple}
        sink = getattr(req, "_fp_sink", None)
        if sink is not None:
            attributes["dataset_sink"] = sink
        rsp_status = evt.trigger(ctx.assoc, evt.EVT_C_STORE, attributes)
        if req._dataset_file:
            req._dataset_file.close()
            try:
                os.unlink(req._dataset_file.name)
            except OSError as exc:
                LOGGER.debug("cannot remove pynetdicom's temporary file %s: %s", req._dataset_file.name, exc)

    if not ctx.success or not service.assoc.is_established:
        return

    rsp = service.validate_status(rsp_status, rsp)
    service.dimse.send_msg(rsp, cx_id)


