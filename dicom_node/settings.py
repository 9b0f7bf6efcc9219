"""Node settings: one YAML file plus environment overrides, validated once.

Settings are built by :func:`load_settings` in ``main()`` and passed down; nothing in
the package reads configuration at import time. Precedence, highest first: explicit
overrides (CLI flags), environment variables (``DICOM_NODE_*``, nested with ``__``, for
example ``DICOM_NODE_DICOM__PORT=104``), the YAML file, then the defaults below, which
``config/default.yaml`` documents setting by setting.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from dicom_node.model_domain import SynonymTable

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


def _check_ae_title(value: str, what: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(_Section):
    """A calling AE title allowed to associate, optionally only from some addresses."""

    ae_title: str
    hosts: list[str] = Field(
        default_factory=list,
        description="IP addresses or CIDR networks the AE may connect from; empty means any address.",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "allowed caller")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed caller host {host!r} is not an IP address or CIDR network") from exc
        return value


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 Annex B) on the SCP port."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = Field(
        default=None, description="PEM bundle used to verify client certificates."
    )
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> "TLSSettings":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("dicom.tls.enabled needs dicom.tls.certificate and dicom.tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("dicom.tls.require_client_certificate needs dicom.tls.ca_certificates")
        return self


class DicomSettings(_Section):
    """The DICOM listener: identity, access policy and association limits."""

    ae_title: str = "DICOM_NODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    require_called_ae_title: bool = True
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1)
    max_pending_connections: int = Field(
        default=32, ge=1,
        description="Connections that have not yet asked for an association; past this, the oldest is closed.")
    max_pdu_size: int = Field(default=1_048_576, ge=4096, le=16 * 1_048_576)
    max_instance_mb: int = Field(default=2048, ge=1, description="Largest instance accepted (after inflating).")
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    accelerate: bool = Field(
        default=False,
        description="Receive through the accelerated SCP (dicom_node.scp_accel, pinned pynetdicom version) instead "
        "of pynetdicom's public API; see docs/receive-acceleration.md.")
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "dicom.ae_title")


class StorageSettings(_Section):
    """Where received instances live and when the node stops accepting them."""

    min_free_mb: int = Field(default=1024, ge=0)
    quarantine_max_mb: int = Field(default=2048, ge=0, description="Rejected instances kept at most, in MiB.")
    fsync: bool = True


class CompletionSettings(_Section):
    """When a study counts as complete (received in full)."""

    quiet_seconds: float = Field(default=10.0, gt=0)
    max_wait_seconds: float = Field(default=600.0, gt=0)
    reopen_on_late_instances: bool = True
    check_interval_seconds: float = Field(default=1.0, gt=0)


class RetentionSettings(_Section):
    """Deleting the files of finished studies (received instances and, optionally, results); the record stays.

    Off by default: with neither ``keep_days`` nor ``max_disk_used_percent`` nothing is ever deleted.
    A study with unfinished work (receiving, not yet routed, a job queued, running, awaiting its
    retry or held, a delivery not yet delivered or dead) is never deleted (see ``dicom_node.retention``).
    """

    keep_days: float | None = Field(
        default=None, gt=0, description="Delete a finished study's files this many days after its last activity.")
    max_disk_used_percent: float | None = Field(
        default=None, gt=0, lt=100,
        description="When the data disk is fuller than this, delete finished studies, oldest first, until it is not.")
    check_interval_seconds: float = Field(default=3600.0, gt=0, description="How often the node applies retention.")
    delete_results: bool = Field(
        default=True, description="Delete the study's result objects and previews in the outbox too.")


class WebTLSSettings(_Section):
    """HTTPS on the web application's port (uvicorn's TLS), so that workers and STOW-RS clients need no proxy."""

    certificate: Path | None = Field(default=None, description="PEM certificate (chain) the web app presents.")
    private_key: Path | None = Field(default=None, description="PEM private key of the certificate (unencrypted).")

    @model_validator(mode="after")
    def _pair(self) -> "WebTLSSettings":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("web.tls needs both certificate and private_key (or neither, for plain HTTP)")
        return self

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


class WebSettings(_Section):
    """The admin web application, its REST API and the monitoring endpoints."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    secret_key_file: Path | None = Field(
        default=None,
        description="File holding the key that signs session cookies; none: data_dir/web-secret.key, "
        "created with a random key on first start.",
    )
    session_hours: float = Field(default=12.0, gt=0, description="A login lasts this long.")
    secure_cookies: bool = Field(
        default=False, description="Mark cookies Secure (only sent over HTTPS): set when behind a TLS proxy."
    )
    login_max_failures: int = Field(default=5, ge=1, description="Failed logins allowed per user name or per address within login_window_seconds; then 429.")
    login_window_seconds: float = Field(default=900.0, gt=0, description="The window over which failed logins are counted.")
    metrics_token: str | None = Field(
        default=None, description="Bearer token /metrics requires; none: /metrics is open (no patient data in it)."
    )
    health_token: str | None = Field(default=None, description="Bearer token /healthz and /readyz require.")
    ops_host: str | None = Field(
        default=None, description="Serve /metrics, /healthz and /readyz on this address (with ops_port) only.")
    ops_port: int | None = Field(default=None, ge=1, le=65535)
    worker_stale_seconds: float = Field(
        default=60.0, gt=0, description="A worker whose heartbeat is older than this is shown as offline."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IP addresses or CIDR networks of reverse proxies whose X-Forwarded-For is believed; "
        "empty: the header is ignored and the connecting address is the client.",
    )
    stow_max_request_mb: int = Field(
        default=8192, ge=1, description="Largest STOW-RS request body accepted, in MiB (each instance in it is "
        "bounded by dicom.max_instance_mb); past it the request is answered 413.")
    tls: WebTLSSettings = Field(default_factory=WebTLSSettings)
    stow_max_requests: int = Field(
        default=8, ge=1, description="STOW-RS requests received at once; one more is answered 503 with Retry-After.")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"web.trusted_proxies entry {proxy!r} is not an IP address or CIDR network") from exc
        return [proxy.strip() for proxy in value]

    @model_validator(mode="after")
    def _ops_pair(self) -> "WebSettings":
        if self.ops_host is not None and self.ops_port is None:
            raise ValueError("web.ops_host needs web.ops_port")
        return self

    @property
    def cookies_secure(self) -> bool:
        """Whether cookies are marked Secure: asked for (a TLS proxy in front), or the app serves HTTPS itself."""
        return self.secure_cookies or self.tls.enabled


