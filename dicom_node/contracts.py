"""Plain data types shared by the node and the workers (no I/O, no heavy imports).

Why: the router, the job pipeline, the model loaders and the DICOM result
builders live in different packages and processes; they agree on these types
instead of on each other's internals. Everything here is a frozen pydantic model
that validates on construction and serialises to JSON (for the DB and the UI).

Coordinates: world positions are DICOM patient coordinates (LPS, millimetres).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "UID_PATTERN",
    "AlgorithmInfo",
    "require_unique_names",
    "CodedConcept",
    "Detection",
    "OutputKind",
    "ReportedFinding",
    "ReportedMeasurement",
    "SegmentLabel",
]

#: The DICOM result objects a pipeline can produce and a destination can receive: PMAP (Parametric Map)
#: and SC (colour Secondary Capture overlays) carry a classifier's explanation map; KO (Key Object Selection)
#: flags the source images with findings.
OutputKind = Literal["SEG", "SR", "GSPS", "PMAP", "SC", "KO"]

#: A DICOM UID: dot-separated numbers without leading zeros (64 characters at most, checked per field).
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodedConcept(_Frozen):
    """A coded concept as DICOM writes it: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class SegmentLabel(_Frozen):
    """One label value of a model's label map and how it is coded in a DICOM SEG segment."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    property_category: CodedConcept
    property_type: CodedConcept
    color_rgb: tuple[int, int, int] = (255, 0, 0)

    @field_validator("color_rgb")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"color_rgb must be three 0..255 values, got {value}")
        return value


class AlgorithmInfo(_Frozen):
    """The model that produced a result, as named in SEG/SR/GSPS (algorithm name and version).

    ``device_uid`` and ``manufacturer`` identify the model as equipment (the Contributing Equipment
    Sequence of every result object); the worker takes them from the model registry
    (:meth:`dicom_node.model_catalog.ModelCatalog.identify`). None: not known (the item then carries
    no Device UID, and the node's manufacturer).
    """

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    model_id: str = Field(min_length=1, description="Registry id of the model (config/models.yaml).")
    device_uid: str | None = Field(default=None, max_length=64, pattern=UID_PATTERN,
                                   description="Device UID of this model version (from the model registry).")
    manufacturer: str | None = Field(default=None, min_length=1, max_length=64,
                                     description="Who made the model (registry entry); None: the node's.")


class Detection(_Frozen):
    """One detected finding: an axis-aligned box in patient coordinates with a confidence.

    ``centre_mm`` is the box centre (LPS); ``size_mm`` the box extent along the
    patient x, y, z axes; ``diameter_mm`` the finding's estimated diameter;
    ``score`` the model's confidence in [0, 1]; ``label`` what was found.
    """

    centre_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    diameter_mm: float = Field(gt=0)
    score: float = Field(ge=0.0, le=1.0)
    label: SegmentLabel

    @field_validator("size_mm")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not v > 0 for v in value):
            raise ValueError(f"size_mm must be three positive extents, got {value}")
        return value


class ReportedMeasurement(_Frozen):
    """One measurement of a finding: what was measured (``name``), the number and its UCUM ``unit``."""

    name: CodedConcept
    value: float
    unit: CodedConcept


class ReportedFinding(_Frozen):
    """One finding as a finished job keeps it in its summary (``summary["findings"]``), coded.

    Why: the node tells hospital systems what a model found (HL7 OBX lines, FHIR Observations,
    :mod:`dicom_node.notify`) without reading the DICOM results back and without the model's
    label definitions, which only the worker has. ``type``: what was found or looked at (a
    nodule, the lung; for a classification the question); ``value``: a coded answer (a
    classification's class); ``site``: where (an anatomical structure); ``text``: one line for
    people ("Nodule 1: 12.5 mm, certainty 93 %"); ``low_confidence``: under the model's display
    threshold.
    """

    text: str = Field(min_length=1, max_length=200)
    type: CodedConcept
    value: CodedConcept | None = None
    site: CodedConcept | None = None
    measurements: tuple[ReportedMeasurement, ...] = ()
    low_confidence: bool = False


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def require_unique_names(items: Sequence[_N], what: str) -> Sequence[_N]:
    """``items`` unchanged; ValueError naming the first ``what`` name used twice (for pydantic validators)."""
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)
    return items
