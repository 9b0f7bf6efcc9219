"""Read routing rules and destinations from YAML files and install them in the database.

Why: admins without the UI keep rules and destinations in files under version
control (``config/rules.yaml``, ``config/destinations.yaml``); the node imports them at
start and ``dicom-node rules import`` does it on demand. A file is checked as the web
app and the API check a save (:mod:`dicom_node.config_service`): the schema here, then
what only the service knows - a rule naming a model the registry does not list or a
destination that does not exist, a destination whose TLS files do not load. A file with
any problem is refused as a whole, with the file, the entry, the field and the value
named, and nothing is changed; at start the node then refuses to start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service import CONFIG_FILE, Actor, DestinationsService, FieldError, Refused, RulesService
from dicom_node.db import config_repo
from dicom_node.destinations import Destination, DestinationSet
from dicom_node.routing import Rule, RuleSet, default_rules
from dicom_node.settings import RoutingSettings

__all__ = ["ConfigFileError", "import_configuration", "import_destinations_file", "import_rules_file",
           "load_destinations_file", "load_rules_file"]

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


def _file_error(path: Path, what: str, data: Any, key: str, errors: list[FieldError]) -> ConfigFileError:
    """One line per problem: the entry (``rules[1] ('echo')``), the field and the message."""
    lines = []
    for location, message in errors:
        location = list(location)
        if len(location) >= 2 and location[0] == key and isinstance(location[1], int):
            index = location[1]
            entries = data.get(key) if isinstance(data, dict) else None
            entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"{key}[{index}]" + (f" ({name!r})" if name else "")
            rest = ".".join(str(p) for p in location[2:])
            lines.append(f"{where}{': ' + rest if rest else ''}: {message}")
        else:
            lines.append(f"{'.'.join(str(p) for p in location) or '(top level)'}: {message}")
    return ConfigFileError(f"{what} file {path} is invalid:\n  " + "\n  ".join(lines))


def _explain(path: Path, what: str, exc: ValidationError, data: Any, key: str) -> ConfigFileError:
    return _file_error(path, what, data, key, [(tuple(e["loc"]), e["msg"]) for e in exc.errors()])


def _load(path: Path, what: str, key: str, model: Any) -> tuple[Any, list[Any]]:
    """(the file's YAML, its entries validated by ``model``); ConfigFileError explains what is wrong."""
    data = _read_yaml(path, what)
    try:
        return data, list(getattr(model.model_validate(data), key))
    except ValidationError as exc:
        raise _explain(path, what, exc, data, key) from exc


def load_rules_file(path: Path) -> list[Rule]:
    """The rules of a YAML file (``rules: [...]``), validated against the schema; ConfigFileError otherwise."""
    return _load(path, "rules", "rules", RuleSet)[1]


def load_destinations_file(path: Path) -> list[Destination]:
    """The destinations of a YAML file (``destinations: [...]``), validated against the schema."""
    return _load(path, "destinations", "destinations", DestinationSet)[1]


def _checked(path: Path, what: str, check: Callable[[list[Any]], list[FieldError]]) -> list[Any]:
    """The entries of ``path`` (``what``: rules or destinations) when the service finds no problem in them
    (``check(entries)`` -> the problems at ``<what>.<index>.<field>``); ConfigFileError naming each otherwise."""
    data, entries = _load(path, what, what, RuleSet if what == "rules" else DestinationSet)
    errors = check(entries)
    if errors:
        raise _file_error(path, what, data, what, errors)
    return entries


def _install(path: Path, install: Callable[[], int]) -> int:
    try:
        return install()
    except Refused as exc:  # the database changed between the check and the write
        raise ConfigFileError(f"{path}: {exc}") from exc


def import_rules_file(path: Path, service: RulesService, actor: Actor, *,
                      also_destinations: Sequence[str] = ()) -> list[Rule]:
    """Check the rules of ``path`` as a save would and install them (each change audited as ``actor``
    importing the file); ConfigFileError naming the file, the rule, the field and the value otherwise."""
    rules: list[Rule] = _checked(path, "rules", lambda found: service.import_problems(
        found, also_destinations=also_destinations))
    _install(path, lambda: service.import_rules(rules, actor.importing(path), also_destinations=also_destinations))
    return rules


def import_destinations_file(path: Path, service: DestinationsService, actor: Actor) -> list[Destination]:
    """Check the destinations of ``path`` as a save would and install them (each change audited)."""
    destinations: list[Destination] = _checked(path, "destinations", service.import_problems)
    _install(path, lambda: service.import_destinations(destinations, actor.importing(path)))
    return destinations


def import_configuration(sessions: sessionmaker[Session], settings: RoutingSettings, *, now: datetime) -> None:
    """Install the configured rules and destinations (changes audited as ``config-file``); the built-in default
    rule when no rules file is configured and the database holds no rule.

    Both files are checked before either is installed (a rule may name a destination of the destinations
    file): ConfigFileError for any problem, naming the file, the entry, the field and the value, and then
    the node does not start - an admin who wrote the file learns at once, not when a study arrives.
    """
    rules_service = RulesService(sessions, models_file=settings.models_file, clock=lambda: now)
    destinations_service = DestinationsService(sessions, clock=lambda: now)
    destinations: list[Destination] = []
    rules: list[Rule] = []
    if settings.destinations_file is not None:
        destinations = _checked(settings.destinations_file, "destinations", destinations_service.import_problems)
    names = [d.name for d in destinations]
    if settings.rules_file is not None:
        rules = _checked(settings.rules_file, "rules", lambda found: rules_service.import_problems(
            found, also_destinations=names))
    if settings.destinations_file is not None:
        path = settings.destinations_file
        changed = _install(path, lambda: destinations_service.import_destinations(destinations,
                                                                                   CONFIG_FILE.importing(path)))
        logger.info("imported %d destination(s) from %s (%d changed)", len(destinations), path, changed)
    if settings.rules_file is not None:
        path = settings.rules_file
        changed = _install(path, lambda: rules_service.import_rules(rules, CONFIG_FILE.importing(path),
                                                                    also_destinations=names))
        logger.info("imported %d routing rule(s) from %s (%d changed)", len(rules), path, changed)
    elif config_repo.rule_count(sessions) == 0:
        config_repo.upsert_rules(sessions, default_rules(), source="built-in", now=now)
        logger.info("no routing rules configured: installed the built-in default rule")
    for rule in config_repo.list_rules(sessions):  # stored before RE2: the node runs, the rule never matches
        for problem in rule.problems():
            logger.warning("routing rule %s is never applied until it is fixed: %s", rule.name, problem)
