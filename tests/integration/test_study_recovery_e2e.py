"""What an admin does when things go wrong, with Orthanc as the PACS: results for a destination added later,
re-processing into new series, an interrupted push that heals itself, and the states a study shows.

The node runs its embedded worker with the demo detection model on a small chest phantom (fast on CPU);
everything an admin does goes through ``dicom-node`` commands against the running node's database.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from dicom_node.app.cli import main
from peers import NodeProcess, Orthanc, free_port, wait_for
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

DETECTION = "lung-nodule-detection"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 48-slice chest phantom with one nodule."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(48, 80, 80), spacing_mm=(5.0, 4.4, 4.4),
                                                   nodule_count=(1, 1), nodule_diameter_mm=(14.0, 16.0)), seed=808)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("chest") / "case", seed=808)
    return sorted(series_dir.glob("*.dcm"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    orthanc = Orthanc(tmp_path / "orthanc", aet="PACS", label="orthanc-recovery").start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


def start_node(work: Path, destinations: list[dict[str, Any]], **overrides: Any) -> NodeProcess:
    """The node with the detection model only (inputs of 10 slices and more) and ``destinations``."""
    chest_domain = {"modalities": ["CT"], "body_regions": ["chest"], "slices": {"min": 10}, "orientations": ["axial"]}
    (work / "models.yaml").write_text(yaml.safe_dump({"models": [{
        "id": DETECTION, "kind": "detection", "format": "monai_bundle", "version": "0.1.0",
        "path": "package://workers/bundles/lung_nodule_detection", "title": "AI lung nodules",
        "input_domain": chest_domain}]}))
    (work / "rules.yaml").write_text(yaml.safe_dump({"rules": [{
        "name": "chest-ct", "pipelines": [DETECTION], "conditions": [{"attribute": "modality", "in": ["CT"]}]}]}))
    (work / "destinations.yaml").write_text(yaml.safe_dump({"destinations": destinations}))
    return NodeProcess(work / "node", overrides={
        "routing.rules_file": str(work / "rules.yaml"), "routing.models_file": str(work / "models.yaml"),
        "routing.destinations_file": str(work / "destinations.yaml"),
        "queue": {"broker_url": "memory://", "embedded_worker_queues": ["gpu", "io"], "sweep_interval_seconds": 0.2},
        **overrides}).start()


def pacs_destination(orthanc: Orthanc) -> dict[str, Any]:
    return {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port,
            "default": True}


def cli(node: NodeProcess, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main([*args, "--config", str(node.config_path), "--data-dir", str(node.data_dir)])
    out = capsys.readouterr()
    assert code == 0, f"dicom-node {' '.join(args)} exited {code}: {out.err}"
    return out.out


def shown(node: NodeProcess, capsys: pytest.CaptureFixture[str], uid: str) -> dict[str, Any]:
    """The study as ``dicom-node studies --json`` shows it."""
    [study] = [s for s in json.loads(cli(node, capsys, "studies", "--json")) if s["study_instance_uid"] == uid]
    return study


def jobs_of(node: NodeProcess) -> list[dict[str, Any]]:
    rows = node.query("SELECT id, state, generation, supersedes_job_id, superseded_at, error FROM jobs ORDER BY id")
    return [dict(zip(("id", "state", "generation", "supersedes", "superseded_at", "error"), row)) for row in rows]


def results_of(node: NodeProcess, job_id: int) -> dict[str, tuple[str, str]]:
    """{SOP Instance UID: (kind, Series Instance UID)} of a job's result objects."""
    rows = node.query("SELECT sop_instance_uid, kind, series_instance_uid FROM result_objects WHERE job_id = ?",
                      (job_id,))
    return {sop: (kind, series) for sop, kind, series in rows}


def delivered(node: NodeProcess, job_id: int, destination: str = "pacs") -> bool:
    return bool(node.query("SELECT 1 FROM deliveries WHERE job_id = ? AND destination = ? AND state = 'delivered'",
                           (job_id, destination)))


def in_pacs(orthanc: Orthanc, sop_uids: list[str]) -> list[pydicom.Dataset] | None:
    found = [orthanc.lookup_instance(uid) for uid in sop_uids]
    if not all(found):
        return None
    return [pydicom.dcmread(io.BytesIO(orthanc.instance_file(str(i)))) for i in found]


def tracking_uids(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    """(Tracking Identifier, Tracking Unique Identifier) of every measurement group of a TID 1500 report."""
    [measurements] = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    found = set()
    for group in measurements.ContentSequence:
        items = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group.ContentSequence}
        found.add((str(items["112039"].TextValue), str(items["112040"].UID)))
    return found


