"""Destinations: validated, saved, tested and audited in one place for the web pages, the API, the CLI and YAML import.

Why: definitions are the senders' own pydantic types (:mod:`dicom_node.destinations`),
each error placed at its field without the union tags (``port``, ``tls.certificate``,
``auth.password``). Secrets never leave the server: :func:`redacted` is what pages, API
and audit log show, and a blank or masked secret sent back means "keep the stored one"
- but only while the URL stays on the server the secret was entered for
(:func:`secret_moved`; such a refused save is audited as ``destination.secret_refused``).
TLS files must load when the definition is saved and before a connection test runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config_service.base import Actor, AuditedStore, FieldError, Refused, pydantic_message
from dicom_node.db import config_repo
from dicom_node.destinations import Destination, DicomDestination, DicomWebDestination, FhirDestination
from dicom_node.tls_files import destination_tls_problems

__all__ = ["KINDS", "MASK", "DestinationsService", "SecretMoved", "TestOutcome", "UnusableTlsFiles",
           "merge_secrets", "redacted", "secret_moved", "test_destination", "validate_destination"]

logger = logging.getLogger(__name__)

#: How a secret is shown (pydantic's SecretStr text); sent back, it means "keep the stored secret".
MASK = "**********"
#: A connection test waits at most this long, whatever the destination's own timeout.
TEST_TIMEOUT_SECONDS = 15.0
MAX_TEXT = 2000
KINDS = ("dicom", "dicomweb", "hl7", "fhir")
AUTH_KINDS = ("none", "basic", "bearer")
_DESTINATION = TypeAdapter(Destination)


def redacted(destination: Destination) -> dict[str, Any]:
    """The definition as JSON with every secret replaced by :data:`MASK` (for pages, API and audit log)."""
    return destination.model_dump(mode="json")


def _revealed(destination: Destination) -> dict[str, Any]:
    """The definition with its secrets, to tell whether an import changes it (never shown or audited)."""
    return _DESTINATION.dump_python(destination, mode="json", context={"reveal_secrets": True})  # type: ignore[no-any-return]


def _origin(url: Any) -> str:
    """``scheme://host:port`` of a URL (default port filled in), the unit a secret is entered for."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return url.strip()
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True)
class SecretMoved:
    """A save that would send the stored secret to another server: which secret, from where, to where."""

    secret: str  # "password" or "token"
    stored_origin: str
    new_origin: str

    @property
    def error(self) -> FieldError:
        what = self.secret
        return (("auth", self.secret),
                f"the URL now points to {self.new_origin} instead of {self.stored_origin}: type the {what} again "
                f"(a stored {what} is only sent to the server it was entered for)")


def _kept_auth(data: Any, stored: Destination | None) -> dict[str, Any] | None:
    """``data``'s auth when it is of the same kind as ``stored``'s (so blank or masked secrets may be kept)."""
    if not isinstance(data, dict) or not isinstance(stored, (DicomWebDestination, FhirDestination)):
        return None
    auth = data.get("auth")
    return auth if isinstance(auth, dict) and auth.get("type") == stored.auth.type else None


def secret_moved(data: Any, stored: Destination | None) -> SecretMoved | None:
    """Whether ``data`` keeps (blank or masked) a stored secret while its URL moves to another scheme, host or
    port: the stored secret must not follow an edited URL to a server it was never meant for."""
    auth = _kept_auth(data, stored)
    if auth is None or _origin(data.get("url")) == _origin(stored.url):  # type: ignore[union-attr]
        return None
    for name in ("password", "token"):
        if getattr(stored.auth, name, None) is not None and auth.get(name) in (None, "", MASK):  # type: ignore[union-attr]
            return SecretMoved(name, _origin(stored.url), _origin(data.get("url")))  # type: ignore[union-attr]
    return None


def merge_secrets(data: Any, stored: Destination | None) -> Any:
    """``data`` with blank or masked secrets replaced by the stored ones (same auth kind and same server only:
    see :func:`secret_moved`)."""
    auth = _kept_auth(data, stored)
    if auth is None or _origin(data.get("url")) != _origin(stored.url):  # type: ignore[union-attr]
        return data
    merged = dict(auth)
    for name in ("password", "token"):
        secret = getattr(stored.auth, name, None)  # type: ignore[union-attr]
        if secret is not None and merged.get(name) in (None, "", MASK):
            merged[name] = secret.get_secret_value()
    return {**data, "auth": merged}


def _location(location: Sequence[str | int]) -> tuple[str | int, ...]:
    """pydantic's location without the union tags (``dicomweb.auth.basic.password`` -> ``auth.password``)."""
    parts = list(location)
    if parts and parts[0] in KINDS:
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] == "auth" and parts[1] in AUTH_KINDS:
        parts = [parts[0], *parts[2:]]
    return tuple(parts)


