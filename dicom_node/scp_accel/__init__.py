"""Opt-in acceleration of pynetdicom's C-STORE SCP (``dicom.accelerate: true``); see docs/receive-acceleration.md.

Stock pynetdicom spends the time of a C-STORE in per-message and per-PDU Python overhead,
not in moving bytes: C-STORE-RSP built and encoded twice through pydicom, command sets
decoded through pydicom, PDUs read in 4 KiB ``recv`` calls, both reactors sleeping 1 ms
per loop (about 2 ms on every request/response round trip), every supported presentation
context deep-copied with UID re-validation for every association. This package replaces,
per accepted association and only there, the classes of pynetdicom's three objects with
subclasses (:mod:`.dul`, :mod:`.dimse`, :mod:`.association`); pynetdicom still negotiates,
runs its state machine, dispatches services, handles release, abort and timeouts, and
calls the node's ``EVT_C_STORE`` handler. The data set of a C-STORE streams to a sink
(the node's staging file) as it arrives.

It relies on pynetdicom's private internals and is pinned to the versions in
:data:`SUPPORTED_PYNETDICOM_VERSIONS`: on any other version :func:`is_supported` is False,
:func:`accelerate` does nothing and the caller uses the public-API path
(:class:`dicom_node.scp.StorageSCP` logs a warning and falls back).

Fast paths are only used when no handler is bound to the low-level events they skip
(``EVT_DATA_RECV``, ``EVT_PDU_RECV``, ``EVT_DIMSE_RECV``, ``EVT_DIMSE_SENT``,
``EVT_FSM_TRANSITION``). pynetdicom's standard logging handlers for the PDU/DIMSE events
are unbound when the ``pynetdicom`` logger is not enabled for INFO at connection time.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.utils import make_target

from dicom_node.scp_accel.association import _FastAssociation
from dicom_node.scp_accel.commands import encode_c_store_rsp
from dicom_node.scp_accel.contexts import FastCopyPresentationContext, cheap_copy_contexts
from dicom_node.scp_accel.dimse import DatasetSink, OpenDataset, _FastDIMSE
from dicom_node.scp_accel.dul import _FastDUL

__all__ = [
    "SUPPORTED_PYNETDICOM_VERSIONS",
    "DatasetSink",
    "FastCopyPresentationContext",
    "OpenDataset",
    "accelerate",
    "cheap_copy_contexts",
    "encode_c_store_rsp",
    "install",
    "is_supported",
    "on_conn_open",
    "unsupported_reason",
]

LOGGER = logging.getLogger(__name__)

#: pynetdicom versions whose internals this package has been written against.
SUPPORTED_PYNETDICOM_VERSIONS: tuple[str, ...] = ("3.0.4",)


def is_supported() -> bool:
    """Whether the installed pynetdicom is one this package was written against."""
    return pynetdicom.__version__ in SUPPORTED_PYNETDICOM_VERSIONS


def unsupported_reason() -> str | None:
    """Why the acceleration cannot be used with the installed pynetdicom, or None when it can."""
    if is_supported():
        return None
    return (f"pynetdicom {pynetdicom.__version__} is installed; the receive acceleration supports only "
            f"{', '.join(SUPPORTED_PYNETDICOM_VERSIONS)}")


_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def accelerate(
    assoc: Association, *, drop_standard_log_handlers: bool | None = None,
    open_dataset: OpenDataset | None = None,
) -> bool:
    """Install the fast paths on a freshly accepted association.

    Call this from an ``EVT_CONN_OPEN`` handler (``event.assoc``): pynetdicom
    triggers that event in ``RequestHandler.handle`` after creating the
    :class:`~pynetdicom.association.Association` and before starting its
    thread, which is the only moment at which the reactors can be replaced
    safely.  Does nothing if the installed pynetdicom version is not
    supported (the caller checks :func:`unsupported_reason` first and says
    so), nor for requestor associations, already started or already
    accelerated ones.

    Parameters
    ----------
    assoc:
        The acceptor association (not yet started).
    drop_standard_log_handlers:
        Unbind pynetdicom's standard PDU/DIMSE logging handlers from this
        association.  ``None`` (default) drops them only if the
        ``pynetdicom`` logger is not enabled for INFO, in which case they
        would produce no output anyway but still format every message (and
        copy every received data set).
    open_dataset:
        Called when a C-STORE-RQ command set has arrived, with ``(association,
        context ID, affected SOP class UID, affected SOP instance UID)`` as sent
        (possibly empty or invalid); returns the :class:`DatasetSink` that the data
        set fragments are written to as they arrive. The ``EVT_C_STORE`` handler
        then finds it as ``event.dataset_sink`` (and ``event.request.DataSet`` is
        empty); it answers every such request, even one with missing or invalid
        UIDs. Without it, data sets are reassembled in memory as pynetdicom does.

    Returns whether the association was accelerated.
    """
    if not is_supported():
        return False
    if not assoc.is_acceptor or assoc.is_alive() or assoc.dul.is_alive():
        return False
    if isinstance(assoc, _FastAssociation):
        return False
    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider:
        # Somebody else already customised these objects; do not stack on top.
        return False
    if type(assoc.dimse) is not DIMSEServiceProvider:
        return False

    if drop_standard_log_handlers is None:
        drop_standard_log_handlers = not logging.getLogger("pynetdicom").isEnabledFor(
            logging.INFO
        )
    if drop_standard_log_handlers:
        for event, handler in _STANDARD_LOG_HANDLERS:
            if any(h[0] is handler for h in assoc.get_handlers(event)):
                assoc.unbind(event, handler)

    wake = threading.Event()
    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)

    dul = assoc.dul
    dul.__class__ = _FastDUL
    dul = cast(_FastDUL, dul)
    dul._fp_rsock = rsock
    dul._fp_wsock = wsock
    dul._fp_lock = threading.Lock()
    dul._fp_closed = False
    dul._fp_wake_assoc = wake
    # threading.Thread stored the bound *original* run_reactor at __init__
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]

    assoc.dimse.__class__ = _FastDIMSE
    dimse = cast(_FastDIMSE, assoc.dimse)
    dimse._fp_wake = wake
    dimse._fp_open_dataset = open_dataset
    dimse._fp_command = bytearray()
    dimse._fp_other_bytes = 0
    assoc.__class__ = _FastAssociation
    cast(_FastAssociation, assoc)._fp_wake = wake
    # Association.__init__ also bound run_reactor; it calls self._run_reactor
    # which now resolves to the fast one, so the thread target is unchanged.
    return True


def on_conn_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler that calls :func:`accelerate` on acceptors."""
    assoc = event.assoc
    if assoc.is_acceptor:
        accelerate(assoc)


def install(server: Any) -> None:
    """Accelerate an already started ``AssociationServer`` (``block=False``).

    Replaces ``server.contexts`` with :func:`cheap_copy_contexts` copies and
    binds :func:`on_conn_open` to ``EVT_CONN_OPEN`` so that every association
    accepted from now on is accelerated.  Connections accepted before this
    call are left alone.
    """
    server.contexts = cheap_copy_contexts(server.contexts)
    if is_supported():
        server.bind(evt.EVT_CONN_OPEN, on_conn_open)
