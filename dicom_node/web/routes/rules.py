"""Routing rules in the admin UI and the REST API: list, edit, enable/disable, reorder, delete, test.

Why: admins change which studies go to which AI pipelines without editing YAML on the
server. A rule is typed data (:class:`dicom_node.routing.Rule`), validated when it is
saved, with every error placed next to the field it is about (``conditions.1.regex``
is the regex input of condition row 1); the pages and the API share one validation
function (:func:`validate_rule`) and one tester (:func:`test_rule`), and the tester
runs the router's own :func:`dicom_node.routing.evaluate` on the router's own
:func:`dicom_node.study_facts.study_facts` of a stored study, so what an admin tests
is what the router does; for each job it also shows whether the model would apply to
the series from its header (the worker's own decision, :mod:`dicom_node.applicability_preview`).
Every change is audited with the rule before and after.

The form needs no JavaScript: condition rows are numbered inputs (``cond-<row>-<field>``,
with ``cond-<row>-<field>-error`` holding that field's error), and a few empty rows are
always offered for new conditions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError

from dicom_node.applicability_preview import JobCheck, preview_applicability
from dicom_node.conductor import evaluate_with
from dicom_node.db import config_repo, repo
from dicom_node.db.job_checks import ApplicabilityView, applicability_view
from dicom_node.db.models import Role
from dicom_node.model_catalog import ModelCatalog
from dicom_node.model_declarations import NO_REGION_WARNING
from dicom_node.model_domain import Applicability
from dicom_node.routing import (
    DEMO_PIPELINES,
    RANGE_ATTRIBUTES,
    TEXT_ATTRIBUTES,
    RangeCondition,
    RoutingDecision,
    Rule,
    RuleOutcome,
    SeriesFacts,
    StudyFacts,
    TextCondition,
    check_condition,  # the router's own per-condition check
)
from dicom_node.settings import Settings
from dicom_node.study_facts import study_facts
from dicom_node.web.auth import Principal, audit_event, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render

__all__ = [
    "RESERVED_RULE_NAMES",
    "RuleTestResult",
    "known_pipelines",
    "router",
    "test_rule",
    "validate_rule",
]

logger = logging.getLogger(__name__)

router = APIRouter()

#: Names the UI's and API's own URLs use (``/rules/new``, ``/rules/test``, ``/api/v1/rules/order``).
RESERVED_RULE_NAMES = frozenset({"new", "test", "order"})
#: Who may run the rule tester: the role that edits rules. A test reads one header per series of
#: the study and evaluates the rule in a web request thread; viewers must not be able to make
#: the node do that work on demand (issue 20).
TESTER_ROLE = Role.ADMIN
#: Empty condition rows the form offers beyond the rule's own conditions.
EXTRA_CONDITION_ROWS = 3
MAX_CONDITION_ROWS = 50
MAX_DESCRIPTION = 1000
MAX_IN_VALUES = 100
MAX_IN_VALUE = 200
MAX_PIPELINES = 20
_SOURCE = "ui"

#: (location of the problem in the rule definition, message). Locations are pydantic's.
FieldError = tuple[tuple[str | int, ...], str]


# --------------------------------------------------------------------------- what rules may refer to


def known_pipelines(settings: Settings) -> tuple[str, ...]:
    """Model ids the workers can run: the ids in ``routing.models_file``, else the demo models.

    Read as plain YAML (the ``id`` of each entry), so the web app needs no model code;
    an unreadable file gives () and pipelines are then not checked here (the node
    itself refuses to start on a broken registry).
    """
    path = settings.routing.models_file
    if path is None:
        return DEMO_PIPELINES
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("cannot read the model registry %s to list pipelines: %s", path, exc)
        return ()
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return ()
    return tuple(str(m["id"]) for m in models if isinstance(m, dict) and m.get("id"))


def _known_destinations(context: WebContext) -> list[str]:
    return [d.name for d in config_repo.list_destinations(context.sessions)]


# --------------------------------------------------------------------------- validation (pages and API)


def _message(error: Mapping[str, Any]) -> str:
    """pydantic's message, without its "Value error, " prefix, naming the value where pydantic does not."""
    message = str(error.get("msg", "invalid"))
    kind = str(error.get("type", ""))
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    value = error.get("input")
    location = error.get("loc", ())
    if kind == "string_pattern_mismatch" and tuple(location)[-1:] == ("name",):
        return (f"rule name {value!r} must start with a letter or digit and hold only letters, digits, spaces, "
                "'_', '.' or '-'")
    if isinstance(value, str | int | float) and not isinstance(value, bool) and kind != "missing":
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return f"{message} (got {shown})"
    return message


def _pydantic_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[FieldError]:
    return [(prefix + tuple(e["loc"]), _message(e)) for e in exc.errors()]


