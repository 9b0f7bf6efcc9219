"""The node's tables: what was received, from whom, and in which state each study is.

The database is the source of truth for every study: the spool holds the bytes, these
rows say what they are, and the completion monitor and (later) the router move the
``Study.state`` column forward. Timestamps are stored as naive UTC and read back as
aware UTC datetimes so SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

import enum
import json
import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

logger = logging.getLogger(__name__)


def json_object(text: str | None, what: str) -> dict[str, Any]:
    """A text column that holds a JSON object, read back: ``{}`` when empty, not JSON or not an object.

    Why ``{}`` rather than an error: these columns (a job's stages, summary and checks, a
    worker's models) are shown, never acted on; one damaged row must not break a page. A
    damaged value is logged, naming ``what`` (e.g. "checks of job 12").
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        logger.warning("%s is not valid JSON; shown as empty", what)
        return {}
    if not isinstance(value, dict):
        logger.warning("%s is not a JSON object; shown as empty", what)
        return {}
    return value


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC, always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given; the node stores aware UTC timestamps")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class StudyState(str, enum.Enum):
    """Where a study is on its way from the PACS to the results."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    IGNORED = "ignored"


class AssociationOutcome(str, enum.Enum):
    """How an association ended (or that it is still open)."""

    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
    INTERRUPTED = "interrupted"  # the node stopped while it was open


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING.value)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    late_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    receiving_since: Mapped[datetime] = mapped_column(
        UTCDateTime(), doc="First instance, or the late instance that reopened it; max_wait runs from here."
    )
    last_activity_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), doc="Last instance or release of a sending association; the quiet period runs from here."
    )
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), doc="When retention deleted its instances and results; the record stays.")

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    events: Mapped[list[StudyEvent]] = relationship(back_populates="study", order_by="StudyEvent.id")

    __table_args__ = (
        Index("ix_studies_state_activity", "state", "last_activity_at"),
        Index("ix_studies_last_received", "last_received_at", "id"),  # the studies list's order (keyset pages)
    )


class Series(Base):
    """One series of one study. A Series Instance UID is unique within its study only: a sender that
    reuses one in another study (another patient) gets a second row, never a share of the first."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    study: Mapped[Study] = relationship(back_populates="series")

    __table_args__ = (Index("ux_series_study_series", "study_id", "series_instance_uid", unique=True),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text, doc="Relative to the spool directory.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))
    late: Mapped[bool] = mapped_column(Boolean, default=False, doc="Arrived after its study was complete.")
    duplicates_received: Mapped[int] = mapped_column(Integer, default=0)


class AssociationProtocol(str, enum.Enum):
    """How a sending session came in: a DICOM association, or one STOW-RS request (recorded alike)."""

    DICOM = "dicom"
    STOW_RS = "stow-rs"


class AssociationRecord(Base):
    """One DICOM association, or one STOW-RS request: who, from where, when, and how it went.

    A STOW-RS request has no AE titles (both empty); ``username`` names the account that sent it.
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(16), default=AssociationOutcome.OPEN.value, index=True)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    protocol: Mapped[str] = mapped_column(String(16), default=AssociationProtocol.DICOM.value,
                                          server_default=AssociationProtocol.DICOM.value)
    username: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_associations_outcome_started", "outcome", "started_at"),)  # rejected, newest first


class AssociationStudy(Base):
    """Which studies an association sent: a study waits while any of them is open."""

    __tablename__ = "association_studies"

    association_id: Mapped[int] = mapped_column(
        ForeignKey("associations.id", ondelete="CASCADE"), primary_key=True
    )
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True, index=True)


class IngestError(Base):
    """An instance the node refused, with the status it answered and why."""

    __tablename__ = "ingest_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id", ondelete="SET NULL"))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(Text)


class StudyEvent(Base):
    """A timestamped step in a study's life (completed, late instance, reopened, ...)."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="events")


class JobState(str, enum.Enum):
    """Where a job (one pipeline on one series of a study) is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # will be retried (attempts left)
    DEAD = "dead"  # no attempts left, or an error retrying cannot fix
    CANCELLED = "cancelled"
    NOT_APPLICABLE = "not_applicable"  # the series is outside what the model was made for (checks say why)
    HELD = "held"  # results judged implausible: kept, not sent, until an operator releases or discards them
    RELEASED = "released"  # held results an operator sent after all
    DISCARDED = "discarded"  # held results an operator threw away


class DeliveryState(str, enum.Enum):
    """Where the delivery of one job's results to one destination is."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"  # waiting for its next attempt (next_attempt_at)
    DEAD = "dead"


class RoutingRuleRow(Base):
    """A routing rule: its validated definition (:class:`dicom_node.routing.Rule`) as JSON."""

    __tablename__ = "routing_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    position: Mapped[int] = mapped_column(Integer, default=0, doc="Order among rules of equal priority.")
    definition: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(255), doc="File it was imported from, or cli/ui.")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DestinationRow(Base):
    """Where results can be sent: a DICOM AE or a DICOMweb STOW-RS service, as validated JSON."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    definition: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Job(Base):
    """One pipeline (model) run on one series of a study, with its stages timed and its error kept."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[str] = mapped_column(Text, doc="JSON list of destination names, or \"default\".")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    stage_seconds: Mapped[str | None] = mapped_column(Text, doc="JSON {stage: seconds} of the last attempt.")
    summary: Mapped[str | None] = mapped_column(Text, doc="JSON summary of the findings.")
    checks: Mapped[str | None] = mapped_column(
        Text, doc="JSON {applicability: ..., plausibility: ...}: the decisions before and after the model ran.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    generation: Mapped[int] = mapped_column(
        Integer, server_default="1",
        doc="1 for the job routing created; 2, 3, ... for each re-run of the model on the series.")
    supersedes_job_id: Mapped[int | None] = mapped_column(
        Integer, doc="The earlier job (same model, series) whose results this one replaces.")
    superseded_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime(), doc="When a later job's results replaced this job's (set when that job finished).")
    input_instances: Mapped[int | None] = mapped_column(
        Integer, doc="Instances the series had when the job was claimed (a series that grew since is noticed).")

    __table_args__ = (
        Index("ux_jobs_study_pipeline_series_generation", "study_id", "pipeline", "series_instance_uid",
              "generation", unique=True),
        Index("ix_jobs_pipeline_finished", "pipeline", "finished_at"),
        Index("ix_jobs_finished_at", "finished_at"),  # the dashboard's throughput
        Index("ix_jobs_state_changed", "state", "state_changed_at"),  # its newest errors
        Index("ix_jobs_state_id", "state", "id"),  # the jobs list by state, newest first (and the workers' claims)
        Index("ix_jobs_pipeline_id", "pipeline", "id"),  # the jobs list by pipeline
    )