def study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.slow
def test_results_reach_a_destination_added_later_and_reprocessing_supersedes_them(
        tmp_path: Path, chest: list[Path], pacs: Orthanc, capsys: pytest.CaptureFixture[str]) -> None:
    node = start_node(tmp_path, destinations=[])
    try:
        uid = study_uid(chest)
        assert node.storescu(chest).returncode == 0
        [first] = wait_for("the detection job to succeed", lambda: [j for j in jobs_of(node)
                                                                   if j["state"] == "succeeded"] or None, timeout=180)
        study = shown(node, capsys, uid)
        assert study["state"] == "held" and "no destination" in study["reason"], study

        # The admin adds the PACS, then sends the existing results to it.
        cli(node, capsys, "destinations", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port",
            str(pacs.dicom_port), "--default")
        out = cli(node, capsys, "studies", "resend", uid)
        assert f"job {first['id']} ({DETECTION}) -> pacs" in out and "created" in out
        originals = results_of(node, first["id"])
        assert {kind for kind, _ in originals.values()} >= {"SR", "GSPS"}
        wait_for("the results in the PACS", lambda: in_pacs(pacs, list(originals)), timeout=60)
        # The PACS stores each object before the node records the delivery (after the association's release).
        wait_for("the delivery recorded", lambda: delivered(node, first["id"]), timeout=30)
        assert shown(node, capsys, uid)["state"] == "done"

        # Re-process (say the model was updated): new objects in new series; the old ones superseded.
        out = cli(node, capsys, "studies", "reprocess", uid)
        assert f"replaces job {first['id']}" in out
        second = wait_for("the re-run to succeed", lambda: next(
            (j for j in jobs_of(node) if j["generation"] == 2 and j["state"] == "succeeded"), None), timeout=180)
        assert second["supersedes"] == first["id"]
        renewed = results_of(node, second["id"])
        wait_for("the new results in the PACS", lambda: in_pacs(pacs, list(renewed)), timeout=60)
        assert set(renewed).isdisjoint(originals)
        assert {series for _, series in renewed.values()}.isdisjoint({series for _, series in originals.values()})
        assert all(j["superseded_at"] for j in jobs_of(node) if j["id"] == first["id"])
        [superseded] = node.query("SELECT detail FROM study_events WHERE kind = 'results_superseded'")
        assert all(sop in superseded[0] for sop in originals), superseded
        # The PACS holds both generations: the new SR names the one it replaces (Predecessor Documents).
        [new_sr] = in_pacs(pacs, [sop for sop, (kind, _) in renewed.items() if kind == "SR"]) or []
        [old_sr_uid] = [sop for sop, (kind, _) in originals.items() if kind == "SR"]
        predecessors = [ref.ReferencedSOPInstanceUID for study_ref in new_sr.PredecessorDocumentsSequence
                        for series_ref in study_ref.ReferencedSeriesSequence
                        for ref in series_ref.ReferencedSOPSequence]
        assert predecessors == [old_sr_uid]
        assert "(run 2)" in str(new_sr.SeriesDescription)
        # The same model on the same series finds the same nodules: each keeps its tracking UID (AIR: a finding
        # is followed across re-processing), while the report itself is a new document.
        [old_sr] = in_pacs(pacs, [old_sr_uid]) or []
        assert tracking_uids(new_sr) == tracking_uids(old_sr) and tracking_uids(old_sr)
        wait_for("the re-run's delivery recorded", lambda: delivered(node, second["id"]), timeout=30)
        assert shown(node, capsys, uid)["state"] == "done"
        actions = [row[0] for row in node.query("SELECT action FROM audit_log WHERE actor = 'cli'")]
        assert {"destination.create", "study.resend", "study.reprocess"} <= set(actions), actions
    finally:
        node.close()


@pytest.mark.slow
def test_an_interrupted_push_heals_itself_when_the_pacs_sends_the_study_again(
        tmp_path: Path, chest: list[Path], pacs: Orthanc, capsys: pytest.CaptureFixture[str]) -> None:
    archive = {"type": "dicom", "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port(),
               "default": True, "timeout_seconds": 2}
    node = start_node(tmp_path, destinations=[pacs_destination(pacs), archive],
                      **{"delivery.max_attempts": 2, "delivery.backoff_initial_seconds": 0.5})
    try:
        uid = study_uid(chest)
        sent = random.Random(57).sample(chest, 29)  # the push stops after 29 of 48 images, in no slice order
        node.storescu(sent, "--abort")
        [dead] = wait_for("the job to die on the incomplete series",
                          lambda: [j for j in jobs_of(node) if j["state"] == "dead"] or None, timeout=120)
        assert "slice(s) missing" in dead["error"], dead
        study = shown(node, capsys, uid)
        assert study["state"] == "failed" and f"job {dead['id']}" in study["reason"], study

        # The PACS sends the whole study again; nobody touches the node.
        assert node.storescu(chest).returncode == 0
        healed = wait_for("the re-run to succeed", lambda: next(
            (j for j in jobs_of(node) if j["generation"] == 2 and j["state"] == "succeeded"), None), timeout=180)
        assert healed["supersedes"] == dead["id"]
        results = results_of(node, healed["id"])
        wait_for("the results in the PACS", lambda: in_pacs(pacs, list(results)), timeout=60)
        [why] = node.query("SELECT detail FROM study_events WHERE kind = 'rerun_on_more_instances'")
        assert f"job {healed['id']} runs {DETECTION} again" in why[0] and "19 more instance(s)" in why[0], why

        # The archive is down: its delivery dies, and the study says so (the dead job is history now).
        wait_for("the archive delivery to die", lambda: node.query(
            "SELECT id FROM deliveries WHERE destination = 'archive' AND state = 'dead'") or None, timeout=60)
        study = shown(node, capsys, uid)
        assert study["state"] == "failed" and "archive" in study["reason"] and "delivery" in study["reason"], study
        assert f"job {dead['id']}" not in study["reason"]
    finally:
        node.close()
