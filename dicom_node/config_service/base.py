"""What every configuration service shares: who acts, why a change is refused, and the audited save skeleton.

Why: the web pages, the REST API, the CLI and the YAML import change the same rules,
destinations and users. Each change goes through one service that validates it, writes
it through the repository and records it in the audit log with the state before and
after, so every front end refuses the same things with the same messages (each at its
field, e.g. ``conditions.1.regex``) and no front end can forget the audit entry. The
front ends only parse their input and render the result or the :class:`Refused` error.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import audit

__all__ = [
    "CLI",
    "CONFIG_FILE",
    "Actor",
    "AuditedStore",
    "FieldError",
    "Refused",
    "Saved",
    "dotted",
    "pydantic_errors",
    "pydantic_message",
    "record_change",
]

logger = logging.getLogger(__name__)

#: (location of the problem in the definition, message naming the field and the value). Locations are pydantic's:
#: ``("conditions", 1, "regex")`` is the regex of the rule's second condition; ``()`` is the whole definition.
FieldError = tuple[tuple[str | int, ...], str]

T = TypeVar("T")


def dotted(location: Sequence[str | int]) -> str:
    """A location as the API and the CLI name it: ``conditions.1.regex``."""
    return ".".join(str(part) for part in location)


def pydantic_message(error: Mapping[str, Any]) -> str:
    """pydantic's message without its "Value error, " prefix, naming the value where pydantic does not."""
    message, kind = str(error.get("msg", "invalid")), str(error.get("type", ""))
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, str | int | float) and not isinstance(value, bool) and kind != "missing":
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return f"{message} (got {shown})"
    return message


def pydantic_errors(exc: ValidationError, prefix: tuple[str | int, ...] = (),
                    message: Callable[[Mapping[str, Any]], str] = pydantic_message) -> list[FieldError]:
    """Each of pydantic's errors at its location (after ``prefix``)."""
    return [(prefix + tuple(e["loc"]), message(e)) for e in exc.errors()]


