"""Read routing rules and destinations from YAML files and install them in the database.

Why: admins without the UI keep rules and destinations in files under version
control (``config/rules.yaml``, ``config/destinations.yaml``); the node imports them at
start and ``dicom-node rules import`` does it on demand. A malformed file is refused
as a whole, with the file, the entry and the field named, and nothing is changed.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import config_repo
from dicom_node.destinations import Destination, DestinationSet
from dicom_node.routing import Rule, RuleSet, default_rules
from dicom_node.settings import RoutingSettings

__all__ = ["ConfigFileError", "import_configuration", "load_destinations_file", "load_rules_file"]

logger = logging.getLogger(__name__)


class ConfigFileError(ValueError):
    """A rules or destinations file that cannot be used; the message names the file and the problem."""


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigFileError(f"{what} file {path}: cannot read it: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{what} file {path}: not valid YAML: {exc}") from exc


def _explain(path: Path, what: str, exc: ValidationError, data: Any, key: str) -> ConfigFileError:
    lines = []
    for error in exc.errors():
        location = list(error["loc"])
        if len(location) >= 2 and location[0] == key and isinstance(location[1], int):
            index = location[1]
            entries = data.get(key) if isinstance(data, dict) else None
            name = entries[index].get("name") if isinstance(entries, list) and isinstance(entries[index], dict) else None
            where = f"{key}[{index}]" + (f" ({name!r})" if name else "")
            rest = ".".join(str(p) for p in location[2:])
            lines.append(f"{where}{': ' + rest if rest else ''}: {error['msg']}")
        else:
            lines.append(f"{'.'.join(str(p) for p in location) or '(top level)'}: {error['msg']}")
    return ConfigFileError(f"{what} file {path} is invalid:\n  " + "\n  ".join(lines))


def load_rules_file(path: Path) -> list[Rule]:
    """The rules of a YAML file (``rules: [...]``), validated; ConfigFileError explains what is wrong."""
    data = _read_yaml(path, "rules")
    try:
        return list(RuleSet.model_validate(data).rules)
    except ValidationError as exc:
        raise _explain(path, "rules", exc, data, "rules") from exc


def load_destinations_file(path: Path) -> list[Destination]:
    """The destinations of a YAML file (``destinations: [...]``), validated."""
    data = _read_yaml(path, "destinations")
    try:
        parsed = DestinationSet.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, "destinations", exc, data, "destinations") from exc
    return list(parsed.destinations)


def import_configuration(sessions: sessionmaker[Session], settings: RoutingSettings, *, now: datetime) -> None:
    """Install the configured rules and destinations; the built-in default rule when there are no rules."""
    if settings.destinations_file is not None:
        destinations = load_destinations_file(settings.destinations_file)
        for destination in destinations:
            config_repo.upsert_destination(sessions, destination, source=str(settings.destinations_file), now=now)
        logger.info("imported %d destination(s) from %s", len(destinations), settings.destinations_file)
    if settings.rules_file is not None:
        rules = load_rules_file(settings.rules_file)
        config_repo.upsert_rules(sessions, rules, source=str(settings.rules_file), now=now)
        logger.info("imported %d routing rule(s) from %s", len(rules), settings.rules_file)
    elif config_repo.rule_count(sessions) == 0:
        config_repo.upsert_rules(sessions, default_rules(), source="built-in", now=now)
        logger.info("no routing rules configured: installed the built-in default rule")
    for rule in config_repo.list_rules(sessions):  # stored before RE2: the node runs, the rule never matches
        for problem in rule.problems():
            logger.warning("routing rule %s is never applied until it is fixed: %s", rule.name, problem)
