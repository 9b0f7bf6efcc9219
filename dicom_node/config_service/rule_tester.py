"""The rule tester: what a routing rule (saved or not, enabled or not) does with a stored study, and why.

Why: an admin who edits a rule wants to see, before saving, which series it selects and
which jobs it creates. The tester runs the router's own :func:`dicom_node.conductor.evaluate_with`
on the router's own :func:`dicom_node.study_facts.study_facts` of a stored study, so what an
admin tests is what the router does; each condition is checked on its own with the router's
per-condition check, and for each job the header-only check before its model is shown
(the worker's own decision, :mod:`dicom_node.applicability_preview`). Nothing is saved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.applicability_preview import JobCheck, preview_applicability
from dicom_node.conductor import evaluate_with
from dicom_node.config_service.rules import model_registry
from dicom_node.db import config_repo
from dicom_node.model_catalog import ModelCatalog
from dicom_node.model_declarations import NO_REGION_WARNING
from dicom_node.model_domain import Applicability
from dicom_node.routing import (
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

__all__ = ["ConditionResult", "JobPreview", "RuleEvaluation", "RuleTestResult", "SeriesResult",
           "describe_condition", "test_rule"]

logger = logging.getLogger(__name__)


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


def _jobs(decision: RoutingDecision, facts: StudyFacts, defaults: list[str], catalog: _Catalog,
          settings: Settings) -> list[JobPreview]:
    numbers = {s.series_instance_uid: s.series_number for s in facts.series}
    if isinstance(catalog, str):
        checks = [JobCheck(job, None, None, catalog) for job in decision.jobs]
    else:
        checks = preview_applicability(catalog, settings.applicability.synonym_table(), facts, decision.jobs)

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


def test_rule(sessions: sessionmaker[Session], settings: Settings, rule: Rule,
              study_instance_uid: str) -> RuleTestResult:
    """Evaluate ``rule`` alone against the stored study ``study_instance_uid`` (saved or not, enabled or not).

    Evaluated by the router's own :func:`~dicom_node.conductor.evaluate_with` (models an admin
    disabled get no job, and the reason says so). Each job carries the check before its model from
    the series header (:func:`~dicom_node.applicability_preview.preview_applicability`, as
    ``dicom-node rules test`` prints it); the worker checks again with the image, which wins.

    KeyError naming the UID when no such study has been received.
    """
    study_id = config_repo.study_id_for_uid(sessions, study_instance_uid)
    if study_id is None:
        raise KeyError(f"no study with Study Instance UID {study_instance_uid!r} has been received")
    facts = study_facts(sessions, settings.spool_dir, study_id)
    defaults = config_repo.default_destination_names(sessions)
    catalog = model_registry(settings.routing.models_file)
    decision = evaluate_with(sessions, [rule], facts)
    [outcome] = decision.outcomes
    result = RuleEvaluation(outcome=outcome, jobs=_jobs(decision, facts, defaults, catalog, settings))
    if_enabled = None
    evaluated = outcome
    if not rule.enabled:
        enabled = evaluate_with(sessions, [rule.model_copy(update={"enabled": True})], facts)
        evaluated = enabled.outcomes[0]
        if_enabled = RuleEvaluation(outcome=evaluated, jobs=_jobs(enabled, facts, defaults, catalog, settings))
    return RuleTestResult(
        rule=rule, study_instance_uid=facts.study_instance_uid, study_description=facts.study_description,
        calling_ae_titles=list(facts.calling_ae_titles), called_ae_titles=list(facts.called_ae_titles),
        result=result, if_enabled=if_enabled, conditions=[describe_condition(c) for c in rule.conditions],
        series=_condition_matrix(rule, facts, evaluated.selected_series),
    )


test_rule.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
