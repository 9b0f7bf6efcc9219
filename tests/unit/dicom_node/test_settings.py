"""Settings: YAML file, environment and CLI overrides, and precise validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_node.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_defaults_are_seconds_not_minutes() -> None:
    settings = load_settings()
    assert settings.dicom.ae_title == "DICOM_NODE"
    assert settings.completion.quiet_seconds <= 30
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("var/dicom-node.db")


def test_shipped_default_yaml_loads_and_matches_the_built_in_defaults() -> None:
    from_file = load_settings(REPO_ROOT / "config" / "default.yaml")
    assert from_file.model_dump() == load_settings().model_dump()


def test_precedence_cli_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("dicom:\n  port: 1104\n  ae_title: FROM_FILE\ncompletion:\n  quiet_seconds: 7\n")
    monkeypatch.setenv("DICOM_NODE_DICOM__PORT", "2104")
    settings = load_settings(config, {"dicom.ae_title": "FROM_CLI", "web.port": None})
    assert settings.dicom.ae_title == "FROM_CLI"
    assert settings.dicom.port == 2104
    assert settings.completion.quiet_seconds == 7
    assert settings.web.port == 8080


def test_invalid_values_name_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("dicom:\n  ae_title: 'WAY_TOO_LONG_AE_TITLE_X'\n  port: 70000\n")
    with pytest.raises(ValidationError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert "dicom.ae_title" in message and "WAY_TOO_LONG_AE_TITLE_X" in message
    assert "dicom.port" in message


def test_unknown_keys_are_rejected_not_ignored(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("completion:\n  quiet_secnods: 5\n")
    with pytest.raises(ValidationError, match="quiet_secnods"):
        load_settings(config)


def test_allowed_caller_hosts_must_be_addresses(tmp_path: Path) -> None:
    config = tmp_path / "hosts.yaml"
    config.write_text("dicom:\n  allowed_callers:\n    - {ae_title: PACS, hosts: [pacs.example]}\n")
    with pytest.raises(ValidationError, match="pacs.example"):
        load_settings(config)


def test_tls_needs_certificate_and_key() -> None:
    with pytest.raises(ValidationError, match="dicom.tls.certificate"):
        load_settings(None, {"dicom.tls.enabled": True})


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_worker_node_access_over_http_needs_the_node_and_a_token(tmp_path: Path) -> None:
    assert load_settings().worker.node_access == "shared_filesystem"
    with pytest.raises(ValidationError, match="needs worker.node_url"):
        load_settings(None, {"worker.node_access": "http", "worker.token": "dnt_x"})
    with pytest.raises(ValidationError, match="needs worker.token or worker.token_file"):
        load_settings(None, {"worker.node_access": "http", "worker.node_url": "https://node:8080"})
    with pytest.raises(ValidationError, match="is not http"):
        load_settings(None, {"worker.node_url": "ftp://node"})
    token_file = tmp_path / "token"
    token_file.write_text("dnt_from_file\n")
    settings = load_settings(None, {"worker.node_access": "http", "worker.node_url": "https://node:8080",
                                    "worker.token_file": str(token_file), "data_dir": str(tmp_path)})
    assert settings.worker.resolved_token() == "dnt_from_file"
    assert settings.series_cache_dir == tmp_path / "series-cache"