def _model_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors at the definition's own field names."""
    errors: list[FieldError] = []
    for error in exc.errors():
        location = _location(error["loc"])
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):  # no or an unknown "type"
            given = error["input"].get("type") if isinstance(error["input"], dict) else None
            auth = location[:1] == ("auth",)
            location = ("auth", "type") if auth else ("type",)
            kinds = AUTH_KINDS if auth else KINDS
            errors.append((location, f"{'.'.join(location)} must be one of {', '.join(kinds)} (got {given!r})"))
        else:
            errors.append((location, pydantic_message(error)))
    return errors


def validate_destination(data: Any, *, stored: Destination | None) -> tuple[Destination | None, list[FieldError]]:
    """The destination ``data`` describes (blank/masked secrets taken from ``stored``), or its problems.

    Refused besides the model's own rules: over-long texts, a stored secret kept while the
    URL moves to another server (:func:`secret_moved`), and TLS files on the node that are
    not what their field says (:func:`dicom_node.tls_files.destination_tls_problems`).
    """
    if not isinstance(data, dict):
        return None, [((), f"a destination must be a JSON object, got {type(data).__name__}")]
    long = [key for key in ("url", "host", "name") if isinstance(data.get(key), str) and len(data[key]) > MAX_TEXT]
    if long:
        return None, [((key,), f"{key} is {len(data[key])} characters long; at most {MAX_TEXT} are allowed")
                      for key in long]
    moved = secret_moved(data, stored)
    try:
        destination = _DESTINATION.validate_python(merge_secrets(data, stored))
    except ValidationError as exc:
        errors = _model_errors(exc)
        if moved is not None:
            errors = [moved.error, *(e for e in errors if e[0] != moved.error[0])]
        return None, errors
    errors = [*([moved.error] if moved is not None else []), *destination_tls_problems(destination)]
    return (None, errors) if errors else (destination, [])


# --------------------------------------------------------------------------- connection test


@dataclass(frozen=True)
class TestOutcome:
    """A connection test's result, as shown and audited."""

    __test__ = False  # not a pytest test class

    ok: bool
    detail: str
    seconds: float
    method: str

    @property
    def round_trip_ms(self) -> float:
        return round(self.seconds * 1000, 1)


def test_destination(destination: Destination, calling_ae_title: str) -> TestOutcome:
    """C-ECHO a DICOM destination, QIDO-RS a DICOMweb one, connect to an HL7 one (MLLP, nothing sent) or read a
    FHIR server's CapabilityStatement; never raises for network trouble."""
    timeout = min(destination.timeout_seconds, TEST_TIMEOUT_SECONDS)
    if destination.type in ("hl7", "fhir"):
        from dicom_node.notify import check_notification_destination

        ok, detail, seconds = check_notification_destination(destination, timeout)  # type: ignore[arg-type]
        return TestOutcome(ok, detail, seconds, "MLLP connect" if destination.type == "hl7" else "GET /metadata")
    if isinstance(destination, DicomDestination):
        from dicom_node.scu import echo

        ok, detail, seconds = echo(destination, calling_ae_title, timeout)
        return TestOutcome(ok, detail, seconds, "C-ECHO")
    from dicom_node.stow import check_dicomweb

    ok, detail, seconds = check_dicomweb(destination, timeout)
    return TestOutcome(ok, detail, seconds, "QIDO-RS GET /studies?limit=1")


test_destination.__test__ = False  # type: ignore[attr-defined]


class UnusableTlsFiles(Refused):
    """The destination's TLS files cannot be loaded, so no connection test was run (422, ``errors`` by field)."""

    def __init__(self, problems: Sequence[FieldError]) -> None:
        super().__init__(422, problems, "destination: its TLS files cannot be used, so it was not tested")

    def __str__(self) -> str:
        return "; ".join(message for _, message in self.errors)


# --------------------------------------------------------------------------- the service


