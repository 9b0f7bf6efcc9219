"""series are keyed by (study, Series Instance UID): a UID reused by another study gets its own row

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 12:00:00

Until 0004 ``series.series_instance_uid`` was unique on its own, so a PACS that reused a
Series Instance UID in a second study (another patient) had that study's instances
filed into the first study's series (issue 20). The UID is now unique within its study
only, and indexed on its own so that the indexer finds a reuse in another study.

SQLite cannot drop a constraint: batch mode rebuilds the table, which the migration
environment does with foreign keys off (see ``env.py``), so no instance row is lost.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

#: The name batch mode gives SQLite's unnamed UNIQUE(series_instance_uid) when it reflects the table.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _unique_on_uid_alone(bind: sa.engine.Connection) -> str:
    """The name of the unique constraint over ``series_instance_uid`` alone (0001 left it unnamed)."""
    for constraint in sa.inspect(bind).get_unique_constraints('series'):
        if constraint['column_names'] == ['series_instance_uid']:
            return constraint['name'] or 'uq_series_series_instance_uid'
    raise RuntimeError("series has no unique constraint on series_instance_uid; is the schema at 0004?")


def upgrade() -> None:
    name = _unique_on_uid_alone(op.get_bind())
    with op.batch_alter_table('series', naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint(name, type_='unique')
        batch_op.create_index('ix_series_series_instance_uid', ['series_instance_uid'], unique=False)
        batch_op.create_index('ux_series_study_series', ['study_id', 'series_instance_uid'], unique=True)


def downgrade() -> None:
    # Fails while a Series Instance UID is used by more than one study: merge or delete those first.
    with op.batch_alter_table('series', naming_convention=_NAMING) as batch_op:
        batch_op.drop_index('ux_series_study_series')
        batch_op.drop_index('ix_series_series_instance_uid')
        batch_op.create_unique_constraint('uq_series_series_instance_uid', ['series_instance_uid'])
