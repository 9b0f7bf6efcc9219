"""What each model declares, in words (models page, API, ``dicom-node models``), and the header-only check
before each planned job (rule tester, ``dicom-node rules test``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dicom_node.applicability_preview import preview_applicability
from dicom_node.model_catalog import DEMO_DETECTION_PLAUSIBILITY, DEMO_SEGMENTATION_PLAUSIBILITY, ModelCatalog
from dicom_node.model_declarations import NO_REGION_WARNING, describe_plausibility, model_declarations
from dicom_node.model_domain import SynonymTable
from dicom_node.plausibility_rules import PlausibilityRules
from dicom_node.routing import JobSpec, SeriesFacts, StudyFacts

BUNDLES = Path(__file__).resolve().parents[3] / "workers" / "bundles"
CHEST_LINE = "CT; chest; slices >= 10; pixel spacing mm 0.3-3; slice spacing mm 0.3-6; axial"


def test_plausibility_rules_in_words() -> None:
    assert describe_plausibility(DEMO_SEGMENTATION_PLAUSIBILITY) == [
        "lung 1000-9000 mL", "heart 100-1500 mL", "nodule <= 500 mL",
        "lung, heart, nodule inside the body (2 % may be outside, lung: 5 %)",
        "heart touches lung on both sides (within 10 mm)", "nodule touches lung (within 10 mm)",
        "at most 10 % low-confidence voxels",
    ]
    assert describe_plausibility(DEMO_DETECTION_PLAUSIBILITY) == ["findings inside the lungs (margin 5 mm)"]
    own = PlausibilityRules.model_validate({"inside_body": ["liver"], "max_outside_fraction": 0.05,
                                            "adjacent": {"liver": ["kidney", {"label": "spleen"}]},
                                            "adjacency_mm": 4})
    assert describe_plausibility(own) == ["liver inside the body (5 % may be outside)",
                                          "liver touches kidney and spleen (within 4 mm)"]
    assert describe_plausibility(PlausibilityRules()) == [] and describe_plausibility(None) == []


def test_demo_models_declare_chest_ct_rules_and_their_series() -> None:
    catalog = ModelCatalog.demo()
    seg = model_declarations(catalog, "chest-ct-segmentation")
    assert seg.error is None and seg.made_for == CHEST_LINE and seg.made_for_warning is None
    assert seg.input_domain is not None and seg.input_domain.body_regions == ("chest",)
    assert seg.plausibility is not None and seg.plausibility["outside_fraction_by_label"] == {"lung": 0.05}
    assert "findings_margin_mm" not in seg.plausibility  # as declared: defaults left out
    assert PlausibilityRules.model_validate(seg.plausibility) == DEMO_SEGMENTATION_PLAUSIBILITY  # round trip
    assert [(s.kind, s.series_number, s.description) for s in seg.result_series] == [
        ("SEG", 9011, "AI chest anatomy - SEG (chest-ct-segmentation 0.1.0)"),
        ("SR", 9012, "AI chest anatomy - SR (chest-ct-segmentation 0.1.0)"),
        ("SC", 9015, "AI chest anatomy - SC (chest-ct-segmentation 0.1.0)"),
        ("KO", 9018, "AI chest anatomy - key images (chest-ct-segmentation 0.1.0)"),
        ("NOTICE", 9019, "AI chest anatomy - not performed (chest-ct-segmentation 0.1.0)")]
    det = model_declarations(catalog, "lung-nodule-detection")
    assert det.plausibility_summary == ["findings inside the lungs (margin 5 mm)"]
    assert [(s.kind, s.series_number) for s in det.result_series] == [("SR", 9022), ("GSPS", 9023), ("SC", 9025),
                                                                      ("KO", 9028),
                                                                      ("NOTICE", 9029)]


def test_no_region_is_a_warning_and_bad_declarations_are_the_models_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLES / "chest_ct_segmentation" / "configs", broken / "configs")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["dicom_node"]["input_domain"] = {"modalities": ["CT"], "body_regions": ["thorax"]}
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    registry = tmp_path / "models.yaml"
    registry.write_text("""
