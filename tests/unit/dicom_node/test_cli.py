"""The dicom-node command line: database upgrade and the study list, as an admin runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import text

from dicom_node.app.cli import main
from dicom_node.db.session import head_revision, make_engine
from dicom_node.settings import load_settings
from dicom_node.study_status import SHOWN_STATES
from tests.conftest import NodeFactory, free_port
from training.phantoms.ct_series import GeneratedSeries

REPO_ROOT = Path(__file__).resolve().parents[3]


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
    assert study["stored_state"] in ("receiving", "complete", "routed") and study["first_received_at"].endswith("+00:00")
    assert study["state"] in SHOWN_STATES and study["reason"]  # the shown state; its jobs may run meanwhile

    assert main(["studies", "--data-dir", data_dir]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("STATE") and small_series.study_uid in table[1] and " 5 " in table[1]


def test_studies_does_not_create_or_migrate_a_database(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "var"
    assert main(["studies", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert f"no database at {data_dir / 'dicom-node.db'}" in err and "Nothing was created" in err
    assert "looked at: --config (not given)" in err and "DICOM_NODE_CONFIG" in err
    assert not data_dir.exists()  # not even the folder
    assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
    assert main(["studies", "--data-dir", str(data_dir)]) == 0
    engine = make_engine(load_settings(None, {"data_dir": data_dir}).resolved_database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    assert main(["studies", "--data-dir", str(data_dir)]) == 1
    assert "is at revision 0001" in capsys.readouterr().err


def test_admin_commands_refuse_to_create_a_database(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = ["--data-dir", str(tmp_path / "var")]
    for command in (["destinations", "add", "pacs", "--ae-title", "PACS", "--host", "h", "--port", "104"],
                    ["rules", "list"], ["jobs", "list"], ["models", "list"], ["users", "list"], ["worker"]):
        assert main([*command, *data]) == 1, command
        assert "no database at" in capsys.readouterr().err, command
    assert not (tmp_path / "var").exists()


def test_the_cli_finds_its_settings_the_same_way_wherever_it_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.config_lookup import anchor_relative_paths, find_config

    checkout, system = tmp_path / "checkout", tmp_path / "etc" / "node.yaml"
    (checkout / "config").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    (checkout / "config" / "default.yaml").write_text("data_dir: ./var\n")
    named = tmp_path / "named.yaml"
    named.write_text("data_dir: ./elsewhere\n")

    def choose(cli: Path | None, env: dict[str, str]):  # type: ignore[no-untyped-def]
        return find_config(cli, env, system_file=system, checkout=checkout)

    assert choose(named, {"DICOM_NODE_CONFIG": "/nowhere.yaml"}).path == named  # --config first
    assert choose(None, {"DICOM_NODE_CONFIG": str(named)}).source == "$DICOM_NODE_CONFIG"
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        choose(None, {"DICOM_NODE_CONFIG": "/nowhere.yaml"})
    in_checkout = choose(None, {})
    assert in_checkout.path == checkout / "config" / "default.yaml" and in_checkout.base_dir == checkout
    system.parent.mkdir()
    system.write_text("data_dir: /srv/dicom-node\n")
    assert choose(None, {}).path == system  # before the checkout
    system.unlink()
    (checkout / "pyproject.toml").unlink()  # an installed copy, not a checkout: built-in defaults
    defaults = choose(None, {})
    assert defaults.path is None and f"{checkout / 'config' / 'default.yaml'} (absent)" in defaults.describe()
    # A relative data_dir of the checkout's file is the checkout's, from whatever folder the command runs in.
    monkeypatch.chdir(tmp_path)
    settings = anchor_relative_paths(load_settings(in_checkout.path), in_checkout.base_dir)
    assert settings.data_dir == checkout / "var"
    assert load_settings(named).data_dir == Path("elsewhere")  # --config: relative to the current folder


def test_the_checkouts_own_settings_are_found_from_another_folder(tmp_path: Path) -> None:
    """``dicom-node studies`` run outside the checkout reads the checkout's var/, and creates nothing where it runs."""
    env = {key: value for key, value in os.environ.items() if key != "DICOM_NODE_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "dicom_node", "studies"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    checkout_db = REPO_ROOT / "var" / "dicom-node.db"
    if checkout_db.is_file():
        assert done.returncode in (0, 1) and "no database at" not in done.stderr
    else:
        assert done.returncode == 1 and f"no database at {checkout_db}" in done.stderr, done.stderr
        assert str(REPO_ROOT / "config" / "default.yaml") in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_disable_enable_list_and_audit(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.db import audit
    from dicom_node.db.session import make_engine, make_session_factory

    data = ["--data-dir", str(tmp_path)]
    assert main(["models", "list", *data]) == 1  # listing never creates or migrates a database
    assert "no database at" in capsys.readouterr().err
    assert main(["db", "upgrade", *data]) == 0
    assert main(["models", "disable", "lung-nodule-detection", "--note", "<b>recall</b>", *data]) == 0
    assert "disabled" in capsys.readouterr().out
    assert main(["models", "list", "--json", *data]) == 0
    rows = {row["model_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["lung-nodule-detection"]["enabled"] is False and rows["lung-nodule-detection"]["note"] == "<b>recall</b>"
    assert rows["chest-ct-segmentation"]["enabled"] is True and rows["chest-ct-segmentation"]["kind"] == "segmentation"
    assert main(["models", "enable", "no-such-model", *data]) == 1
    assert "no model 'no-such-model' in the registry" in capsys.readouterr().err
    assert main(["models", "enable", "lung-nodule-detection", *data]) == 0

    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'dicom-node.db'}"))
    entries = audit.list_entries(sessions, action="model.")
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("cli", "model.enable", "lung-nodule-detection"), ("cli", "model.disable", "lung-nodule-detection")]
    assert entries[1].before == {"enabled": True, "note": None} and entries[1].after["enabled"] is False


def test_serve_with_a_rules_file_naming_an_unknown_model_exits_1_naming_it(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: chest\n    pipelines: [no-such-model]\n")
    config = tmp_path / "node.yaml"
    config.write_text(f"routing:\n  rules_file: {rules}\n")
    done = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(config), "--data-dir",
                           str(tmp_path / "var"), "--port", str(free_port()), "--web-port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot start" in done.stderr and "no-such-model" in done.stderr and str(rules) in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_the_web_port_in_use_exits_1_naming_it(tmp_path: Path) -> None:
    import socket

    from tests.conftest import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        web_port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node", "serve", "--data-dir", str(tmp_path), "--port", str(free_port()),
             "--web-port", str(web_port)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "DICOM_NODE_STORAGE__MIN_FREE_MB": "0",
                 "DICOM_NODE_QUEUE__EMBEDDED_WORKER_QUEUES": "[]"},
        )
    assert done.returncode == 1
    assert f"cannot start: the web server could not start on http://127.0.0.1:{web_port} (port in use?)" in done.stderr


def test_configuration_changes_from_the_shell_are_audited_without_secrets(tmp_path: Path) -> None:
    from dicom_node.db import audit
    from dicom_node.db.session import make_engine, make_session_factory

    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["db", "upgrade", *data]) == 0
    assert main(["destinations", "add", "pacs", "--ae-title", "PACS", "--host", "10.0.0.5", "--port", "104",
                 *data]) == 0
    assert main(["destinations", "add", "pacs", "--ae-title", "PACS2", "--host", "10.0.0.5", "--port", "104",
                 *data]) == 0
    archive = tmp_path / "destinations.yaml"
    archive.write_text("destinations:\n  - {type: dicomweb, name: archive, url: 'https://dw.example/dicom-web',\n"
                       "     auth: {type: basic, username: node, password: hunter2-secret}}\n")
    assert main(["destinations", "import", str(archive), *data]) == 0
    assert main(["destinations", "remove", "pacs", *data]) == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: chest, pipelines: [chest-ct-segmentation]}\n")
    assert main(["rules", "import", str(rules), *data]) == 0
    assert main(["rules", "remove", "chest", *data]) == 0

    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'data' / 'dicom-node.db'}"))
    entries = list(reversed(audit.list_entries(sessions)))
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("cli", "destination.create", "pacs"), ("cli", "destination.update", "pacs"),
        ("cli", "destination.create", "archive"), ("cli", "destination.delete", "pacs"),
        ("cli", "rule.create", "chest"), ("cli", "rule.delete", "chest")]
    assert entries[1].before["ae_title"] == "PACS" and entries[1].after["ae_title"] == "PACS2"
    assert entries[2].detail == f"imported from {archive}"
    assert "hunter2-secret" not in json.dumps([(e.before, e.after) for e in entries])
    assert entries[5].before["pipelines"] == ["chest-ct-segmentation"] and entries[5].after is None


