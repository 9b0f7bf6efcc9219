"""Where results go: DICOM (C-STORE) and DICOMweb (STOW-RS) destinations, and where the news of them goes:
HL7 v2 (MLLP) and FHIR R4 notification destinations, as typed data.

Why: admins list destinations in YAML, the DB or the UI; each is validated when it is
loaded or saved (errors name the field and the wrong value), never when a delivery is
already under way. ``type`` tells the kinds apart (``dicom`` / ``dicomweb`` receive the
result objects, ``hl7`` / ``fhir`` are told about them), so :data:`Destination` parses any
of them from one mapping, and routing rules name either kind the same way. Sending lives
elsewhere: :func:`dicom_node.scu.send_dicom`, :func:`dicom_node.stow.send_dicomweb` and
:func:`dicom_node.notify.send_notification`.

Secrets (a basic-auth password, a bearer token) are :class:`pydantic.SecretStr`: they
print as ``**********`` in reprs, logs and ``model_dump(mode="json")``; pass
``context={"reveal_secrets": True}`` to ``model_dump``/``model_dump_json`` to store a
definition with its secrets (the DB's ``destinations.definition``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from dicom_node.contracts import OutputKind, require_unique_names
from dicom_node.settings import _check_ae_title

__all__ = [
    "ALL_OUTPUTS",
    "DEFAULT_OUTPUTS",
    "BasicAuth",
    "BearerAuth",
    "Destination",
    "DestinationSet",
    "DicomDestination",
    "DicomTLS",
    "DicomWebAuth",
    "DicomWebDestination",
    "FhirDestination",
    "HL7Destination",
    "NOTIFICATION_KINDS",
    "NOTIFY_EVENTS",
    "NoAuth",
    "NotificationDestination",
    "ResultDestination",
]

#: Every result kind a destination can ask for (the form's choices).
ALL_OUTPUTS: frozenset[OutputKind] = frozenset({"SEG", "SR", "GSPS", "PMAP", "SC", "KO"})
#: What a destination receives when its ``outputs`` say nothing: SEG, SR, GSPS and KO (the Key Object Selection
#: of the images with findings: a SOP class PACS store and show as "key images", also where SEG and SR are not
#: shown). A classifier's explanation map (PMAP: Parametric Map, SC: colour Secondary Capture overlays) must be
#: asked for: many PACS do not accept the Parametric Map SOP class (the association would refuse it and the
#: delivery fail), and colour overlay images are a series a reading list shows.
DEFAULT_OUTPUTS: frozenset[OutputKind] = frozenset({"SEG", "SR", "GSPS", "KO"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9_.:\-\[\]%]+$")  # DNS name, IPv4, IPv6 (with zone id)


_S = TypeVar("_S", bound=frozenset[Any])


def _some(field: str, value: _S, choices: frozenset[str]) -> _S:
    """``value`` unless it is empty (a set field that must name at least one of ``choices``)."""
    if not value:
        raise ValueError(f"{field} is empty; name at least one of {', '.join(sorted(choices))}")
    return value


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _reveal(value: SecretStr, info: SerializationInfo) -> str:
    """JSON form of a secret: masked unless the caller asks for it (``reveal_secrets``)."""
    if isinstance(info.context, dict) and info.context.get("reveal_secrets"):
        return value.get_secret_value()
    return str(value)


class _NamedDestination(_Definition):
    """What every destination has: a unique name, default or not, a time-out per network operation."""

    name: str = Field(description="Unique name; routing rules refer to destinations by it.")
    default: bool = Field(default=False, description="Used by the rules that name no destinations.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"destination name {value!r} must be 1-64 letters, digits, '_', '.' or '-' "
                "and start with a letter or digit"
            )
        return value


class _DestinationBase(_NamedDestination):
    """A destination of result objects: which results it takes, and what it gets when AI was not performed."""

    outputs: frozenset[OutputKind] = Field(
        default=DEFAULT_OUTPUTS,
        description="Result kinds this destination receives (SEG, SR, GSPS; PMAP and SC only when named)."
    )
    not_performed: Literal["none", "sr"] = Field(
        default="none",
        description="When a model declined a study (not made for it) or its result was held: none sends nothing; "
                    "sr sends a short SR 'AI analysis not performed' with the coded reason and the model.")
    outline_low_confidence: bool = Field(
        default=False,
        description="Outline in the GSPS and the overlay series (SC) also the findings under their model's display "
                    "threshold, in grey and named 'low confidence' (the SR reports them either way).")

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: frozenset[OutputKind]) -> frozenset[OutputKind]:
        return _some("outputs", value, ALL_OUTPUTS)

    @field_serializer("outputs")
    def _sorted_outputs(self, value: frozenset[OutputKind]) -> list[str]:
        return sorted(value)  # stable JSON for the DB and diffs

    def accepts(self, kind: OutputKind) -> bool:
        """Whether results of ``kind`` go to this destination."""
        return kind in self.outputs


class DicomTLS(_Definition):
    """DICOM TLS (PS3.15 Annex B) towards one peer.

    ``ca_certificates`` (PEM) verifies the peer's certificate; without it the system's
    trust store is used. ``certificate`` + ``private_key`` are this node's client
    certificate, for peers that require one. ``check_hostname`` matches the peer's
    certificate against ``host`` (turn it off only for peers whose certificates name
    neither their DNS name nor their address).
    """

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DicomTLS:
        if (self.certificate is None) != (self.private_key is None):
            given = "certificate" if self.certificate is not None else "private_key"
            missing = "private_key" if self.certificate is not None else "certificate"
            raise ValueError(
                f"tls.{given} is set ({getattr(self, given)}) but tls.{missing} is not; a client certificate needs both"
            )
        return self


class DicomDestination(_DestinationBase):
    """A DICOM peer reached by C-STORE (a PACS, a viewer's archive, another node)."""

    type: Literal["dicom"] = "dicom"
    ae_title: str = Field(description="The peer's AE title (the Called AE Title).")
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(
        default=None, description="This node's AE title towards the peer; default: dicom.ae_title."
    )
    tls: DicomTLS | None = None
    max_pdu: int = Field(default=1_048_576, ge=0, description="Largest PDU this node receives; 0 means unlimited.")

    @field_validator("ae_title")
    @classmethod
    def _called(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @field_validator("calling_ae_title")
    @classmethod
    def _calling(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value, "calling_ae_title")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError(f"host {value!r} is not a host name or IP address")
        return value

    @property
    def peer(self) -> str:
        """``AE@host:port``, for messages and the UI."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class NoAuth(_Definition):
    """No HTTP authentication."""

    type: Literal["none"] = "none"


class BasicAuth(_Definition):
    """HTTP basic authentication (RFC 7617); use it over https only."""

    type: Literal["basic"] = "basic"
    username: str = Field(min_length=1)
    password: SecretStr

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        if ":" in value:
            raise ValueError(f"auth.username {value!r} contains ':', which basic authentication cannot carry")
        return value

    @field_serializer("password", when_used="json")
    def _password(self, value: SecretStr, info: SerializationInfo) -> str:
        return _reveal(value, info)


class BearerAuth(_Definition):
    """An OAuth 2 / OpenID bearer token sent as ``Authorization: Bearer ...``."""

    type: Literal["bearer"] = "bearer"
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("auth.token is empty")
        return value

    @field_serializer("token", when_used="json")
    def _token_json(self, value: SecretStr, info: SerializationInfo) -> str:
        return _reveal(value, info)


DicomWebAuth = Annotated[NoAuth | BasicAuth | BearerAuth, Field(discriminator="type")]


class _HttpService(_Definition):
    """An HTTP(S) service root with its credentials and TLS settings (DICOMweb, FHIR).

    With ``verify_tls`` the server's certificate is checked against ``ca_certificates`` (PEM)
    or, without it, the system's trust store.
    """

    url: str
    auth: DicomWebAuth = Field(default_factory=NoAuth)
    verify_tls: bool = True
    ca_certificates: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {value!r} must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError(f"url {value!r} must be the service root, without query or fragment")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"url {parts.scheme}://***@{parts.hostname}... must not carry credentials; "
                "give them as auth (basic or bearer), which is kept secret"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_options(self) -> _HttpService:
        if self.ca_certificates is not None and not self.verify_tls:
            raise ValueError(
                f"ca_certificates is set ({self.ca_certificates}) but verify_tls is false; drop one of them"
            )
        return self

    @property
    def peer(self) -> str:
        """The service root URL, for messages and the UI."""
        return self.url


class DicomWebDestination(_HttpService, _DestinationBase):
    """A DICOMweb server reached by STOW-RS (``POST {url}/studies``); ``url`` is the service root (for
    Orthanc ``http://host:8042/dicom-web``)."""

    type: Literal["dicomweb"] = "dicomweb"


#: When a notification destination is told: the job's results were delivered to its result destinations
#: (``results``), the model declined the study (``not_performed``), or its result was held as implausible (``held``).
NotifyEvent = Literal["results", "not_performed", "held"]
NOTIFY_EVENTS: frozenset[str] = frozenset({"results", "not_performed", "held"})
#: The ``type`` of the destinations that are told about results rather than sent them.
NOTIFICATION_KINDS: frozenset[str] = frozenset({"hl7", "fhir"})
_HL7_NAME = re.compile(r"^[^|^~\\&\r\n]{1,20}$")  # an HD namespace: no HL7 separator, 20 characters at most


class _NotificationBase(_NamedDestination):
    """A system told that a job's results exist (a RIS, an EHR): which events it is told of."""

    notify: frozenset[NotifyEvent] = Field(
        default=frozenset({"results", "not_performed", "held"}),
        description="results: when a job's results reached its result destinations; not_performed: when a model "
                    "declined the study; held: when a result was held as implausible (the message says which).")

    @field_validator("notify")
    @classmethod
    def _some_events(cls, value: frozenset[str]) -> frozenset[str]:
        return _some("notify", value, NOTIFY_EVENTS)

    @field_serializer("notify")
    def _sorted_events(self, value: frozenset[str]) -> list[str]:
        return sorted(value)


class HL7Destination(_NotificationBase):
    """A RIS or interface engine told by an HL7 v2.5 ORU^R01 over MLLP (one message per job, ACK awaited).

    ``sending_*``/``receiving_*`` fill MSH-3..6; ``patient_id_authority`` is PID-3's assigning
    authority (the issuer of the DICOM Patient ID at this site). ``tls`` wraps the MLLP connection
    (the same options as DICOM TLS).
    """

    type: Literal["hl7"] = "hl7"
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = Field(default="DICOM_NODE", description="MSH-3")
    sending_facility: str | None = Field(default=None, description="MSH-4")
    receiving_application: str | None = Field(default=None, description="MSH-5")
    receiving_facility: str | None = Field(default=None, description="MSH-6")
    patient_id_authority: str | None = Field(default=None, description="PID-3.4, the Patient ID's issuer")
    processing_id: Literal["P", "D", "T"] = Field(default="P", description="MSH-11: production, debugging, training")
    tls: DicomTLS | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError(f"host {value!r} is not a host name or IP address")
        return value

    @field_validator("sending_application", "sending_facility", "receiving_application", "receiving_facility",
                     "patient_id_authority")
    @classmethod
    def _hd(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _HL7_NAME.match(value):
            raise ValueError(f"{info.field_name} {value!r} must be 1-20 characters without | ^ ~ \\ & or line breaks")
        return value

    @property
    def peer(self) -> str:
        """``mllp://host:port`` (``mllps`` with TLS), for messages and the UI."""
        return f"mllp{'s' if self.tls else ''}://{self.host}:{self.port}"


class FhirDestination(_HttpService, _NotificationBase):
    """A FHIR R4 server told by a transaction Bundle (``POST {url}``): a DiagnosticReport and its Observations.

    ``url`` is the FHIR base (``https://ehr.example/fhir``); ``patient_id_system`` the identifier
    system (a URI) of the DICOM Patient ID at this site, by which the report names its subject.
    """

    type: Literal["fhir"] = "fhir"
    patient_id_system: str | None = Field(default=None, max_length=255,
                                          description="Identifier.system of the patient (a URI)")

    @field_validator("patient_id_system")
    @classmethod
    def _system(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(urn:|https?://)\S+$", value):
            raise ValueError(f"patient_id_system {value!r} must be a URI (urn:..., http://... or https://...)")
        return value


#: A destination of result objects ("dicom" or "dicomweb").
ResultDestination = DicomDestination | DicomWebDestination
#: A destination told about results ("hl7" or "fhir").
NotificationDestination = HL7Destination | FhirDestination
#: Any kind of destination, told apart by ``type`` ("dicom", "dicomweb", "hl7" or "fhir").
Destination = Annotated[DicomDestination | DicomWebDestination | HL7Destination | FhirDestination,
                        Field(discriminator="type")]


class DestinationSet(_Definition):
    """The destinations of one YAML file (``destinations: [...]``); names are unique."""

    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Any]) -> list[Any]:
        require_unique_names(value, "destination")
        return value

    def by_name(self, name: str) -> ResultDestination | NotificationDestination:
        """The destination called ``name``; KeyError naming it and the known names otherwise."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise KeyError(f"no destination named {name!r} (known: {known})")

    def defaults(self) -> list[ResultDestination | NotificationDestination]:
        """The destinations marked ``default``, in file order."""
        return [d for d in self.destinations if d.default]