class ResultObject(Base):
    """A DICOM object a job produced (SEG, SR, GSPS), kept in the outbox until delivered.

    Also how the node recognises its own results when a PACS sends them back.
    """

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text, doc="Relative to the outbox directory.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Delivery(Base):
    """Sending one job's results to one destination, with retries and backoff."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    objects_sent: Mapped[int] = mapped_column(Integer, default=0)
    kinds: Mapped[str | None] = mapped_column(
        Text, doc="JSON list of the result kinds it carries; NULL: every kind the destination takes but NOTICE.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ux_deliveries_job_destination", "job_id", "destination", unique=True),
        Index("ix_deliveries_delivered_at", "delivered_at"),  # the dashboard's throughput
        Index("ix_deliveries_state_changed", "state", "state_changed_at"),  # its newest errors
        Index("ix_deliveries_state_id", "state", "id"),  # the deliveries list by state, newest first
        Index("ix_deliveries_destination_id", "destination", "id"),  # the deliveries list by destination
    )


class Role(str, enum.Enum):
    """What a user of the web app and API may do.

    The roles of people form a ladder: each includes the ones before it (viewer, operator,
    admin). The two service roles stand apart, for machines with API tokens only (no login,
    no page): ``worker``, a GPU worker on another machine, whose token reads series over
    DICOMweb and uploads results into the outbox; ``sender``, a PACS or script that pushes
    studies in by STOW-RS. A service account passes the checks of its own role and no
    other; a check for a service role also lets people in from a rung of the ladder up
    (:meth:`admits`): viewers read what workers read, operators may push studies as
    senders do (it makes jobs run, like re-processing a study).
    """

    WORKER = "worker"  # DICOMweb reads + outbox uploads (routes that name it exactly), no page, no admin API
    SENDER = "sender"  # STOW-RS into the receive path, nothing else
    VIEWER = "viewer"  # read everything (patient identifiers included)
    OPERATOR = "operator"  # + retry and cancel jobs, re-send deliveries, test connections, STOW-RS
    ADMIN = "admin"  # + routing rules, destinations, models, users, API tokens, audit log

    @property
    def level(self) -> int:
        """The rung of a person's role (0 for the service roles, which are not on the ladder)."""
        return _ROLE_LEVELS[self]

    @property
    def is_service(self) -> bool:
        """A machine's role (worker, sender): API tokens only, never a login."""
        return self in _PERSON_FLOOR

    def admits(self, holder: "Role") -> bool:
        """Whether a holder of role ``holder`` passes a check that asks for this role."""
        if holder is self:
            return True
        if holder.is_service:
            return False
        return holder.level >= _PERSON_FLOOR.get(self, self).level


