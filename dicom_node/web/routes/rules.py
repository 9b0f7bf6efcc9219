"""Routing rules in the admin UI and the REST API: list, edit, enable/disable, reorder, delete, test.

Why: admins change which studies go to which AI pipelines without editing YAML on the
server. Routes here only parse and render: the form or JSON body becomes a rule
definition, :class:`dicom_node.config_service.RulesService` validates it (each error at
its field, ``conditions.1.regex`` is the regex input of condition row 1; unknown models
and destinations refused as the CLI and the YAML import refuse them), saves it and
audits it with the rule before and after; the tester is
:func:`dicom_node.config_service.rule_tester.test_rule` (the router's own evaluation).

The form needs no JavaScript: condition rows are numbered inputs (``cond-<row>-<field>``,
with ``cond-<row>-<field>-error`` holding that field's error), and a few empty rows are
always offered for new conditions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from dicom_node.config_service import Refused, RulesService
from dicom_node.config_service.base import FieldError
from dicom_node.config_service.rule_tester import RuleTestResult, describe_condition, test_rule
from dicom_node.db import config_repo, repo
from dicom_node.db.job_checks import ApplicabilityView, applicability_view
from dicom_node.db.models import Role
from dicom_node.model_domain import Applicability
from dicom_node.routing import RANGE_ATTRIBUTES, TEXT_ATTRIBUTES, RangeCondition, Rule
from dicom_node.web.auth import Principal, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.routes.config_edit import (
    FormData,
    actor,
    api_delete,
    api_save,
    form_save,
    invalid_json,
    one,
    or_404,
    refused_json,
    rules_service,
    submitted_form,
)

__all__ = ["FormData", "RuleForm", "parse_rule_form", "router", "submitted_form"]

logger = logging.getLogger(__name__)

router = APIRouter()

#: Who may run the rule tester: the role that edits rules. A test reads one header per series of
#: the study and evaluates the rule in a web request thread; viewers must not be able to make
#: the node do that work on demand (issue 20).
TESTER_ROLE = Role.ADMIN
#: Empty condition rows the form offers beyond the rule's own conditions.
EXTRA_CONDITION_ROWS = 3
MAX_CONDITION_ROWS = 50


def check_view(applicability: Applicability) -> ApplicabilityView:
    """A decision as the study page shows a job's checks (reason in words, passed/failed/unknown)."""
    view = applicability_view({"applicability": applicability.as_record()})
    assert view is not None  # a record of Applicability is always readable
    return view


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


