"""The admin commands of ``dicom-node``: destinations, rules, jobs and models.

Why: admins without the web UI manage the node from a shell; these commands use the
same repository functions, validation and routing evaluator as the node and the UI.
Commands that change something bring the database schema up to date first (as
``serve`` does); listing commands refuse to touch a database of another version.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import config_repo, job_views, jobs
from dicom_node.destinations import ALL_OUTPUTS, DEFAULT_OUTPUTS, NOTIFY_EVENTS, FhirDestination, HL7Destination
from dicom_node.db.session import DatabaseNotReady, open_sessions
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.db.model_settings import ModelSettingView
    from dicom_node.model_catalog import ModelCatalog
    from dicom_node.model_domain import Applicability, InputDomain, SynonymTable

#: The worker's check of a series' images before a model: (the series' files, model id, what the model was made
#: for, header synonyms) -> the decision. ``rules test --image`` runs it as the worker will.
ImageCheck = Callable[[Sequence[Path], str, "InputDomain", "SynonymTable"], "Applicability"]

__all__ = ["ImageCheck", "add_commands", "run"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _sessions(settings: Settings, *, writes: bool) -> sessionmaker[Session] | None:
    """Sessions on the node's database: migrated first for a change; a listing refuses another revision."""
    try:
        return open_sessions(settings.resolved_database_url, migrate=writes)
    except DatabaseNotReady as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return None


def _audit(sessions: sessionmaker[Session], action: str, target_kind: str, target: str, *,
           before: Any = None, after: Any = None, detail: str | None = None) -> None:
    """Audit a change made from the shell (actor ``cli``) through the config service's one audit path."""
    from dicom_node.config_service.base import CLI, record_change

    record_change(sessions, _now(), CLI, action, target_kind=target_kind, target=target, before=before,
                  after=after, detail=detail)