class Refused(Exception):
    """A change the service does not make: ``status`` (422 invalid, 404 not found, 409 conflict) and the
    problems at their fields. ``what`` names the thing ("routing rule 'chest'") for the API's ``detail``."""

    def __init__(self, status: int, errors: Sequence[FieldError], what: str = "request") -> None:
        super().__init__(status, list(errors), what)
        self.status = status
        self.errors = list(errors)
        self.what = what

    @classmethod
    def invalid(cls, what: str, errors: Sequence[FieldError]) -> "Refused":
        return cls(422, errors, what)

    @classmethod
    def not_found(cls, message: str) -> "Refused":
        return cls(404, [((), message)])

    @classmethod
    def conflict(cls, message: str, at: tuple[str | int, ...] = ()) -> "Refused":
        return cls(409, [(at, message)])

    @property
    def message(self) -> str:
        """Every problem's message on one line (each names its value), as 404 and 409 answers carry it."""
        return "; ".join(text for _, text in self.errors)

    def __str__(self) -> str:
        """``invalid <what>: field: message; ...`` for a 422, else :attr:`message` (what the CLI prints)."""
        if self.status != 422:
            return self.message
        return f"invalid {self.what}: " + "; ".join(f"{dotted(loc)}: {text}" if loc else text
                                                     for loc, text in self.errors)

    def by_field(self) -> dict[str, str]:
        """The problems by dotted field ("" for the whole definition), for forms with one error slot per field."""
        found: dict[str, str] = {}
        for location, text in self.errors:
            key = dotted(location)
            found[key] = f"{found[key]}; {text}" if key in found else text
        return found


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as the audit log records it, and where the change comes from.

    ``name``: a user name, ``cli`` or ``config-file``; ``source``: what the configuration tables record as the
    origin of a stored definition (``ui``, ``api``, ``cli`` or the file imported); ``note``: added to the detail
    of each audit entry ("(API token)", "imported from rules.yaml").
    """

    name: str
    source: str
    remote_addr: str | None = None
    note: str | None = None

    def detail(self, detail: str | None) -> str | None:
        return " ".join(part for part in (detail, self.note) if part) or None

    def importing(self, path: object) -> "Actor":
        """This actor importing the file ``path`` (the stored definitions' source is the file)."""
        return replace(self, source=str(path), note=f"imported from {path}")


#: The shell (``dicom-node rules ...``, ``destinations ...``, ``users ...``).
CLI = Actor(name="cli", source="cli")
#: A configuration file imported when the node starts (``routing.rules_file``, ``routing.destinations_file``).
CONFIG_FILE = Actor(name="config-file", source="config-file")


@dataclass(frozen=True)
class Saved(Generic[T]):
    """A stored definition after a save: the new state and whether it was created (else replaced)."""

    item: T
    created: bool


class AuditedStore(ABC, Generic[T]):
    """The skeleton each kind of named configuration shares: get, validate -> save -> audit, delete -> audit.

    Subclasses say how to validate, read, write and show (for the audit log, secrets
    redacted) their kind; this class makes sure that every write is preceded by the
    validation and followed by exactly one audit entry.
    """

    #: Audit action prefix and target kind ("rule", "destination").
    kind: str
    #: How messages name the kind ("routing rule", "destination").
    noun: str

    def __init__(self, sessions: sessionmaker[Session], *, clock: Callable[[], datetime]) -> None:
        self.sessions = sessions
        self.clock = clock

    # ------------------------------------------------------------------ what subclasses provide

    @abstractmethod
    def stored(self, name: str) -> T | None:
        """The stored definition called ``name``, or None."""

    @abstractmethod
    def problems(self, data: Any, *, stored: T | None, original: str | None) -> tuple[T | None, list[FieldError]]:
        """The definition ``data`` describes, or every problem with it (``stored``: the definition it replaces)."""

    @abstractmethod
    def write(self, item: T, *, original: str | None, actor: Actor) -> T | None:
        """Store ``item`` (replacing ``original`` when given); the definition it replaced. Raises Refused."""

    @abstractmethod
    def remove(self, name: str) -> bool:
        """Delete ``name``; False when it did not exist."""

    @abstractmethod
    def name_of(self, item: T) -> str: ...

    @abstractmethod
    def state(self, item: T) -> dict[str, Any]:
        """``item`` as the audit log and the API show it (never a secret)."""

    def refused_invalid(self, data: Any, errors: list[FieldError], *, stored: T | None, actor: Actor) -> None:
        """Hook: a save of ``data`` was refused as invalid (the destination service audits one kind of refusal)."""

    def before_delete(self, name: str) -> None:
        """Hook: raise Refused when ``name`` must not be deleted now."""

    # ------------------------------------------------------------------ the skeleton

    def get(self, name: str) -> T:
        """The stored definition called ``name``; Refused (404) naming it otherwise."""
        item = self.stored(name)
        if item is None:
            raise Refused.not_found(f"no {self.noun} named {name!r}")
        return item

    def what(self, data: Any) -> str:
        """How a refusal names the definition ``data`` ("routing rule 'chest'")."""
        name = data.get("name") if isinstance(data, dict) else None
        return f"{self.noun} {name[:64]!r}" if isinstance(name, str) else self.noun

    def save(self, data: Any, actor: Actor, *, original: str | None = None) -> Saved[T]:
        """Validate ``data``, store it (new, or replacing ``original``) and audit ``<kind>.create``/``.update``
        (a rename says so in the entry's detail).

        Refused: 404 (no ``original``), 422 (every problem at its field), 409 (the name is taken).
        """
        stored = None if original is None else self.get(original)
        item, errors = self.problems(data, stored=stored, original=original)
        if item is None:
            self.refused_invalid(data, errors, stored=stored, actor=actor)
            raise Refused.invalid(self.what(data), errors)
        before = self.write(item, original=original, actor=actor)
        name = self.name_of(item)
        self.record(actor, "create" if before is None else "update", name,
                    before=None if before is None else self.state(before), after=self.state(item),
                    detail=f"renamed from {original!r}" if original is not None and original != name else None)
        return Saved(item, created=before is None)

    def delete(self, name: str, actor: Actor) -> T:
        """Delete ``name`` and audit ``<kind>.delete`` with the definition it had; Refused 404 / 409."""
        item = self.get(name)
        self.before_delete(name)
        if not self.remove(name):
            raise Refused.not_found(f"no {self.noun} named {name!r}")
        self.record(actor, "delete", name, before=self.state(item))
        return item

    def record(self, actor: Actor, action: str, target: str | None, *, before: Any = None, after: Any = None,
               detail: str | None = None) -> None:
        """Audit ``<kind>.<action>`` on ``target``."""
        record_change(self.sessions, self.clock(), actor, f"{self.kind}.{action}", target_kind=self.kind,
                      target=target, before=before, after=after, detail=detail)


def record_change(sessions: sessionmaker[Session], now: datetime, actor: Actor, action: str, *, target_kind: str,
                  target: str | None, before: Any = None, after: Any = None, detail: str | None = None) -> None:
    """The one place a configuration change reaches the audit log: who, what, the state before and after."""
    audit.record(sessions, at=now, actor=actor.name, action=action, target_kind=target_kind, target=target,
                 before=before, after=after, remote_addr=actor.remote_addr, detail=actor.detail(detail))
    logger.info("%s: %s %s", actor.name, action, target or "")