def parse_rule_form(form: FormData) -> tuple[RuleForm, dict[str, Any]]:
    """The form as typed (to show it again) and the rule definition it describes (to validate).

    Problems only the form can have (a min that is not a number, a regex on a numeric
    attribute, ...) are recorded in ``RuleForm.errors`` at their input.
    """
    state = RuleForm(
        name=one(form, "name").strip(), description=one(form, "description"),
        enabled=one(form, "enabled") in ("on", "true", "1"), priority=one(form, "priority").strip() or "0",
        match=one(form, "match") or "all", series_prefer=one(form, "series-prefer") or "thinnest",
        pipelines=[p for p in form.get("pipelines", []) if p],
        destinations_mode=one(form, "destinations-mode") or "default",
        destinations=[d for d in form.get("destinations", []) if d],
    )
    try:
        count = min(max(int(one(form, "cond-rows") or 0), 0), MAX_CONDITION_ROWS)
    except ValueError:
        count = 0
    conditions: list[dict[str, Any]] = []
    for row in range(count):
        item = ConditionRow(
            attribute=one(form, f"cond-{row}-attribute").strip(), in_=one(form, f"cond-{row}-in"),
            regex=one(form, f"cond-{row}-regex"), min=one(form, f"cond-{row}-min").strip(),
            max=one(form, f"cond-{row}-max").strip(), negate=one(form, f"cond-{row}-negate") in ("on", "true", "1"),
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


def _rule_url(name: str) -> str:
    return f"/rules/{quote(name, safe='')}"


_DONE = {"created": "Rule {} created.", "updated": "Rule {} saved.", "deleted": "Rule {} deleted.",
         "enabled": "Rule {} enabled.", "disabled": "Rule {} disabled.", "moved": "Rule {} moved."}


def _form_page(
    request: Request, context: WebContext, state: RuleForm, *, original: str | None,
    record: config_repo.RuleRecord | None = None, test: RuleTestResult | None = None, test_error: str | None = None,
    study_uid: str = "", status_code: int = 200,
) -> Response:
    service = rules_service(context)
    known = service.known_pipelines()
    pipelines = [*known, *(p for p in state.pipelines if p not in known)]
    destinations = service.known_destinations()
    destinations += [d for d in state.destinations if d not in destinations]
    return render(
        request, "rule_form.html", status_code=status_code, form=state, original=original, record=record,
        known_pipelines=set(known), pipelines=pipelines, destinations=destinations,
        default_destinations=config_repo.default_destination_names(context.sessions),
        text_attributes=list(TEXT_ATTRIBUTES), range_attributes=list(RANGE_ATTRIBUTES),
        studies=repo.list_studies(context.sessions, limit=25), test=test, test_error=test_error, study_uid=study_uid,
        check_view=check_view,
    )


def _record(context: WebContext, name: str) -> config_repo.RuleRecord:
    return or_404(lambda: rules_service(context).record_of(name))


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
    record = None if original is None else _record(context, original)
    service = rules_service(context)
    state, definition = parse_rule_form(form)

    def refused(exc: Refused) -> Response:
        if exc.status == 409:
            state.error("name", exc.message)
        else:
            _place_errors(state, exc.errors)
        return _form_page(request, context, state, original=original, record=record, status_code=exc.status)

    if state.errors:  # the form's own problems, shown with the rule's
        _, errors = service.problems(definition, stored=None, original=original)
        return refused(Refused.invalid("routing rule", errors))
    return form_save(service, request, principal, definition, original=original, refused=refused,
                     done=lambda rule, created: f"/rules?done={'created' if created else 'updated'}"
                                                f"&rule={quote(rule.name)}")


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


def _tested_page(request: Request, context: WebContext, state: RuleForm, rule: Rule, study_uid: str, *,
                 original: str | None, record: config_repo.RuleRecord | None) -> Response:
    """The form with the result of testing ``rule`` against ``study_uid`` (or why it could not be tested)."""
    if not study_uid:
        return _form_page(request, context, state, original=original, record=record, status_code=422,
                          test_error="Choose a study to test against (a recent one, or type its Study Instance UID).")
    try:
        result = test_rule(context.sessions, context.settings, rule, study_uid)
    except KeyError as exc:
        return _form_page(request, context, state, original=original, record=record, study_uid=study_uid,
                          test_error=str(exc.args[0]), status_code=404)
    return _form_page(request, context, state, original=original, record=record, test=result, study_uid=study_uid)


def _test_from_form(request: Request, context: WebContext, form: FormData, original: str | None) -> Response:
    record = None if original is None else _record(context, original)
    state, definition = parse_rule_form(form)
    rule, errors = rules_service(context).check(definition, check_reserved=False)
    _place_errors(state, errors)
    study_uid = _study_choice(form)
    if rule is None or state.errors:
        return _form_page(request, context, state, original=original, record=record, study_uid=study_uid,
                          test_error="Fix the errors marked in the form above; then the rule can be tested.", status_code=422)
    return _tested_page(request, context, state, rule, study_uid, original=original, record=record)


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
    record = _record(context, name)
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
    record = _record(context, name)
    state = RuleForm.from_rule(record.rule)
    study_uid = (study_instance_uid.strip() or study_pick.strip())
    if not study_uid:
        return _form_page(request, context, state, original=name, record=record,
                          test_error="Choose a study to test against.", status_code=422)
    return _tested_page(request, context, state, record.rule, study_uid, original=name, record=record)


@router.post("/rules/{name}/test", include_in_schema=False)
def test_edited_rule_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(TESTER_ROLE)), context: WebContext = Depends(get_context),
) -> Response:
    """Test the edit form's current content (unsaved) against a stored study."""
    return _test_from_form(request, context, form, name)


