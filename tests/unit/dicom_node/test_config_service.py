"""One configuration service behind the REST API, the CLI and the YAML import at the node's start.

Each path must refuse a rule naming an unknown model or destination with the same message (naming the
field and the value), store nothing and audit nothing; and each accepted change must leave exactly one
audit entry naming the right actor.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.app.cli import main
from dicom_node.config_files import ConfigFileError, import_configuration
from dicom_node.config_service import CLI, CONFIG_FILE, Actor, DestinationsService, Refused, RulesService
from dicom_node.db import audit, config_repo, users
from dicom_node.model_catalog import ModelCatalog
from dicom_node.routing import load_stored_rule
from dicom_node.settings import RoutingSettings
from tests.web.conftest import WebEnv, make_web_env

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
DEMO = "chest-ct-segmentation, lung-nodule-detection"
PACS = {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
UNKNOWN_PIPELINE = {"name": "chest", "pipelines": ["chest-ct-segmentation", "no-such-model"]}
UNKNOWN_DESTINATION = {"name": "chest", "pipelines": ["lung-nodule-detection"], "destinations": ["pacs", "nowhere"]}
#: (the rule, its field, the message every path gives for it).
REFUSED = [
    (UNKNOWN_PIPELINE, "pipelines.1", f"unknown pipeline 'no-such-model'; the model registry lists {DEMO}"),
    (UNKNOWN_DESTINATION, "destinations.1", "no destination named 'nowhere' (known: pacs)"),
]


@pytest.fixture
def env(tmp_path: Path) -> WebEnv:
    """A node's database (with the destination ``pacs``) and its web app; the CLI reaches it by --data-dir."""
    web = make_web_env(tmp_path / "data")
    DestinationsService(web.sessions, clock=lambda: T0).save(PACS, Actor("setup", "test"))
    return web


def rules_file(tmp_path: Path, *rules: dict[str, Any]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": list(rules)}))
    return path


def via_api(env: WebEnv, tmp_path: Path, rule: dict[str, Any], capsys: Any) -> str:
    answer = env.client().post("/api/v1/rules", json=rule, headers={"Authorization": f"Bearer {env.token('admin')}"})
    if answer.status_code == 201:
        return ""
    assert answer.status_code == 422, answer.text
    return "\n".join(f"{e['field']}: {e['message']}" for e in answer.json()["errors"])


def via_cli(env: WebEnv, tmp_path: Path, rule: dict[str, Any], capsys: Any) -> str:
    capsys.readouterr()
    code = main(["rules", "import", str(rules_file(tmp_path, rule)), "--data-dir", str(env.data_dir)])
    err = capsys.readouterr().err
    assert code == (0 if not err else 2), err
    return err


def via_start(env: WebEnv, tmp_path: Path, rule: dict[str, Any], capsys: Any) -> str:
    try:
        import_configuration(env.sessions, RoutingSettings(rules_file=rules_file(tmp_path, rule)), now=T0)
    except ConfigFileError as exc:
        return str(exc)
    return ""


PATHS: dict[str, tuple[Callable[..., str], str]] = {
    "api": (via_api, "admin"), "cli": (via_cli, "cli"), "start": (via_start, "config-file")}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("rule", "field", "message"), REFUSED, ids=["unknown pipeline", "unknown destination"])
def test_every_path_refuses_an_unknown_reference_with_the_same_message(
    env: WebEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, rule: dict[str, Any], field: str,
    message: str,
) -> None:
    run, _ = PATHS[path]
    said = run(env, tmp_path, rule, capsys)
    assert message in said
    # the field is named too: "pipelines.1: ..." (API, as the field of the error) or "rules[0] ('chest'):
    # pipelines.1: ..." (file import, with the file named)
    assert f"{field}: {message}" in said
    if path != "api":
        assert str(tmp_path / "rules.yaml") in said and "rules[0] ('chest')" in said
    assert config_repo.list_rules(env.sessions) == []
    assert audit.list_entries(env.sessions, action="rule.") == []


