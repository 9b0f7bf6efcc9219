"""Where results go: DICOM (C-STORE) and DICOMweb (STOW-RS) destinations as typed data.

Why: admins list destinations in YAML, the DB or the UI; each is validated when it is
loaded or saved (errors name the field and the wrong value), never when a delivery is
already under way. ``type`` tells the two kinds apart (``dicom`` / ``dicomweb``), so
:data:`Destination` parses either from one mapping. Sending lives elsewhere:
:func:`dicom_node.scu.send_dicom` and :func:`dicom_node.stow.send_dicomweb`.

Secrets (a basic-auth password, a bearer token) are :class:`pydantic.SecretStr`: they
print as ``**********`` in reprs, logs and ``model_dump(mode="json")``; pass
``context={"reveal_secrets": True}`` to ``model_dump``/``model_dump_json`` to store a
definition with its secrets (the DB's ``destinations.definition``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
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
    "NoAuth",
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


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _reveal(value: SecretStr, info: SerializationInfo) -> str:
    """JSON form of a secret: masked unless the caller asks for it (``reveal_secrets``)."""
    if isinstance(info.context, dict) and info.context.get("reveal_secrets"):
        return value.get_secret_value()
    return str(value)


class _DestinationBase(_Definition):
    """What every destination has: a unique name, which results it takes, default or not."""

    name: str = Field(description="Unique name; routing rules refer to destinations by it.")
    outputs: frozenset[OutputKind] = Field(
        default=DEFAULT_OUTPUTS,
        description="Result kinds this destination receives (SEG, SR, GSPS; PMAP and SC only when named)."
    )
    default: bool = Field(default=False, description="Receives the results of rules that name no destinations.")
    not_performed: Literal["none", "sr"] = Field(
        default="none",
        description="When a model declined a study (not made for it) or its result was held: none sends nothing; "
                    "sr sends a short SR 'AI analysis not performed' with the coded reason and the model.")
    outline_low_confidence: bool = Field(
        default=False,
        description="Outline in the GSPS and the overlay series (SC) also the findings under their model's display "
                    "threshold, in grey and named 'low confidence' (the SR reports them either way).")
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

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: frozenset[OutputKind]) -> frozenset[OutputKind]:
        if not value:
            raise ValueError(f"outputs is empty; name at least one of {', '.join(sorted(ALL_OUTPUTS))}")
        return value

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


class DicomWebDestination(_DestinationBase):
    """A DICOMweb server reached by STOW-RS (``POST {url}/studies``).

    ``url`` is the service root (for Orthanc ``http://host:8042/dicom-web``). With
    ``verify_tls`` the server's certificate is checked against ``ca_certificates`` (PEM)
    or, without it, the system's trust store.
    """

    type: Literal["dicomweb"] = "dicomweb"
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
            raise ValueError(f"url {value!r} must be the DICOMweb service root, without query or fragment")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"url {parts.scheme}://***@{parts.hostname}... must not carry credentials; "
                "give them as auth (basic or bearer), which is kept secret"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_options(self) -> DicomWebDestination:
        if self.ca_certificates is not None and not self.verify_tls:
            raise ValueError(
                f"ca_certificates is set ({self.ca_certificates}) but verify_tls is false; drop one of them"
            )
        return self

    @property
    def peer(self) -> str:
        """The service root URL, for messages and the UI."""
        return self.url


#: Either kind of destination, told apart by ``type`` ("dicom" or "dicomweb").
Destination = Annotated[DicomDestination | DicomWebDestination, Field(discriminator="type")]


class DestinationSet(_Definition):
    """The destinations of one YAML file (``destinations: [...]``); names are unique."""

    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Any]) -> list[Any]:
        require_unique_names(value, "destination")
        return value

    def by_name(self, name: str) -> DicomDestination | DicomWebDestination:
        """The destination called ``name``; KeyError naming it and the known names otherwise."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise KeyError(f"no destination named {name!r} (known: {known})")

    def defaults(self) -> list[DicomDestination | DicomWebDestination]:
        """The destinations marked ``default``, in file order."""
        return [d for d in self.destinations if d.default]