def _validate_condition(index: int, item: Any) -> tuple[TextCondition | RangeCondition | None, list[FieldError]]:
    where: tuple[str | int, ...] = ("conditions", index)
    if not isinstance(item, dict):
        return None, [(where, f"condition {index} must be a mapping, got {item!r:.80}")]
    attribute = item.get("attribute")
    model: type[TextCondition] | type[RangeCondition]
    if attribute in RANGE_ATTRIBUTES:
        model = RangeCondition
    elif attribute in TEXT_ATTRIBUTES:
        model = TextCondition
    else:
        known = ", ".join(sorted([*TEXT_ATTRIBUTES, *RANGE_ATTRIBUTES]))
        return None, [(where + ("attribute",), f"unknown attribute {attribute!r:.80}; known: {known}")]
    errors: list[FieldError] = []
    values = item.get("in")  # a regex's length and syntax (RE2) are TextCondition's own checks
    if isinstance(values, list):
        if len(values) > MAX_IN_VALUES:
            errors.append((where + ("in",), f"'in' lists {len(values)} values; at most {MAX_IN_VALUES} are allowed"))
        long = [v for v in values if isinstance(v, str) and len(v) > MAX_IN_VALUE]
        if long:
            errors.append((where + ("in",), f"'in' value {long[0][:40]!r}... is longer than {MAX_IN_VALUE} characters"))
    if errors:
        return None, errors
    try:
        return model.model_validate(item), []
    except ValidationError as exc:
        return None, _pydantic_errors(exc, where)


def validate_rule(
    data: Any,
    *,
    pipelines: Sequence[str],
    destinations: Sequence[str],
    check_reserved: bool = True,
) -> tuple[Rule | None, list[FieldError]]:
    """The rule ``data`` describes, or every problem with it, each at its own location.

    Beyond :class:`Rule`'s own validation: each condition is checked on its own (so an
    error in the second condition is reported at ``conditions.1...``, and all bad
    conditions at once), lengths are limited, pipelines must be known model ids (when
    ``pipelines`` is not empty), named destinations must exist, and (``check_reserved``)
    the name may not be one the web UI's URLs use.
    """
    if not isinstance(data, dict):
        return None, [((), f"a routing rule must be a JSON object, got {type(data).__name__}")]
    errors: list[FieldError] = []
    conditions = data.get("conditions", [])
    typed: list[TextCondition | RangeCondition] = []
    if isinstance(conditions, list):
        for index, item in enumerate(conditions):
            condition, problems = _validate_condition(index, item)
            errors += problems
            if condition is not None:
                typed.append(condition)
    description = data.get("description")
    if isinstance(description, str) and len(description) > MAX_DESCRIPTION:
        errors.append((("description",), f"description is {len(description)} characters long; at most "
                                         f"{MAX_DESCRIPTION} are allowed"))
    rest = {**data, "conditions": typed} if isinstance(conditions, list) else data
    rule: Rule | None = None
    try:
        rule = Rule.model_validate(rest)
    except ValidationError as exc:
        errors += _pydantic_errors(exc)
    errors += _reference_errors(data, pipelines=pipelines, destinations=destinations, check_reserved=check_reserved)
    return (None, errors) if errors or rule is None else (rule, [])


def _reference_errors(data: dict[str, Any], *, pipelines: Sequence[str], destinations: Sequence[str],
                      check_reserved: bool) -> list[FieldError]:
    """What :class:`Rule` cannot know: reserved names, unknown pipelines and destinations, too many pipelines."""
    errors: list[FieldError] = []
    name = data.get("name")
    if check_reserved and isinstance(name, str) and name in RESERVED_RULE_NAMES:
        errors.append((("name",), f"rule name {name!r} is reserved by the web UI's addresses; choose another"))
    wanted = data.get("pipelines")
    if isinstance(wanted, list):
        if len(wanted) > MAX_PIPELINES:
            errors.append((("pipelines",), f"{len(wanted)} pipelines; at most {MAX_PIPELINES} are allowed"))
        elif pipelines:
            for index, pipeline in enumerate(wanted):
                if isinstance(pipeline, str) and pipeline not in pipelines:
                    errors.append((("pipelines", index), f"unknown pipeline {pipeline[:80]!r}; the model registry "
                                                         f"lists {', '.join(pipelines)}"))
    targets = data.get("destinations")
    if isinstance(targets, list):
        for index, target in enumerate(targets):
            if isinstance(target, str) and target not in destinations:
                errors.append((("destinations", index), f"no destination named {target[:80]!r} (known: "
                                                        f"{', '.join(destinations) or 'none yet'})"))
    return errors


def _api_errors(errors: Sequence[FieldError]) -> list[dict[str, str]]:
    return [{"field": ".".join(str(p) for p in location), "message": message} for location, message in errors]


def invalid_response(what: str, errors: Sequence[FieldError]) -> JSONResponse:
    """The API's 422 answer: ``{"detail": ..., "errors": [{"field": "conditions.1.regex", "message": ...}]}``."""
    return JSONResponse({"detail": f"invalid {what}", "errors": _api_errors(errors)}, status_code=422)


# --------------------------------------------------------------------------- the rule tester


class ConditionResult(BaseModel):
    """One condition of the tested rule on one series: whether it holds and the router's reason."""

    index: int
    condition: str
    holds: bool
    reason: str