def _change(context: WebContext, name: str, done: str, change: Callable[[RulesService], object]) -> Response:
    """Run a one-button change through the service; back to the list saying what was done (404/422 as pages)."""
    or_404(lambda: change(rules_service(context)))
    return RedirectResponse(f"/rules?done={done}&rule={quote(name)}", status_code=303)


@router.post("/rules/{name}/delete", include_in_schema=False)
def delete_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _change(context, name, "deleted",
                   lambda service: service.delete(name, actor(request, principal)))


@router.post("/rules/{name}/enable", include_in_schema=False)
def enable_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _change(context, name, "enabled",
                   lambda service: service.set_enabled(name, True, actor(request, principal)))


@router.post("/rules/{name}/disable", include_in_schema=False)
def disable_rule_submit(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return _change(context, name, "disabled",
                   lambda service: service.set_enabled(name, False, actor(request, principal)))


@router.post("/rules/{name}/move", include_in_schema=False)
def move_rule_submit(
    request: Request, name: str, form: FormData = Depends(submitted_form),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    direction: Any = one(form, "direction")
    return _change(context, name, "moved",
                   lambda service: service.move(name, direction, actor(request, principal)))


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


def _api_test(context: WebContext, rule: Rule, study_instance_uid: str) -> Response:
    try:
        result = test_rule(context.sessions, context.settings, rule, study_instance_uid)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from exc
    return JSONResponse(result.model_dump(mode="json", by_alias=True))


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
    return api_save(rules_service(context), request, principal, body, None)


@router.put("/api/v1/rules/order", tags=["rules"], response_model=list[str], responses=_ERRORS)
def api_reorder_rules(
    request: Request, names: list[str] = Body(..., description="Every rule name once, in the new order."),
    principal: Principal = Depends(require(Role.ADMIN)), context: WebContext = Depends(get_context),
) -> Response:
    """Set the order of all rules (it decides among rules of equal priority)."""
    try:
        return JSONResponse(rules_service(context).reorder(names, actor(request, principal, api=True)))
    except Refused as exc:
        return refused_json(exc)


@router.post("/api/v1/rules/test", tags=["rules"], response_model=RuleTestResult, responses=_ERRORS)
def api_test_rule(
    body: RuleTestRequest, principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test a rule definition (saved or not, enabled or not) against a stored study; nothing is saved."""
    rule, errors = rules_service(context).check(body.rule, check_reserved=False)
    if rule is None:
        return invalid_json("routing rule", [(("rule", *loc), msg) for loc, msg in errors])
    return _api_test(context, rule, body.study_instance_uid)


@router.get("/api/v1/rules/{name}", tags=["rules"], response_model=Rule, responses=_ERRORS)
def api_get_rule(
    name: str, principal: Principal = Depends(require(Role.VIEWER)), context: WebContext = Depends(get_context)
) -> Rule:
    return _record(context, name).rule


@router.put("/api/v1/rules/{name}", tags=["rules"], response_model=Rule, openapi_extra=_RULE_BODY,
            responses=_ERRORS)
def api_update_rule(
    request: Request, name: str, body: Any = Body(...), principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Replace the rule called ``name``; a different ``name`` in the body renames it (keeping its position)."""
    return api_save(rules_service(context), request, principal, body, name)


@router.delete("/api/v1/rules/{name}", tags=["rules"], status_code=204, responses=_ERRORS)
def api_delete_rule(
    request: Request, name: str, principal: Principal = Depends(require(Role.ADMIN)),
    context: WebContext = Depends(get_context),
) -> Response:
    return api_delete(rules_service(context), request, principal, name)


@router.post("/api/v1/rules/{name}/test", tags=["rules"], response_model=RuleTestResult, responses=_ERRORS)
def api_test_stored_rule(
    name: str, body: StoredRuleTestRequest, principal: Principal = Depends(require(TESTER_ROLE)),
    context: WebContext = Depends(get_context),
) -> Response:
    """Test the stored rule against a stored study; nothing changes (admins only, see TESTER_ROLE)."""
    return _api_test(context, _record(context, name).rule, body.study_instance_uid)