class DestinationsService(AuditedStore[Destination]):
    """Validate, save, test and audit destinations (pages, API, CLI and YAML import alike)."""

    kind = "destination"
    noun = "destination"

    def __init__(self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime],
                 calling_ae_title: str = "") -> None:
        """``calling_ae_title``: the node's AE title in connection tests (C-ECHO) of DICOM destinations."""
        super().__init__(sessions, clock=clock)
        self.calling_ae_title = calling_ae_title

    def stored(self, name: str) -> Destination | None:
        return config_repo.get_destination(self.sessions, name)

    def record_of(self, name: str) -> config_repo.DestinationRecord:
        """The stored destination with its source; Refused (404) naming it otherwise."""
        record = config_repo.get_destination_record(self.sessions, name)
        if record is None:
            raise Refused.not_found(f"no destination named {name!r}")
        return record

    def what(self, data: Any) -> str:
        return self.noun

    def problems(self, data: Any, *, stored: Destination | None,
                 original: str | None) -> tuple[Destination | None, list[FieldError]]:
        """As :func:`validate_destination`; a destination cannot be renamed (rules refer to it by name)."""
        if original is not None and isinstance(data, dict):
            if data.get("name", original) != original:
                return None, [(("name",), f"a destination cannot be renamed ({original!r} to {data.get('name')!r}): "
                                          "rules refer to it by name; create a new one and delete this one")]
            data = {**data, "name": original}
        return validate_destination(data, stored=stored)

    def refused_invalid(self, data: Any, errors: list[FieldError], *, stored: Destination | None,
                        actor: Actor) -> None:
        """A save that would send the stored secret to another server is audited (``destination.secret_refused``)."""
        moved = secret_moved(data, stored)
        if moved is not None and stored is not None:
            self.record(actor, "secret_refused", stored.name, before={"url_origin": moved.stored_origin},
                        after={"url_origin": moved.new_origin},
                        detail=f"not saved: the URL moved from {moved.stored_origin} to {moved.new_origin} "
                               f"without a new {moved.secret}")

    def write(self, item: Destination, *, original: str | None, actor: Actor) -> Destination | None:
        try:
            if original is None:
                config_repo.create_destination(self.sessions, item, source=actor.source, now=self.clock())
                return None
            return config_repo.update_destination(self.sessions, item, source=actor.source, now=self.clock())
        except config_repo.NameTaken as exc:
            raise Refused.conflict(str(exc), ("name",)) from exc
        except config_repo.ConfigNotFound as exc:
            raise Refused.not_found(str(exc)) from exc

    def before_delete(self, name: str) -> None:
        users = config_repo.rules_using_destination(self.sessions, name)
        if users:
            raise Refused.conflict(f"destination {name!r} is used by routing rule(s) {', '.join(users)}; "
                                   "change those rules first")

    def remove(self, name: str) -> bool:
        return config_repo.delete_destination(self.sessions, name)

    def name_of(self, item: Destination) -> str:
        return item.name

    def state(self, item: Destination) -> dict[str, Any]:
        return redacted(item)

    def save_or_replace(self, data: Any, actor: Actor) -> tuple[Destination, bool]:
        """Save ``data`` as a new destination, or replace the one of its name (``destinations add``)."""
        name = data.get("name") if isinstance(data, dict) else None
        existing = isinstance(name, str) and self.stored(name) is not None
        saved = self.save(data, actor, original=name if existing else None)
        return saved.item, saved.created

    def import_problems(self, destinations: Sequence[Destination]) -> list[FieldError]:
        """Every problem a save would find in the destinations of a file (TLS files that do not load, ...), at
        ``destinations.<index>.<field>``."""
        errors: list[FieldError] = []
        for index, destination in enumerate(destinations):
            _, problems = validate_destination(_revealed(destination), stored=None)
            errors += [(("destinations", index, *location), message) for location, message in problems]
        return errors

    def import_destinations(self, destinations: Sequence[Destination], actor: Actor) -> int:
        """Check every destination of a file as a save would (:meth:`import_problems`), then insert or replace
        them by name, auditing each one that changed; the number changed. Refused (422) listing every problem,
        and nothing is stored."""
        errors = self.import_problems(destinations)
        if errors:
            raise Refused.invalid("destinations", errors)
        changed = 0
        for destination in destinations:
            before = self.stored(destination.name)
            if before is not None and _revealed(before) == _revealed(destination):
                continue
            config_repo.upsert_destination(self.sessions, destination, source=actor.source, now=self.clock())
            changed += 1
            self.record(actor, "create" if before is None else "update", destination.name,
                        before=None if before is None else redacted(before), after=redacted(destination))
        return changed

    def test(self, destination: Destination, actor: Actor) -> TestOutcome:
        """Test the connection and audit ``destination.test``; UnusableTlsFiles (audited too) instead of trying
        with TLS files that cannot be loaded."""
        problems = list(destination_tls_problems(destination))
        if problems:
            refused = UnusableTlsFiles(problems)
            self.record(actor, "test", destination.name, after={"ok": False, "method": "not run",
                                                                "detail": str(refused)},
                        detail="not run: unusable TLS files")
            raise refused
        outcome = test_destination(destination, self.calling_ae_title)
        self.record(actor, "test", destination.name,
                    after={"ok": outcome.ok, "method": outcome.method, "round_trip_ms": outcome.round_trip_ms,
                           "detail": outcome.detail},
                    detail=f"{'ok' if outcome.ok else 'failed'} in {outcome.round_trip_ms:g} ms")
        return outcome
