"""Routing rules: validated, saved and audited in one place for the web pages, the API, the CLI and YAML import.

Why: a rule naming a model the registry does not list, or a destination that does not
exist, is refused wherever it comes from, with the same message naming the field and
the value (``pipelines.1: unknown pipeline 'x'; the model registry lists ...``). The
known pipelines are the model registry's ids (:class:`dicom_node.model_catalog.ModelCatalog`,
the registry the workers load), never a second reading of ``models.yaml``.

Beyond :class:`dicom_node.routing.Rule`'s own validation each condition is checked on
its own (an error in the second condition is reported at ``conditions.1...``, all bad
conditions at once), lengths are limited, and names the web UI's addresses use are reserved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service.base import Actor, AuditedStore, FieldError, Refused, pydantic_errors, pydantic_message
from dicom_node.db import config_repo
from dicom_node.model_catalog import ModelCatalog
from dicom_node.routing import RangeCondition, Rule, TextCondition, condition_model, known_attributes

__all__ = [
    "MAX_PIPELINES",
    "RESERVED_RULE_NAMES",
    "RulesService",
    "known_pipelines",
    "model_registry",
    "validate_rule",
]

logger = logging.getLogger(__name__)

#: Names the UI's and API's own URLs use (``/rules/new``, ``/rules/test``, ``/api/v1/rules/order``).
RESERVED_RULE_NAMES = frozenset({"new", "test", "order"})
MAX_DESCRIPTION = 1000
MAX_IN_VALUES = 100
MAX_IN_VALUE = 200
MAX_PIPELINES = 20


# --------------------------------------------------------------------------- what rules may refer to


def model_registry(models_file: Path | None) -> ModelCatalog | str:
    """The model registry the workers load (``routing.models_file``, else the demo models), or why it cannot be
    read (the rule tester shows the reason at each job's check)."""
    try:
        return ModelCatalog.configured(models_file)
    except (ValueError, OSError) as exc:  # ModelRegistryError is a ValueError
        return f"the model registry cannot be read: {exc}"


def known_pipelines(models_file: Path | None) -> tuple[str, ...]:
    """The model ids rules may name: the registry's ids. An unreadable registry gives () and pipelines are then
    not checked (the workers refuse to start on a broken registry and say why)."""
    registry = model_registry(models_file)
    if isinstance(registry, str):
        logger.warning("pipelines of routing rules are not checked: %s", registry)
        return ()
    return registry.ids


# --------------------------------------------------------------------------- validation


def _message(error: Any) -> str:
    """pydantic's message; a bad rule name says what a name may hold."""
    if error.get("type") == "string_pattern_mismatch" and tuple(error.get("loc", ()))[-1:] == ("name",):
        return (f"rule name {error.get('input')!r} must start with a letter or digit and hold only letters, digits, "
                "spaces, '_', '.' or '-'")
    return pydantic_message(error)


def _validate_condition(index: int, item: Any) -> tuple[TextCondition | RangeCondition | None, list[FieldError]]:
    where: tuple[str | int, ...] = ("conditions", index)
    if not isinstance(item, dict):
        return None, [(where, f"condition {index} must be a mapping, got {item!r:.80}")]
    attribute = item.get("attribute")
    model = condition_model(attribute)
    if model is None:
        return None, [(where + ("attribute",), f"unknown attribute {attribute!r:.80}; known: {known_attributes()}")]
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
        return None, pydantic_errors(exc, where, _message)


def validate_rule(
    data: Any, *, pipelines: Sequence[str], destinations: Collection[str], check_reserved: bool = True,
) -> tuple[Rule | None, list[FieldError]]:
    """The rule ``data`` describes, or every problem with it, each at its own location.

    ``pipelines``: the model ids a rule may name (not checked when empty); ``destinations``:
    the destination names it may name; ``check_reserved``: refuse names the web UI's URLs use.
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
        errors += pydantic_errors(exc, (), _message)
    errors += _reference_errors(data, pipelines=pipelines, destinations=destinations, check_reserved=check_reserved)
    return (None, errors) if errors or rule is None else (rule, [])


def _reference_errors(data: dict[str, Any], *, pipelines: Sequence[str], destinations: Collection[str],
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
                                                        f"{', '.join(sorted(destinations)) or 'none yet'})"))
    return errors


# --------------------------------------------------------------------------- the service


class RulesService(AuditedStore[Rule]):
    """Validate, save and audit routing rules (pages, API, CLI and YAML import alike)."""

    kind = "rule"
    noun = "routing rule"

    def __init__(self, sessions: sessionmaker[Session], *, models_file: Path | None,
                 clock: Callable[[], datetime]) -> None:
        super().__init__(sessions, clock=clock)
        self.models_file = models_file

    # ------------------------------------------------------------------ references

    def known_pipelines(self) -> tuple[str, ...]:
        return known_pipelines(self.models_file)

    def known_destinations(self) -> list[str]:
        return [d.name for d in config_repo.list_destinations(self.sessions)]

    # ------------------------------------------------------------------ AuditedStore

    def stored(self, name: str) -> Rule | None:
        record = config_repo.get_rule(self.sessions, name)
        return None if record is None else record.rule

    def record_of(self, name: str) -> config_repo.RuleRecord:
        """The stored rule with its position and source; Refused (404) naming it otherwise."""
        record = config_repo.get_rule(self.sessions, name)
        if record is None:
            raise Refused.not_found(f"no routing rule named {name!r}")
        return record

    def problems(self, data: Any, *, stored: Rule | None, original: str | None,
                 check_reserved: bool | None = None) -> tuple[Rule | None, list[FieldError]]:
        """Checked as saved: a new name may not be reserved (``check_reserved`` None); an unsaved rule under test
        passes ``check_reserved=False``."""
        if check_reserved is None:
            check_reserved = original is None or not isinstance(data, dict) or data.get("name") != original
        return validate_rule(data, pipelines=self.known_pipelines(), destinations=self.known_destinations(),
                             check_reserved=check_reserved)

    def check(self, data: Any, *, check_reserved: bool = True) -> tuple[Rule | None, list[FieldError]]:
        """The rule ``data`` describes or its problems, nothing saved (the tester, a form with its own errors)."""
        return self.problems(data, stored=None, original=None, check_reserved=check_reserved)

    def write(self, item: Rule, *, original: str | None, actor: Actor) -> Rule | None:
        try:
            before, _ = config_repo.save_rule(self.sessions, item, original_name=original, source=actor.source,
                                              now=self.clock())
        except config_repo.NameTaken as exc:
            raise Refused.conflict(str(exc), ("name",)) from exc
        except config_repo.ConfigNotFound as exc:
            raise Refused.not_found(str(exc)) from exc
        return None if before is None else before.rule

    def remove(self, name: str) -> bool:
        return config_repo.delete_rule(self.sessions, name)

    def name_of(self, item: Rule) -> str:
        return item.name

    def state(self, item: Rule) -> dict[str, Any]:
        return item.model_dump(mode="json", by_alias=True)

    # ------------------------------------------------------------------ rule-only changes

    def set_enabled(self, name: str, enabled: bool, actor: Actor) -> Rule:
        """Enable or disable ``name`` (audited ``rule.enable``/``rule.disable``); Refused 404."""
        try:
            before, after = config_repo.set_rule_enabled(self.sessions, name, enabled, source=actor.source,
                                                         now=self.clock())
        except config_repo.ConfigNotFound as exc:
            raise Refused.not_found(str(exc)) from exc
        self.record(actor, "enable" if enabled else "disable", name, before=self.state(before.rule),
                    after=self.state(after.rule))
        return after.rule

    def move(self, name: str, direction: Literal["up", "down"], actor: Actor) -> list[str]:
        """Swap ``name`` with its neighbour (audited ``rule.reorder`` when the order changed); the new order."""
        if direction not in ("up", "down"):
            raise Refused.invalid("move", [(("direction",), f"direction must be 'up' or 'down', got "
                                                            f"{str(direction)[:20]!r}")])
        try:
            before, after = config_repo.move_rule(self.sessions, name, direction)
        except config_repo.ConfigNotFound as exc:
            raise Refused.not_found(str(exc)) from exc
        if before != after:
            self.record(actor, "reorder", name, before=before, after=after, detail=f"moved {direction}")
        return after

    def reorder(self, names: Sequence[str], actor: Actor) -> list[str]:
        """Put every rule in the order of ``names`` (audited ``rule.reorder``); Refused 422 at ``names``."""
        try:
            before, after = config_repo.reorder_rules(self.sessions, names)
        except ValueError as exc:
            raise Refused.invalid("rule order", [(("names",), str(exc))]) from exc
        if before != after:
            self.record(actor, "reorder", None, before=before, after=after)
        return after

    def import_problems(self, rules: Sequence[Rule], *,
                        also_destinations: Collection[str] = ()) -> list[FieldError]:
        """Every problem a save would find in the rules of a file, at ``rules.<index>.<field>``.

        ``also_destinations``: names about to be imported with the rules (a node's start imports the
        destinations file first).
        """
        pipelines, destinations = self.known_pipelines(), {*self.known_destinations(), *also_destinations}
        errors: list[FieldError] = []
        for index, rule in enumerate(rules):
            _, problems = validate_rule(self.state(rule), pipelines=pipelines, destinations=destinations)
            errors += [(("rules", index, *location), message) for location, message in problems]
        return errors

    def import_rules(self, rules: Sequence[Rule], actor: Actor, *, also_destinations: Collection[str] = ()) -> int:
        """Check every rule of a file as a save would (:meth:`import_problems`), then insert or replace them by
        name in file order, auditing each rule that changed; the number changed. Refused (422) listing every
        problem, and nothing is stored."""
        errors = self.import_problems(rules, also_destinations=also_destinations)
        if errors:
            raise Refused.invalid("rules", errors)
        before = {record.rule.name: record.rule for record in config_repo.list_rule_records(self.sessions)}
        config_repo.upsert_rules(self.sessions, rules, source=actor.source, now=self.clock())
        changed = 0
        for rule in rules:
            old = before.get(rule.name)
            old_state = None if old is None else self.state(old)
            if old_state != self.state(rule):
                changed += 1
                self.record(actor, "create" if old is None else "update", rule.name, before=old_state,
                            after=self.state(rule))
        return changed
