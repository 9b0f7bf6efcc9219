"""job checks and delivery kinds: applicability and plausibility evidence; notices before results

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 15:00:00

``jobs.checks``: JSON of the applicability decision (before the model ran) and the
plausibility decision (after), with their evidence and timings. ``deliveries.kinds``:
JSON list of the result kinds one delivery carries (NULL: every kind the destination
takes, except the "AI analysis not performed" notice); a held job first sends only its
notice, and its results when an operator releases it.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('checks', sa.Text(), nullable=True))
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column('kinds', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_column('kinds')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('checks')
