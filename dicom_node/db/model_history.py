"""The version history of the registry's models: each registration with its version, Device UID and weights digest.

Why: the registry file says what a model is now; a hospital must also see what it was
(which version and which weights produced a result of last month) and who registered
it when. ``dicom-node models add`` records a row per registration; the models page
and ``models list`` show them, newest first.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import ModelRegistration

__all__ = ["RegistrationView", "history", "record_registration"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationView:
    """One registration as the models page, the API and the CLI show it."""

    model_id: str
    version: str
    format: str
    path: str
    device_uid: str
    weights_sha256: str
    registered_at: datetime
    registered_by: str
    registry_file: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _view(row: ModelRegistration) -> RegistrationView:
    return RegistrationView(model_id=row.model_id, version=row.version, format=row.format, path=row.path,
                            device_uid=row.device_uid, weights_sha256=row.weights_sha256,
                            registered_at=row.registered_at, registered_by=row.registered_by,
                            registry_file=row.registry_file)


def record_registration(sessions: sessionmaker[Session], *, model_id: str, version: str, model_format: str,
                        path: str, device_uid: str, weights_sha256: str, by: str, now: datetime,
                        registry_file: str | None) -> RegistrationView:
    """Append one registration to ``model_id``'s history; the stored row as a view."""
    with sessions.begin() as session:
        row = ModelRegistration(model_id=model_id, version=version, format=model_format, path=path,
                                device_uid=device_uid, weights_sha256=weights_sha256, registered_at=now,
                                registered_by=by[:64], registry_file=registry_file)
        session.add(row)
        session.flush()
        view = _view(row)
    logger.info("model %s version %s registered by %s (Device UID %s)", model_id, version, by, device_uid)
    return view


def history(sessions: sessionmaker[Session], model_id: str | None = None) -> dict[str, list[RegistrationView]]:
    """Registrations by model id, newest first (all models, or only ``model_id``)."""
    query = select(ModelRegistration).order_by(ModelRegistration.registered_at.desc(), ModelRegistration.id.desc())
    if model_id is not None:
        query = query.where(ModelRegistration.model_id == model_id)
    found: dict[str, list[RegistrationView]] = {}
    with sessions() as session:
        for row in session.scalars(query):
            found.setdefault(row.model_id, []).append(_view(row))
    return found
