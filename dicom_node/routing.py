"""Routing rules as typed data, and the one pure function that applies them to a complete study.

Why: admins decide which studies go to which AI pipelines and where the results go.
Rules are data (YAML, the DB, the UI) validated when loaded or saved, never code run
at routing time (unlike mercure's Python-expression rules), and one function,
:func:`evaluate`, is used by the router, by ``dicom-node rules test`` and by the UI's
rule tester, so what an admin tests is what runs.

A rule's ``conditions`` are checked per series, together with the study-level facts
(calling/called AE title, study description): a series for which the conditions hold
(``match: all`` - every one; ``any`` - at least one) is a *candidate*. The rule
matches when some series is a candidate; its ``series`` selector picks which
candidates feed its pipelines (for example the thinnest axial CT series). Series that
are not images (SEG, SR, presentation states, ...) and series this node produced
itself (results coming back through a PACS auto-route) are never candidates.

:func:`evaluate` returns one :class:`JobSpec` per pipeline: when several matching
rules ask for the same pipeline, the one with the highest ``priority`` (then the
first in order) decides the series and destinations. A pipeline (model) an admin
disabled gets no job; the matching rule's reasons name it.

Regexes run on RE2 (``google-re2``), which never backtracks: matching takes time
linear in the text, so no pattern (``(a+)+$`` on ``aaaa...!``) can stall the router
(or, through the interpreter lock, the whole node). Patterns RE2 cannot run (backreferences,
lookaround, ``\\Z``) are refused when a rule is validated; a rule stored before
this check (:func:`load_stored_rule`) loads, but never matches, and says why
(:meth:`Rule.problems`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dicom_node.contracts import require_unique_names
from dicom_node.model_domain import HeaderFacts

__all__ = [
    "DEMO_PIPELINES",
    "MAX_REGEX_LENGTH",
    "SeriesSelector",
    "default_rules",
    "RangeCondition",
    "RoutingDecision",
    "Rule",
    "RuleOutcome",
    "RuleSet",
    "SeriesFacts",
    "StudyFacts",
    "TextCondition",
    "JobSpec",
    "check_condition",
    "disabled_pipeline_reason",
    "evaluate",
    "header_facts",
    "load_stored_rule",
    "orientation_of",
    "regex_problem",
]

Orientation = Literal["axial", "sagittal", "coronal", "oblique"]

#: Attributes a text condition can test, and whether they belong to the study or the series.
TEXT_ATTRIBUTES: dict[str, Literal["study", "series"]] = {
    "calling_ae_title": "study",
    "called_ae_title": "study",
    "study_description": "study",
    "modality": "series",
    "body_part_examined": "series",
    "series_description": "series",
    "manufacturer": "series",
    "orientation": "series",
}
#: Attributes a range condition can test (all per series). ``slice_count`` counts the slices of
#: the series' volume (the frames of a multi-frame instance); ``instance_count`` counts instances.
RANGE_ATTRIBUTES = ("slice_thickness_mm", "slice_count", "instance_count")

#: The longest pattern a condition may hold (a description is at most 64 characters).
MAX_REGEX_LENGTH = 500
#: Memory RE2 may use for one compiled pattern (its default is 8 MiB); larger patterns are refused.
_RE2_MAX_MEM = 2 * 1_048_576
#: Validation context of a rule read back from the database (see :func:`load_stored_rule`).
_STORED = "stored"


class _UnusableRegex(ValueError):
    """A pattern RE2 cannot run; the message says why, naming the pattern."""


def _why_not(pattern: str, error: str) -> str:
    """RE2's compile error in an admin's words: what is not supported, and what to use instead."""
    if (error.startswith("invalid escape sequence: \\") and error[-1:].isdigit()) or (
            error.startswith("invalid perl operator: (?P") and "(?P=" in pattern):
        return "backreferences (\\1, (?P=name)) are not supported by the node's regex engine (RE2)"
    if error.startswith("invalid perl operator: (?=") or error.startswith("invalid perl operator: (?!") \
            or error.startswith("invalid perl operator: (?<"):
        return "lookaround ((?=...), (?!...), (?<=...), (?<!...)) is not supported by the node's regex engine (RE2)"
    if error == "invalid escape sequence: \\Z":
        return "\\Z is not supported by the node's regex engine (RE2): use \\z (or $) for the end of the text"
    if error.startswith("pattern too large"):
        return (f"it needs more than {_RE2_MAX_MEM // 1_048_576} MiB to compile "
                "(RE2 expands repetitions such as {n}); simplify it")
    return ""


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    """``pattern`` compiled by RE2, case-insensitive; _UnusableRegex saying why it cannot be."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise _UnusableRegex(f"regex {pattern[:40]!r}... is {len(pattern)} characters long; "
                             f"at most {MAX_REGEX_LENGTH} are allowed")
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else b""
        error = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        why = _why_not(pattern, error)
        if why:
            raise _UnusableRegex(f"regex {pattern!r} cannot be used: {why}") from None
        raise _UnusableRegex(f"regex {pattern!r} does not compile: {error}") from None


