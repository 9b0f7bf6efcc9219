"""What a model's result must look like to be sent: per-model plausibility rules, and the decision.

Why: the node must never send a result a radiologist could mistake for a finding on the
wrong anatomy. The applicability check keeps a model off series it was not made for;
these rules judge what it *returned*: organ volumes in a sane range, organs inside the
body and next to their neighbours, findings inside the lungs, and few voxels the network
itself was unsure about. A result that breaks a rule is held (not sent) and shown to the
admin with the reasons from :class:`Plausibility`.

This module is the shared lower layer (pydantic and the standard library only): the
catalog validates a model's rules with :class:`PlausibilityRules` (checking
:meth:`PlausibilityRules.label_names` against the model's labels and
:meth:`PlausibilityRules.misfits` against its kind), the workers evaluate them
(``workers.plausibility.check_plausibility``), and the web pages read the stored
:meth:`Plausibility.as_record`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicom_node.model_domain import Check, NumberRange

__all__ = ["Neighbour", "Plausibility", "PlausibilityRules", "ResultKind"]

#: The two kinds of results the rules judge (the model's kind in the catalog).
ResultKind = Literal["segmentation", "detection", "classification"]

#: Rules that judge a label map, and the rule that judges detections.
_SEGMENTATION_RULES = ("volumes_ml", "inside_body", "adjacent", "max_low_confidence_fraction")
_DETECTION_RULES = ("findings_inside",)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Neighbour(_Strict):
    """A label another label must touch; ``sides: both`` asks for contact on the patient's left AND right.

    Written in YAML as a plain label name (``lung``: touch it anywhere) or as
    ``{label: lung, sides: both}``.
    """

    label: str = Field(min_length=1)
    sides: Literal["any", "both"] = "any"

    def describe(self) -> str:
        return self.label if self.sides == "any" else f"{self.label} on both sides"


class PlausibilityRules(_Strict):
    """Per-model rules a result must satisfy before it is sent (all optional; none given: nothing checked).

    Declared in a model's registry entry (``plausibility:``) or its bundle metadata
    (``dicom_node.plausibility``), for example the chest segmentation model::

        plausibility:
          volumes_ml:                     # label -> allowed volume in mL; an absent label is 0 mL
            lung: {min: 1000, max: 9000}
            heart: {min: 150, max: 1500}
            nodule: {max: 500}
          inside_body: [lung, heart, nodule]
          max_outside_fraction: 0.02      # of each such label's voxels ...
          outside_fraction_by_label:      # ... except these
            lung: 0.4
          adjacent:                       # label -> labels it must touch within adjacency_mm
            heart: [{label: lung, sides: both}]   # the heart lies between the two lungs
            nodule: [lung]                # short for {label: lung, sides: any}
          adjacency_mm: 10
          max_low_confidence_fraction: 0.25

    and the detector::

        plausibility:
          findings_inside: lungs
          findings_margin_mm: 5

    Segmentation rules:

    * ``volumes_ml``: ``{label: {min, max}}`` in millilitres (either bound optional). A
      label missing from the result counts as 0 mL, so ``min`` also demands presence.
    * ``inside_body``: labels that must lie inside the patient's body, judged against
      the body mask of the image survey (independent of the model): at most
      ``max_outside_fraction`` of each label's voxels may lie outside it, or the
      label's own fraction in ``outside_fraction_by_label`` (for a model known to
      label some air outside the patient, without loosening the rule for the others).
    * ``adjacent``: ``{label: [neighbour, ...]}``: where ``label`` is present, some of
      it must come within ``adjacency_mm`` of each neighbour. A neighbour with
      ``sides: both`` must be found within that distance on the patient's left of the
      label's centre AND on its right (the heart between the left and the right lung).
    * ``max_low_confidence_fraction``: the out-of-distribution signal. The most a
      result's ``low_confidence_fraction`` (the share of foreground voxels whose winning
      softmax probability is below 0.5, reported by the model loader) may be.

    Detection rule:

    * ``findings_inside: lungs``: every finding's centre must lie in the lungs of the
      image survey, or within ``findings_margin_mm`` of them (juxtapleural nodules sit
      on the lung's edge).

    Rules that need the image survey (``inside_body``, ``findings_inside``) cannot be
    verified without one; the result is then held, never sent unchecked. Label names
    are not checked here: the catalog checks :meth:`label_names` against the model's
    labels and :meth:`misfits` against its kind.
    """

    volumes_ml: dict[str, NumberRange] = {}
    inside_body: tuple[str, ...] = ()
    max_outside_fraction: float = Field(default=0.02, ge=0.0, le=1.0)
    outside_fraction_by_label: dict[str, float] = {}
    adjacent: dict[str, tuple[Neighbour, ...]] = {}
    adjacency_mm: float = Field(default=10.0, gt=0.0)
    findings_inside: Literal["lungs"] | None = None
    findings_margin_mm: float = Field(default=5.0, ge=0.0)
    max_low_confidence_fraction: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("volumes_ml")
    @classmethod
    def _volume_labels(cls, value: dict[str, NumberRange]) -> dict[str, NumberRange]:
        for label, limits in value.items():
            _label_name(label, "volumes_ml")
            if limits.min is None and limits.max is None:
                raise ValueError(f"volumes_ml: {label!r} gives neither min nor max")
            for bound in (limits.min, limits.max):
                if bound is not None and bound < 0:
                    raise ValueError(f"volumes_ml: {label!r} has negative bound {bound:g} mL")
        return value

    @field_validator("inside_body")
    @classmethod
    def _inside_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for label in value:
            _label_name(label, "inside_body")
            if label in seen:
                raise ValueError(f"inside_body: label {label!r} is listed twice")
            seen.add(label)
        return value

    @field_validator("outside_fraction_by_label")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        for label, fraction in value.items():
            _label_name(label, "outside_fraction_by_label")
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"outside_fraction_by_label: {label!r} has {fraction:g}, not a fraction in 0..1")
        return value

    @field_validator("adjacent", mode="before")
    @classmethod
    def _neighbour_shorthand(cls, value: Any) -> Any:
        """``heart: [lung]`` is short for ``heart: [{label: lung}]``; a single name needs no list."""
        if not isinstance(value, Mapping):
            return value
        expanded: dict[Any, Any] = {}
        for label, neighbours in value.items():
            items = [neighbours] if isinstance(neighbours, (str, Mapping, Neighbour)) else neighbours
            if isinstance(items, (list, tuple)):
                items = [{"label": item} if isinstance(item, str) else item for item in items]
            expanded[label] = items
        return expanded

    @field_validator("adjacent")
    @classmethod
    def _adjacent_labels(cls, value: dict[str, tuple[Neighbour, ...]]) -> dict[str, tuple[Neighbour, ...]]:
        for label, neighbours in value.items():
            _label_name(label, "adjacent")
            if not neighbours:
                raise ValueError(f"adjacent: {label!r} lists no neighbour")
            seen: set[str] = set()
            for neighbour in neighbours:
                if neighbour.label == label:
                    raise ValueError(f"adjacent: {label!r} is given as its own neighbour")
                if neighbour.label in seen:
                    raise ValueError(f"adjacent: {label!r} lists neighbour {neighbour.label!r} twice")
                seen.add(neighbour.label)
        return value

    @model_validator(mode="after")
    def _margin_needs_findings(self) -> PlausibilityRules:
        if self.findings_inside is None and "findings_margin_mm" in self.model_fields_set:
            raise ValueError(
                f"findings_margin_mm {self.findings_margin_mm:g} is given without findings_inside"
            )
        if not self.inside_body and "max_outside_fraction" in self.model_fields_set:
            raise ValueError(f"max_outside_fraction {self.max_outside_fraction:g} is given without inside_body")
        stray = sorted(set(self.outside_fraction_by_label) - set(self.inside_body))
        if stray:
            raise ValueError(f"outside_fraction_by_label names {', '.join(map(repr, stray))}, which inside_body "
                             f"does not list ({', '.join(self.inside_body) or 'empty'})")
        if not self.adjacent and "adjacency_mm" in self.model_fields_set:
            raise ValueError(f"adjacency_mm {self.adjacency_mm:g} is given without adjacent")
        return self

    def outside_fraction(self, label: str) -> float:
        """The largest fraction of ``label`` that may lie outside the body."""
        return self.outside_fraction_by_label.get(label, self.max_outside_fraction)

    def label_names(self) -> set[str]:
        """Every label these rules mention (for the catalog to check against the model's labels)."""
        names = set(self.volumes_ml) | set(self.inside_body) | set(self.adjacent)
        for neighbours in self.adjacent.values():
            names.update(n.label for n in neighbours)
        return names

    def misfits(self, kind: ResultKind) -> tuple[str, ...]:
        """The rules given here that cannot judge a ``kind`` model's results (the catalog rejects them)."""
        other = {"segmentation": _DETECTION_RULES, "detection": _SEGMENTATION_RULES,
                 "classification": _SEGMENTATION_RULES + _DETECTION_RULES}[kind]  # none judges a class
        fields = type(self).model_fields
        return tuple(name for name in other if getattr(self, name) != fields[name].default)

    def empty(self) -> bool:
        """True when no rule is given (every result passes)."""
        return not (self.volumes_ml or self.inside_body or self.adjacent or self.findings_inside
                    or self.max_low_confidence_fraction is not None)


def _label_name(label: str, field: str) -> None:
    if not label.strip():
        raise ValueError(f"{field}: empty label name {label!r}")


class Plausibility(_Strict):
    """The verdict on one result: plausible or not, one sentence per failed rule, every check made.

    ``reasons``: one readable sentence per rule that failed or could not be verified
    (naming the label, the value and the allowed range); ``checks``: every rule
    evaluated (``passed`` None: could not be verified, which holds the result like a
    failure); ``seconds``: the check's cost.
    """

    model_id: str
    plausible: bool
    reasons: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()
    seconds: float = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> Plausibility:
        if self.plausible and self.reasons:
            raise ValueError(f"a plausible result has no reasons, got {list(self.reasons)}")
        if not self.plausible and not self.reasons:
            raise ValueError("an implausible result needs at least one reason")
        return self

    def summary(self) -> str:
        """One line for the timeline: "plausible (N checks)" or "held: <first reason> (+k more)"."""
        if self.plausible:
            count = len(self.checks)
            return f"{self.model_id} result plausible ({count} check{'' if count == 1 else 's'} passed)"
        more = f" (+{len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
        return f"{self.model_id} result held as implausible: {self.reasons[0]}{more}"

    def as_record(self) -> dict[str, Any]:
        """JSON-able form for the job's record."""
        return self.model_dump(mode="json")