class RoutingSettings(_Section):
    """Where routing rules, destinations and models come from, and how many times a job is tried."""

    rules_file: Path | None = Field(
        default=None,
        description="YAML routing rules imported into the DB at start; none: the built-in default rule "
        "(every complete CT study runs both demo models) when the DB has no rules.",
    )
    destinations_file: Path | None = Field(default=None, description="YAML destinations imported at start.")
    models_file: Path | None = Field(default=None, description="Model registry; none: the two demo models.")
    job_max_attempts: int = Field(default=3, ge=1)
    job_lease_seconds: float = Field(default=300.0, gt=0)


class QueueSettings(_Section):
    """The job queue: embedded (one machine, in-process worker) or a Redis broker shared by GPU workers."""

    broker_url: str = Field(default="memory://", description="memory:// (embedded) or redis://host:6379/0")
    embedded_worker_queues: list[Literal["gpu", "io"]] = Field(
        default_factory=lambda: ["gpu", "io"],
        description="Queues the serve process consumes itself; [] when separate workers do all the work.",
    )
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    resend_after_seconds: float = Field(
        default=120.0, gt=0,
        description="A job still queued (a delivery still pending) this long after its message was sent is sent "
        "again, in case the broker lost it; each later re-send waits as long as the job had waited.",
    )
    stop_grace_seconds: float = Field(
        default=15.0, ge=0, le=30,
        description="On SIGTERM/SIGINT, how long the running job or delivery may take to finish before it is "
        "handed back to the queue (not counted as an attempt). At most 30, so that the whole stop stays well "
        "inside systemd's TimeoutStopSec=60.",
    )


class DeliverySettings(_Section):
    """Sending results to destinations."""

    calling_ae_title: str | None = Field(default=None, description="AE title we call from; none: dicom.ae_title.")
    max_attempts: int = Field(default=10, ge=1)
    backoff_initial_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    lease_seconds: float = Field(default=300.0, gt=0)


class ResultsSettings(_Section):
    """How result objects are labelled in the PACS (never random).

    Series numbers and descriptions are per model (see ``config/models.yaml``: ``title``,
    ``series_number``), so two models' results never share a series number or a description.
    """

    manufacturer: str = "DICOM AI node"