class SeriesResult(BaseModel):
    """One series of the study as the tested rule sees it."""

    series: SeriesFacts
    status: Literal["selected", "candidate", "not a candidate", "not an image", "result of this node"]
    conditions: list[ConditionResult]


class JobPreview(BaseModel):
    """A job the router would create, with its destinations spelled out and the check before its model.

    ``applicability`` is the header-only decision (:mod:`dicom_node.applicability_preview`);
    the worker decides again with the image itself, and where they disagree the image wins.
    """

    pipeline: str
    series_instance_uid: str
    series_number: int | None
    rule: str
    priority: int
    destinations: list[str]
    default_destinations: bool
    made_for: str | None = Field(None, description="what the model was made for, in one line")
    made_for_warning: str | None = Field(None, description="set when the model names no body region")
    applicability: Applicability | None = Field(
        None, description="whether the model applies to the series, judged from its header (None: see check_error)")
    check_error: str | None = Field(None, description="why the check could not be made")


class RuleEvaluation(BaseModel):
    """What :func:`dicom_node.routing.evaluate` decided for the tested rule."""

    outcome: RuleOutcome
    jobs: list[JobPreview]


class RuleTestResult(BaseModel):
    """The tested rule against one stored study: the router's outcome, and the detail behind it.

    ``result`` is exactly what the router would decide with this rule alone; when the
    rule is disabled that is "rule is disabled", and ``if_enabled`` shows what the rule
    would do once enabled. ``series`` lists each series with each condition's result.
    """

    rule: Rule
    study_instance_uid: str
    study_description: str | None
    calling_ae_titles: list[str]
    called_ae_titles: list[str]
    result: RuleEvaluation
    if_enabled: RuleEvaluation | None
    conditions: list[str] = Field(description="Each condition of the rule in words, in order.")
    series: list[SeriesResult]


def describe_condition(condition: TextCondition | RangeCondition) -> str:
    """A condition in a few words, for lists and test results (with why it cannot be used, if so)."""
    if isinstance(condition, RangeCondition):
        low = f"{condition.min:g} ≤ " if condition.min is not None else ""
        high = f" ≤ {condition.max:g}" if condition.max is not None else ""
        return f"{low}{condition.attribute}{high}"
    parts = []
    if condition.in_ is not None:
        parts.append(f"in {', '.join(condition.in_)}")
    if condition.regex is not None:
        parts.append(f"matches /{condition.regex}/")
    text = f"{'NOT ' if condition.negate else ''}{condition.attribute} " + " and ".join(parts)
    problem = condition.regex_problem()
    return text if problem is None else f"{text} - the rule is never applied until this is fixed: {problem}"


#: What the model registry gives the tester: a catalog, or why it cannot be read.
_Catalog = ModelCatalog | str


def _catalog(context: WebContext) -> _Catalog:
    """The registry the workers use, or the reason it cannot be read (shown at each job's check)."""
    try:
        return ModelCatalog.configured(context.settings.routing.models_file)
    except (ValueError, OSError) as exc:  # ModelRegistryError is a ValueError
        return f"the model registry cannot be read: {exc}"


def _jobs(decision: RoutingDecision, facts: StudyFacts, defaults: list[str], catalog: _Catalog,
          context: WebContext) -> list[JobPreview]:
    numbers = {s.series_instance_uid: s.series_number for s in facts.series}
    if isinstance(catalog, str):
        checks = [JobCheck(job, None, None, catalog) for job in decision.jobs]
    else:
        checks = preview_applicability(catalog, context.settings.applicability.synonym_table(), facts, decision.jobs)

    def preview(check: JobCheck) -> JobPreview:
        job, domain = check.spec, check.domain
        is_default = job.destinations == "default"
        return JobPreview(pipeline=job.pipeline, series_instance_uid=job.series_instance_uid,
                          series_number=numbers.get(job.series_instance_uid), rule=job.rule, priority=job.priority,
                          destinations=list(defaults if is_default else job.destinations),
                          default_destinations=is_default, made_for=domain.describe() if domain else None,
                          made_for_warning=NO_REGION_WARNING if domain and not domain.body_regions else None,
                          applicability=check.applicability, check_error=check.error)

    return [preview(check) for check in checks]


def check_view(applicability: Applicability) -> ApplicabilityView:
    """A decision as the study page shows a job's checks (reason in words, passed/failed/unknown)."""
    view = applicability_view({"applicability": applicability.as_record()})
    assert view is not None  # a record of Applicability is always readable
    return view


