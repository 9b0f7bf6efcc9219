"""The checks a worker made before and after a model ran, as the study page, the API and the CLI show them.

Why: a job's ``checks`` column holds JSON (``{"applicability": ..., "plausibility": ...}``,
the records of :class:`dicom_node.model_domain.Applicability` and
:class:`dicom_node.plausibility_rules.Plausibility`). A PACS admin needs them in plain
words: whether the model applied and why not, what the header and the image said about
the body region, each check passed / failed / unknown, and what a held result broke.
The reading is lenient (a record written by another version, or damaged, is shown as
far as it can be, never fails a page), so these are plain views, not the validating
models of the lower layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REASON_WORDS",
    "ApplicabilityView",
    "CheckLine",
    "PlausibilityView",
    "applicability_view",
    "outcome_reason",
    "plausibility_view",
]

logger = logging.getLogger(__name__)

#: What each reason code of a declined model means, in words for a PACS admin.
REASON_WORDS = {
    "modality": "the series is not of a modality the model was made for",
    "body-region": "the series does not show the body region the model was made for",
    "coverage": "the organ the model needs is not wholly in the field of view",
    "slices": "the series has too few or too many slices for the model",
    "spacing": "the pixel or slice spacing is outside what the model was made for",
    "thickness": "the slice thickness is outside what the model was made for",
    "orientation": "the slices are not oriented as the model needs",
    "contrast": "the contrast (with or without) is not what the model was made for",
}


@dataclass(frozen=True)
class CheckLine:
    """One criterion: its name, whether it held (None: could not be judged) and the evidence."""

    name: str
    passed: bool | None
    detail: str

    @property
    def result(self) -> str:
        """passed, failed or unknown (also the CSS class of its badge)."""
        return {True: "passed", False: "failed", None: "unknown"}[self.passed]


@dataclass(frozen=True)
class ApplicabilityView:
    """The check before the model ran: does the model apply to this series, and the evidence."""

    model_id: str
    applies: bool
    reason_code: str | None
    reason: str | None
    header_regions: tuple[str, ...]
    image_regions: tuple[str, ...] | None  # None: the image was not judged
    checks: tuple[CheckLine, ...]
    seconds: float | None

    @property
    def plain_reason(self) -> str | None:
        """Why the model did not apply, in words (None when it applied)."""
        if self.applies:
            return None
        words = REASON_WORDS.get(self.reason_code or "")
        if not words:
            return self.reason or "The model was not made for this series"
        words = words[0].upper() + words[1:]
        if not self.reason:
            return words
        # The reason is "<check name>: <evidence>"; the words already say which criterion failed.
        name, _, evidence = self.reason.partition(": ")
        known = {c.name for c in self.checks}
        return f"{words}: {evidence if evidence and name in known else self.reason}"


@dataclass(frozen=True)
class PlausibilityView:
    """The check after the model ran: is its result plausible, and what it broke if not."""

    model_id: str
    plausible: bool
    reasons: tuple[str, ...]
    checks: tuple[CheckLine, ...]
    seconds: float | None


def _checks(value: Any) -> tuple[CheckLine, ...]:
    if not isinstance(value, list):
        return ()
    lines = []
    for item in value:
        if not isinstance(item, Mapping):
            continue
        passed = item.get("passed")
        lines.append(CheckLine(name=str(item.get("name") or "?"),
                               passed=passed if isinstance(passed, bool) else None,
                               detail=str(item.get("detail") or "")))
    return tuple(lines)


def _regions(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _record(checks: Mapping[str, Any], name: str, verdict: str) -> Mapping[str, Any] | None:
    """The ``name`` record of a job's ``checks`` when it holds a boolean ``verdict``; else None (logged if present)."""
    record = checks.get(name)
    if not isinstance(record, Mapping) or not isinstance(record.get(verdict), bool):
        if record is not None:
            logger.warning("%s record %r is not readable; not shown", name, str(record)[:200])
        return None
    return record


def applicability_view(checks: Mapping[str, Any]) -> ApplicabilityView | None:
    """The applicability record of a job's ``checks`` (None when there is none, or it says nothing)."""
    record = _record(checks, "applicability", "applies")
    if record is None:
        return None
    image = record.get("image_regions")
    return ApplicabilityView(
        model_id=str(record.get("model_id") or ""), applies=record["applies"],
        reason_code=_text(record.get("reason_code")), reason=_text(record.get("reason")),
        header_regions=_regions(record.get("header_regions")),
        image_regions=_regions(image) if isinstance(image, list) else None,
        checks=_checks(record.get("checks")), seconds=_seconds(record.get("seconds")),
    )


def plausibility_view(checks: Mapping[str, Any]) -> PlausibilityView | None:
    """The plausibility record of a job's ``checks`` (None when the model's result was not judged)."""
    record = _record(checks, "plausibility", "plausible")
    if record is None:
        return None
    reasons = record.get("reasons")
    return PlausibilityView(
        model_id=str(record.get("model_id") or ""), plausible=record["plausible"],
        reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
        checks=_checks(record.get("checks")), seconds=_seconds(record.get("seconds")),
    )


def outcome_reason(state: str, checks: Mapping[str, Any]) -> str | None:
    """Why a job ended as it did, in words, for the states whose reason lives in its checks.

    not_applicable: why the model did not apply; held (and released or discarded, which were
    held first): what the result broke. None for the other states, and when the checks say nothing.
    """
    if state == "not_applicable":
        applicability = applicability_view(checks)
        return applicability.plain_reason if applicability is not None else None
    if state in ("held", "released", "discarded"):
        plausibility = plausibility_view(checks)
        if plausibility is not None and plausibility.reasons:
            return "; ".join(plausibility.reasons)
        return None
    return None
