"""The dicom-node command line: database upgrade and the study list, as an admin runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.cli import main
from dicom_node.db.session import head_revision
from tests.conftest import NodeFactory
from training.phantoms.ct_series import GeneratedSeries


def test_db_upgrade_creates_the_database(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out
    assert (tmp_path / "dicom-node.db").is_file()


def test_invalid_configuration_exits_2_with_the_setting_named(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("dicom:\n  port: -4\n")
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "dicom.port" in done.stderr and "invalid configuration" in done.stderr


def test_studies_lists_state_counts_and_timestamps(
    node_factory: NodeFactory, small_series: GeneratedSeries, capsys  # type: ignore[no-untyped-def]
) -> None:
    node = node_factory()
    data_dir = str(node.settings.data_dir)
    assert main(["studies", "--data-dir", data_dir]) == 0
    assert "no studies received yet" in capsys.readouterr().out

    ae = AE("CLI_TEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOM_NODE")
    for path in small_series.paths[:5]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()

    assert main(["studies", "--json", "--data-dir", data_dir]) == 0
    [study] = json.loads(capsys.readouterr().out)
    assert study["study_instance_uid"] == small_series.study_uid
    assert (study["instances"], study["series"], study["modalities"]) == (5, 1, ["CT"])
    assert study["state"] in ("receiving", "complete", "routed") and study["first_received_at"].endswith("+00:00")

    assert main(["studies", "--data-dir", data_dir]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("STATE") and small_series.study_uid in table[1] and " 5 " in table[1]


def test_studies_does_not_create_or_migrate_a_database(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["studies", "--data-dir", str(tmp_path)]) == 1
    assert "db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert main(["studies", "--data-dir", str(tmp_path)]) == 0
