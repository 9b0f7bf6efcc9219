"""The plausibility rules' schema: what a model may declare, and errors that name the field and value."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from dicom_node.model_domain import Check, NumberRange
from dicom_node.plausibility_rules import Neighbour, Plausibility, PlausibilityRules

CHEST_YAML = """
volumes_ml:
  lung: {min: 1000, max: 9000}
  heart: {min: 150, max: 1500}
  nodule: {max: 500}
inside_body: [lung, heart, nodule]
max_outside_fraction: 0.02
outside_fraction_by_label: {lung: 0.4}
adjacent:
  heart: [{label: lung, sides: both}]
  nodule: [lung]
adjacency_mm: 10
max_low_confidence_fraction: 0.25
"""


def _error(raw: dict) -> str:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as caught:
        PlausibilityRules.model_validate(raw)
    return str(caught.value)


def test_the_documented_yaml_shape_reads_into_rules() -> None:
    rules = PlausibilityRules.model_validate(yaml.safe_load(CHEST_YAML))
    assert rules.volumes_ml["lung"] == NumberRange(min=1000, max=9000)
    assert rules.volumes_ml["nodule"].min is None
    assert rules.inside_body == ("lung", "heart", "nodule")
    assert (rules.outside_fraction("lung"), rules.outside_fraction("heart")) == (0.4, 0.02)
    assert rules.adjacent["heart"] == (Neighbour(label="lung", sides="both"),)
    assert rules.adjacent["nodule"] == (Neighbour(label="lung", sides="any"),)
    assert rules.max_low_confidence_fraction == 0.25
    assert rules.label_names() == {"lung", "heart", "nodule"}
    assert rules.misfits("segmentation") == ()
    assert rules.misfits("detection") == ("volumes_ml", "inside_body", "adjacent", "max_low_confidence_fraction")
    assert not rules.empty()


def test_a_single_neighbour_name_needs_no_list() -> None:
    rules = PlausibilityRules.model_validate({"adjacent": {"heart": "lung"}})
    assert rules.adjacent == {"heart": (Neighbour(label="lung"),)}
    assert rules.label_names() == {"heart", "lung"}


def test_detection_rules_and_their_defaults() -> None:
    rules = PlausibilityRules.model_validate({"findings_inside": "lungs"})
    assert rules.findings_margin_mm == 5.0
    assert rules.misfits("detection") == ()
    assert rules.misfits("segmentation") == ("findings_inside",)
    assert rules.label_names() == set()
    assert PlausibilityRules().empty()
    assert PlausibilityRules().misfits("segmentation") == ()


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"volumes_ml": {"lung": {"min": 9000, "max": 1000}}}, ["volumes_ml", "min 9000", "max 1000"]),
        ({"volumes_ml": {"lung": {}}}, ["volumes_ml", "'lung'", "neither min nor max"]),
        ({"volumes_ml": {"lung": {"min": -5}}}, ["volumes_ml", "'lung'", "-5"]),
        ({"volumes_ml": {"lung": {"mn": 5}}}, ["volumes_ml.lung.mn"]),
        ({"inside_body": ["lung", "lung"]}, ["inside_body", "'lung'", "twice"]),
        ({"inside_body": ["lung", " "]}, ["inside_body", "' '"]),
        ({"max_outside_fraction": 1.5, "inside_body": ["lung"]}, ["max_outside_fraction", "1.5"]),
        ({"inside_body": ["lung"], "outside_fraction_by_label": {"lung": 1.2}}, ["'lung'", "1.2", "0..1"]),
        ({"inside_body": ["lung"], "outside_fraction_by_label": {"heart": 0.1}},
         ["outside_fraction_by_label names 'heart'", "inside_body does not list (lung)"]),
        ({"adjacent": {"heart": []}}, ["adjacent", "'heart'", "no neighbour"]),
        ({"adjacent": {"heart": ["heart"]}}, ["adjacent", "'heart'", "own neighbour"]),
        ({"adjacent": {"heart": ["lung", {"label": "lung", "sides": "both"}]}}, ["'heart'", "'lung'", "twice"]),
        ({"adjacent": {"heart": [{"label": "lung", "sides": "three"}]}}, ["adjacent.heart.0.sides", "three"]),
        ({"adjacent": {"heart": ["lung"]}, "adjacency_mm": 0}, ["adjacency_mm", "0"]),
        ({"findings_inside": "liver"}, ["findings_inside", "liver"]),
        ({"findings_inside": "lungs", "findings_margin_mm": -1}, ["findings_margin_mm", "-1"]),
        ({"findings_margin_mm": 3}, ["findings_margin_mm 3", "without findings_inside"]),
        ({"max_outside_fraction": 0.1}, ["max_outside_fraction 0.1", "without inside_body"]),
        ({"adjacency_mm": 4}, ["adjacency_mm 4", "without adjacent"]),
        ({"max_low_confidence_fraction": 2}, ["max_low_confidence_fraction", "2"]),
        ({"volume_ml": {"lung": {"min": 1}}}, ["volume_ml", "Extra inputs are not permitted"]),
    ],
)
def test_invalid_rules_name_the_field_and_the_value(raw: dict, names: list[str]) -> None:  # type: ignore[type-arg]
    message = _error(raw)
    for name in names:
        assert name in message, (name, message)


def test_rules_are_frozen() -> None:
    rules = PlausibilityRules(inside_body=("lung",))
    with pytest.raises(ValidationError):
        rules.inside_body = ("heart",)  # type: ignore[misc]


def test_a_verdict_summarises_and_serialises() -> None:
    held = Plausibility(
        model_id="chest-ct-segmentation", plausible=False,
        reasons=("lung volume 350 mL is outside the allowed 1000-9000 mL", "heart is absent (0 mL); allowed 150-1500 mL"),
        checks=(Check(name="volume of lung", passed=False, detail="350 mL outside 1000-9000 mL"),
                Check(name="volume of heart", passed=False, detail="absent"),
                Check(name="lung inside the body", passed=None, detail="no survey")),
        seconds=0.01,
    )
    assert held.summary() == ("chest-ct-segmentation result held as implausible: lung volume 350 mL is outside "
                              "the allowed 1000-9000 mL (+1 more)")
    record = held.as_record()
    assert json.loads(json.dumps(record)) == record
    assert record["checks"][2] == {"name": "lung inside the body", "passed": None, "detail": "no survey"}
    fine = Plausibility(model_id="m", plausible=True, checks=(Check(name="x", passed=True, detail="ok"),))
    assert fine.summary() == "m result plausible (1 check passed)"


def test_a_verdict_cannot_contradict_its_reasons() -> None:
    with pytest.raises(ValidationError, match="plausible result has no reasons"):
        Plausibility(model_id="m", plausible=True, reasons=("lung absent",))
    with pytest.raises(ValidationError, match="at least one reason"):
        Plausibility(model_id="m", plausible=False)