def regex_problem(pattern: str) -> str | None:
    """Why a condition cannot use ``pattern`` (too long, or RE2 cannot compile it), or None if it can."""
    try:
        _compiled(pattern)
    except _UnusableRegex as exc:
        return str(exc)
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextCondition(_Strict):
    """A text attribute that must equal one of ``in`` (case-insensitive) and/or match ``regex``.

    ``regex`` is searched (not anchored) case-insensitively, like a PACS admin would
    expect of "description contains chest"; anchor with ``^...$`` when needed. It is
    RE2 syntax (Python's without backreferences and lookaround; ``\\z`` for ``\\Z``),
    at most :data:`MAX_REGEX_LENGTH` characters.
    """

    attribute: Literal[
        "calling_ae_title", "called_ae_title", "study_description", "modality", "body_part_examined",
        "series_description", "manufacturer", "orientation",
    ]
    in_: list[str] | None = Field(default=None, alias="in")
    regex: str | None = None
    negate: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Refuse what RE2 cannot run, except in a rule read back from the database (see Rule.problems)."""
        stored = bool(info.context and info.context.get(_STORED))
        if value is not None and not stored:
            problem = regex_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    def regex_problem(self) -> str | None:
        """Why this condition's regex cannot be used (only a rule stored before RE2 can have one), or None."""
        return None if self.regex is None else regex_problem(self.regex)

    @model_validator(mode="after")
    def _something(self) -> "TextCondition":
        if self.in_ is None and self.regex is None:
            raise ValueError(f"condition on {self.attribute} needs 'in' or 'regex'")
        if self.in_ is not None and not self.in_:
            raise ValueError(f"condition on {self.attribute}: 'in' must list at least one value")
        if self.attribute == "orientation" and self.in_ is not None:
            unknown = sorted({v.lower() for v in self.in_} - {"axial", "sagittal", "coronal", "oblique"})
            if unknown:
                raise ValueError(f"orientation must be axial, sagittal, coronal or oblique, got {unknown}")
        return self

    def holds(self, value: str | None) -> tuple[bool, str]:
        """Whether the condition holds for ``value``, and a sentence saying why."""
        text = value or ""
        ok = True
        if self.in_ is not None:
            ok = text.strip().lower() in {v.strip().lower() for v in self.in_}
        if ok and self.regex is not None:
            try:
                ok = _compiled(self.regex).search(text) is not None
            except _UnusableRegex as exc:  # never true, not even negated
                return False, f"{self.attribute}: {exc}"
        if self.negate:
            ok = not ok
        wanted = []
        if self.in_ is not None:
            wanted.append(f"in {self.in_}")
        if self.regex is not None:
            wanted.append(f"matching /{self.regex}/")
        return ok, f"{self.attribute} {text!r} {'is' if ok else 'is not'} {'not ' if self.negate else ''}" + (
            " and ".join(wanted)
        )