CHEST_LINE = "CT; chest; slices >= 10; pixel spacing mm 0.3-3; slice spacing mm 0.3-6; axial"


def test_models_list_shows_what_each_model_was_made_for(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["db", "upgrade", *data]) == 0
    capsys.readouterr()
    assert main(["models", "list", *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # two lines per model
    assert lines[0].split()[:3] == ["chest-ct-segmentation", "segmentation", "enabled"]
    assert lines[0].endswith("series 9011 SEG, 9012 SR, 9015 SC, 9018 KO, 9019 not performed")
    assert lines[1].startswith(f"    made for {CHEST_LINE} | results must pass: lung 1000-9000 mL; heart 100-1500 mL;")
    assert lines[3] == f"    made for {CHEST_LINE} | results must pass: findings inside the lungs (margin 5 mm)"
    assert main(["models", "list", "--json", *data]) == 0
    rows = {row["model_id"]: row for row in json.loads(capsys.readouterr().out)}
    seg, det = rows["chest-ct-segmentation"], rows["lung-nodule-detection"]
    assert seg["input_domain"]["body_regions"] == ["chest"] and seg["input_domain"]["orientations"] == ["axial"]
    assert seg["plausibility"]["volumes_ml"]["heart"] == {"min": 100, "max": 1500}
    assert det["plausibility"] == {"findings_inside": "lungs", "findings_margin_mm": 5.0}
    assert det["result_series"] == [
        {"kind": "SR", "series_number": 9022, "description": "AI lung nodules - SR (lung-nodule-detection 0.1.0)"},
        {"kind": "GSPS", "series_number": 9023, "description": "AI lung nodules - GSPS (lung-nodule-detection 0.1.0)"},
        {"kind": "SC", "series_number": 9025, "description": "AI lung nodules - SC (lung-nodule-detection 0.1.0)"},
        {"kind": "KO", "series_number": 9028, "description": "AI lung nodules - key images (lung-nodule-detection 0.1.0)"},
        {"kind": "NOTICE", "series_number": 9029,
         "description": "AI lung nodules - not performed (lung-nodule-detection 0.1.0)"}]
    assert seg["error"] is None and seg["made_for_warning"] is None

    registry = tmp_path / "models.yaml"
    registry.write_text("""
models:
  - {id: anywhere, kind: detection, format: monai_bundle, path: package://workers/bundles/lung_nodule_detection,
     version: "0.1.0", input_domain: {modalities: [CT]}}
  - {id: misfit, kind: detection, format: monai_bundle, path: package://workers/bundles/lung_nodule_detection,
     version: "0.1.0", plausibility: {volumes_ml: {nodule: {max: 50}}}}
""")
    config = tmp_path / "node.yaml"
    config.write_text(f"routing:\n  models_file: {registry}\n")
    assert main(["models", "list", "--config", str(config), *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("    made for CT - WARNING: no body region declared - runs on any region of its modality"
                        " | results must pass: none")
    assert lines[2].startswith("misfit ") and "series 9022 SR, 9023 GSPS, 9025 SC, 9028 KO, 9029 not performed" in lines[2]
    assert lines[3].startswith("    ERROR: ") and "plausibility rule(s) volumes_ml cannot judge a detection" in lines[3]


def test_rules_test_prints_the_header_check_before_each_model(  # type: ignore[no-untyped-def]
    tmp_path: Path, capsys
) -> None:
    """A study whose header names the head: the rule matches, both chest models would decline it."""
    import pydicom

    from dicom_node.db import config_repo
    from dicom_node.ingest import utc_now
    from dicom_node.routing import default_rules
    from tests.web.conftest import make_web_env
    from tests.web.test_rules import ingest
    from training.phantoms.ct_series import SeriesGeometry, generate_ct_series

    head = generate_ct_series(tmp_path / "head", geometry=SeriesGeometry(rows=32, columns=32, slices=12), seed=58,
                              study_description="CT HEAD")
    for path in head.paths:
        dataset = pydicom.dcmread(path)
        dataset.BodyPartExamined = "HEAD"
        dataset.save_as(path)
    env = make_web_env(tmp_path / "data")
    ingest(env, head.paths)
    config_repo.upsert_rules(env.sessions, default_rules(), source="test", now=utc_now())
    assert main(["rules", "test", head.study_uid, "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "MATCH    ct-default" in out
    assert f"    chest-ct-segmentation is made for: {CHEST_LINE}\n" in out
    assert ("      NOT APPLICABLE: chest-ct-segmentation not applicable: body region: the header says head; the model "
            "is made for chest (the image was not judged) (0.000 s)\n") in out
    assert "        ok   modality: CT is CT\n" in out and "        FAIL body region: the header says head;" in out
    assert "        FAIL header regions: body_part_examined 'HEAD': HEAD -> head;" in out
    assert out.count("NOT APPLICABLE") == 2 and "(header only; add --image" in out