class WorkerSettings(_Section):
    """How a GPU worker (``dicom-node worker``, or the one ``serve`` embeds) reaches the node's instances and outbox,
    how it runs its models and how many finished inferences it may encode while the next model runs."""

    node_access: Literal["shared_filesystem", "http"] = Field(
        default="shared_filesystem",
        description="shared_filesystem: the node's data_dir is mounted here (NFS); http: series are fetched from "
        "the node's DICOMweb and results uploaded to it, with node_url and a worker account's token.")
    node_url: str | None = Field(default=None, description="The node's web app, e.g. https://node.example:8080.")
    token: str | None = Field(default=None, description="API token of a worker account (users create --role worker).")
    token_file: Path | None = Field(default=None, description="A file holding the token (instead of token).")
    tls_verify: bool = Field(default=True, description="Check the node's certificate (https).")
    ca_certificates: Path | None = Field(default=None, description="CA bundle for the node's certificate.")
    timeout_seconds: float = Field(default=120.0, gt=0, description="Network timeout of one request to the node.")
    cache_max_mb: int = Field(
        default=4096, ge=1, description="Series fetched from the node are kept in data_dir/series-cache up to this "
        "size (least recently used removed first; the series in use is always kept).")
    cudnn_benchmark: bool = Field(
        default=True, description="On a GPU: let cuDNN time its convolution algorithms for each new input shape "
        "and keep the fastest (torch.backends.cudnn.benchmark); the first job of each new shape pays the timing.")
    pending_encodes: int = Field(
        default=1, ge=0, le=4, description="Jobs whose model ran that a worker may hand to its encoder thread (DICOM "
        "objects, outbox, finishing the job) while the next job's model runs; each holds its volume and result in "
        "memory until it is encoded. 0: each job is encoded in its own job slot, before the next model starts.")

    @field_validator("node_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"worker.node_url {value!r} is not http(s)://host[:port][/path]")
        return value

    @model_validator(mode="after")
    def _http_needs_node(self) -> "WorkerSettings":
        if self.node_access == "http":
            if not self.node_url:
                raise ValueError("worker.node_access http needs worker.node_url")
            if not self.token and self.token_file is None:
                raise ValueError("worker.node_access http needs worker.token or worker.token_file")
        return self

    def resolved_token(self) -> str:
        """The token, read from ``token_file`` when that is set (raises naming the file when it cannot be read)."""
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"worker.token_file {self.token_file}: {exc.strerror or exc}") from exc
        return self.token or ""


class ApplicabilitySettings(_Section):
    """The check before a model runs (is the series what the model was made for?)."""

    header_synonyms: dict[str, list[str]] = Field(
        default_factory=dict,
        description="More header words naming body regions, {region: [word, ...]}, added to the built-in table.")

    @field_validator("header_synonyms")
    @classmethod
    def _known_regions(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        SynonymTable(value)  # raises ValueError naming an unknown region or an empty word
        return value

    def synonym_table(self) -> SynonymTable:
        """The table of the built-in words plus these."""
        return SynonymTable(self.header_synonyms)


class Settings(BaseSettings):
    """Everything the node needs to run; see ``config/default.yaml``."""

    model_config = SettingsConfigDict(
        env_prefix="DICOM_NODE_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Path("./var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite file in data_dir."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    applicability: ApplicabilitySettings = Field(default_factory=ApplicabilitySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    @property
    def resolved_database_url(self) -> str:
        """The configured URL, or the default SQLite database under the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dicom-node.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def outbox_dir(self) -> Path:
        """Result objects the workers produced, kept until delivered."""
        return self.data_dir / "outbox"

    @property
    def series_cache_dir(self) -> Path:
        """Series a worker fetched from the node (``worker.node_access: http``)."""
        return self.data_dir / "series-cache"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if settings_cls.model_config.get("yaml_file"):
            sources += (YamlConfigSettingsSource(settings_cls),)
        return sources


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"dicom.port": 104}`` into ``{"dicom": {"port": 104}}``, dropping ``None``."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from a YAML file, the environment and dotted overrides.

    Raises ``FileNotFoundError`` for a missing file and pydantic's ``ValidationError``
    (which names every bad setting and value) for invalid content.
    """
    init = _nested(overrides or {})
    if config_file is None:
        return Settings(**init)
    if not config_file.is_file():
        raise FileNotFoundError(f"configuration file {config_file} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    return FileSettings(**init)
