"""Routing rules: validation when loaded, and the pure evaluator the router and `rules test` share."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.config_files import ConfigFileError, load_rules_file
from dicom_node.routing import (
    Rule,
    SeriesFacts,
    StudyFacts,
    default_rules,
    evaluate,
    orientation_of,
)

REPO_ROOT = Path(__file__).resolve().parents[3]

AXIAL = (1, 0, 0, 0, 1, 0)
SAGITTAL = (0, 1, 0, 0, 0, -1)
CORONAL = (1, 0, 0, 0, 0, -1)


def series(uid: str, **kwargs: object) -> SeriesFacts:
    defaults: dict[str, object] = {"modality": "CT", "instance_count": 100, "slice_thickness_mm": 1.0,
                                   "orientation": "axial", "series_number": int(uid.rsplit(".", 1)[-1])}
    return SeriesFacts(series_instance_uid=uid, **{**defaults, **kwargs})  # type: ignore[arg-type]


def study(*items: SeriesFacts, **kwargs: object) -> StudyFacts:
    return StudyFacts(study_instance_uid="1.2.3", series=items, **kwargs)  # type: ignore[arg-type]


def rule(**kwargs: object) -> Rule:
    return Rule.model_validate({"name": "r", "pipelines": ["seg"], **kwargs})


def test_orientation_from_image_orientation_patient() -> None:
    assert orientation_of(AXIAL) == "axial"
    assert orientation_of(SAGITTAL) == "sagittal"
    assert orientation_of(CORONAL) == "coronal"
    assert orientation_of((1, 0, 0, 0, 0.7071, 0.7071)) == "oblique"  # 45 degrees
    assert orientation_of((1, 0, 0, 0, 0.9848, 0.1736)) == "axial"  # 10 degrees tilt is still axial
    assert orientation_of(None) is None


def test_default_rule_picks_the_thinnest_ct_series_and_runs_both_demo_models() -> None:
    facts = study(series("1.2.3.1", slice_thickness_mm=5.0), series("1.2.3.2", slice_thickness_mm=1.0),
                  series("1.2.3.3", instance_count=2, slice_thickness_mm=0.5))  # a localizer: too few images
    decision = evaluate(default_rules(), facts)
    assert {(j.pipeline, j.series_instance_uid) for j in decision.jobs} == {
        ("chest-ct-segmentation", "1.2.3.2"), ("lung-nodule-detection", "1.2.3.2")}
    assert all(j.destinations == "default" for j in decision.jobs)


def test_default_rule_ignores_other_modalities_and_says_why() -> None:
    decision = evaluate(default_rules(), study(series("1.2.3.1", modality="MR")))
    assert decision.jobs == ()
    assert "modality 'MR' is not in ['CT']" in decision.ignored_reason  # type: ignore[operator]


def test_results_the_node_produced_and_non_image_series_never_trigger_jobs() -> None:
    facts = study(series("1.2.3.7", modality="SEG", is_image=False), series("1.2.3.8", produced_by_node=True))
    decision = evaluate([rule()], facts)
    assert decision.jobs == ()
    reasons = decision.outcomes[0].reasons
    assert any("not an image series" in r for r in reasons)
    assert any("a result this node produced" in r for r in reasons)


def test_all_versus_any() -> None:
    conditions = [{"attribute": "modality", "in": ["MR"]}, {"attribute": "slice_thickness_mm", "max": 2}]
    facts = study(series("1.2.3.1"))
    assert evaluate([rule(conditions=conditions, match="all")], facts).jobs == ()
    assert len(evaluate([rule(conditions=conditions, match="any")], facts).jobs) == 1


@pytest.mark.parametrize(
    ("condition", "matches"),
    [
        ({"attribute": "study_description", "regex": "chest|thorax"}, True),
        ({"attribute": "study_description", "regex": "^abdomen"}, False),
        ({"attribute": "calling_ae_title", "in": ["pacs_main"]}, True),  # case-insensitive
        ({"attribute": "calling_ae_title", "in": ["OTHER"]}, False),
        ({"attribute": "called_ae_title", "in": ["AI_NODE"]}, True),
        ({"attribute": "manufacturer", "regex": "siemens"}, True),
        ({"attribute": "manufacturer", "regex": "siemens", "negate": True}, False),
        ({"attribute": "body_part_examined", "in": ["CHEST"]}, True),
        ({"attribute": "series_description", "regex": "lung"}, False),
        ({"attribute": "orientation", "in": ["sagittal"]}, False),
        ({"attribute": "instance_count", "min": 50, "max": 200}, True),
        ({"attribute": "slice_count", "min": 101}, False),
        ({"attribute": "slice_thickness_mm", "min": 2.0}, False),
    ],
)
def test_each_condition_attribute(condition: dict[str, object], matches: bool) -> None:
    facts = study(series("1.2.3.1", manufacturer="SIEMENS Healthineers", body_part_examined="CHEST",
                         series_description="Body 1.0 B31f"),
                  calling_ae_titles=("PACS_MAIN",), called_ae_titles=("AI_NODE",), study_description="CT Thorax w/o")
    assert bool(evaluate([rule(conditions=[condition])], facts).jobs) is matches


def test_selectors() -> None:
    facts = study(series("1.2.3.1", slice_thickness_mm=3.0, instance_count=300),
                  series("1.2.3.2", slice_thickness_mm=1.0, instance_count=120))
    pick = lambda prefer: {j.series_instance_uid for j in evaluate([rule(series={"prefer": prefer})], facts).jobs}  # noqa: E731
    assert pick("thinnest") == {"1.2.3.2"}
    assert pick("most_instances") == {"1.2.3.1"}
    assert pick("all") == {"1.2.3.1", "1.2.3.2"}


def test_a_multi_frame_series_is_judged_and_chosen_by_its_slices_not_its_instances() -> None:
    enhanced = series("1.2.3.1", slice_thickness_mm=1.0, instance_count=1, slice_count=108)
    classic = series("1.2.3.2", slice_thickness_mm=1.0, instance_count=60)
    decision = evaluate(default_rules(), study(enhanced))
    assert {j.series_instance_uid for j in decision.jobs} == {"1.2.3.1"}
    both = study(enhanced, classic)
    pick = lambda prefer: {j.series_instance_uid for j in evaluate([rule(series={"prefer": prefer})], both).jobs}  # noqa: E731
    assert pick("thinnest") == {"1.2.3.1"}  # same thickness: more slices wins
    assert pick("most_instances") == {"1.2.3.1"}  # 108 images in one instance beat 60 instances
    only_instances = rule(conditions=[{"attribute": "instance_count", "min": 10}])
    assert evaluate([only_instances], study(enhanced)).jobs == ()  # what the old default rule did


def test_higher_priority_rule_decides_a_shared_pipeline() -> None:
    low = rule(name="low", priority=0, destinations=["archive"])
    high = rule(name="high", priority=10, destinations=["pacs"], conditions=[{"attribute": "orientation", "in": ["axial"]}])
    decision = evaluate([low, high], study(series("1.2.3.1")))
    assert [(j.rule, j.destinations) for j in decision.jobs] == [("high", ("pacs",))]


def test_disabled_rules_never_match() -> None:
    decision = evaluate([rule(enabled=False)], study(series("1.2.3.1")))
    assert decision.jobs == () and decision.outcomes[0].reasons == ("rule is disabled",)


def test_a_disabled_pipeline_gets_no_job_and_the_rule_says_why() -> None:
    facts = study(series("1.2.3.1", slice_thickness_mm=5.0), series("1.2.3.2", slice_thickness_mm=1.0))
    decision = evaluate(default_rules(), facts, disabled_pipelines=frozenset({"chest-ct-segmentation"}))
    assert [(j.pipeline, j.series_instance_uid) for j in decision.jobs] == [("lung-nodule-detection", "1.2.3.2")]
    [outcome] = decision.outcomes
    assert outcome.matched and outcome.selected_series == ("1.2.3.2",)
    assert outcome.reasons[-1] == "pipeline chest-ct-segmentation is disabled by an admin"
    assert decision.ignored_reason is None
    # the default argument and an unrelated disabled model change nothing
    assert evaluate(default_rules(), facts) == evaluate(default_rules(), facts, disabled_pipelines={"other-model"})
    assert len(evaluate(default_rules(), facts).jobs) == 2


def test_every_pipeline_disabled_ignores_the_study_with_that_reason() -> None:
    facts = study(series("1.2.3.1"))
    mr_only = rule(name="mr", pipelines=["mr-model"], conditions=[{"attribute": "modality", "in": ["MR"]}])
    decision = evaluate([*default_rules(), mr_only], facts,
                        disabled_pipelines={"chest-ct-segmentation", "lung-nodule-detection", "mr-model"})
    assert decision.jobs == ()
    reason = decision.ignored_reason
    assert reason is not None
    assert "ct-default:" in reason and "pipeline chest-ct-segmentation is disabled by an admin" in reason
    assert "pipeline lung-nodule-detection is disabled by an admin" in reason
    # a rule that does not match says why it does not match, not that its pipeline is disabled
    [mr] = [o for o in decision.outcomes if o.rule == "mr"]
    assert not mr.matched and not any("disabled by an admin" in r for r in mr.reasons)


def test_a_disabled_pipeline_is_not_taken_over_by_a_lower_priority_rule() -> None:
    high = rule(name="high", priority=10, pipelines=["seg", "det"], destinations=["pacs"])
    low = rule(name="low", priority=0, pipelines=["seg", "other"], destinations=["archive"])
    decision = evaluate([low, high], study(series("1.2.3.1")), disabled_pipelines=frozenset({"seg"}))
    assert sorted((j.pipeline, j.rule) for j in decision.jobs) == [("det", "high"), ("other", "low")]
    assert all("pipeline seg is disabled by an admin" in o.reasons for o in decision.outcomes)


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"conditions": [{"attribute": "colour", "in": ["red"]}]}, "unknown attribute 'colour'"),
        ({"conditions": [{"attribute": "study_description", "regex": "(unclosed"}]}, "does not compile"),
        ({"conditions": [{"attribute": "modality"}]}, "needs 'in' or 'regex'"),
        ({"conditions": [{"attribute": "slice_thickness_mm", "min": 5, "max": 1}]}, "min 5.0 > max 1.0"),
        ({"conditions": [{"attribute": "orientation", "in": ["diagonal"]}]}, "axial, sagittal, coronal or oblique"),
        ({"pipelines": []}, "at least 1 item"),
        ({"series": {"prefer": "random"}}, "thinnest"),
        ({"evaluate": "__import__('os')"}, "Extra inputs are not permitted"),
    ],
)
def test_malformed_rules_are_refused_with_the_reason(definition: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        rule(**definition)


def test_shipped_rules_file_is_the_built_in_default() -> None:
    assert load_rules_file(REPO_ROOT / "config" / "rules.yaml") == default_rules()


def test_rules_file_errors_name_the_file_and_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: ok\n    pipelines: [a]\n  - name: broken\n    pipelines: [a]\n"
                   "    conditions: [{attribute: modality, regex: '[x'}]\n")
    with pytest.raises(ConfigFileError, match=r"rules\[1\] \('broken'\).*does not compile"):
        load_rules_file(bad)
    bad.write_text("rules: [{name: a, pipelines: [x]}, {name: a, pipelines: [y]}]")
    with pytest.raises(ConfigFileError, match="used twice"):
        load_rules_file(bad)
    bad.write_text("rules: [unclosed")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        load_rules_file(bad)