models:
  - {id: anywhere, kind: segmentation, format: monai_bundle, path: package://workers/bundles/chest_ct_segmentation,
     version: "0.1.0", input_domain: {modalities: [CT]}}
  - {id: liver-rules, kind: segmentation, format: monai_bundle, path: package://workers/bundles/chest_ct_segmentation,
     version: "0.1.0", plausibility: {volumes_ml: {liver: {max: 3000}}}}
  - {id: thorax, kind: segmentation, format: monai_bundle, path: broken, version: "0.1.0"}
""")
    catalog = ModelCatalog.from_file(registry)
    anywhere = model_declarations(catalog, "anywhere")
    assert anywhere.error is None and anywhere.made_for == "CT" and anywhere.made_for_warning == NO_REGION_WARNING
    assert anywhere.plausibility is None and anywhere.plausibility_summary == []
    liver = model_declarations(catalog, "liver-rules")
    assert liver.error is not None and "plausibility names label(s) 'liver'" in liver.error
    assert liver.made_for == "CT" and liver.plausibility is None  # the domain is still shown
    thorax = model_declarations(catalog, "thorax")
    assert thorax.error is not None and "dicom_node.input_domain is invalid" in thorax.error
    assert "'thorax'" in thorax.error
    assert thorax.input_domain is None and thorax.made_for is None
    assert [s.series_number for s in thorax.result_series] == [9031, 9032, 9035, 9038, 9039]


def _facts(body_part: str, study_description: str) -> StudyFacts:
    series = SeriesFacts(series_instance_uid="1.2.3.4", modality="CT", body_part_examined=body_part,
                         series_number=2, pixel_spacing_mm=0.8, slice_spacing_mm=2.5, orientation="axial",
                         instance_count=40)
    return StudyFacts(study_instance_uid="1.2.3", study_description=study_description, series=(series,))


def _job(pipeline: str, series_uid: str = "1.2.3.4") -> JobSpec:
    return JobSpec(pipeline=pipeline, series_instance_uid=series_uid, rule="r", priority=0, destinations="default")


def test_preview_decides_each_job_from_the_header() -> None:
    catalog = ModelCatalog.demo()
    chest, head = _facts("CHEST", "CT THORAX"), _facts("HEAD", "CT Schädel nativ")
    [applies] = preview_applicability(catalog, SynonymTable(), chest, [_job("lung-nodule-detection")])
    assert applies.error is None and applies.domain is not None and applies.domain.describe() == CHEST_LINE
    assert applies.applicability is not None and applies.applicability.applies
    jobs = [_job("chest-ct-segmentation"), _job("no-such-model"), _job("lung-nodule-detection", "9.9")]
    [declined, unknown, missing] = preview_applicability(catalog, SynonymTable(), head, jobs)
    assert declined.applicability is not None and not declined.applicability.applies
    assert declined.applicability.reason_code == "body-region"
    assert declined.applicability.reason == ("body region: the header says head; the model is made for chest "
                                             "(the image was not judged)")
    assert unknown.applicability is None and unknown.domain is None
    assert unknown.error is not None and "no model 'no-such-model'" in unknown.error
    assert missing.applicability is None and missing.error == "series 9.9 is not in study 1.2.3"
    # An admin's synonym makes a local word count: "KOPF" is built in, "SCHAEDELBASIS" is not.
    local = _facts("SCHAEDELBASIS", "")
    [silent] = preview_applicability(catalog, SynonymTable(), local, [_job("chest-ct-segmentation")])
    [named] = preview_applicability(catalog, SynonymTable({"head": ["SCHAEDELBASIS"]}), local,
                                    [_job("chest-ct-segmentation")])
    assert silent.applicability is not None and silent.applicability.header_regions == ()
    assert named.applicability is not None and named.applicability.header_regions == ("head",)
