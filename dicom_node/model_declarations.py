"""What each model declares, in words for a PACS admin: what it was made for, what its results must pass,
and the series its results arrive in.

Why: the models page, its API and ``dicom-node models`` all show the same three facts, and an admin
must be able to read them at a glance ("CT; chest; slices >= 10", "lung 1000-9000 mL; ..."), so they
are put into words once, here. A declaration that cannot be used (an invalid input domain in the
bundle's metadata, a plausibility rule naming a label the model does not have) is the model's error
(:attr:`ModelDeclarations.error`), never an exception: one broken model must not hide the others.

Shared lower layer: reads the catalog (registry entries, bundle ``metadata.json``), nothing else.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from dicom_node.model_catalog import ModelCatalog
from dicom_node.model_domain import InputDomain
from dicom_node.plausibility_rules import PlausibilityRules

__all__ = [
    "NO_REGION_WARNING",
    "RESULT_KINDS",
    "ModelDeclarations",
    "ResultSeries",
    "describe_plausibility",
    "model_declarations",
]

logger = logging.getLogger(__name__)

#: Shown when a model names no body region: nothing keeps it off a series of another region.
NO_REGION_WARNING = "no body region declared - runs on any region of its modality"

#: The result objects each kind of model gives (workers.pipeline.encode_results; SC, the burned-in overlay, for
#: destinations that name it), and the "AI analysis not performed" SR (NOTICE) any model gives on a series it was
#: not made for.
RESULT_KINDS: dict[str, tuple[str, ...]] = {
    "segmentation": ("SEG", "SR", "SC", "KO", "NOTICE"),
    "detection": ("SR", "GSPS", "SC", "KO", "NOTICE"),
    "classification": ("SR", "PMAP", "SC", "NOTICE"),
}


class ResultSeries(BaseModel):
    """One series a model's results arrive in at the destinations."""

    kind: str = Field(description="SEG, SR, GSPS, PMAP, SC, KO (the key images), or NOTICE (the 'AI analysis not "
                                  "performed' SR)")
    series_number: int
    description: str = Field(description="the Series Description the objects carry")


class ModelDeclarations(BaseModel):
    """A model's input domain, plausibility rules and result series, each also in words."""

    input_domain: InputDomain | None = Field(None, description="what the model was made for (None: unreadable)")
    made_for: str | None = Field(None, description="the input domain in one line, e.g. 'CT; chest; slices >= 10'")
    made_for_warning: str | None = Field(None, description="set when the model names no body region")
    plausibility: dict[str, Any] | None = Field(
        None, description="the rules its results must pass, as declared (None: no rules, or unreadable)")
    plausibility_summary: list[str] = Field(
        default_factory=list, description="each rule in words, e.g. 'lung 1000-9000 mL' (empty: none)")
    result_series: list[ResultSeries] = Field(default_factory=list)
    error: str | None = Field(None, description="why a declaration cannot be used")


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def describe_plausibility(rules: PlausibilityRules | None) -> list[str]:
    """Each rule in a few words ("lung 1000-9000 mL", "heart touches lung on both sides (within 10 mm)");
    empty when there are none."""
    if rules is None:
        return []
    parts = [f"{label} {limits.describe()} mL" for label, limits in rules.volumes_ml.items()]
    if rules.inside_body:
        own = "".join(f", {label}: {_percent(fraction)}" for label, fraction in rules.outside_fraction_by_label.items())
        parts.append(f"{', '.join(rules.inside_body)} inside the body "
                     f"({_percent(rules.max_outside_fraction)} may be outside{own})")
    for label, neighbours in rules.adjacent.items():
        parts.append(f"{label} touches {' and '.join(n.describe() for n in neighbours)} "
                     f"(within {rules.adjacency_mm:g} mm)")
    if rules.findings_inside is not None:
        parts.append(f"findings inside the {rules.findings_inside} (margin {rules.findings_margin_mm:g} mm)")
    if rules.max_low_confidence_fraction is not None:
        parts.append(f"at most {_percent(rules.max_low_confidence_fraction)} low-confidence voxels")
    return parts


def model_declarations(catalog: ModelCatalog, model_id: str) -> ModelDeclarations:
    """What ``model_id`` of ``catalog`` declares; a declaration that cannot be used becomes ``error``.

    ``model_id`` must be one of ``catalog.ids``.
    """
    values: dict[str, Any] = {}
    errors: list[str] = []
    entry = catalog.entry(model_id)
    try:
        domain = catalog.input_domain(model_id)
    except (ValueError, OSError) as exc:  # ModelRegistryError is a ValueError
        logger.info("model %s: input domain: %s", model_id, exc)
        errors.append(str(exc))
    else:
        values.update(input_domain=domain, made_for=domain.describe(),
                      made_for_warning=None if domain.body_regions else NO_REGION_WARNING)
    try:
        rules = catalog.plausibility(model_id)
    except (ValueError, OSError) as exc:
        logger.info("model %s: plausibility: %s", model_id, exc)
        errors.append(str(exc))
    else:
        if rules is not None and not rules.empty():
            values.update(plausibility=rules.model_dump(mode="json", exclude_unset=True),
                          plausibility_summary=describe_plausibility(rules))
    series = []
    for kind in RESULT_KINDS[entry.kind]:
        number, description = catalog.result_series(model_id, kind)
        series.append(ResultSeries(kind=kind, series_number=number, description=description))
    return ModelDeclarations(**values, result_series=series, error="; ".join(errors) or None)