def _destinations(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.config_files import import_destinations_file
    from dicom_node.config_service import CLI, DestinationsService, Refused

    writes = args.sub in ("add", "import", "remove", "send-recent")
    sessions = _sessions(settings, writes=writes)
    if sessions is None:
        return 1
    service = DestinationsService(sessions, clock=_now)
    if args.sub == "add":
        try:
            destination, _ = service.save_or_replace(_added_destination(args), CLI)
        except Refused as exc:
            print(f"dicom-node: {exc}", file=sys.stderr)
            return 2
        print(f"destination {destination.name}: {destination.peer}{' (default)' if destination.default else ''}")
        return 0
    if args.sub == "import":
        return _import_file(lambda: import_destinations_file(args.file, service, CLI), args.file, "destination")
    if args.sub == "remove":
        return _remove(lambda: service.delete(args.name, CLI), args.name, "destination")
    if args.sub == "send-recent":
        return _send_recent(settings, sessions, args.name, args.hours)
    listed = config_repo.list_destinations(sessions)
    if args.json:
        print(json.dumps([d.model_dump(mode="json", context={"reveal_secrets": False}) for d in listed], indent=2))
        return 0
    if not listed:
        print("no destinations; add one with `dicom-node destinations add NAME --ae-title T --host H --port P --default`")
        return 0
    print(f"{'NAME':<20} {'TYPE':<9} {'DEFAULT':<7} {'OUTPUTS':<13} {'NOT PERFORMED':<13} ADDRESS")
    for d in listed:
        if isinstance(d, (HL7Destination, FhirDestination)):
            outputs, notice = "report", "report" if "not_performed" in d.notify else "nothing"
        else:
            outputs, notice = ",".join(sorted(d.outputs)), "SR" if d.not_performed == "sr" else "nothing"
        print(f"{d.name:<20} {d.type:<9} {'yes' if d.default else 'no':<7} {outputs:<13} {notice:<13} {d.peer}")
    return 0


def _added_destination(args: argparse.Namespace) -> dict[str, object]:
    """The definition ``destinations add`` describes (validated by the service, which names a missing field)."""
    data: dict[str, object] = {"type": args.type, "name": args.name, "default": args.default}
    if args.type in ("hl7", "fhir"):
        data["notify"] = sorted(e.strip() for e in args.notify.split(",") if e.strip())
        if args.type == "hl7":
            data.update(host=args.host, port=args.port, sending_facility=args.sending_facility,
                        receiving_application=args.receiving_application,
                        receiving_facility=args.receiving_facility, patient_id_authority=args.patient_id_authority)
        else:
            data.update(url=args.url, patient_id_system=args.patient_id_system)
        return data
    return {**data, "ae_title": args.ae_title, "host": args.host, "port": args.port,
            "outputs": sorted(o.strip().upper() for o in args.outputs.split(",") if o.strip()),
            "not_performed": args.not_performed, "outline_low_confidence": args.outline_low_confidence}


def _send_recent(settings: Settings, sessions: sessionmaker[Session], name: str, hours: float) -> int:
    """``destinations send-recent``: the results of the last ``hours`` that destination ``name`` never had."""
    from dicom_node.config_service import CLI
    from dicom_node.study_actions import StudyActionRefused, resend_recent

    try:
        targets = resend_recent(sessions, name, hours=hours, now=_now(), actor=CLI,
                                delivery_max_attempts=settings.delivery.max_attempts)
    except StudyActionRefused as refused:
        print(f"dicom-node: {refused.message}", file=sys.stderr)
        return 1
    for target in targets:
        print(f"job {target.job_id} ({target.pipeline}) -> {name}: delivery {target.delivery_id}")
    print(f"{len(targets)} job(s)' results of the last {hours:g} hours will be sent to {name} by the running node"
          if targets else f"nothing to send: no results of the last {hours:g} hours that {name} did not have")
    return 0


def _import_file(load: Callable[[], Sequence[Any]], path: Path, what: str) -> int:
    """Import a rules or destinations file through the config service (``load``); 2 when it is refused."""
    from dicom_node.config_files import ConfigFileError

    try:
        imported = load()
    except ConfigFileError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    print(f"imported {len(imported)} {what}(s) from {path}")
    return 0


def _remove(delete: Callable[[], object], name: str, what: str) -> int:
    """Remove a rule or destination through the config service (``delete``); 1 when it is refused."""
    from dicom_node.config_service import Refused

    try:
        delete()
    except Refused as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    print(f"{what} {name} removed")
    return 0


def _rules(settings: Settings, args: argparse.Namespace, image_check: ImageCheck | None) -> int:
    from dicom_node.config_files import import_rules_file
    from dicom_node.config_service import CLI, RulesService

    sessions = _sessions(settings, writes=args.sub in ("import", "remove"))
    if sessions is None:
        return 1
    service = RulesService(sessions, models_file=settings.routing.models_file, clock=_now)
    if args.sub == "remove":
        return _remove(lambda: service.delete(args.name, CLI), args.name, "rule")
    if args.sub == "import":
        return _import_file(lambda: import_rules_file(args.file, service, CLI), args.file, "rule")
    if args.sub == "list":
        rules = config_repo.list_rules(sessions)
        if args.json:
            print(json.dumps([r.model_dump(mode="json", by_alias=True) for r in rules], indent=2))
            return 0
        if not rules:
            print("no routing rules (the node installs its default rule when it starts)")
        for rule in rules:
            state = "enabled" if rule.enabled else "DISABLED"
            conditions = f" {rule.match} of: " + "; ".join(_describe(c.model_dump(by_alias=True, exclude_none=True))
                                                            for c in rule.conditions) if rule.conditions else " always"
            destinations = rule.destinations if isinstance(rule.destinations, str) else ", ".join(rule.destinations)
            print(f"{rule.name} [{state}, priority {rule.priority}]:{conditions}\n"
                  f"    -> {', '.join(rule.pipelines)} on the {rule.series.prefer} series; results to {destinations}")
            for problem in rule.problems():
                print(f"    NEVER APPLIED until fixed: {problem}")
        return 0
    if args.image and image_check is None:
        print("dicom-node: --image needs the worker's image check, which this installation lacks "
              "(install dicom-node[worker])", file=sys.stderr)
        return 2
    return _rules_test(settings, sessions, args.study_uid, image_check=image_check if args.image else None)


def _describe(condition: dict[str, Any]) -> str:
    attribute = condition.pop("attribute")
    negate = condition.pop("negate", False)
    parts = [f"{k} {v}" for k, v in condition.items()]
    return f"{'NOT ' if negate else ''}{attribute} " + " ".join(parts)


def _rules_test(settings: Settings, sessions: sessionmaker[Session], study_uid: str, *,
                image_check: ImageCheck | None) -> int:
    from dicom_node.conductor import decide

    study_id = config_repo.study_id_for_uid(sessions, study_uid)
    if study_id is None:
        print(f"dicom-node: no study {study_uid} has been received", file=sys.stderr)
        return 1
    decision = decide(sessions, settings.spool_dir, study_id)
    for outcome in decision.outcomes:
        print(f"{'MATCH   ' if outcome.matched else 'NO MATCH'} {outcome.rule}")
        for reason in outcome.reasons:
            print(f"    {reason}")
    if not decision.jobs:
        print(f"no job: {decision.ignored_reason}")
        return 0
    print("jobs:")
    for job in decision.jobs:
        print(f"    {job.pipeline} on series {job.series_instance_uid} (rule {job.rule})")
    return _applicability_report(settings, sessions, study_id, decision.jobs, image_check=image_check)


def _applicability_report(settings: Settings, sessions: sessionmaker[Session], study_id: int,
                          specs: Any, *, image_check: ImageCheck | None) -> int:
    """Whether each job's model may run on its series: from the header (always) and the image (``image_check``)."""
    from dicom_node.applicability_preview import preview_applicability
    from dicom_node.model_catalog import ModelCatalog, ModelRegistryError
    from dicom_node.study_facts import study_facts
    from dicom_node.study_store import FileStudyStore

    try:
        catalog = ModelCatalog.configured(settings.routing.models_file)
    except ModelRegistryError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    facts = study_facts(sessions, settings.spool_dir, study_id)
    synonyms = settings.applicability.synonym_table()
    print("check before each model (the worker decides with the image too; the image wins):")
    for planned in preview_applicability(catalog, synonyms, facts, specs):
        spec, domain, decision = planned.spec, planned.domain, planned.applicability
        if domain is None:
            print(f"    {spec.pipeline}: {planned.error}")
            continue
        print(f"    {spec.pipeline} is made for: {domain.describe()}")
        if image_check is not None:
            try:
                files = FileStudyStore(sessions, settings.spool_dir).series_files(
                    spec.series_instance_uid, study_instance_uid=facts.study_instance_uid)
                decision = image_check(files, spec.pipeline, domain, synonyms)
            except (ValueError, LookupError, OSError) as exc:  # a series the worker could not load either
                print(f"      cannot load the series: {exc}")
                continue
        if decision is None:
            print(f"      cannot check: {planned.error}")
            continue
        print(f"      {'APPLIES' if decision.applies else 'NOT APPLICABLE'}: "
              f"{decision.summary()} ({decision.seconds:.3f} s)")
        for check in decision.checks:
            mark = {True: "ok  ", False: "FAIL", None: "?   "}[check.passed]
            print(f"        {mark} {check.name}: {check.detail}")
    if image_check is None:
        print("  (header only; add --image to survey the images as the worker will)")
    return 0


def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    sessions = _sessions(settings, writes=args.sub != "list")
    if sessions is None:
        return 1
    if args.sub == "retry":
        if not jobs.retry_job(sessions, args.job_id, now=_now()):
            print(f"dicom-node: {_why_not_retried(sessions, args.job_id)}", file=sys.stderr)
            return 1
        _audit(sessions, "job.retry", "job", str(args.job_id), after={"state": "failed", "attempts": 0})
        print(f"job {args.job_id} will run again (the running node enqueues it within a second)")
        return 0
    if args.sub == "retry-delivery":
        if not jobs.retry_delivery(sessions, args.delivery_id, now=_now()):
            print(f"dicom-node: {_why_not_resent(sessions, args.delivery_id)}", file=sys.stderr)
            return 1
        _audit(sessions, "delivery.retry", "delivery", str(args.delivery_id), after={"state": "failed", "attempts": 0})
        print(f"delivery {args.delivery_id} will be sent again (the running node sends it within a second)")
        return 0
    if args.sub in ("release", "discard"):
        return _held_job(settings, sessions, args.sub, args.job_id)
    try:
        page = job_views.list_jobs(sessions, state=args.state, limit=args.limit, study_instance_uid=args.study,
                                   after=args.after)
    except ValueError as exc:
        print(f"dicom-node: --after: {exc}", file=sys.stderr)
        return 2
    listed = page.items
    if args.json:
        print(json.dumps([
            {"id": j.id, "study_instance_uid": j.study_instance_uid, "series_instance_uid": j.series_instance_uid,
             "pipeline": j.pipeline, "rule": j.rule, "state": j.state, "attempts": j.attempts,
             "max_attempts": j.max_attempts, "error": j.error, "stage_seconds": j.stage_seconds,
             "summary": j.summary, "checks": j.checks, "outcome_reason": j.outcome_reason,
             "queued_at": j.queued_at.isoformat(),
             "started_at": j.started_at.isoformat() if j.started_at else None,
             "finished_at": j.finished_at.isoformat() if j.finished_at else None,
             "deliveries": [{"id": d.id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
                             "error": d.error, "kinds": list(d.kinds) if d.kinds is not None else None}
                            for d in j.deliveries]}
            for j in listed
        ], indent=2))
        return 0
    if not listed:
        print(f"no {args.state} jobs" if args.state else "no jobs yet")
    for j in listed:
        deliveries = ", ".join(f"{d.destination}: {d.state} (delivery {d.id}{', notice' if d.notice_only else ''})"
                               for d in j.deliveries) or "no deliveries"
        print(f"{j.id:>5} {j.state:<14} {j.pipeline:<24} attempts {j.attempts}/{j.max_attempts}  {deliveries}")
        print(f"      study {j.study_instance_uid} series {j.series_instance_uid}")
        if j.error:
            print(f"      error: {j.error}")
        for line in _outcome_lines(j):
            print(f"      {line}")
        for d in j.deliveries:
            if d.error and d.state != "delivered":
                print(f"      delivery {d.id} to {d.destination}: {d.error}")
    if page.next_cursor:
        print(f"older jobs: --after {page.next_cursor}")
    return 0


def _outcome_lines(job: job_views.JobRow) -> list[str]:
    """What ``jobs list`` says under a job that was not applicable or held: the reason from its checks."""
    reason = job.outcome_reason
    if job.state == "not_applicable":
        return [f"not applicable: {reason or 'the model was not made for this series'}"]
    if job.state == "held":
        return [f"HELD, not sent: {reason or 'judged implausible'}",
                f"(send anyway: dicom-node jobs release {job.id}; throw away: dicom-node jobs discard {job.id})"]
    if job.state in ("released", "discarded") and reason:
        return [f"{job.state} by an operator; it had been held for: {reason}"]
    return []


def _held_job(settings: Settings, sessions: sessionmaker[Session], action: str, job_id: int) -> int:
    """Release (send after all) or discard a held job's results, as the web page does; audited as ``cli``."""
    from dicom_node import held_results
    from dicom_node.spool import Spool

    verb = {"release": "released", "discard": "discarded"}[action]
    job = job_views.get_job(sessions, job_id)
    if job is None:
        print(f"dicom-node: job {job_id} does not exist", file=sys.stderr)
        return 1
    if job.state != "held":
        print(f"dicom-node: job {job_id} is {job.state}; only held jobs can be {verb}", file=sys.stderr)
        return 1
    before = {"state": job.state, "attempts": job.attempts, "max_attempts": job.max_attempts, "error": job.error,
              "reasons": job.outcome_reason}
    where = f"{job.pipeline} on series {job.series_instance_uid} of study {job.study_instance_uid}"
    if action == "release":
        released = held_results.release_held(sessions, job_id, now=_now(), by="cli",
                                             delivery_max_attempts=settings.delivery.max_attempts)
        if released is None:
            return _no_longer_held(sessions, job_id, verb)
        to = ", ".join(released.destinations) or "no destination (none is configured for it now)"
        _audit(sessions, "job.release", "job", str(job_id), before=before,
               after={**before, "state": "released", "destinations": released.destinations,
                      "deliveries": released.delivery_ids}, detail=f"{where}: held results released to {to}")
        print(f"job {job_id}: held results released to {to} (the running node sends them within a second)")
        return 0
    thrown = [r.kind for r in job.results if r.kind != jobs.NOTICE_KIND]
    outbox = Spool(settings.outbox_dir, fsync=settings.storage.fsync)
    if not held_results.discard_held(sessions, outbox, job_id, now=_now(), by="cli"):
        return _no_longer_held(sessions, job_id, verb)
    _audit(sessions, "job.discard", "job", str(job_id), before={**before, "results": thrown},
           after={**before, "state": "discarded", "results": []},
           detail=f"{where}: held results discarded ({', '.join(thrown) or 'no result objects'})")
    print(f"job {job_id}: held results discarded ({', '.join(thrown) or 'no result objects'}); nothing will be sent")
    return 0


def _no_longer_held(sessions: sessionmaker[Session], job_id: int, verb: str) -> int:
    now = job_views.get_job(sessions, job_id)
    print(f"dicom-node: job {job_id} is {now.state if now else 'gone'}; only held jobs can be {verb}", file=sys.stderr)
    return 1


def _models(settings: Settings, args: argparse.Namespace) -> int:
    """List the registry's models with their enabled state, or enable/disable one (audited as ``cli``)."""
    from dicom_node.db import model_settings
    from dicom_node.model_catalog import ModelCatalog, ModelRegistryError

    if args.sub == "add":
        return _add_model(settings, args)
    try:
        registry = ModelCatalog.configured(settings.routing.models_file)
    except (ModelRegistryError, OSError) as exc:
        print(f"dicom-node: cannot read the model registry: {exc}", file=sys.stderr)
        return 1
    sessions = _sessions(settings, writes=args.sub != "list")
    if sessions is None:
        return 1
    if args.sub == "list":
        return _list_models(registry, model_settings.model_settings(sessions), as_json=args.json)
    if args.model_id not in registry.ids:
        print(f"dicom-node: no model {args.model_id!r} in the registry (known: {', '.join(registry.ids)})",
              file=sys.stderr)
        return 1
    enabled = args.sub == "enable"
    try:
        before, after = model_settings.set_model_enabled(sessions, args.model_id, enabled, note=args.note, by="cli",
                                                         now=_now())
    except ValueError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    _audit(sessions, f"model.{args.sub}", "model", args.model_id, before=before.audit_state(),
           after=after.audit_state())
    print(f"model {args.model_id} {'enabled' if enabled else 'disabled'}"
          + ("" if enabled else ": routing creates no new jobs for it"))
    return 0


def _add_model(settings: Settings, args: argparse.Namespace) -> int:
    """``models add``: check the model's files, append its entry to the registry, record the registration."""
    import yaml

    from dicom_node.db import model_history
    from dicom_node.model_register import RegistrationError, register_model

    registry_file = args.registry or settings.routing.models_file
    if registry_file is None:
        print("dicom-node: no model registry file: this node serves the built-in demo models. Copy "
              "config/models.yaml (it lists the demo models) to a place of your choice, set routing.models_file "
              "to it in the settings (or DICOM_NODE_ROUTING__MODELS_FILE), then run this again (or give "
              "--registry FILE)", file=sys.stderr)
        return 1
    extra: dict[str, Any] = {}
    if args.entry is not None:
        try:
            extra = yaml.safe_load(args.entry.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            print(f"dicom-node: --entry {args.entry}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(extra, dict):
            print(f"dicom-node: --entry {args.entry} must hold a mapping of entry fields", file=sys.stderr)
            return 2
    try:
        registered = register_model(Path(registry_file), args.path, args.model_id,
                                    model_format=None if args.format == "auto" else args.format, kind=args.kind,
                                    version=args.version, extra=extra, replace=args.replace)
    except RegistrationError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    entry = registered.entry
    sessions = _sessions(settings, writes=True)
    if sessions is not None:
        model_history.record_registration(
            sessions, model_id=entry.id, version=entry.version, model_format=entry.format, path=entry.path,
            device_uid=registered.device_uid, weights_sha256=registered.weights_sha256, by="cli", now=_now(),
            registry_file=str(registered.registry_file))
        _audit(sessions, "model.register", "model", entry.id,
               before={"version": registered.replaced_version} if registered.replaced_version else None,
               after={"version": entry.version, "format": entry.format, "path": entry.path,
                      "device_uid": registered.device_uid, "weights_sha256": registered.weights_sha256},
               detail=f"added to {registered.registry_file}")
    what = f"version {entry.version}" + (f" (was {registered.replaced_version})" if registered.replaced_version
                                         else "")
    print(f"model {entry.id}: {entry.format} {entry.kind}, {what}, registered in {registered.registry_file}\n"
          f"    path {entry.path}\n    Device UID {registered.device_uid} (weights sha256 "
          f"{registered.weights_sha256[:16]}...)")
    if settings.routing.models_file is None or Path(settings.routing.models_file).resolve() != \
            Path(registered.registry_file).resolve():
        print(f"note: routing.models_file does not name {registered.registry_file}; the node serves it only once "
              "it does")
    print("restart the workers to load it; routing rules name it by its id")
    return 0


#: How ``models list`` names the kinds of result series ("NOTICE" is the "AI analysis not performed" SR).
_KIND_WORDS = {"NOTICE": "not performed"}


def _list_models(registry: ModelCatalog, stored: dict[str, ModelSettingView], *, as_json: bool) -> int:
    """Each model: its state, what it was made for, what its results must pass and their series numbers."""
    from dicom_node.db import model_settings
    from dicom_node.model_declarations import model_declarations

    rows = []
    for model_id in registry.ids:
        declared = model_declarations(registry, model_id)
        rows.append(model_settings.setting_of(stored, model_id).as_dict() | {
            "kind": registry.entry(model_id).kind,
            "input_domain": declared.input_domain.model_dump(mode="json") if declared.input_domain else None,
            "made_for": declared.made_for, "made_for_warning": declared.made_for_warning,
            "plausibility": declared.plausibility, "plausibility_summary": declared.plausibility_summary,
            "result_series": [s.model_dump() for s in declared.result_series], "error": declared.error})
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        state = "enabled" if row["enabled"] else "DISABLED"
        series = ", ".join(f"{s['series_number']} {_KIND_WORDS.get(s['kind'], s['kind'])}"
                           for s in row["result_series"])
        print(f"{row['model_id']:<28} {row['kind']:<13} {state:<9} series {series}"
              + (f"  note: {row['note']}" if row["note"] else ""))
        if row["error"]:
            print(f"    ERROR: {row['error']}")
            continue
        warning = f" - WARNING: {row['made_for_warning']}" if row["made_for_warning"] else ""
        checks = "; ".join(row["plausibility_summary"]) or "none"
        print(f"    made for {row['made_for']}{warning} | results must pass: {checks}")
    return 0


def _why_not_retried(sessions: sessionmaker[Session], job_id: int) -> str:
    """Why ``jobs retry`` did nothing, and what to do instead."""
    job = job_views.get_job(sessions, job_id)
    if job is None:
        return f"job {job_id} does not exist"
    purged = job_views.deleted_by_retention(sessions, job.study_instance_uid, "study's instances")
    if purged is not None:
        return f"job {job_id} cannot run again: {purged}"
    if job.superseded_at is not None:
        return (f"job {job_id} was superseded by a later run of {job.pipeline} on its series; to run it again: "
                f"dicom-node studies reprocess {job.study_instance_uid}")
    if job.state in ("succeeded", "released"):
        return (f"job {job_id} {job.state}; nothing to retry. To send its results (again, or to a destination added "
                f"since): dicom-node studies resend {job.study_instance_uid}; to run the model again: "
                f"dicom-node studies reprocess {job.study_instance_uid}")
    if job.state == "held":
        return f"job {job_id} is held; release or discard its results: dicom-node jobs release|discard {job_id}"
    return f"job {job_id} is {job.state.replace('_', ' ')}; only failed, dead or cancelled jobs can be retried"


def _why_not_resent(sessions: sessionmaker[Session], delivery_id: int) -> str:
    """Why ``jobs retry-delivery`` did nothing."""
    delivery = job_views.get_delivery(sessions, delivery_id)
    if delivery is None:
        return f"delivery {delivery_id} does not exist"
    purged = job_views.deleted_by_retention(sessions, delivery.study_instance_uid, "results")
    if purged is not None:
        return f"delivery {delivery_id} cannot be re-sent: {purged}"
    return (f"delivery {delivery_id} is {delivery.state}; only failed or dead deliveries can be retried (to send "
            f"delivered results again: dicom-node studies resend {delivery.study_instance_uid})")


def add_commands(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``destinations``, ``rules``, ``jobs`` and ``models`` sub-commands to the CLI parser; ``common``
    adds the options every command that reads the settings has (``--config``, ``--data-dir``)."""
    from dicom_node.db.models import JobState

    def command(group: Any, name: str, text: str, *positional: tuple[str, type]) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=text)
        common(parser)
        for argument, kind in positional:
            parser.add_argument(argument, type=kind)
        return parser

    def group(name: str, text: str) -> Any:
        return commands.add_parser(name, help=text).add_subparsers(dest="sub", required=True)

    name, file, model = ("name", str), ("file", Path), ("model_id", str)
    job, delivery = ("job_id", int), ("delivery_id", int)
    destinations = group("destinations", "where results are sent")
    add = command(destinations, "add", "add or replace a DICOM destination, or an HL7 or FHIR notification "
                                       "destination (--type; DICOMweb and FHIR credentials: `destinations import`)",
                  name)
    add.add_argument("--type", choices=("dicom", "hl7", "fhir"), default="dicom",
                     help="dicom (C-STORE, the default), hl7 (ORU^R01 over MLLP) or fhir (DiagnosticReport)")
    add.add_argument("--ae-title", help="the destination's AE title (dicom)")
    add.add_argument("--host", help="dicom, hl7")
    add.add_argument("--port", type=int, help="dicom, hl7")
    add.add_argument("--url", help="the FHIR base URL (fhir)")
    add.add_argument("--default", action="store_true", help="receives (is told about) the results of default rules")
    add.add_argument("--notify", default=",".join(sorted(NOTIFY_EVENTS)),
                     help=f"hl7, fhir: when it is told, any of {','.join(sorted(NOTIFY_EVENTS))} (default: all)")
    add.add_argument("--sending-facility", help="hl7: MSH-4")
    add.add_argument("--receiving-application", help="hl7: MSH-5")
    add.add_argument("--receiving-facility", help="hl7: MSH-6")
    add.add_argument("--patient-id-authority", help="hl7: PID-3's assigning authority")
    add.add_argument("--patient-id-system", help="fhir: the identifier system (URI) of the DICOM Patient ID")
    add.add_argument("--outputs", default=",".join(sorted(DEFAULT_OUTPUTS)),
                     help=f"objects it receives, any of {','.join(sorted(ALL_OUTPUTS))} "
                          f"(default {','.join(sorted(DEFAULT_OUTPUTS))})")
    add.add_argument("--not-performed", choices=("none", "sr"), default="none",
                     help="when a model declines a study or its result is held: send nothing (none, the default) "
                          "or an 'AI analysis not performed' SR with the reason (sr)")
    add.add_argument("--outline-low-confidence", action="store_true",
                     help="outline also the findings under their model's display threshold (grey) in the GSPS and "
                          "the overlay series; by default only the SR reports them")
    command(destinations, "list", "list destinations").add_argument("--json", action="store_true")
    command(destinations, "import", "import destinations from a YAML file", file)
    command(destinations, "remove", "remove a destination", name)
    command(destinations, "send-recent", "send a destination (e.g. one just added) the results of the last hours "
            "that it never had", name).add_argument("--hours", type=float, default=24.0,
                                                     help="how far back (default 24)")

    rules = group("rules", "routing rules")
    command(rules, "list", "list routing rules").add_argument("--json", action="store_true")
    command(rules, "import", "import rules from a YAML file (validated first)", file)
    command(rules, "remove", "remove a routing rule", name)
    command(rules, "test", "which rules match a received study, and why the others do not", ("study_uid", str)
            ).add_argument("--image", action="store_true",
                           help="also survey the images (which body regions they show), as the worker will")

    job_commands = group("jobs", "jobs and their deliveries")
    listing = command(job_commands, "list", "list jobs, newest first")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--study", help="only this Study Instance UID")
    listing.add_argument("--state", choices=[s.value for s in JobState],
                         help="only jobs in this state (held: results waiting for an operator)")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--after", metavar="CURSOR", help="the older jobs below a page (the cursor the last "
                         "line of a full page names)")
    command(job_commands, "retry", "run a failed or dead job again", job)
    command(job_commands, "release", "send a held job's results (judged implausible) to its destinations after all",
            job)
    command(job_commands, "discard", "throw a held job's results away (their files too); nothing of them is sent",
            job)
    command(job_commands, "retry-delivery", "send a failed or dead delivery again", delivery)

    models = group("models", "the model registry: list, add, enable or disable a model")
    command(models, "list", "models of the registry and whether routing may use them").add_argument(
        "--json", action="store_true")
    add = command(models, "add", "check a model folder or file and register it (a new entry of routing.models_file)")
    add.add_argument("path", type=Path, help="a MONAI bundle folder, an nnU-Net v2 results folder "
                                             "(dataset.json, plans.json, fold_*), a .ts or an .onnx file")
    add.add_argument("--id", required=True, dest="model_id", help="the id routing rules will name it by")
    add.add_argument("--format", default="auto", choices=("auto", "monai_bundle", "torchscript", "onnx", "nnunet"),
                     help="the model's format (default: detected from the files)")
    add.add_argument("--kind", choices=("segmentation", "detection", "classification"),
                     help="what it gives (default: the bundle's dicom_node.kind, else segmentation)")
    add.add_argument("--version", help="the version written into results (default: the bundle's metadata version; "
                                       "required for other formats)")
    add.add_argument("--registry", type=Path, help="the registry file to add it to (default: routing.models_file)")
    add.add_argument("--entry", type=Path, help="a YAML file of more entry fields: labels, preprocessing, nnunet, "
                                                "input_domain, plausibility, title, series_number, name, overrides")
    add.add_argument("--replace", action="store_true",
                     help="register a new version of a model id already in the registry (its entry is replaced; "
                          "fields not given are kept)")
    for verb, text in (("enable", "let routing create jobs for a model again"),
                       ("disable", "stop routing from creating jobs for a model (queued jobs still run)")):
        command(models, verb, text, model).add_argument(
            "--note", help="why (shown on the models page and kept in the audit log)")


def run(settings: Settings, args: argparse.Namespace, *, image_check: ImageCheck | None = None) -> int:
    """Run a ``destinations``, ``rules``, ``jobs`` or ``models`` sub-command; returns the exit code.

    ``image_check``: the worker's own check of a series' images, for ``rules test --image``
    (handed in by the wiring layer; this module never imports the workers).
    """
    if args.command == "rules":
        return _rules(settings, args, image_check)
    handler = {"destinations": _destinations, "jobs": _jobs, "models": _models}[args.command]
    return handler(settings, args)