def _condition_matrix(rule: Rule, facts: StudyFacts, selected: Sequence[str]) -> list[SeriesResult]:
    """Per series, each condition's result with the router's own reason.

    :func:`evaluate` joins the reasons of one series into one sentence; here each
    condition is checked on its own with the same per-condition function evaluate
    uses, so the page can mark exactly which condition failed.
    """
    results = []
    for series in facts.series:
        checks = [check_condition(c, facts, series) for c in rule.conditions]
        conditions = [ConditionResult(index=i, condition=describe_condition(c), holds=ok, reason=reason)
                      for i, (c, (ok, reason)) in enumerate(zip(rule.conditions, checks))]
        holds = [ok for ok, _ in checks]
        candidate = not rule.problems() and (not holds or (all(holds) if rule.match == "all" else any(holds)))
        status: Any
        if series.produced_by_node:
            status = "result of this node"
        elif not series.is_image:
            status = "not an image"
        elif series.series_instance_uid in selected:
            status = "selected"
        else:
            status = "candidate" if candidate else "not a candidate"
        results.append(SeriesResult(series=series, status=status, conditions=conditions))
    return results


def test_rule(context: WebContext, rule: Rule, study_instance_uid: str) -> RuleTestResult:
    """Evaluate ``rule`` alone against the stored study ``study_instance_uid`` (saved or not, enabled or not).

    Evaluated by the router's own :func:`~dicom_node.conductor.evaluate_with` (models an admin
    disabled get no job, and the reason says so). Each job carries the check before its model from
    the series header (:func:`~dicom_node.applicability_preview.preview_applicability`, as
    ``dicom-node rules test`` prints it); the worker checks again with the image, which wins.

    KeyError naming the UID when no such study has been received.
    """
    study_id = config_repo.study_id_for_uid(context.sessions, study_instance_uid)
    if study_id is None:
        raise KeyError(f"no study with Study Instance UID {study_instance_uid!r} has been received")
    facts = study_facts(context.sessions, context.settings.spool_dir, study_id)
    defaults = config_repo.default_destination_names(context.sessions)
    catalog = _catalog(context)
    decision = evaluate_with(context.sessions, [rule], facts)
    [outcome] = decision.outcomes
    result = RuleEvaluation(outcome=outcome, jobs=_jobs(decision, facts, defaults, catalog, context))
    if_enabled = None
    evaluated = outcome
    if not rule.enabled:
        enabled = evaluate_with(context.sessions, [rule.model_copy(update={"enabled": True})], facts)
        evaluated = enabled.outcomes[0]
        if_enabled = RuleEvaluation(outcome=evaluated, jobs=_jobs(enabled, facts, defaults, catalog, context))
    return RuleTestResult(
        rule=rule, study_instance_uid=facts.study_instance_uid, study_description=facts.study_description,
        calling_ae_titles=list(facts.calling_ae_titles), called_ae_titles=list(facts.called_ae_titles),
        result=result, if_enabled=if_enabled, conditions=[describe_condition(c) for c in rule.conditions],
        series=_condition_matrix(rule, facts, evaluated.selected_series),
    )


# --------------------------------------------------------------------------- the form


@dataclass
class ConditionRow:
    """One condition row of the form, as text (what the user typed, or a stored condition)."""

    attribute: str = ""
    in_: str = ""
    regex: str = ""
    min: str = ""
    max: str = ""
    negate: bool = False


@dataclass
class RuleForm:
    """The rule form's contents and errors (keyed by element id; ``form`` for the whole form)."""

    name: str = ""
    description: str = ""
    enabled: bool = True
    priority: str = "0"
    match: str = "all"
    series_prefer: str = "thinnest"
    pipelines: list[str] = field(default_factory=list)
    destinations_mode: str = "default"
    destinations: list[str] = field(default_factory=list)
    rows: list[ConditionRow] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)
    row_of_condition: list[int] = field(default_factory=list)

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key, []).append(message)

    @classmethod
    def from_rule(cls, rule: Rule) -> "RuleForm":
        rows = []
        for c in rule.conditions:
            if isinstance(c, RangeCondition):
                rows.append(ConditionRow(attribute=c.attribute, min="" if c.min is None else f"{c.min:g}",
                                         max="" if c.max is None else f"{c.max:g}"))
            else:
                rows.append(ConditionRow(attribute=c.attribute, in_=", ".join(c.in_ or []), regex=c.regex or "",
                                         negate=c.negate))
        rows += [ConditionRow() for _ in range(EXTRA_CONDITION_ROWS)]
        named = rule.destinations != "default"
        return cls(name=rule.name, description=rule.description, enabled=rule.enabled, priority=str(rule.priority),
                   match=rule.match, series_prefer=rule.series.prefer, pipelines=list(rule.pipelines),
                   destinations_mode="named" if named else "default",
                   destinations=list(rule.destinations) if named else [], rows=rows)

    @classmethod
    def blank(cls) -> "RuleForm":
        return cls(rows=[ConditionRow() for _ in range(EXTRA_CONDITION_ROWS)])


FormData = dict[str, list[str]]


async def submitted_form(request: Request) -> FormData:
    """FastAPI dependency: the submitted form as name -> values (the form is parsed once per request)."""
    form = await request.form()
    return {key: [v for v in form.getlist(key) if isinstance(v, str)] for key in form.keys()}


def _one(form: FormData, key: str) -> str:
    values = form.get(key) or [""]
    return values[0]