_ROLE_LEVELS = {Role.WORKER: 0, Role.SENDER: 0, Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}
#: The least person role that also passes a check for each service role.
_PERSON_FLOOR = {Role.WORKER: Role.VIEWER, Role.SENDER: Role.OPERATOR}


class User(Base):
    """A person (or automation account) who logs in to the web app or holds API tokens."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebSession(Base):
    """A logged-in browser session; the cookie carries the token, the table only its SHA-256."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    remote_addr: Mapped[str | None] = mapped_column(String(64))


class ApiToken(Base):
    """A bearer token for automation; acts with its user's role. Only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), doc="First characters of the token, to recognise it.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """Who did what, when, with the state before and after (append-only: triggers refuse changes)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True, doc="Username, or 'anonymous' / 'system' / 'cli'.")
    action: Mapped[str] = mapped_column(String(64), index=True, doc="For example login, rule.update, job.retry.")
    target_kind: Mapped[str | None] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(255))
    before: Mapped[str | None] = mapped_column(Text, doc="JSON of the state before the change.")
    after: Mapped[str | None] = mapped_column(Text, doc="JSON of the state after the change.")
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class LoginAttempt(Base):
    """A login attempt, kept for rate limiting (the audit log keeps the history)."""

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    succeeded: Mapped[bool] = mapped_column(Boolean)


class WorkerStatus(Base):
    """A worker process's heartbeat: its queues, device, models and what it is doing."""

    __tablename__ = "worker_status"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, doc="host:pid")
    queues: Mapped[str] = mapped_column(String(64), doc="Comma-separated queue names.")
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    models: Mapped[str | None] = mapped_column(
        Text, doc="JSON {model name: {state: loading|loaded|failed, device, error}}.")
    current_job_id: Mapped[int | None] = mapped_column(Integer)


class ModelSetting(Base):
    """An admin's choice for one model of the registry; a model without a row is enabled.

    The registry (a YAML file or the built-in demo models) says which models exist; this
    row says whether the router may create jobs for one, and who decided so and why.
    """

    __tablename__ = "model_settings"

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True, doc="Model id of the registry.")
    enabled: Mapped[bool] = mapped_column(Boolean)
    note: Mapped[str | None] = mapped_column(Text, doc="The admin's reason, at most 500 characters.")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String(64), doc="Username (or 'cli') of who changed it last.")


class ModelRegistration(Base):
    """One registration of a model in the registry (``dicom-node models add``): its version history.

    The Device UID is derived from the SHA-256 of the weight files, so a registration with new
    weights shows a new UID and one with the same weights the same UID.
    """

    __tablename__ = "model_registrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(String(64), index=True, doc="Model id of the registry.")
    version: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32), doc="monai_bundle, torchscript, onnx or nnunet.")
    path: Mapped[str] = mapped_column(Text, doc="The model's path as the registry names it.")
    device_uid: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    registered_by: Mapped[str] = mapped_column(String(64), doc="Username, or 'cli'.")
    registry_file: Mapped[str | None] = mapped_column(Text, doc="The registry file the entry was added to.")


class MetricCount(Base):
    """A count the database keeps as rows change (triggers of migration 0012, which says what each metric
    counts): ``/metrics`` and the queue depths read these few rows instead of counting the history."""

    __tablename__ = "metric_counts"

    metric: Mapped[str] = mapped_column(String(40), primary_key=True)
    label1: Mapped[str] = mapped_column(Text, primary_key=True)
    label2: Mapped[str] = mapped_column(Text, primary_key=True)
    label3: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class MetricDelta(Base):
    """A change to a :class:`MetricCount` not yet added to it (PostgreSQL's triggers append these, so that
    concurrent transactions never wait on a counter row; ``dicom_node.db.counters.fold`` adds them up)."""

    __tablename__ = "metric_deltas"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    metric: Mapped[str] = mapped_column(String(40))
    label1: Mapped[str] = mapped_column(Text)
    label2: Mapped[str] = mapped_column(Text)
    label3: Mapped[str] = mapped_column(Text)
    delta: Mapped[int] = mapped_column(BigInteger)
