"""The ``dicom-node`` command line: finds the settings (:mod:`dicom_node.config_lookup`) and runs a command.

Part of the wiring layer: ``serve`` and ``worker`` build their processes here
(:mod:`dicom_node.app.node`), and ``rules test --image`` is given the worker's image
check; the other commands live beside the code they drive.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from dicom_node.config_lookup import ConfigChoice, anchor_relative_paths, find_config
from dicom_node.db.session import missing_database
from dicom_node.settings import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dicom_node.admin_cli import ImageCheck
    from dicom_node.model_domain import Applicability, InputDomain, SynonymTable

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML settings file (default: $DICOM_NODE_CONFIG, else /etc/dicom-node/node.yaml, else the "
             "checkout's config/default.yaml, else built-in defaults)",
    )
    parser.add_argument("--data-dir", type=Path, help="where the database, spool and quarantine live")


#: The node's own commands: running one never imports ``training`` (serving never does; DESIGN.md, "Layers").
NODE_COMMANDS = frozenset({"serve", "db", "studies", "worker", "destinations", "rules", "jobs", "models", "users",
                           "tokens"})


def build_parser(*, training: bool = True) -> argparse.ArgumentParser:
    """The ``dicom-node`` parser; ``training``: also the commands of the training package (train, evaluate,
    export, phantom), which imports it - left out when a node command runs."""
    parser = argparse.ArgumentParser(prog="dicom-node", description="DICOM AI node")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM listener and the node's services")
    _common(serve)
    serve.add_argument("--port", type=int, help="DICOM port (dicom.port)")
    serve.add_argument("--web-port", type=int, help="admin web port (web.port)")
    serve.add_argument("--ae-title", help="this node's AE title (dicom.ae_title)")
    serve.add_argument("--check", action="store_true",
                       help="start nothing: ask the node running with these settings (its /readyz) and exit 0 "
                            "when it is ready, 1 when not (for container health checks)")

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply the database migrations")
    _common(db_upgrade)

    from dicom_node import studies_cli

    studies_cli.add_commands(commands, _common)

    worker = commands.add_parser("worker", help="run a Celery worker (GPU inference and/or delivery)")
    _common(worker)
    worker.add_argument("--queues", default="gpu", help="comma-separated queues: gpu, io (default gpu)")
    worker.add_argument("--concurrency", type=int, default=1, help="tasks at a time (1 per GPU for gpu)")
    worker.add_argument("--broker", help="broker URL (queue.broker_url), e.g. redis://host:6379/0")
    worker.add_argument("--check", action="store_true",
                        help="start nothing: ping the workers of this machine over the broker and exit 0 when one "
                             "answers, 1 when none does (for container health checks)")

    from dicom_node import admin_cli, users_cli

    admin_cli.add_commands(commands, _common)
    users_cli.add_commands(commands, _common)

    if training:  # making and checking the models the node serves (the training package owns them)
        from training.cli import add_phantom_command, add_training_commands

        add_phantom_command(commands)
        add_training_commands(commands)
    return parser


def _settings(args: argparse.Namespace, choice: ConfigChoice) -> Settings:
    overrides: dict[str, Any] = {"data_dir": args.data_dir.resolve() if args.data_dir is not None else None}
    if args.command == "serve":
        overrides.update({"dicom.port": args.port, "web.port": args.web_port, "dicom.ae_title": args.ae_title})
    if args.command == "worker":
        overrides.update({"queue.broker_url": args.broker})
    return anchor_relative_paths(load_settings(choice.path, overrides), choice.base_dir)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def _serve(settings: Settings) -> int:
    from dicom_node.app.node import Node
    from dicom_node.stopping import exit_process

    from dicom_node.config_files import ConfigFileError

    try:
        Node(settings).serve_forever()
    except (RuntimeError, OSError, ConfigFileError) as exc:  # a port in use, an unreadable TLS key, a bad rule ...
        print(f"dicom-node: cannot start: {exc}", file=sys.stderr)
        return 1
    exit_process(0)  # without waiting for a model still computing a job that was handed back


def _db_upgrade(settings: Settings) -> int:
    from dicom_node.db.session import current_revision, make_engine, upgrade

    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    return 0


#: Commands that work on the node's existing database and must not create one (``serve`` and ``db upgrade`` may).
_NEEDS_DATABASE = frozenset({"studies", "worker", "destinations", "rules", "jobs", "models", "users", "tokens"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(training=not argv or argv[0] not in NODE_COMMANDS).parse_args(argv)
    if getattr(args, "handler", None) is not None:  # train, evaluate, phantom: no node settings
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        return int(args.handler(args))
    try:
        choice = find_config(args.config, os.environ)
        settings = _settings(args, choice)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"dicom-node: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    logger.debug("%s", choice.describe())
    if getattr(args, "check", False):  # before the database check: a health check neither needs nor creates it
        return _health_check(settings, args.command)
    if args.command in _NEEDS_DATABASE:
        missing = missing_database(settings.resolved_database_url)
        if missing is not None:
            print(f"dicom-node: {missing} (data_dir {settings.data_dir}); {choice.describe()}. Nothing was created: "
                  "point --config or --data-dir at the node's settings, or start the node (`dicom-node serve`) or "
                  "run `dicom-node db upgrade` with these settings to create a new, empty database.",
                  file=sys.stderr)
            return 1
    if args.command == "serve":
        return _serve(settings)
    if args.command == "db":
        return _db_upgrade(settings)
    if args.command == "studies":
        return _studies(settings, args)
    if args.command == "worker":
        from dicom_node.app.node import run_worker
        from dicom_node.stopping import exit_process

        code = run_worker(settings, [q.strip() for q in args.queues.split(",") if q.strip()], args.concurrency)
        if code != 0:  # refused to start: nothing is running yet
            return code
        exit_process(code)  # without waiting for a model still computing a job that was handed back
    if args.command in ("users", "tokens"):
        from dicom_node import users_cli

        return users_cli.run(settings, args)
    if args.command in ("destinations", "rules", "jobs", "models"):
        from dicom_node import admin_cli

        return admin_cli.run(settings, args, image_check=_image_check())
    raise AssertionError(f"unhandled command {args.command}")


def _health_check(settings: Settings, command: str) -> int:
    """``serve --check`` / ``worker --check``: 0 when the running process answers, else 1; one line either way."""
    from dicom_node.app.health_check import check_node, check_worker

    result = check_node(settings) if command == "serve" else check_worker(settings)
    print(f"dicom-node {command} --check: {'ok' if result.ok else 'failed'}: {result.detail}",
          file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _studies(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node import studies_cli
    from dicom_node.db.session import DatabaseNotReady, open_sessions

    try:
        sessions = open_sessions(settings.resolved_database_url, migrate=False)
    except DatabaseNotReady as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    return studies_cli.run(settings, sessions, args)


def _image_check() -> "ImageCheck | None":
    """The worker's check of a series' images before a model (``rules test --image``); ``None`` without the
    worker's packages (a receive-only installation)."""
    try:
        from workers.applicability import check_applicability
        from workers.volume import load_series
    except ImportError:
        return None

    def check(files: "Sequence[Path]", model_id: str, domain: "InputDomain", synonyms: "SynonymTable") -> "Applicability":
        return check_applicability(model_id, domain, load_series(files), synonyms).applicability

    return check


if __name__ == "__main__":
    sys.exit(main())
