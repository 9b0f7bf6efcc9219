"""Which result objects a destination gets: default or low-confidence variant, by its current setting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from dicom_node.destinations import DicomDestination
from dicom_node.model_catalog import ModelCatalog, ModelEntry, demo_entries
from dicom_node.result_variants import base_kind, low_variant, select_results


@dataclass(frozen=True)
class Result:
    kind: str
    path: str


JOB = [Result("SR", "sr"), Result("GSPS", "gsps"), Result("GSPS+LOW", "gsps-low"), Result("SC", "sc1"),
       Result("SC", "sc2"), Result("SC+LOW", "sc-low1"), Result("KO", "ko")]


def paths(results: list[Result]) -> list[str]:
    return [r.path for r in results]


def test_the_default_objects_unless_the_destination_outlines_low_confidence_findings() -> None:
    assert (low_variant("GSPS"), base_kind("GSPS+LOW"), base_kind("SC")) == ("GSPS+LOW", "GSPS", "SC")
    assert paths(select_results(JOB, {"SR", "GSPS", "KO"}, False)) == ["sr", "gsps", "ko"]
    assert paths(select_results(JOB, {"SR", "GSPS", "KO"}, True)) == ["sr", "gsps-low", "ko"]
    assert paths(select_results(JOB, {"SC"}, False)) == ["sc1", "sc2"]
    assert paths(select_results(JOB, {"SC"}, True)) == ["sc-low1"], "the whole variant series, not a mix"
    # A job without a variant (no low-confidence finding): the default object, whatever the setting.
    plain = [r for r in JOB if not r.kind.endswith("+LOW")]
    assert paths(select_results(plain, {"GSPS", "SC"}, True)) == ["gsps", "sc1", "sc2"]
    assert select_results(JOB, {"SEG"}, True) == []


def test_destination_setting_defaults_off_and_round_trips() -> None:
    pacs = DicomDestination(name="pacs", ae_title="PACS", host="pacs.local", port=104)
    assert pacs.outline_low_confidence is False
    shown = DicomDestination.model_validate({**pacs.model_dump(mode="json"), "outline_low_confidence": True})
    assert shown.outline_low_confidence is True
    assert DicomDestination.model_validate(shown.model_dump(mode="json")) == shown


def test_display_threshold_is_a_detection_models_score_between_0_and_1() -> None:
    catalog = ModelCatalog.demo()
    assert catalog.display_threshold("lung-nodule-detection") == 0.34
    assert catalog.display_threshold("chest-ct-segmentation") is None
    detector = next(e for e in demo_entries() if e.kind == "detection").model_dump()
    for wrong in (-0.1, 1.5):
        with pytest.raises(ValidationError, match="display_threshold"):
            ModelEntry.model_validate({**detector, "display_threshold": wrong})
    segmenter = next(e for e in demo_entries() if e.kind == "segmentation").model_dump(exclude={"plausibility"})
    with pytest.raises(ValidationError, match="applies to detection models"):
        ModelEntry.model_validate({**segmenter, "display_threshold": 0.5})