class RangeCondition(_Strict):
    """A numeric series attribute within ``[min, max]`` (either bound may be omitted)."""

    attribute: Literal["slice_thickness_mm", "slice_count", "instance_count"]
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "RangeCondition":
        if self.min is None and self.max is None:
            raise ValueError(f"range condition on {self.attribute} needs min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range condition on {self.attribute}: min {self.min} > max {self.max}")
        return self

    def holds(self, value: float | None) -> tuple[bool, str]:
        if self.min is not None and self.max is not None:
            bounds = f"in [{self.min:g}, {self.max:g}]"
        elif self.min is not None:
            bounds = f">= {self.min:g}"
        else:
            bounds = f"<= {self.max:g}"
        if value is None:
            return False, f"{self.attribute} is unknown, needs {bounds}"
        ok = (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        return ok, f"{self.attribute} {value:g} {'is' if ok else 'is not'} {bounds}"


class SeriesSelector(_Strict):
    """Which of a rule's candidate series feed its pipelines.

    ``thinnest``: the candidate with the smallest slice thickness (ties: more
    slices, then the lower series number); ``most_instances``: the one with the
    most images (slices: the frames of an enhanced multi-frame instance count, so one
    108-frame instance beats 60 single-frame ones); ``all``: every candidate, one job
    per series and pipeline.
    """

    prefer: Literal["thinnest", "most_instances", "all"] = "thinnest"


def condition_model(attribute: Any) -> type[TextCondition] | type[RangeCondition] | None:
    """The condition type that compares ``attribute`` (numbers: a range; text: values or a regex); ``None`` for an
    attribute no rule knows."""
    if attribute in RANGE_ATTRIBUTES:
        return RangeCondition
    if attribute in TEXT_ATTRIBUTES:
        return TextCondition
    return None


def known_attributes() -> str:
    """Every attribute a condition may name, for messages."""
    return ", ".join(sorted([*TEXT_ATTRIBUTES, *RANGE_ATTRIBUTES]))


class Rule(_Strict):
    """One routing rule: when it applies, and what to do then."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
    description: str = ""
    enabled: bool = True
    match: Literal["all", "any"] = "all"
    conditions: list[TextCondition | RangeCondition] = Field(default_factory=list)
    series: SeriesSelector = Field(default_factory=SeriesSelector)
    pipelines: list[str] = Field(min_length=1, description="Model ids from the model registry.")
    destinations: list[str] | Literal["default"] = "default"
    priority: int = Field(default=0, ge=-1000, le=1000)

    @field_validator("conditions", mode="before")
    @classmethod
    def _typed_conditions(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        typed: list[Any] = []
        for index, item in enumerate(value):
            if isinstance(item, TextCondition | RangeCondition):
                typed.append(item)
                continue
            if not isinstance(item, dict):
                raise ValueError(f"condition {index} must be a mapping, got {item!r}")
            attribute = item.get("attribute")
            model = condition_model(attribute)
            if model is None:
                raise ValueError(f"condition {index}: unknown attribute {attribute!r}; known: {known_attributes()}")
            try:
                typed.append(model.model_validate(item, context=info.context))
            except ValidationError as exc:  # name the condition: pydantic would drop its index
                raise ValueError("; ".join(f"condition {index} ({attribute}): {_error_text(e)}"
                                           for e in exc.errors())) from None
        return typed

    def problems(self) -> list[str]:
        """Why this rule cannot be applied (empty when it can): conditions whose regex cannot be used.

        Only a rule stored before regexes were checked for RE2 can have any (new
        definitions are refused); :func:`evaluate` never matches such a rule and gives these as its reasons.
        """
        return [f"condition {index} ({condition.attribute}): {problem}"
                for index, condition in enumerate(self.conditions)
                if isinstance(condition, TextCondition) and (problem := condition.regex_problem()) is not None]

    @field_validator("pipelines")
    @classmethod
    def _unique_pipelines(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"pipelines listed twice: {value}")
        return value


def _error_text(error: Any) -> str:
    """One pydantic error of a condition as text: our own messages name their field, others get it prefixed."""
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "value_error":
        return message.removeprefix("Value error, ")
    location = ".".join(str(part) for part in error.get("loc", ()))
    return f"{location}: {message}" if location else message


def load_stored_rule(definition: str) -> Rule:
    """A rule from its JSON in the database, even when a regex of it can no longer be used.

    Rules saved before regexes were checked for RE2 may hold a backreference or
    lookaround; refusing them here would stop the router, the UI and start-up. They
    load, never match, and :meth:`Rule.problems` says why (shown by the UI, ``rules
    test`` and the study's timeline) until an admin fixes them.
    """
    return Rule.model_validate_json(definition, context={_STORED: True})


class RuleSet(_Strict):
    """The rules of one YAML file (``rules: [...]``); names are unique."""

    rules: list[Rule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, value: list[Rule]) -> list[Rule]:
        require_unique_names(value, "rule")
        return value


class SeriesFacts(_Strict):
    """What routing knows of one series (from the index and one instance's header).

    ``instance_count``: instances received; ``slice_count``: slices of the series'
    volume, the sum of NumberOfFrames over its instances (an enhanced multi-frame CT is
    one instance of 100+ slices); left out, it is ``instance_count`` (single-frame).
    ``pixel_spacing_mm``: the smaller in-plane spacing; ``slice_spacing_mm``:
    SpacingBetweenSlices where the header gives it; ``contrast_agent``: the
    ContrastBolusAgent (or the enhanced agent sequence) as short text, None when absent.
    """

    series_instance_uid: str
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    manufacturer: str | None = None
    series_number: int | None = None
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: float | None = None
    slice_spacing_mm: float | None = None
    orientation: Orientation | None = None
    contrast_agent: str | None = None
    instance_count: int = 0
    slice_count: int = 0
    is_image: bool = True
    produced_by_node: bool = False

    @model_validator(mode="before")
    @classmethod
    def _slices_default_to_instances(cls, data: Any) -> Any:
        """A series whose slice count is not given is single-frame: one slice per instance."""
        if isinstance(data, dict) and data.get("slice_count") is None and "instance_count" in data:
            return {**data, "slice_count": data["instance_count"]}
        return data


class StudyFacts(_Strict):
    """What routing knows of a complete study."""

    study_instance_uid: str
    calling_ae_titles: tuple[str, ...] = ()
    called_ae_titles: tuple[str, ...] = ()
    study_description: str | None = None
    series: tuple[SeriesFacts, ...] = ()


class JobSpec(_Strict):
    """One job the router should create: a pipeline on a series, and where the results go."""

    pipeline: str
    series_instance_uid: str
    rule: str
    priority: int
    destinations: tuple[str, ...] | Literal["default"]


class RuleOutcome(_Strict):
    """Why a rule matched (and which series it chose) or did not.

    ``problems``: why the rule cannot be applied at all (see :meth:`Rule.problems`).
    """

    rule: str
    matched: bool
    reasons: tuple[str, ...]
    selected_series: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


class RoutingDecision(_Strict):
    """The result of :func:`evaluate`: the jobs to create and every rule's outcome."""

    jobs: tuple[JobSpec, ...]
    outcomes: tuple[RuleOutcome, ...]

    @property
    def ignored_reason(self) -> str | None:
        """Why no job was created (None when there are jobs): the readable record for the UI."""
        if self.jobs:
            return None
        if not self.outcomes:
            return "no routing rule is enabled"
        return " | ".join(f"{o.rule}: {'; '.join(o.reasons) or 'no match'}" for o in self.outcomes)


def orientation_of(image_orientation: Sequence[float] | None, tolerance_deg: float = 15.0) -> Orientation | None:
    """Axial, sagittal or coronal from ImageOrientationPatient (normal within ``tolerance_deg``), else oblique."""
    if image_orientation is None or len(image_orientation) != 6:
        return None
    row, col = [float(v) for v in image_orientation[:3]], [float(v) for v in image_orientation[3:]]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    length = sum(v * v for v in normal) ** 0.5
    if length == 0:
        return None
    threshold = math.cos(math.radians(tolerance_deg))
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) / length < threshold:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _series_value(study: StudyFacts, series: SeriesFacts, attribute: str) -> Any:
    return study.study_description if attribute == "study_description" else getattr(series, attribute)


def check_condition(
    condition: TextCondition | RangeCondition, study: StudyFacts, series: SeriesFacts
) -> tuple[bool, str]:
    """Whether one condition holds for a series of the study, and why (the rule tester shows it per condition)."""
    if isinstance(condition, TextCondition) and condition.attribute in ("calling_ae_title", "called_ae_title"):
        titles = study.calling_ae_titles if condition.attribute == "calling_ae_title" else study.called_ae_titles
        results = [condition.holds(t) for t in titles] or [condition.holds(None)]
        hit = [r for r in results if r[0]]
        return hit[0] if hit else results[0]
    return condition.holds(_series_value(study, series, condition.attribute))


def _select(candidates: list[SeriesFacts], prefer: str) -> list[SeriesFacts]:
    if prefer == "all":
        return candidates
    if prefer == "most_instances":
        key = lambda s: (-s.slice_count, s.series_number if s.series_number is not None else 1 << 30)  # noqa: E731
    else:
        key = lambda s: (  # noqa: E731
            s.slice_thickness_mm if s.slice_thickness_mm is not None else float("inf"),
            -s.slice_count,
            s.series_number if s.series_number is not None else 1 << 30,
        )
    return [min(candidates, key=key)]


def _evaluate_rule(rule: Rule, study: StudyFacts) -> RuleOutcome:
    problems = tuple(rule.problems())
    if problems:
        return RuleOutcome(rule=rule.name, matched=False, problems=problems,
                           reasons=tuple(f"rule cannot be applied until it is fixed: {p}" for p in problems))
    reasons: list[str] = []
    candidates: list[SeriesFacts] = []
    for series in study.series:
        label = f"series {series.series_number if series.series_number is not None else '?'} ({series.series_instance_uid})"
        if series.produced_by_node:
            reasons.append(f"{label}: a result this node produced, never routed")
            continue
        if not series.is_image:
            reasons.append(f"{label}: not an image series ({series.modality or 'unknown modality'})")
            continue
        results = [check_condition(c, study, series) for c in rule.conditions]
        ok = all(r[0] for r in results) if rule.match == "all" else any(r[0] for r in results)
        if not rule.conditions:
            ok = True
        if ok:
            candidates.append(series)
            reasons.append(f"{label}: candidate ({'; '.join(r[1] for r in results) or 'no conditions'})")
        else:
            reasons.append(f"{label}: {'; '.join(r[1] for r in results)}")
    if not candidates:
        reasons.append("no series meets the conditions" if study.series else "the study has no series")
        return RuleOutcome(rule=rule.name, matched=False, reasons=tuple(reasons))
    chosen = _select(candidates, rule.series.prefer)
    reasons.append(
        f"selected ({rule.series.prefer}): " + ", ".join(s.series_instance_uid for s in chosen)
    )
    return RuleOutcome(
        rule=rule.name, matched=True, reasons=tuple(reasons),
        selected_series=tuple(s.series_instance_uid for s in chosen),
    )


def disabled_pipeline_reason(pipeline: str) -> str:
    """The reason a matching rule gives for a pipeline it does not run (the UI and the CLI show it)."""
    return f"pipeline {pipeline} is disabled by an admin"


def evaluate(
    rules: Iterable[Rule], study: StudyFacts, *, disabled_pipelines: Collection[str] = frozenset()
) -> RoutingDecision:
    """Apply ``rules`` to ``study``: the jobs to create and why each rule did or did not match.

    Pure: no I/O, no clock; the same inputs always give the same decision.
    Disabled rules are reported as such and never match. ``disabled_pipelines``: model
    ids an admin disabled (:func:`dicom_node.db.model_settings.disabled_models`); a
    matching rule creates no job for them and its reasons say so, so when every
    pipeline of every matching rule is disabled the study is ignored with that reason.
    """
    ordered = sorted(enumerate(rules), key=lambda item: (-item[1].priority, item[0]))
    outcomes: list[RuleOutcome] = []
    jobs: dict[tuple[str, str], JobSpec] = {}
    claimed: set[str] = set()
    for _, rule in ordered:
        if not rule.enabled:
            outcomes.append(RuleOutcome(rule=rule.name, matched=False, reasons=("rule is disabled",)))
            continue
        outcome = _evaluate_rule(rule, study)
        if outcome.matched:
            off = [p for p in rule.pipelines if p in disabled_pipelines]
            if off:
                outcome = outcome.model_copy(
                    update={"reasons": (*outcome.reasons, *(disabled_pipeline_reason(p) for p in off))})
        outcomes.append(outcome)
        if not outcome.matched:
            continue
        destinations: tuple[str, ...] | Literal["default"] = (
            "default" if rule.destinations == "default" else tuple(rule.destinations)
        )
        for pipeline in rule.pipelines:
            if pipeline in disabled_pipelines:
                continue
            if pipeline in claimed:
                continue  # a rule of higher priority already decided this pipeline
            claimed.add(pipeline)
            for series_uid in outcome.selected_series:
                jobs[(pipeline, series_uid)] = JobSpec(
                    pipeline=pipeline, series_instance_uid=series_uid, rule=rule.name,
                    priority=rule.priority, destinations=destinations,
                )
    return RoutingDecision(jobs=tuple(jobs.values()), outcomes=tuple(outcomes))


#: Model ids of the two demo models shipped with the node (see the model registry).
DEMO_PIPELINES = ("chest-ct-segmentation", "lung-nodule-detection")


def default_rules() -> list[Rule]:
    """The rule the node starts with: every complete CT study runs both demo models.

    The thinnest CT series with at least 10 slices is used (localizers and dose
    reports are left out; an enhanced multi-frame series counts its frames), and
    results go to every destination flagged default.
    ``config/rules.yaml`` holds the same rule for admins to copy and change.
    """
    return [
        Rule(
            name="ct-default",
            description="Every CT study: chest segmentation and lung nodule detection on the thinnest CT series",
            conditions=[
                TextCondition(attribute="modality", **{"in": ["CT"]}),
                RangeCondition(attribute="slice_count", min=10),
            ],
            series=SeriesSelector(prefer="thinnest"),
            pipelines=list(DEMO_PIPELINES),
            destinations="default",
        )
    ]


def header_facts(study: StudyFacts, series: SeriesFacts) -> HeaderFacts:
    """What the header says of ``series``, as the applicability check reads it (slices = ``slice_count``).

    Pure, so the router, ``dicom-node rules test`` and the UI judge a series from the same facts.
    """
    return HeaderFacts(
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        study_description=study.study_description,
        series_description=series.series_description,
        protocol_name=series.protocol_name,
        slices=series.slice_count,
        pixel_spacing_mm=series.pixel_spacing_mm,
        slice_spacing_mm=series.slice_spacing_mm,
        slice_thickness_mm=series.slice_thickness_mm,
        orientation=series.orientation,
        contrast_agent=series.contrast_agent,
    )
