"""What the node stores, however an instance arrives (C-STORE or STOW-RS): storage SOP classes, transfer syntaxes.

Why one module: the DICOM listener offers exactly these in its presentation contexts,
and the STOW-RS intake refuses a part outside them with the status the listener's
negotiation implies (SOP class or transfer syntax not supported), so both ways in
accept the same instances.
"""

from __future__ import annotations

from pynetdicom.presentation import AllStoragePresentationContexts

__all__ = ["STORAGE_SOP_CLASSES", "SUPPORTED_TRANSFER_SYNTAXES", "is_storage_sop_class"]

# Accepted as sent and stored unchanged (PS3.5 Section 10 and Annex A), in order of
# preference when a sender offers several for one SOP class: lossless compression first
# (the sender keeps its encoding and the link carries less), then uncompressed, and lossy
# compression last, so the node never asks a sender to compress lossily images it holds
# uncompressed, which would degrade what the models see.
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
)

#: Every storage SOP class pynetdicom knows, in its order (the listener offers each with every syntax above).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
_STORAGE = frozenset(STORAGE_SOP_CLASSES)


def is_storage_sop_class(uid: str) -> bool:
    """Whether the node stores instances of SOP class ``uid`` (one of :data:`STORAGE_SOP_CLASSES`)."""
    return uid in _STORAGE
