"""Studies received over DICOM are routed by the rules in the database, and admins see why.

The node runs without a worker here (jobs stay queued), so this is routing alone:
the default rule, a rule file with AE-title and description conditions, the CLI's
``rules test``, and our own result objects coming back without creating jobs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import yaml

from dicom_node.app.cli import main
from peers import NodeProcess, wait_for
from training.phantoms.ct_series import SeriesGeometry, generate_ct_series


def push(node: NodeProcess, files: list[Path], calling_ae: str = "STORESCU") -> None:
    result = node.storescu(files, calling_ae=calling_ae)
    assert result.returncode == 0, result.stderr


def wait_state(node: NodeProcess, study_uid: str, *states: str) -> str:
    def probe() -> str | None:
        rows = node.query("SELECT state FROM studies WHERE study_instance_uid = ?", [study_uid])
        return rows[0][0] if rows and rows[0][0] in states else None

    return wait_for(f"study {study_uid} in state {states}", probe, timeout=20)


def test_default_rule_queues_both_demo_models_on_the_thinnest_ct_series(node_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_process()
    thick = generate_ct_series(tmp_path / "thick", geometry=SeriesGeometry(
        rows=32, columns=32, slices=12, slice_spacing=5.0, slice_thickness=5.0), seed=3, series_number=2)
    thin = generate_ct_series(tmp_path / "thin", geometry=SeriesGeometry(
        rows=32, columns=32, slices=24, slice_spacing=2.5, slice_thickness=2.5), seed=3, series_number=3)
    assert thick.study_uid == thin.study_uid
    push(node, thick.paths + thin.paths)
    assert wait_state(node, thin.study_uid, "routed", "ignored") == "routed"
    jobs = node.query("SELECT pipeline, series_instance_uid, state, rule FROM jobs ORDER BY pipeline")
    assert jobs == [("chest-ct-segmentation", thin.series_uid, "queued", "ct-default"),
                    ("lung-nodule-detection", thin.series_uid, "queued", "ct-default")]


def test_rules_file_conditions_and_the_rules_test_command(node_process, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [{
        "name": "chest-from-ct1", "pipelines": ["lung-nodule-detection"],
        "conditions": [{"attribute": "calling_ae_title", "in": ["CT1"]},
                       {"attribute": "study_description", "regex": "chest"}],
    }]}))
    node = node_process({"routing.rules_file": str(rules)})
    chest = generate_ct_series(tmp_path / "a", geometry=SeriesGeometry(rows=32, columns=32, slices=10), seed=21,
                               study_description="CT CHEST W/O")
    push(node, chest.paths, calling_ae="CT2")
    assert wait_state(node, chest.study_uid, "routed", "ignored") == "ignored"
    detail = node.query("SELECT detail FROM study_events WHERE kind = 'ignored'")[0][0]
    assert "calling_ae_title 'CT2' is not in ['CT1']" in detail

    other = generate_ct_series(tmp_path / "b", geometry=SeriesGeometry(rows=32, columns=32, slices=10), seed=22,
                               study_description="CT CHEST W/O")
    push(node, other.paths, calling_ae="CT1")
    assert wait_state(node, other.study_uid, "routed", "ignored") == "routed"

    code = main(["rules", "test", chest.study_uid, "--config", str(node.config_path), "--data-dir", str(node.data_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "NO MATCH chest-from-ct1" in out and "calling_ae_title 'CT2' is not in ['CT1']" in out
    assert "study_description 'CT CHEST W/O' is matching /chest/" in out


def test_our_own_results_coming_back_never_create_jobs(node_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_process()
    series = generate_ct_series(tmp_path / "ct", geometry=SeriesGeometry(rows=32, columns=32, slices=12), seed=31)
    push(node, series.paths)
    wait_state(node, series.study_uid, "routed")
    [(job_id,)] = node.query("SELECT id FROM jobs WHERE pipeline = 'lung-nodule-detection'")
    # A result this node produced (registered as a result object), sent back by the PACS.
    result_dir = tmp_path / "result"
    result = generate_ct_series(result_dir, geometry=SeriesGeometry(rows=32, columns=32, slices=12), seed=31,
                                series_number=9001)
    ds = pydicom.dcmread(result.paths[0])
    with sqlite3.connect(node.db_path, timeout=10) as connection:
        connection.execute(
            "INSERT INTO result_objects (job_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid, path, "
            "created_at) VALUES (?, 'SEG', ?, ?, ?, 'x.dcm', '2026-01-01 00:00:00')",
            (job_id, str(ds.SOPClassUID), str(ds.SOPInstanceUID), result.series_uid),
        )
    push(node, result.paths)
    wait_for("the returned results completing the study again",
             lambda: node.query("SELECT COUNT(*) FROM study_events WHERE kind = 'routed'")[0][0] >= 2, timeout=20)
    assert node.query("SELECT COUNT(*) FROM jobs")[0][0] == 2
    detail = node.query("SELECT detail FROM study_events WHERE kind = 'routed' ORDER BY id DESC")[0][0]
    assert "not run again: " in detail and detail.count(" queued") + detail.count(" running") >= 2, detail
