"""The ``dicom-node`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicom_node.settings import Settings, load_settings

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ["DICOM_NODE_CONFIG"]) if os.environ.get("DICOM_NODE_CONFIG") else None,
        help="YAML settings file (default: $DICOM_NODE_CONFIG, else built-in defaults)",
    )
    parser.add_argument("--data-dir", type=Path, help="where the database, spool and quarantine live")


def build_parser() -> argparse.ArgumentParser:
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

    # Making and checking the models the node serves (the training package owns them).
    from training.cli import add_phantom_command, add_training_commands

    add_phantom_command(commands)
    add_training_commands(commands)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.command == "serve":
        overrides.update({"dicom.port": args.port, "web.port": args.web_port, "dicom.ae_title": args.ae_title})
    return load_settings(args.config, overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def _serve(settings: Settings) -> int:
    from dicom_node.node import Node

    Node(settings).serve_forever()
    return 0


def _db_upgrade(settings: Settings) -> int:
    from dicom_node.db.session import current_revision, make_engine, upgrade

    engine = make_engine(settings.resolved_database_url)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    return 0


def _studies(settings: Settings, as_json: bool, limit: int) -> int:
    from dicom_node.db import repo
    from dicom_node.db.session import current_revision, head_revision, make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    revision, head = current_revision(engine), head_revision()
    if revision != head:
        print(
            f"dicom-node: the database at {engine.url.render_as_string(hide_password=True)} is at revision "
            f"{revision or 'none'}, this version needs {head}; start the node or run `dicom-node db upgrade`",
            file=sys.stderr,
        )
        return 1
    studies = repo.list_studies(make_session_factory(engine), limit=limit)
    if as_json:
        rows = [
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                "accession_number": s.accession_number,
                "study_date": s.study_date,
                "modalities": s.modalities.split(",") if s.modalities else [],
                "state": s.state,
                "series": s.series_count,
                "instances": s.instance_count,
                "late_instances": s.late_instance_count,
                "first_received_at": s.first_received_at.isoformat(),
                "last_received_at": s.last_received_at.isoformat(),
                "completed_at": s.completed_at.isoformat() if s.completed_at else None,
            }
            for s in studies
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not studies:
        print("no studies received yet")
        return 0
    header = f"{'STATE':<10} {'SERIES':>6} {'IMAGES':>7} {'MOD':<8} {'FIRST RECEIVED (UTC)':<20} {'COMPLETED (UTC)':<20} STUDY INSTANCE UID"
    print(header)
    for s in studies:
        completed = f"{s.completed_at:%Y-%m-%d %H:%M:%S}" if s.completed_at else "-"
        print(
            f"{s.state:<10} {s.series_count:>6} {s.instance_count:>7} {s.modalities[:8]:<8} "
            f"{s.first_received_at:%Y-%m-%d %H:%M:%S}  {completed:<20} {s.study_instance_uid}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "handler", None) is not None:  # train, evaluate, phantom: no node settings
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        return int(args.handler(args))
    try:
        settings = _settings(args)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"dicom-node: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    if args.command == "serve":
        return _serve(settings)
    if args.command == "db":
        return _db_upgrade(settings)
    if args.command == "studies":
        return _studies(settings, args.json, args.limit)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
