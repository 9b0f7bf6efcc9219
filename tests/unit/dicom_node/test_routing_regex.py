"""Routing regexes are bounded: RE2 (no backtracking), refused when saved if RE2 cannot run them.

Issue 20, item 5: a rule with ``(a+)+$`` on the study description froze the whole node
for a description of 40 ``a`` and a ``!``. These tests hold the evaluator, the rule
validation (files, the CLI) and rules stored before the change to that.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.app.cli import main
from dicom_node.config_files import ConfigFileError, load_rules_file
from dicom_node.routing import (
    MAX_REGEX_LENGTH,
    Rule,
    SeriesFacts,
    StudyFacts,
    evaluate,
    load_stored_rule,
)

CATASTROPHIC = "(a+)+$"


def facts(description: str) -> StudyFacts:
    return StudyFacts(study_instance_uid="1.2.3", study_description=description, series=(
        SeriesFacts(series_instance_uid="1.2.3.1", modality="CT", instance_count=20),))


def rule_with(regex: str, **condition: object) -> Rule:
    return Rule.model_validate({"name": "descr", "pipelines": ["seg"], "conditions": [
        {"attribute": "study_description", "regex": regex, **condition}]})


def test_the_catastrophic_backtracking_pattern_is_decided_at_once() -> None:
    rules = [rule_with(CATASTROPHIC)]
    started = time.perf_counter()
    decision = evaluate(rules, facts("a" * 40 + "!"))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"evaluate took {elapsed:.1f} s"
    assert decision.jobs == () and "is not matching /(a+)+$/" in decision.outcomes[0].reasons[0]
    assert [j.pipeline for j in evaluate(rules, facts("a" * 40)).jobs] == ["seg"]


def test_matching_stays_case_insensitive_and_unanchored() -> None:
    chest = [rule_with("chest|thorax")]
    assert evaluate(chest, facts("CT THORAX w/o")).jobs
    assert evaluate(chest, facts("Low-dose Chest")).jobs
    assert not evaluate(chest, facts("abdomen")).jobs
    assert evaluate([rule_with("^ct$")], facts("CT")).jobs
    assert not evaluate([rule_with("^ct$")], facts("CT CHEST")).jobs
    assert evaluate([rule_with("étude")], facts("ÉTUDE THORACIQUE")).jobs  # case folding beyond ASCII


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(chest)\1", "backreferences"),
        (r"(?P<part>ab)(?P=part)", "backreferences"),
        (r"chest(?=x)", "lookaround"),
        (r"(?<!no )chest", "lookaround"),
        (r"chest\Z", r"\z"),
        ("(unclosed", "does not compile"),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_condition_and_the_pattern(pattern: str, why: str) -> None:
    with pytest.raises(ValidationError) as caught:
        rule_with(pattern)
    [error] = caught.value.errors()
    assert error["loc"] == ("conditions",)
    message = str(error["msg"])
    assert message.startswith("Value error, condition 0 (study_description): regex ")
    assert repr(pattern) in message and why in message


def test_overlong_patterns_are_refused() -> None:
    rule_with("a" * MAX_REGEX_LENGTH)
    with pytest.raises(ValidationError, match=f"at most {MAX_REGEX_LENGTH}"):
        rule_with("a" * (MAX_REGEX_LENGTH + 1))


def test_a_rule_stored_before_re2_loads_and_never_matches_with_the_reason() -> None:
    stored = ('{"name": "old", "pipelines": ["seg"], "conditions": '
              '[{"attribute": "study_description", "regex": "(chest)\\\\1", "negate": true}]}')
    with pytest.raises(ValidationError):
        Rule.model_validate_json(stored)  # refused as a new definition
    old = load_stored_rule(stored)
    assert old.conditions[0].regex == r"(chest)\1"  # type: ignore[union-attr]
    assert old.problems() == [
        "condition 0 (study_description): regex '(chest)\\\\1' cannot be used: backreferences (\\1, (?P=name)) "
        "are not supported by the node's regex engine (RE2)"]
    decision = evaluate([old], facts("abdomen"))  # negate must not turn an unusable pattern into a match
    [outcome] = decision.outcomes
    assert not outcome.matched and decision.jobs == ()
    assert "rule cannot be applied" in outcome.reasons[0] and "(chest)\\\\1" in outcome.reasons[0]
    assert "rule cannot be applied" in (decision.ignored_reason or "")


def test_rules_files_and_the_cli_refuse_a_backreference_naming_rule_condition_and_pattern(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: ok\n    pipelines: [a]\n  - name: echo\n    pipelines: [a]\n"
                     "    conditions:\n      - {attribute: modality, in: [CT]}\n"
                     "      - {attribute: series_description, regex: '(ax)\\1'}\n")
    with pytest.raises(ConfigFileError) as caught:
        load_rules_file(rules)
    message = str(caught.value)
    assert f"rules file {rules} is invalid" in message
    assert "rules[1] ('echo'): conditions: Value error, condition 1 (series_description): regex '(ax)\\\\1' " \
           "cannot be used: backreferences" in message
    assert main(["db", "upgrade", "--data-dir", str(tmp_path / "data")]) == 0  # the CLI creates no database
    capsys.readouterr()
    assert main(["rules", "import", str(rules), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "rules[1] ('echo'): conditions: Value error, condition 1 (series_description)" in err
    assert "backreferences" in err
    assert main(["rules", "list", "--data-dir", str(tmp_path / "data")]) == 0
    assert "echo" not in capsys.readouterr().out  # nothing of the refused file was imported
