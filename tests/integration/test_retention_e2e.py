"""Retention on a running node with Orthanc as the PACS: a dry run first, then the purge removes only the
finished study; a study whose delivery waits for its retry stays; results the PACS sends back afterwards
are still recognised as the node's own; the study's exported record says what happened.

Two chest phantoms go through the demo detection model (fast on CPU) and are delivered to Orthanc;
the second also to an archive that is down, whose delivery waits ten minutes for its next attempt.
Every admin step is a ``dicom-node`` command against the running node's database.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from peers import NodeProcess, Orthanc, free_port, wait_for
from test_study_recovery_e2e import chest, cli, in_pacs, jobs_of, pacs, pacs_destination, results_of, start_node, \
    study_uid
from training.data.dicom_pair import write_dicom_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

__all__ = ["chest", "pacs"]  # fixtures used here, defined beside the other admin scenarios

#: The age limit of the purge: 8.6 s, so that both studies are "old" a few seconds after their last activity.
OLDER_THAN_DAYS = "0.0001"
#: What retention must never change on a dry run (the node's own heartbeat tables change meanwhile).
RECORD_TABLES = ("studies", "series", "instances", "jobs", "deliveries", "result_objects", "study_events", "audit_log")


@pytest.fixture(scope="module")
def second_chest(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = generate_chest_phantom(PhantomConfig(shape=(48, 80, 80), spacing_mm=(5.0, 4.4, 4.4),
                                                   nodule_count=(1, 1), nodule_diameter_mm=(12.0, 14.0)), seed=809)
    series_dir, _ = write_dicom_case(phantom, tmp_path_factory.mktemp("chest2") / "case", seed=809)
    return sorted(series_dir.glob("*.dcm"))


def snapshot(node: NodeProcess) -> tuple[dict[str, list[tuple[Any, ...]]], list[tuple[str, int]]]:
    rows = {table: node.query(f"SELECT * FROM {table} ORDER BY 1") for table in RECORD_TABLES}
    files = sorted((str(p.relative_to(node.data_dir)), p.stat().st_size)
                   for folder in ("spool", "outbox") for p in (node.data_dir / folder).rglob("*") if p.is_file())
    return rows, files


def instances_of(node: NodeProcess, uid: str) -> int:
    return int(node.query("SELECT count(*) FROM instances i JOIN series s ON s.id = i.series_id JOIN studies t ON "
                          "t.id = s.study_id WHERE t.study_instance_uid = ?", (uid,))[0][0])


@pytest.mark.slow
def test_retention_removes_only_the_finished_study_after_a_dry_run(
        tmp_path: Path, chest: list[Path], second_chest: list[Path], pacs: Orthanc,
        capsys: pytest.CaptureFixture[str]) -> None:
    node = start_node(tmp_path, destinations=[pacs_destination(pacs)],
                      **{"delivery.backoff_initial_seconds": 600, "delivery.backoff_max_seconds": 600})
    try:
        done_uid, waiting_uid = study_uid(chest), study_uid(second_chest)
        assert node.storescu(chest).returncode == 0
        [first] = wait_for("the first study's job", lambda: [j for j in jobs_of(node) if j["state"] == "succeeded"]
                           or None, timeout=180)
        results = results_of(node, first["id"])
        wait_for("its results in the PACS", lambda: in_pacs(pacs, list(results)), timeout=60)

        cli(node, capsys, "destinations", "add", "archive", "--ae-title", "ARCHIVE", "--host", "127.0.0.1",
            "--port", str(free_port()), "--default")  # nothing listens there
        assert node.storescu(second_chest).returncode == 0
        wait_for("the archive delivery to wait for its retry", lambda: node.query(
            "SELECT id FROM deliveries WHERE destination = 'archive' AND state = 'failed'") or None, timeout=240)
        [[archive_delivery]] = node.query("SELECT id FROM deliveries WHERE destination = 'archive'")
        time.sleep(10)  # both studies' last activity is now older than OLDER_THAN_DAYS

        before = snapshot(node)
        dry = cli(node, capsys, "studies", "purge", "--older-than-days", OLDER_THAN_DAYS, "--dry-run")
        would, skipped = dry.split("SKIPPED (unfinished work):")
        assert "DRY RUN" in would and done_uid in would and waiting_uid not in would, dry
        assert f"{waiting_uid}: delivery {archive_delivery} to archive is failed, awaiting its next attempt" in skipped
        assert "total: would delete 1 study(ies), 48 instance(s)" in dry
        assert snapshot(node) == before, "the dry run changed the node's record or files"

        out = cli(node, capsys, "studies", "purge", "--older-than-days", OLDER_THAN_DAYS)
        assert "total: deleted 1 study(ies), 48 instance(s)" in out, out
        assert instances_of(node, done_uid) == 0 and instances_of(node, waiting_uid) == 48
        spool_dirs = {p.name for p in node.spool_dir.iterdir() if not p.name.startswith(".")}
        assert spool_dirs == {waiting_uid}
        outbox = node.data_dir / "outbox"
        assert not (outbox / f"job-{first['id']}").exists()
        assert all((outbox / path).is_file() for (path,) in node.query(
            "SELECT r.path FROM result_objects r JOIN jobs j ON j.id = r.job_id WHERE j.id != ?", (first["id"],)))
        assert set(results_of(node, first["id"])) == set(results)  # the rows that recognise them stay
        assert in_pacs(pacs, list(results)), "the PACS's copies are not the node's to delete"

        result_series = {series for _, series in results.values()}
        # The PACS sends the purged study's results back (an auto-routing PACS does): still the node's own.
        returned = tmp_path / "returned"
        returned.mkdir()
        for n, sop in enumerate(results):
            (returned / f"{n}.dcm").write_bytes(pacs.instance_file(str(pacs.lookup_instance(sop))))
        assert node.storescu(sorted(returned.iterdir()), "--required").returncode == 0  # SR and GSPS contexts
        # The study completes again and is routed again: its instances are gone, and the returned series
        # are known as results (their ResultObject rows stayed), so no rule selects anything.
        [[why]] = wait_for("the study to be routed again", lambda: node.query(
            "SELECT e.detail FROM study_events e JOIN studies s ON s.id = e.study_id WHERE s.study_instance_uid = ? "
            "AND e.kind IN ('routed', 'ignored') AND e.id > (SELECT max(id) FROM study_events WHERE kind = 'purged')",
            (done_uid,)) or None, timeout=60)
        assert why.count("a result this node produced, never routed") == len(result_series), why
        assert len(jobs_of(node)) == 2, "returned results started a job"

        record_file = tmp_path / "incident.json"
        cli(node, capsys, "studies", "export", done_uid, "--output", str(record_file))
        record = json.loads(record_file.read_text(encoding="utf-8"))
        assert record["format"] == "dicom-node.study-record/1" and record["study"]["purged_at"]
        assert [e["kind"] for e in record["timeline"]].count("study.purged") == 1
        assert {s["series_instance_uid"] for s in record["series"] if s["is_result"]} == result_series
        assert ("cli", "study.purge") in [(e["actor"], e["action"]) for e in record["audit"]]
        assert pydicom.dcmread(next(returned.iterdir()), stop_before_pixels=True).StudyInstanceUID == done_uid
    finally:
        node.close()