def parse_rule_form(form: FormData) -> tuple[RuleForm, dict[str, Any]]:
    """The form as typed (to show it again) and the rule definition it describes (to validate).

    Problems only the form can have (a min that is not a number, a regex on a numeric
    attribute, ...) are recorded in ``RuleForm.errors`` at their input.
    """
    state = RuleForm(
        name=_one(form, "name").strip(), description=_one(form, "description"),
        enabled=_one(form, "enabled") in ("on", "true", "1"), priority=_one(form, "priority").strip() or "0",
        match=_one(form, "match") or "all", series_prefer=_one(form, "series-prefer") or "thinnest",
        pipelines=[p for p in form.get("pipelines", []) if p],
        destinations_mode=_one(form, "destinations-mode") or "default",
        destinations=[d for d in form.get("destinations", []) if d],
    )
    try:
        count = min(max(int(_one(form, "cond-rows") or 0), 0), MAX_CONDITION_ROWS)
    except ValueError:
        count = 0
    conditions: list[dict[str, Any]] = []
    for row in range(count):
        item = ConditionRow(
            attribute=_one(form, f"cond-{row}-attribute").strip(), in_=_one(form, f"cond-{row}-in"),
            regex=_one(form, f"cond-{row}-regex"), min=_one(form, f"cond-{row}-min").strip(),
            max=_one(form, f"cond-{row}-max").strip(), negate=_one(form, f"cond-{row}-negate") in ("on", "true", "1"),
        )
        state.rows.append(item)
        condition = _row_condition(state, row, item)
        if condition is not None:
            state.row_of_condition.append(row)
            conditions.append(condition)
    if not any(not (r.attribute or r.in_.strip() or r.regex.strip() or r.min or r.max) for r in state.rows):
        state.rows.append(ConditionRow())  # always leave an empty row for one more condition
    definition: dict[str, Any] = {
        "name": state.name, "description": state.description, "enabled": state.enabled,
        "priority": state.priority, "match": state.match, "series": {"prefer": state.series_prefer},
        "pipelines": state.pipelines, "conditions": conditions,
        "destinations": state.destinations if state.destinations_mode == "named" else "default",
    }
    if state.destinations_mode == "named" and not state.destinations:
        state.error("destinations", "tick at least one destination, or choose 'default destinations'")
    return state, definition


#: The numeric attributes in words ("a, b and c"), for the message of a min/max on a text attribute.
_RANGE_NAMES = ", ".join(RANGE_ATTRIBUTES[:-1]) + f" and {RANGE_ATTRIBUTES[-1]}"


def _row_condition(state: RuleForm, row: int, item: ConditionRow) -> dict[str, Any] | None:
    """The condition of one form row (None for an empty or unusable row; problems go to ``state.errors``)."""
    key = f"cond-{row}"
    has_text, has_regex = bool(item.in_.strip()), bool(item.regex.strip())
    if not item.attribute:
        if has_text or has_regex or item.min or item.max:
            state.error(f"{key}-attribute", "choose the attribute this condition tests, or clear the row")
        return None
    condition: dict[str, Any] = {"attribute": item.attribute}
    usable = True
    if item.attribute in RANGE_ATTRIBUTES:
        for name, present in (("in", has_text), ("regex", has_regex)):
            if present:
                state.error(f"{key}-{name}", f"{item.attribute} is a number: give min and/or max, not '{name}'")
                usable = False
        if item.negate:
            state.error(f"{key}-negate", f"negate applies to text attributes only, not to {item.attribute}")
            usable = False
        for name in ("min", "max"):
            text = getattr(item, name)
            if not text:
                continue
            try:
                condition[name] = float(text)
            except ValueError:
                state.error(f"{key}-{name}", f"{name} {text!r} is not a number")
                usable = False
        if "min" not in condition and "max" not in condition and usable:
            condition["min"] = None  # let the model say what is missing, at the row
    else:
        for name, text in (("min", item.min), ("max", item.max)):
            if text:
                state.error(f"{key}-{name}", f"{name} applies to {_RANGE_NAMES} only; "
                                             f"{item.attribute} is text: use 'in' or 'regex'")
                usable = False
        if has_text:
            condition["in"] = [v.strip() for v in item.in_.split(",") if v.strip()]
        if has_regex:
            condition["regex"] = item.regex
        condition["negate"] = item.negate
    return condition if usable else None


def _place_errors(state: RuleForm, errors: Sequence[FieldError]) -> None:
    """Put validation errors (pydantic locations in the rule) next to the form input they concern."""
    simple = {"name", "description", "enabled", "priority", "match"}
    for location, message in errors:
        head = location[0] if location else None
        if head == "conditions" and len(location) >= 2 and isinstance(location[1], int) \
                and location[1] < len(state.row_of_condition):
            row = state.row_of_condition[location[1]]
            part = location[2] if len(location) > 2 else None
            part = "in" if part == "in_" else part
            key = f"cond-{row}-{part}" if part in ("attribute", "in", "regex", "min", "max", "negate") else f"cond-{row}"
            state.error(key, message)
        elif head == "series":
            state.error("series-prefer", message)
        elif head in ("pipelines", "destinations", "conditions") or head in simple:
            state.error(str(head), message)
        else:
            state.error("form", message)