@pytest.mark.parametrize("path", PATHS)
def test_every_path_audits_one_change_with_its_actor(
    env: WebEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    run, actor = PATHS[path]
    rule = {"name": "chest", "pipelines": ["lung-nodule-detection"], "destinations": ["pacs"]}
    assert run(env, tmp_path, rule, capsys) == ""
    [entry] = audit.list_entries(env.sessions, action="rule.")
    assert (entry.actor, entry.action, entry.target) == (actor, "rule.create", "chest")
    assert entry.before is None and entry.after["destinations"] == ["pacs"]
    if path == "api":
        assert entry.detail == "(API token)"
    else:
        assert entry.detail == f"imported from {tmp_path / 'rules.yaml'}"
    [stored] = config_repo.list_rules(env.sessions)
    assert stored.name == "chest" and stored.pipelines == ["lung-nodule-detection"]

    if path != "api":  # importing the same file again changes nothing, and records nothing
        assert run(env, tmp_path, rule, capsys) == ""
        assert len(audit.list_entries(env.sessions, action="rule.")) == 1


def test_a_start_with_an_invalid_reference_imports_neither_file(env: WebEnv, tmp_path: Path) -> None:
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(yaml.safe_dump({"destinations": [{**PACS, "name": "archive"}]}))
    rules = rules_file(tmp_path, {"name": "ok", "pipelines": ["lung-nodule-detection"], "destinations": ["archive"]},
                       {"name": "typo", "pipelines": ["lung-nodule-detection"], "destinations": ["archvie"]})
    with pytest.raises(ConfigFileError) as caught:
        import_configuration(env.sessions, RoutingSettings(rules_file=rules, destinations_file=destinations), now=T0)
    assert str(caught.value) == (f"rules file {rules} is invalid:\n  rules[1] ('typo'): destinations.0: no destination "
                                 "named 'archvie' (known: archive, pacs)")
    assert [d.name for d in config_repo.list_destinations(env.sessions)] == ["pacs"]
    assert config_repo.list_rules(env.sessions) == []

    rules.write_text(yaml.safe_dump({"rules": [{"name": "ok", "pipelines": ["lung-nodule-detection"],
                                                "destinations": ["archive"]}]}))
    import_configuration(env.sessions, RoutingSettings(rules_file=rules, destinations_file=destinations), now=T0)
    assert [(e.actor, e.action, e.target) for e in reversed(audit.list_entries(env.sessions, actor="config-file"))] \
        == [("config-file", "destination.create", "archive"), ("config-file", "rule.create", "ok")]


def test_destinations_refused_alike_by_the_api_and_the_cli(
    env: WebEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-ca.pem"
    archive = {"type": "dicomweb", "name": "archive", "url": "https://dw.example/dicom-web",
               "ca_certificates": str(missing)}
    message = f"ca_certificates {missing} does not exist on the node"
    answer = env.client().post("/api/v1/destinations", json=archive,
                               headers={"Authorization": f"Bearer {env.token('admin')}"})
    assert answer.status_code == 422
    assert answer.json()["errors"] == [{"field": "ca_certificates", "message": message}]

    file = tmp_path / "destinations.yaml"
    file.write_text(yaml.safe_dump({"destinations": [archive]}))
    capsys.readouterr()
    assert main(["destinations", "import", str(file), "--data-dir", str(env.data_dir)]) == 2
    assert f"destinations[0] ('archive'): ca_certificates: {message}" in capsys.readouterr().err

    assert main(["destinations", "add", "bad", "--ae-title", "X" * 17, "--host", "h", "--port", "104",
                 "--data-dir", str(env.data_dir)]) == 2
    assert "invalid destination: ae_title: " in capsys.readouterr().err
    assert [d.name for d in config_repo.list_destinations(env.sessions)] == ["pacs"]
    assert audit.list_entries(env.sessions, action="destination.", actor="cli") == []

    assert main(["destinations", "remove", "pacs", "--data-dir", str(env.data_dir)]) == 0
    [removed] = audit.list_entries(env.sessions, action="destination.delete")
    assert removed.actor == "cli" and removed.before["ae_title"] == "PACS"


def test_pipelines_are_the_model_registrys_ids(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [
        {"id": "liver-seg", "kind": "segmentation", "format": "monai_bundle", "path": str(tmp_path / "bundle"),
         "version": "1.0.0"}]}))
    env = make_web_env(tmp_path / "web", **{"routing.models_file": registry})
    service = RulesService(env.sessions, models_file=registry, clock=lambda: T0)
    assert service.known_pipelines() == ModelCatalog.configured(registry).ids == ("liver-seg",)
    service.save({"name": "liver", "pipelines": ["liver-seg"]}, CLI)
    with pytest.raises(Refused) as caught:
        service.save({"name": "chest", "pipelines": ["chest-ct-segmentation"]}, CLI)
    assert caught.value.status == 422
    assert caught.value.errors == [(("pipelines", 0), "unknown pipeline 'chest-ct-segmentation'; the model "
                                                      "registry lists liver-seg")]

    # a rule stored before the registry changed: its page marks the model the registry no longer lists
    config_repo.save_rule(env.sessions, load_stored_rule(
        '{"name": "old", "pipelines": ["lung-nodule-detection"]}'), original_name=None, source="test", now=T0)
    page = env.login("admin").client.get("/rules/old").text
    assert page.count("not in the model registry") == 1 and "liver-seg" in page


def test_the_import_actor_is_no_user_name() -> None:
    for actor in (CLI, CONFIG_FILE):
        with pytest.raises(ValueError, match="reserved"):
            users.validate_username(actor.name)
