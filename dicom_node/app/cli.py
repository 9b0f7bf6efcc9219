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


def build_parser() -> argparse.ArgumentParser:
    from dicom_node.db.models import JobState

    parser = argparse.ArgumentParser(prog="dicom-node", description="DICOM AI node")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM listener and the node's services")
    _common(serve)
    serve.add_argument("--port", type=int, help="DICOM port (dicom.port)")
    serve.add_argument("--web-port", type=int, help="admin web port (web.port)")
    serve.add_argument("--ae-title", help="this node's AE title (dicom.ae_title)")

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply the database migrations")
    _common(db_upgrade)

    studies = commands.add_parser("studies", help="list received studies and their state")
    _common(studies)
    studies.add_argument("--json", action="store_true", help="machine-readable output")
    studies.add_argument("--limit", type=int, default=500)

    worker = commands.add_parser("worker", help="run a Celery worker (GPU inference and/or delivery)")
    _common(worker)
    worker.add_argument("--queues", default="gpu", help="comma-separated queues: gpu, io (default gpu)")
    worker.add_argument("--concurrency", type=int, default=1, help="tasks at a time (1 per GPU for gpu)")
    worker.add_argument("--broker", help="broker URL (queue.broker_url), e.g. redis://host:6379/0")

    destinations = commands.add_parser("destinations", help="where results are sent")
    dest_commands = destinations.add_subparsers(dest="sub", required=True)
    dest_add = dest_commands.add_parser("add", help="add or replace a DICOM destination")
    _common(dest_add)
    dest_add.add_argument("name")
    dest_add.add_argument("--ae-title", required=True, help="the destination's AE title")
    dest_add.add_argument("--host", required=True)
    dest_add.add_argument("--port", type=int, required=True)
    dest_add.add_argument("--default", action="store_true", help="receives the results of default rules")
    dest_add.add_argument("--outputs", default="SEG,SR,GSPS", help="objects it receives, any of SEG,SR,GSPS,PMAP,SC (default SEG,SR,GSPS)")
    dest_add.add_argument("--not-performed", choices=("none", "sr"), default="none",
                          help="when a model declines a study or its result is held: send nothing (none, the "
                               "default) or an 'AI analysis not performed' SR with the reason (sr)")
    dest_list = dest_commands.add_parser("list", help="list destinations")
    _common(dest_list)
    dest_list.add_argument("--json", action="store_true")
    dest_import = dest_commands.add_parser("import", help="import destinations from a YAML file")
    _common(dest_import)
    dest_import.add_argument("file", type=Path)
    dest_remove = dest_commands.add_parser("remove", help="remove a destination")
    _common(dest_remove)
    dest_remove.add_argument("name")

    rules = commands.add_parser("rules", help="routing rules")
    rule_commands = rules.add_subparsers(dest="sub", required=True)
    rules_list = rule_commands.add_parser("list", help="list routing rules")
    _common(rules_list)
    rules_list.add_argument("--json", action="store_true")
    rules_import = rule_commands.add_parser("import", help="import rules from a YAML file (validated first)")
    _common(rules_import)
    rules_import.add_argument("file", type=Path)
    rules_remove = rule_commands.add_parser("remove", help="remove a routing rule")
    _common(rules_remove)
    rules_remove.add_argument("name")
    rules_test = rule_commands.add_parser("test", help="which rules match a received study, and why the others do not")
    _common(rules_test)
    rules_test.add_argument("study_uid")
    rules_test.add_argument("--image", action="store_true",
                            help="also survey the images (which body regions they show), as the worker will")

    jobs_parser = commands.add_parser("jobs", help="jobs and their deliveries")
    job_commands = jobs_parser.add_subparsers(dest="sub", required=True)
    jobs_list = job_commands.add_parser("list", help="list jobs, newest first")
    _common(jobs_list)
    jobs_list.add_argument("--json", action="store_true")
    jobs_list.add_argument("--study", help="only this Study Instance UID")
    jobs_list.add_argument("--state", choices=[s.value for s in JobState],
                           help="only jobs in this state (held: results waiting for an operator)")
    jobs_list.add_argument("--limit", type=int, default=100)
    jobs_retry = job_commands.add_parser("retry", help="run a failed or dead job again")
    _common(jobs_retry)
    jobs_retry.add_argument("job_id", type=int)
    jobs_release = job_commands.add_parser(
        "release", help="send a held job's results (judged implausible) to its destinations after all")
    _common(jobs_release)
    jobs_release.add_argument("job_id", type=int)
    jobs_discard = job_commands.add_parser(
        "discard", help="throw a held job's results away (their files too); nothing of them is sent")
    _common(jobs_discard)
    jobs_discard.add_argument("job_id", type=int)
    deliveries_retry = job_commands.add_parser("retry-delivery", help="send a failed or dead delivery again")
    _common(deliveries_retry)
    deliveries_retry.add_argument("delivery_id", type=int)

    from dicom_node.users_cli import add_commands as add_user_commands

    add_user_commands(commands, _common)

    models = commands.add_parser("models", help="the model registry: list, add, enable or disable a model")
    model_commands = models.add_subparsers(dest="sub", required=True)
    models_list = model_commands.add_parser("list", help="models of the registry and whether routing may use them")
    _common(models_list)
    models_list.add_argument("--json", action="store_true")
    models_add = model_commands.add_parser(
        "add", help="check a model folder or file and register it (a new entry of routing.models_file)")
    _common(models_add)
    models_add.add_argument("path", type=Path, help="a MONAI bundle folder, an nnU-Net v2 results folder "
                                                    "(dataset.json, plans.json, fold_*), a .ts or an .onnx file")
    models_add.add_argument("--id", required=True, dest="model_id", help="the id routing rules will name it by")
    models_add.add_argument("--format", default="auto",
                            choices=("auto", "monai_bundle", "torchscript", "onnx", "nnunet"),
                            help="the model's format (default: detected from the files)")
    models_add.add_argument("--kind", choices=("segmentation", "detection", "classification"),
                            help="what it gives (default: the bundle's dicom_node.kind, else segmentation)")
    models_add.add_argument("--version", help="the version written into results (default: the bundle's metadata "
                                              "version; required for other formats)")
    models_add.add_argument("--registry", type=Path,
                            help="the registry file to add it to (default: routing.models_file)")
    models_add.add_argument("--entry", type=Path,
                            help="a YAML file of more entry fields: labels, preprocessing, nnunet, input_domain, "
                                 "plausibility, title, series_number, name, overrides")
    models_add.add_argument("--replace", action="store_true",
                            help="register a new version of a model id already in the registry (its entry is "
                                 "replaced; fields not given are kept)")
    for name, text in (("enable", "let routing create jobs for a model again"),
                       ("disable", "stop routing from creating jobs for a model (queued jobs still run)")):
        command = model_commands.add_parser(name, help=text)
        _common(command)
        command.add_argument("model_id")
        command.add_argument("--note", help="why (shown on the models page and kept in the audit log)")

    # Making and checking the models the node serves (the training package owns them).
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
    args = build_parser().parse_args(argv)
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
        return _studies(settings, args.json, args.limit)
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


def _studies(settings: Settings, as_json: bool, limit: int) -> int:
    from dicom_node.db.session import DatabaseNotReady, open_sessions
    from dicom_node.studies_cli import list_studies

    try:
        sessions = open_sessions(settings.resolved_database_url, migrate=False)
    except DatabaseNotReady as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    return list_studies(sessions, as_json=as_json, limit=limit)


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
