"""What a model was made for, what a header says, and the decision that combines header and image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dicom_node.model_catalog import ModelCatalog, ModelRegistryError
from dicom_node.model_domain import (
    HeaderFacts,
    ImageRegions,
    InputDomain,
    NumberRange,
    SynonymTable,
    decide,
    header_regions,
)
from dicom_node.settings import Settings

CHEST = InputDomain(modalities=("CT",), body_regions=("chest",), complete_coverage=True, slices=NumberRange(min=10),
                    pixel_spacing_mm=NumberRange(max=3.0), orientations=("axial",))
CHEST_CT = HeaderFacts(modality="CT", slices=120, pixel_spacing_mm=0.7, orientation="axial")


@pytest.mark.parametrize(("field", "text", "regions"), [
    ("body_part_examined", "CHEST", ("chest",)),
    ("body_part_examined", "THORAX", ("chest",)),
    ("study_description", "CT Tórax c/ contraste", ("chest",)),  # Spanish/Portuguese, accent removed
    ("series_description", "Lunge 1.0 B60f", ("chest",)),  # German
    ("protocol_name", "POUMONS faible dose", ("chest",)),  # French
    ("study_description", "CT Schädel nativ", ("head",)),
    ("body_part_examined", "CHESTABDPELVIS", ("chest", "abdomen", "pelvis")),
    ("body_part_examined", "HEADNECK", ("head", "neck")),
    ("study_description", "Whole body trauma", ("whole_body",)),
    ("series_description", "Longitudinal 5mm", ()),  # no whole word names a region
    ("series_description", "CAPITAL", ()),  # "CAP" only as a word
])
def test_header_words_in_several_languages_name_regions(field: str, text: str, regions: tuple[str, ...]) -> None:
    found = header_regions(HeaderFacts(**{field: text}))
    assert found.regions == regions
    if regions:
        assert field in found.evidence[0]


def test_admins_extend_the_synonym_table_and_a_typo_in_a_region_is_refused() -> None:
    facts = HeaderFacts(series_description="THX low dose screening")
    assert header_regions(facts).silent
    table = Settings(applicability={"header_synonyms": {"chest": ["THX"]}}).applicability.synonym_table()
    assert header_regions(facts, table).regions == ("chest",)
    with pytest.raises(ValueError, match="unknown body region 'thorax'"):
        SynonymTable({"thorax": ["THX"]})
    with pytest.raises(ValueError, match="no letters or digits"):
        SynonymTable({"chest": ["--"]})


def test_the_image_wins_when_the_header_disagrees_either_way() -> None:
    lying = CHEST_CT.model_copy(update={"body_part_examined": "HEAD"})
    chest_image = ImageRegions(regions=("chest",), complete=("chest",), evidence=("lungs 4.1 L",), seconds=0.2)
    runs = decide("m", CHEST, lying, image=chest_image)
    assert runs.applies and runs.header_regions == ("head",) and runs.image_regions == ("chest",)
    assert "the image wins" in next(c.detail for c in runs.checks if c.name == "body region")
    head_image = ImageRegions(regions=("head",), evidence=("skull ring on 38 levels",))
    declined = decide("m", CHEST, CHEST_CT.model_copy(update={"body_part_examined": "CHEST"}), image=head_image)
    assert not declined.applies and declined.reason_code == "body-region"
    assert "the image shows head" in declined.reason and "the image wins" in declined.reason


def test_coverage_slices_spacing_orientation_and_modality_each_decline_with_their_code() -> None:
    chest_cut = ImageRegions(regions=("chest",), complete=(), evidence=("lungs cut by the first level",))
    assert decide("m", CHEST, CHEST_CT, image=chest_cut).reason_code == "coverage"
    whole = ImageRegions(regions=("chest",), complete=("chest",))
    for update, code in (({"slices": 4}, "slices"), ({"pixel_spacing_mm": 5.0}, "spacing"),
                         ({"orientation": "sagittal"}, "orientation"), ({"modality": "MR"}, "modality")):
        decision = decide("m", CHEST, CHEST_CT.model_copy(update=update), image=whole)
        assert not decision.applies and decision.reason_code == code, (update, decision.reason)
    assert decide("m", CHEST, CHEST_CT, image=whole).applies


def test_without_an_image_judgement_a_silent_header_declines_and_a_named_region_decides() -> None:
    unknown = decide("m", CHEST, CHEST_CT)
    assert not unknown.applies and unknown.reason_code == "body-region" and "unknown" in unknown.reason
    not_judged = ImageRegions(available=False, evidence=("not a CT",))
    assert decide("m", CHEST, CHEST_CT.model_copy(update={"study_description": "CT THORAX"}),
                  image=not_judged).applies
    assert decide("any", InputDomain(), HeaderFacts()).applies  # a model that declares nothing runs anywhere


def test_contrast_is_read_from_the_agent() -> None:
    with_contrast = InputDomain(contrast="with")
    assert not decide("m", with_contrast, HeaderFacts()).applies
    assert decide("m", with_contrast, HeaderFacts(contrast_agent="Iomeprol")).applies
    assert decide("m", InputDomain(contrast="without"), HeaderFacts(contrast_agent="Iomeprol")).reason_code == "contrast"


def test_each_model_gets_its_own_block_of_result_series(tmp_path: Path) -> None:
    catalog = ModelCatalog.demo()
    seg = [catalog.result_series("chest-ct-segmentation", kind) for kind in ("SEG", "SR", "GSPS", "NOTICE")]
    det = [catalog.result_series("lung-nodule-detection", kind) for kind in ("SEG", "SR", "GSPS", "NOTICE")]
    assert [n for n, _ in seg] == [9011, 9012, 9013, 9019] and [n for n, _ in det] == [9021, 9022, 9023, 9029]
    assert det[1][1] == "AI lung nodules - SR (lung-nodule-detection 0.1.0)"
    assert seg[1][1] != det[1][1] and all(len(d) <= 64 for _, d in seg + det)
    entries = [{"id": "a", "kind": "segmentation", "format": "monai_bundle", "path": "a", "version": "1",
                "series_number": 9100}, {"id": "b", "kind": "segmentation", "format": "monai_bundle", "path": "b",
                                         "version": "1", "series_number": 9105}]
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    with pytest.raises(ModelRegistryError, match="'a' and 'b' have result series numbers 9100 and 9105"):
        ModelCatalog.from_file(tmp_path / "models.yaml")


def test_the_input_domain_comes_from_the_entry_else_the_bundle_else_its_modality(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle" / "configs"
    bundle.mkdir(parents=True)
    meta = {"version": "1", "network_data_format": {"inputs": {"image": {"modality": "MR"}}}}
    (bundle / "metadata.json").write_text(json.dumps(meta))
    entry = {"id": "m", "kind": "segmentation", "format": "monai_bundle", "path": "bundle", "version": "1"}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    assert ModelCatalog.from_file(tmp_path / "models.yaml").input_domain("m") == InputDomain(modalities=("MR",))
    meta["dicom_node"] = {"input_domain": {"modalities": ["MR"], "body_regions": ["head"]}}
    (bundle / "metadata.json").write_text(json.dumps(meta))
    assert ModelCatalog.from_file(tmp_path / "models.yaml").input_domain("m").body_regions == ("head",)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [{**entry, "input_domain": {
        "body_regions": ["pelvis"]}}]}))
    assert ModelCatalog.from_file(tmp_path / "models.yaml").input_domain("m").body_regions == ("pelvis",)
    meta["dicom_node"] = {"input_domain": {"body_regions": ["brain"]}}
    (bundle / "metadata.json").write_text(json.dumps(meta))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    with pytest.raises(ModelRegistryError, match="dicom_node.input_domain is invalid"):
        ModelCatalog.from_file(tmp_path / "models.yaml").input_domain("m")


def test_plausibility_rules_must_fit_the_model_kind_and_name_its_labels(tmp_path: Path) -> None:
    labels = [{"value": 1, "name": "spleen", "code": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"},
               "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}}]
    entry = {"id": "spleen", "kind": "segmentation", "format": "torchscript", "path": "m.ts", "version": "1",
             "labels": labels, "preprocessing": {"spacing_mm": [1, 1, 1], "window_hu": [-100, 200],
                                                 "roi_size": [32, 32, 32]}}

    def catalog(plausibility: dict) -> ModelCatalog:
        (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [{**entry, "plausibility": plausibility}]}))
        return ModelCatalog.from_file(tmp_path / "models.yaml")

    assert catalog({"volumes_ml": {"spleen": {"max": 1500}}}).plausibility("spleen") is not None
    with pytest.raises(ModelRegistryError, match="names label\\(s\\) 'liver', the model's labels are spleen"):
        catalog({"inside_body": ["liver"]}).plausibility("spleen")
    with pytest.raises(ModelRegistryError, match="findings_inside cannot judge a segmentation model"):
        catalog({"findings_inside": "lungs"}).check()
    ModelCatalog.demo().check()  # the shipped declarations are consistent
