"""Which models of the registry admins have disabled, with who did it, when and why.

Why: an admin must be able to stop a model quickly (a bad result reported, a bundle
being replaced, a GPU to free) without editing every routing rule that names it. The
registry says which models exist; a ``model_settings`` row says whether the router
may create jobs for one. A model with no row is enabled, so a new model in the
registry runs as soon as a rule names it. The router reads :func:`disabled_models`
for every study it routes and passes it to the pure :func:`dicom_node.routing.evaluate`;
jobs already created for a model keep running when it is disabled.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import ModelSetting

__all__ = [
    "MODEL_ID_MAX",
    "NOTE_MAX",
    "ModelSettingView",
    "disabled_models",
    "model_settings",
    "set_model_enabled",
    "setting_of",
]

logger = logging.getLogger(__name__)

#: Longest model id (the registry's limit, and the column's).
MODEL_ID_MAX = 64
#: Longest note an admin may give with a change.
NOTE_MAX = 500


@dataclass(frozen=True)
class ModelSettingView:
    """A model's setting as the models page, the API and the audit log show it.

    ``updated_at``/``updated_by`` are None for a model nobody has changed (enabled by default).
    """

    model_id: str
    enabled: bool
    note: str | None
    updated_at: datetime | None
    updated_by: str | None

    def audit_state(self) -> dict[str, Any]:
        """What the audit log keeps as ``before``/``after`` of a change."""
        return {"enabled": self.enabled, "note": self.note}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _view(row: ModelSetting) -> ModelSettingView:
    return ModelSettingView(model_id=row.model_id, enabled=row.enabled, note=row.note,
                            updated_at=row.updated_at, updated_by=row.updated_by)


def setting_of(settings: dict[str, ModelSettingView], model_id: str) -> ModelSettingView:
    """The setting of ``model_id`` from :func:`model_settings`'s answer: enabled and unchanged when it has no row."""
    found = settings.get(model_id)
    if found is not None:
        return found
    return ModelSettingView(model_id=model_id, enabled=True, note=None, updated_at=None, updated_by=None)


def model_settings(sessions: sessionmaker[Session]) -> dict[str, ModelSettingView]:
    """Every stored setting by model id (models without one are enabled; see :func:`setting_of`)."""
    with sessions() as session:
        rows = session.scalars(select(ModelSetting).order_by(ModelSetting.model_id))
        return {row.model_id: _view(row) for row in rows}


def disabled_models(sessions: sessionmaker[Session]) -> set[str]:
    """Ids of the models an admin disabled: the router creates no job for them."""
    with sessions() as session:
        return set(session.scalars(select(ModelSetting.model_id).where(ModelSetting.enabled.is_(False))))


def _clean_note(note: str | None) -> str | None:
    if note is None:
        return None
    note = note.strip()
    if len(note) > NOTE_MAX:
        raise ValueError(f"note is {len(note)} characters long; at most {NOTE_MAX} are allowed")
    return note or None


def set_model_enabled(
    sessions: sessionmaker[Session],
    model_id: str,
    enabled: bool,
    *,
    note: str | None,
    by: str,
    now: datetime,
) -> tuple[ModelSettingView, ModelSettingView]:
    """Enable or disable ``model_id`` with the admin's ``note`` (stripped; empty is None); (before, after).

    The caller checks that the id is in the registry; this only checks its length.
    ``before`` of a model never changed is "enabled, no note". ValueError names a
    too-long id or note. The note is replaced by each change (the audit log keeps old ones).
    """
    if not model_id or len(model_id) > MODEL_ID_MAX:
        raise ValueError(f"model id {model_id[:80]!r} must be 1 to {MODEL_ID_MAX} characters long")
    note = _clean_note(note)
    for attempt in (1, 2):
        try:
            with sessions.begin() as session:
                row = session.get(ModelSetting, model_id, with_for_update=True)
                if row is None:
                    before = setting_of({}, model_id)
                    row = ModelSetting(model_id=model_id)
                    session.add(row)
                else:
                    before = _view(row)
                row.enabled = enabled
                row.note = note
                row.updated_at = now
                row.updated_by = by[:64]
                session.flush()
                after = _view(row)
            logger.info("model %s %s by %s", model_id, "enabled" if enabled else "disabled", by)
            return before, after
        except IntegrityError:  # two first changes of the same model at once: the second updates the row
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