# --------------------------------------------------------------------------- pages


def _audit_rule(rule: Rule | None) -> dict[str, Any] | None:
    return None if rule is None else rule.model_dump(mode="json", by_alias=True)


def _record_or_404(context: WebContext, name: str) -> config_repo.RuleRecord:
    record = config_repo.get_rule(context.sessions, name)
    if record is None:
        raise HTTPException(404, f"no routing rule named {name!r}")
    return record


def _rule_url(name: str) -> str:
    return f"/rules/{quote(name, safe='')}"


_DONE = {"created": "Rule {} created.", "updated": "Rule {} saved.", "deleted": "Rule {} deleted.",
         "enabled": "Rule {} enabled.", "disabled": "Rule {} disabled.", "moved": "Rule {} moved."}


def _form_page(
    request: Request, context: WebContext, state: RuleForm, *, original: str | None,
    record: config_repo.RuleRecord | None = None, test: RuleTestResult | None = None, test_error: str | None = None,
    study_uid: str = "", status_code: int = 200,
) -> Response:
    pipelines = list(known_pipelines(context.settings))
    pipelines += [p for p in state.pipelines if p not in pipelines]
    destinations = _known_destinations(context)
    destinations += [d for d in state.destinations if d not in destinations]
    return render(
        request, "rule_form.html", status_code=status_code, form=state, original=original, record=record,
        known_pipelines=set(known_pipelines(context.settings)), pipelines=pipelines, destinations=destinations,
        default_destinations=config_repo.default_destination_names(context.sessions),
        text_attributes=list(TEXT_ATTRIBUTES), range_attributes=list(RANGE_ATTRIBUTES),
        studies=repo.list_studies(context.sessions, limit=25), test=test, test_error=test_error, study_uid=study_uid,
        check_view=check_view,
    )


@router.get("/rules", include_in_schema=False)
def rules_page(
    request: Request, q: str = Query("", max_length=200), state: str = Query("", pattern="^(|enabled|disabled)$"),
    done: str = Query(""), rule: str = Query("", max_length=64),
    principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context),
) -> Response:
    records = list(enumerate(config_repo.list_rule_records(context.sessions)))
    total = len(records)
    if q:
        needle = q.lower()
        records = [(i, r) for i, r in records if needle in r.rule.name.lower() or needle in r.rule.description.lower()
                   or any(needle in p.lower() for p in r.rule.pipelines)]
    if state:
        records = [(i, r) for i, r in records if r.rule.enabled == (state == "enabled")]
    message = _DONE[done].format(rule) if done in _DONE and rule else None
    return render(request, "rules.html", records=records, total=total, q=q, state=state, message=message,
                  describe=describe_condition, last=total - 1)


@router.get("/rules/new", include_in_schema=False)
def new_rule_page(
    request: Request, principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context)
) -> Response:
    return _form_page(request, context, RuleForm.blank(), original=None)


def _save_from_form(request: Request, context: WebContext, principal: Principal, form: FormData,
                    original: str | None) -> Response:
    record = None if original is None else _record_or_404(context, original)
    state, definition = parse_rule_form(form)
    rule, errors = validate_rule(definition, pipelines=known_pipelines(context.settings),
                                 destinations=_known_destinations(context),
                                 check_reserved=original is None or state.name != original)
    _place_errors(state, errors)
    if rule is None or state.errors:
        return _form_page(request, context, state, original=original, record=record, status_code=422)
    try:
        before, after = config_repo.save_rule(context.sessions, rule, original_name=original, source=_SOURCE,
                                              now=context.clock())
    except config_repo.NameTaken as exc:
        state.error("name", str(exc))
        return _form_page(request, context, state, original=original, record=record, status_code=409)
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    action = "rule.create" if before is None else "rule.update"
    detail = f"renamed from {original!r}" if original is not None and original != rule.name else None
    audit_event(context, request, principal, action, target_kind="rule", target=rule.name,
                before=_audit_rule(before.rule if before else None), after=_audit_rule(after.rule), detail=detail)
    done = "created" if before is None else "updated"
    return RedirectResponse(f"/rules?done={done}&rule={quote(rule.name)}", status_code=303)


