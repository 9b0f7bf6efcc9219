"""Send datasets to an in-process node with pynetdicom, as a PACS would (one association)."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.app.node import Node


def store_all(node: Node, datasets: Iterable[Dataset], calling_ae: str = "PACS") -> None:
    """C-STORE every dataset (CT, Explicit VR Little Endian) on one association; each must succeed."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.dicom.ae_title)
    assert assoc.is_established, f"the node on port {node.scp.port} refused the association"
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            assert status.Status == 0x0000, f"C-STORE of {dataset.SOPInstanceUID} answered 0x{status.Status:04X}"
    finally:
        assoc.release()
