"""Which detections are shown as findings and which only reported as low-confidence (a model's display threshold).

Why: a 35 % false positive outlined like a certain finding misleads the reader. Each
model may set ``display_threshold`` in the registry (0..1): detections scoring under it
are still reported in the SR, marked low-confidence, but the GSPS and the overlay
series do not outline them - unless a destination asks for them (``outline_low_confidence``),
and then they are drawn apart (grey, "low confidence"). One rule, here, for the SR,
GSPS, overlay series and preview.

In the SR a detection of a model with a threshold carries the CAD SR's coded Rendering
Intent (DCM 111056, CID 6034 "Intended Use of CAD Output"): "Presentation Optional" (DCM
111151) under the threshold - it is the destination's choice whether it is drawn -,
"Presentation Required" (DCM 111150) at or above it; a model without a threshold says nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.sr.codedict import codes

from dicom_node.contracts import Detection

__all__ = ["LOW_CONFIDENCE_TEXT", "PRESENTATION_OPTIONAL", "is_low_confidence", "outlined", "rendering_intent",
           "split_by_confidence"]

#: How a low-confidence detection is named where it is drawn or listed.
LOW_CONFIDENCE_TEXT = "low confidence"
#: The Rendering Intent of a low-confidence detection (CID 6034).
PRESENTATION_OPTIONAL = codes.DCM.PresentationOptionalRenderingDeviceMayPresent


def is_low_confidence(detection: Detection, threshold: float | None) -> bool:
    """Whether ``detection`` scores under the model's display ``threshold`` (None: no threshold, never)."""
    return threshold is not None and detection.score < threshold


def split_by_confidence(detections: Sequence[Detection],
                        threshold: float | None) -> tuple[tuple[Detection, ...], tuple[Detection, ...]]:
    """(at or above the threshold, under it), each in the given order."""
    low = tuple(d for d in detections if is_low_confidence(d, threshold))
    return tuple(d for d in detections if not is_low_confidence(d, threshold)), low


def outlined(detections: Sequence[Detection], threshold: float | None, outline_low: bool) -> tuple[Detection, ...]:
    """The detections a GSPS or overlay outlines: all with ``outline_low``, else those at or above ``threshold``."""
    return tuple(detections) if outline_low else split_by_confidence(detections, threshold)[0]


def rendering_intent(detection: Detection, threshold: float | None) -> hd.sr.QualitativeEvaluation | None:
    """The SR's coded Rendering Intent of ``detection`` (module docstring); None when the model has no threshold."""
    if threshold is None:
        return None
    value = (PRESENTATION_OPTIONAL if is_low_confidence(detection, threshold)
             else codes.DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent)
    return hd.sr.QualitativeEvaluation(name=codes.DCM.RenderingIntent, value=value)