@router.post("/rules", include_in_schema=False)
def create_rule_submit(
    request: Request, form: FormData = Depends(submitted_form), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _save_from_form(request, context, principal, form, None)


def _study_choice(form: FormData | Mapping[str, str]) -> str:
    def get(key: str) -> str:
        value = form.get(key)
        return (value[0] if value else "") if isinstance(value, list) else (value or "")

    return (get("study_instance_uid").strip() or get("study_pick").strip())[:64]


def _test_from_form(request: Request, context: WebContext, form: FormData, original: str | None) -> Response:
    record = None if original is None else _record_or_404(context, original)
    state, definition = parse_rule_form(form)
    rule, errors = validate_rule(definition, pipelines=known_pipelines(context.settings),
                                 destinations=_known_destinations(context), check_reserved=False)
    _place_errors(state, errors)
    study_uid = _study_choice(form)
    if rule is None or state.errors:
        return _form_page(request, context, state, original=original, record=record, study_uid=study_uid,
                          test_error="Fix the errors marked in the form above; then the rule can be tested.", status_code=422)
    if not study_uid:
        return _form_page(request, context, state, original=original, record=record,
                          test_error="Choose a study to test against (a recent one, or type its Study Instance UID).",
                          status_code=422)
    try:
        result = test_rule(context, rule, study_uid)
    except KeyError as exc:
        return _form_page(request, context, state, original=original, record=record, study_uid=study_uid,
                          test_error=str(exc.args[0]), status_code=404)
    return _form_page(request, context, state, original=original, record=record, test=result, study_uid=study_uid)


@router.post("/rules/test", include_in_schema=False)
def test_new_rule_submit(
    request: Request, form: FormData = Depends(submitted_form), principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the new-rule form's content, unsaved."""
    return _test_from_form(request, context, form, None)


@router.get("/rules/{name}", include_in_schema=False)
def rule_page(
    request: Request, name: str, principal: Principal = Depends(require(Role.VIEWER)),
    context: WebContext = Depends(get_context),
) -> Response:
    record = _record_or_404(context, name)
    return _form_page(request, context, RuleForm.from_rule(record.rule), original=name, record=record)


@router.post("/rules/{name}", include_in_schema=False)
def update_rule_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    return _save_from_form(request, context, principal, form, name)


@router.get("/rules/{name}/test", include_in_schema=False)
def test_stored_rule_page(
    request: Request, name: str, study_instance_uid: str = Query("", max_length=64),
    study_pick: str = Query("", max_length=64), principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the rule as stored (nothing changes; only roles that edit rules, see TESTER_ROLE)."""
    record = _record_or_404(context, name)
    state = RuleForm.from_rule(record.rule)
    study_uid = (study_instance_uid.strip() or study_pick.strip())
    if not study_uid:
        return _form_page(request, context, state, original=name, record=record,
                          test_error="Choose a study to test against.", status_code=422)
    try:
        result = test_rule(context, record.rule, study_uid)
    except KeyError as exc:
        return _form_page(request, context, state, original=name, record=record, study_uid=study_uid,
                          test_error=str(exc.args[0]), status_code=404)
    return _form_page(request, context, state, original=name, record=record, test=result, study_uid=study_uid)


@router.post("/rules/{name}/test", include_in_schema=False)
def test_edited_rule_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(TESTER_ROLE)), context: WebContext = Depends(get_context),
) -> Response:
    """Test the edit form's current content (unsaved) against a stored study."""
    return _test_from_form(request, context, form, name)


@router.post("/rules/{name}/delete", include_in_schema=False)
def delete_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    record = _record_or_404(context, name)
    _delete(request, context, principal, record)
    return RedirectResponse(f"/rules?done=deleted&rule={quote(name)}", status_code=303)


def _delete(request: Request, context: WebContext, principal: Principal, record: config_repo.RuleRecord) -> None:
    if not config_repo.delete_rule(context.sessions, record.rule.name):
        raise HTTPException(404, f"no routing rule named {record.rule.name!r}")
    audit_event(context, request, principal, "rule.delete", target_kind="rule", target=record.rule.name,
                before=_audit_rule(record.rule))


def _set_enabled(request: Request, context: WebContext, principal: Principal, name: str, enabled: bool) -> Rule:
    try:
        before, after = config_repo.set_rule_enabled(context.sessions, name, enabled, source=_SOURCE,
                                                     now=context.clock())
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    audit_event(context, request, principal, "rule.enable" if enabled else "rule.disable", target_kind="rule",
                target=name, before=_audit_rule(before.rule), after=_audit_rule(after.rule))
    return after.rule


@router.post("/rules/{name}/enable", include_in_schema=False)
def enable_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    _set_enabled(request, context, principal, name, True)
    return RedirectResponse(f"/rules?done=enabled&rule={quote(name)}", status_code=303)


@router.post("/rules/{name}/disable", include_in_schema=False)
def disable_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    _set_enabled(request, context, principal, name, False)
    return RedirectResponse(f"/rules?done=disabled&rule={quote(name)}", status_code=303)


@router.post("/rules/{name}/move", include_in_schema=False)
def move_rule_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    direction = _one(form, "direction")
    if direction not in ("up", "down"):
        raise HTTPException(422, f"direction must be 'up' or 'down', got {direction[:20]!r}")
    try:
        before, after = config_repo.move_rule(context.sessions, name, direction)  # type: ignore[arg-type]
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    if before != after:
        audit_event(context, request, principal, "rule.reorder", target_kind="rule", target=name, before=before,
                    after=after, detail=f"moved {direction}")
    return RedirectResponse(f"/rules?done=moved&rule={quote(name)}", status_code=303)


# --------------------------------------------------------------------------- API

_RULE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Rule"}}}}}
_ERRORS = {404: {"description": "No rule of that name"}, 409: {"description": "The name is taken"},
           422: {"description": "Invalid definition: `errors` lists each field (e.g. `conditions.1.regex`)"}}


class RuleTestRequest(BaseModel):
    """Test a rule definition (saved or not) against a stored study."""

    rule: dict[str, Any] = Field(description="A routing rule definition (the Rule schema).")
    study_instance_uid: str = Field(min_length=1, max_length=64)


class StoredRuleTestRequest(BaseModel):
    study_instance_uid: str = Field(min_length=1, max_length=64)


def _api_save(request: Request, context: WebContext, principal: Principal, body: Any,
              original: str | None) -> Response:
    if original is not None and config_repo.get_rule(context.sessions, original) is None:
        raise HTTPException(404, f"no routing rule named {original!r}")
    renamed = original is None or not isinstance(body, dict) or body.get("name") != original
    rule, errors = validate_rule(body, pipelines=known_pipelines(context.settings),
                                 destinations=_known_destinations(context), check_reserved=renamed)
    if rule is None:
        name = body.get("name") if isinstance(body, dict) else None
        return invalid_response(f"routing rule {name[:64]!r}" if isinstance(name, str) else "routing rule", errors)
    try:
        before, after = config_repo.save_rule(context.sessions, rule, original_name=original, source="api",
                                              now=context.clock())
    except config_repo.NameTaken as exc:
        raise HTTPException(409, str(exc)) from exc
    except config_repo.ConfigNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    detail = f"renamed from {original!r}" if original is not None and original != rule.name else None
    audit_event(context, request, principal, "rule.create" if before is None else "rule.update", target_kind="rule",
                target=rule.name, before=_audit_rule(before.rule if before else None), after=_audit_rule(after.rule),
                detail=detail)
    return JSONResponse(_audit_rule(after.rule), status_code=201 if before is None else 200)


@router.get("/api/v1/rules", tags=["rules"], response_model=list[Rule])
def api_list_rules(
    principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> list[Rule]:
    """Every routing rule, in evaluation order (among rules of equal priority)."""
    return config_repo.list_rules(context.sessions)


@router.post("/api/v1/rules", tags=["rules"], status_code=201, response_model=Rule, openapi_extra=_RULE_BODY,
             responses=_ERRORS)
def api_create_rule(
    request: Request, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Add a rule (it goes last in the order)."""
    return _api_save(request, context, principal, body, None)


@router.put("/api/v1/rules/order", tags=["rules"], response_model=list[str], responses=_ERRORS)
def api_reorder_rules(
    request: Request, names: list[str] = Body(..., description="Every rule name once, in the new order."),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    """Set the order of all rules (it decides among rules of equal priority)."""
    try:
        before, after = config_repo.reorder_rules(context.sessions, names)
    except ValueError as exc:
        return invalid_response("rule order", [(("names",), str(exc))])
    if before != after:
        audit_event(context, request, principal, "rule.reorder", target_kind="rule", target=None, before=before,
                    after=after)
    return JSONResponse(after)


@router.post("/api/v1/rules/test", tags=["rules"], response_model=RuleTestResult, responses=_ERRORS)
def api_test_rule(
    body: RuleTestRequest, principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test a rule definition (saved or not, enabled or not) against a stored study; nothing is saved."""
    rule, errors = validate_rule(body.rule, pipelines=known_pipelines(context.settings),
                                 destinations=_known_destinations(context), check_reserved=False)
    if rule is None:
        return invalid_response("routing rule", [(("rule", *loc), msg) for loc, msg in errors])
    try:
        result = test_rule(context, rule, body.study_instance_uid)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from exc
    return JSONResponse(result.model_dump(mode="json", by_alias=True))


@router.get("/api/v1/rules/{name}", tags=["rules"], response_model=Rule, responses=_ERRORS)
def api_get_rule(
    name: str, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Rule:
    return _record_or_404(context, name).rule


@router.put("/api/v1/rules/{name}", tags=["rules"], response_model=Rule, openapi_extra=_RULE_BODY,
            responses=_ERRORS)
def api_update_rule(
    request: Request, name: str, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Replace the rule called ``name``; a different ``name`` in the body renames it (keeping its position)."""
    return _api_save(request, context, principal, body, name)


@router.delete("/api/v1/rules/{name}", tags=["rules"], status_code=204, responses=_ERRORS)
def api_delete_rule(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    _delete(request, context, principal, _record_or_404(context, name))
    return Response(status_code=204)


@router.post("/api/v1/rules/{name}/test", tags=["rules"], response_model=RuleTestResult, responses=_ERRORS)
def api_test_stored_rule(
    name: str, body: StoredRuleTestRequest, principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the stored rule against a stored study; nothing changes (admins only, see TESTER_ROLE)."""
    record = _record_or_404(context, name)
    try:
        result = test_rule(context, record.rule, body.study_instance_uid)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from exc
    return JSONResponse(result.model_dump(mode="json", by_alias=True))
