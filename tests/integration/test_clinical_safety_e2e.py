"""Clinical safety through the whole product: a PACS (real Orthanc) auto-routes studies to the node, and
a model runs only on what it was made for, and nothing implausible reaches the PACS (issue 21).

Three studies, one node (embedded mode), three models: the two demo chest models and an "air painter"
(a TorchScript network that labels every air voxel as lung, declared for chest CT, with the plausibility
rule that lung lies inside the body), so its results are always implausible.

* The real head CT (Debian's InVesalius example, BodyPartExamined HEAD): no model runs; the PACS
  receives no SEG, no GSPS, only one "AI analysis not performed" SR per model (the destination asks
  for them), each with the coded reason.
* A chest phantom whose header says HEAD, and one whose header says nothing: the image decides, the
  chest models run and their SEG/SR/GSPS reach the PACS; the painter's result is held (a notice is
  sent instead), visible with its reason, then released (its SEG and SR reach the PACS) or discarded.

Every object that reaches the PACS validates with dciodvfy with no error.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from dicom_node.app.cli import main
from peers import NodeProcess, Orthanc, wait_for
from auto_routing import pacs_routing_to_node
from test_pipeline_e2e import dciodvfy_errors
from training.data.dicom_pair import write_dicom_case
from training.data.invesalius import INVESALIUS_EXAMPLE, read_invesalius_project
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from training.phantoms.ct_series import SeriesGeometry, ct_series_datasets, write_series

SEG, SR, PR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1"
PAINTER = "air-painter"
MODELS = ("chest-ct-segmentation", "lung-nodule-detection", PAINTER)
FINISHED = ("succeeded", "dead", "cancelled", "not_applicable", "held", "released", "discarded")


class AirIsLung(torch.nn.Module):
    """Input scaled 0..1 over -1000..500 HU; channel 2 (lung) wins wherever it is air (below about -850 HU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        air = (x < 0.1).float()
        return torch.cat([1.0 - air, torch.zeros_like(x), air], dim=1) * 10.0


def _models_file(work: Path) -> Path:
    painter = work / "air_painter.ts"
    torch.jit.script(AirIsLung()).save(str(painter))
    chest = {"modalities": ["CT"], "body_regions": ["chest"], "slices": {"min": 10}, "orientations": ["axial"]}
    lung = {"value": 2, "name": "lung", "code": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"},
            "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}}
    models = {"models": [
        {"id": "chest-ct-segmentation", "kind": "segmentation", "format": "monai_bundle", "version": "0.1.0",
         "path": "package://workers/bundles/chest_ct_segmentation", "title": "AI chest anatomy",
         "input_domain": chest},
        {"id": "lung-nodule-detection", "kind": "detection", "format": "monai_bundle", "version": "0.1.0",
         "path": "package://workers/bundles/lung_nodule_detection", "title": "AI lung nodules",
         "input_domain": chest},
        {"id": PAINTER, "kind": "segmentation", "format": "torchscript", "version": "1.0", "path": str(painter),
         "title": "AI air painter", "labels": [lung], "input_domain": chest,
         "preprocessing": {"spacing_mm": [5.0, 5.0, 5.0], "window_hu": [-1000, 500], "roi_size": [32, 32, 32]},
         "plausibility": {"inside_body": ["lung"]}},
    ]}
    path = work / "models.yaml"
    path.write_text(yaml.safe_dump(models, sort_keys=False))
    return path


def _head_ct(work: Path) -> list[Path]:
    """The InVesalius head CT as a DICOM series with BodyPartExamined HEAD."""
    project = read_invesalius_project(INVESALIUS_EXAMPLE)
    sz, sy, sx = project.spacing_zyx_mm
    nz, ny, nx = project.volume.shape
    geometry = SeriesGeometry(rows=ny, columns=nx, slices=nz, pixel_spacing=(sy, sx), slice_spacing=sz,
                              slice_thickness=sz, orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    datasets = ct_series_datasets(project.volume, geometry, seed=3, patient_id="INVESALIUS-0051",
                                  study_description="CT HEAD")
    for ds in datasets:
        ds.BodyPartExamined = "HEAD"
    return write_series(datasets, work / "head")


def _chest(work: Path, name: str, seed: int, header: dict[str, str | None]) -> list[Path]:
    """A small chest phantom with a nodule whose header attributes are set (None: removed) as given."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(48, 80, 80), spacing_mm=(5.0, 4.4, 4.4),
                                                   nodule_count=(1, 1), nodule_diameter_mm=(14.0, 16.0)), seed=seed)
    series_dir, _ = write_dicom_case(phantom, work / name, seed=seed)
    files = sorted(series_dir.glob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in header.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return files


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _in_pacs(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """Every result object (SEG, SR, PR) of the study in Orthanc, read back."""
    orthanc_study = orthanc.lookup_study(study_uid)
    found = []
    for series in orthanc.get(f"/studies/{orthanc_study}/series"):
        if series["MainDicomTags"].get("Modality") in ("SEG", "SR", "PR"):
            for instance in series["Instances"]:
                found.append(pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance))))
    return found


def _jobs(node: NodeProcess, study_uid: str) -> dict[str, tuple[int, str, dict]]:
    rows = node.query("SELECT j.pipeline, j.id, j.state, j.checks FROM jobs j JOIN studies s ON s.id = j.study_id "
                      "WHERE s.study_instance_uid = ?", (study_uid,))
    return {pipeline: (job_id, state, json.loads(checks) if checks else {}) for pipeline, job_id, state, checks in rows}


def _finished(node: NodeProcess, study_uid: str) -> dict[str, tuple[int, str, dict]] | None:
    jobs = _jobs(node, study_uid)
    return jobs if len(jobs) == len(MODELS) and all(state in FINISHED for _, state, _ in jobs.values()) else None


def _reason(notice: pydicom.Dataset) -> tuple[str, str]:
    """(reason code, comment) of an "AI analysis not performed" SR."""
    code, text = None, None

    def walk(items: pydicom.Sequence) -> None:
        nonlocal code, text
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if name == "AINPR":
                code = str(item.ConceptCodeSequence[0].CodeValue)
            if name == "121106":
                text = str(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(notice.ContentSequence)
    assert code is not None and text is not None, "not an 'AI analysis not performed' SR"
    return code, text


def _valid(datasets: list[pydicom.Dataset], work: Path) -> None:
    for n, ds in enumerate(datasets):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert dciodvfy_errors(buffer.getvalue(), work, f"result-{n}") == [], ds.SeriesDescription


@pytest.mark.slow
def test_a_model_runs_only_on_what_it_was_made_for_and_nothing_implausible_is_sent(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    head = _head_ct(tmp_path)
    misleading = _chest(tmp_path, "misleading", 11, {"BodyPartExamined": "HEAD", "StudyDescription": "CT HEAD",
                                                      "SeriesDescription": "Head 5 mm"})
    silent = _chest(tmp_path, "silent", 12, {"BodyPartExamined": None, "StudyDescription": None,
                                             "SeriesDescription": None, "ProtocolName": None})
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "ct", "pipelines": list(MODELS), "series": {"prefer": "thinnest"},
        "conditions": [{"attribute": "modality", "in": ["CT"]}, {"attribute": "slice_count", "min": 10}]}]}))
    with pacs_routing_to_node(tmp_path, "safety", destination={"not_performed": "sr"}, overrides={
            "routing.rules_file": str(rules), "routing.models_file": str(_models_file(tmp_path))}) as (orthanc, node):
        for files in (head, misleading, silent):
            orthanc.upload_files(files)
        uids = {name: _study_uid(files) for name, files in (("head", head), ("misleading", misleading),
                                                              ("silent", silent))}
        done = {name: wait_for(f"the {name} study's jobs to finish", lambda uid=uid: _finished(node, uid),
                               timeout=300) for name, uid in uids.items()}

        # The head CT: no model ran; the image says head (the header agrees); one notice per model.
        for model in MODELS:
            _, state, checks = done["head"][model]
            assert state == "not_applicable", (model, state)
            decision = checks["applicability"]
            assert decision["reason_code"] == "body-region" and "head" in decision["image_regions"], decision
            assert decision["seconds"] < 5.0
        notices = wait_for("three notices in the PACS", lambda: (lambda found: found if len(found) == 3 else None)(
            _in_pacs(orthanc, uids["head"])), timeout=120)
        assert {ds.SOPClassUID for ds in notices} == {SR}
        assert sorted(int(ds.SeriesNumber) for ds in notices) == [9019, 9029, 9039]
        for notice in notices:
            code, text = _reason(notice)
            assert code == "AINP-REG" and "head" in text, (code, text)
        _valid(notices, tmp_path)

        # Misleading and empty headers: the image decides; the chest models' results reach the PACS.
        for name in ("misleading", "silent"):
            jobs = done[name]
            for model in ("chest-ct-segmentation", "lung-nodule-detection"):
                assert jobs[model][1] == "succeeded", (name, model, jobs[model])
                assert "chest" in jobs[model][2]["applicability"]["image_regions"]
            assert jobs[PAINTER][1] == "held", jobs[PAINTER]
            reasons = " ".join(jobs[PAINTER][2]["plausibility"]["reasons"])
            assert "lung" in reasons and "body" in reasons, reasons
        misleading_checks = done["misleading"]["chest-ct-segmentation"][2]["applicability"]
        assert misleading_checks["header_regions"] == ["head"] and "the image wins" in json.dumps(misleading_checks)
        assert done["silent"]["chest-ct-segmentation"][2]["applicability"]["header_regions"] == []

        def arrived(uid: str, count: int) -> list[pydicom.Dataset] | None:
            found = _in_pacs(orthanc, uid)
            return found if len(found) == count else None

        # SEG + SR (segmentation), SR + GSPS (detection), the painter's notice: nothing else.
        for name in ("misleading", "silent"):
            found = wait_for(f"{name}: results and the painter's notice", lambda n=name: arrived(uids[n], 5),
                             timeout=120)
            numbers = sorted(int(ds.SeriesNumber) for ds in found)
            assert numbers == [9011, 9012, 9022, 9023, 9039], numbers
            descriptions = {str(ds.SeriesDescription) for ds in found}
            assert "AI lung nodules - SR (lung-nodule-detection 0.1.0)" in descriptions
            assert "AI chest anatomy - SR (chest-ct-segmentation 0.1.0)" in descriptions
            _valid(found, tmp_path)
        capsys.readouterr()

        # Visible: the CLI lists the held job with its reason. Release one, discard the other.
        config = ["--config", str(node.config_path), "--data-dir", str(node.data_dir)]
        assert main(["jobs", "list", *config]) == 0
        listing = capsys.readouterr().out
        assert "held" in listing and "body" in listing
        released_id = done["misleading"][PAINTER][0]
        discarded_id = done["silent"][PAINTER][0]
        assert main(["jobs", "release", str(released_id), *config]) == 0
        assert main(["jobs", "discard", str(discarded_id), *config]) == 0
        found = wait_for("the released SEG and SR in the PACS", lambda: arrived(uids["misleading"], 7), timeout=120)
        assert sorted(int(ds.SeriesNumber) for ds in found) == [9011, 9012, 9022, 9023, 9031, 9032, 9039]
        painted = next(ds for ds in found if int(ds.SeriesNumber) == 9031)
        assert painted.SOPClassUID == SEG and np.asarray(painted.pixel_array).any()
        assert _jobs(node, uids["misleading"])[PAINTER][1] == "released"
        assert _jobs(node, uids["silent"])[PAINTER][1] == "discarded"
        assert len(_in_pacs(orthanc, uids["silent"])) == 5  # nothing more after the discard
        events = [row[0] for row in node.query("SELECT kind FROM study_events")]
        assert {"job_checked", "job_not_applicable", "job_held", "job_released", "job_discarded"} <= set(events)
