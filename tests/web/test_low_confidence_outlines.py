"""Low-confidence findings per destination, through the real worker pipeline and the destination form.

A chest CT phantom (three detections by the shipped demo detector: 81 %, 70 %, 41 %) is
received, routed and run by ``workers.pipeline.run_job`` with the detector's display
threshold set to 0.5, so one finding is low-confidence. What each destination would be
sent is what dispatch picks (:func:`dicom_node.result_variants.select_results` with the
destination's setting as stored now) from the job's recorded results, read back from the
outbox. The burned-in overlay series (SC) is built only when a destination names SC.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.db import config_repo, jobs
from dicom_node.destinations import DicomDestination
from dicom_node.model_catalog import demo_entries
from dicom_node.result_variants import select_results
from tests.web.conftest import LoggedIn, WebEnv
from tests.web.studies_fixtures import T0
from tests.web.test_preview import DETECTOR, received, run_jobs
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from workers.models.registry import ModelRegistry

THRESHOLD = 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = generate_chest_phantom(PhantomConfig(nodule_count=(2, 2), nodule_diameter_mm=(12.0, 18.0)), seed=4242)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("chest") / "case", seed=4242)
    return sorted(series_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    detector = next(entry for entry in demo_entries() if entry.id == DETECTOR)
    return ModelRegistry((detector.model_copy(update={"display_threshold": THRESHOLD}),), base_dir=Path("."),
                         source="low-confidence test models")


def destination(env: WebEnv, name: str, outputs: set[str], outline: bool) -> DicomDestination:
    made = DicomDestination(name=name, ae_title=name.upper(), host="127.0.0.1", port=11112, default=True,
                            outputs=frozenset(outputs), outline_low_confidence=outline)  # type: ignore[arg-type]
    config_repo.upsert_destination(env.sessions, made, source="test", now=T0)
    return made


def sent_to(env: WebEnv, job_id: int, name: str) -> list[jobs.ResultSpec]:
    """What dispatch sends ``name`` of job ``job_id``, by the destination's setting as stored now."""
    stored = config_repo.get_destination(env.sessions, name)
    assert stored is not None
    return select_results(jobs.results_of_job(env.sessions, job_id), stored.outputs, stored.outline_low_confidence)


def texts(env: WebEnv, result: jobs.ResultSpec) -> list[str]:
    ds = pydicom.dcmread(env.settings.outbox_dir / result.path)
    return sorted(str(t.UnformattedTextValue) for a in ds.GraphicAnnotationSequence
                  for t in a.get("TextObjectSequence", []))


def test_each_destination_gets_the_outlines_its_setting_asks_for_and_sc_goes_only_where_named(
    web: WebEnv, files: list[Path], registry: ModelRegistry
) -> None:
    destination(web, "pacs", {"SR", "GSPS", "KO"}, outline=False)
    destination(web, "viewer", {"GSPS", "SC"}, outline=True)
    study, series = received(web, files)
    [job_id] = run_jobs(web, registry, study, series, [DETECTOR])
    results = jobs.results_of_job(web.sessions, job_id)
    kinds = [r.kind for r in results]
    assert {"SR", "GSPS", "GSPS+LOW", "SC", "SC+LOW", "KO"} == set(kinds), kinds

    [gsps] = [r for r in sent_to(web, job_id, "pacs") if r.kind == "GSPS"]
    assert [r.kind for r in sent_to(web, job_id, "pacs")] == ["SR", "GSPS", "KO"]
    shown_to_pacs = texts(web, gsps)
    assert len(shown_to_pacs) == 2 and not any("low confidence" in t for t in shown_to_pacs)
    viewer = sent_to(web, job_id, "viewer")
    assert {r.kind for r in viewer} == {"GSPS+LOW", "SC+LOW"}
    [variant] = [r for r in viewer if r.kind == "GSPS+LOW"]
    shown_to_viewer = texts(web, variant)
    assert len(shown_to_viewer) == 3 and [t for t in shown_to_viewer if t.endswith("low confidence")] == [
        next(t for t in shown_to_viewer if "41%" in t)]
    # The SC series (default and variant): the model as contributing equipment, as on every result.
    for result in [r for r in results if r.kind in ("SC", "SC+LOW")]:
        ds = pydicom.dcmread(web.settings.outbox_dir / result.path)
        assert str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.7")  # a Secondary Capture
        models = [e.get("ManufacturerModelName") for e in ds.ContributingEquipmentSequence]
        assert "Lung nodule detection (CenterNet 3D)" in models, models

    # The setting changes: the same job's re-send follows it.
    destination(web, "pacs", {"SR", "GSPS", "KO"}, outline=True)
    assert [r.kind for r in sent_to(web, job_id, "pacs")] == ["SR", "GSPS+LOW", "KO"]


def test_no_overlay_series_and_no_variant_when_no_destination_asks(
    web: WebEnv, files: list[Path], registry: ModelRegistry
) -> None:
    destination(web, "pacs", {"SR", "GSPS", "KO"}, outline=False)
    study, series = received(web, files)
    [job_id] = run_jobs(web, registry, study, series, [DETECTOR])
    kinds = [r.kind for r in jobs.results_of_job(web.sessions, job_id)]
    assert sorted(kinds) == ["GSPS", "KO", "SR"]


def test_the_destination_form_and_api_carry_outline_low_confidence(web: WebEnv, admin: LoggedIn) -> None:
    form = {"type": "dicom", "name": "pacs2", "ae_title": "PACS2", "host": "pacs.example", "port": "104",
            "outputs": ["SR", "GSPS"], "not_performed": "none"}
    assert admin.post("/destinations", {**form, "outline_low_confidence": "on"}).status_code == 303
    assert config_repo.get_destination(web.sessions, "pacs2").outline_low_confidence  # type: ignore[union-attr]
    page = admin.client.get("/destinations/pacs2").text
    assert 'id="outline_low_confidence"' in page
    headers = {"Authorization": f"Bearer {web.token('admin')}"}
    listed = web.client().get("/api/v1/destinations/pacs2", headers=headers).json()
    assert listed["outline_low_confidence"] is True
    assert admin.post("/destinations/pacs2", form).status_code == 303
    assert not config_repo.get_destination(web.sessions, "pacs2").outline_low_confidence  # type: ignore[union-attr]
