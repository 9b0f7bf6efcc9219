"""default rule counts slices: a stored built-in ``ct-default`` tests slice_count, not instance_count

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 16:00:00

The built-in rule asked for ``instance_count >= 10``, so an enhanced multi-frame CT (one
instance of 100+ frames) was ignored (issue 21). It now asks for ``slice_count >= 10``
(the frames of the series' volume). Rules live in the database, so a node that installed
the old rule keeps it: this rewrites a rule named ``ct-default`` whose definition is still
exactly the old built-in one. A rule an admin changed (or imported under that name with
other content) is left as it is. Data only; the schema does not change.
"""

import json
from typing import Any

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_NAME = 'ct-default'


def _definition(count_attribute: str) -> dict[str, Any]:
    """The built-in rule as the node stored it (``Rule.model_dump_json(by_alias=True)``), fixed here
    so that later changes of the code's default rule do not change this migration."""
    return {
        "name": _NAME,
        "description": "Every CT study: chest segmentation and lung nodule detection on the thinnest CT series",
        "enabled": True,
        "match": "all",
        "conditions": [
            {"attribute": "modality", "in": ["CT"], "regex": None, "negate": False},
            {"attribute": count_attribute, "min": 10.0, "max": None},
        ],
        "series": {"prefer": "thinnest"},
        "pipelines": ["chest-ct-segmentation", "lung-nodule-detection"],
        "destinations": "default",
        "priority": 0,
    }


_RULES = sa.table('routing_rules', sa.column('id', sa.Integer), sa.column('name', sa.String),
                  sa.column('definition', sa.Text))


def _rewrite(old: dict[str, Any], new: dict[str, Any]) -> None:
    bind = op.get_bind()
    row = bind.execute(sa.select(_RULES.c.id, _RULES.c.definition).where(_RULES.c.name == _NAME)).first()
    if row is None:
        return
    try:
        stored = json.loads(row.definition)
    except ValueError:
        return  # not ours to judge: the node reports an unreadable rule itself
    if stored == old:
        bind.execute(sa.update(_RULES).where(_RULES.c.id == row.id).values(
            definition=json.dumps(new, separators=(",", ":"))))


def upgrade() -> None:
    _rewrite(_definition("instance_count"), _definition("slice_count"))


def downgrade() -> None:
    _rewrite(_definition("slice_count"), _definition("instance_count"))
