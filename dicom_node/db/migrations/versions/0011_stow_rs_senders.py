"""STOW-RS intake: how a sending session came in, and which account sent it

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-09 10:00:00

A STOW-RS request is recorded like a DICOM association (a row of ``associations``): the
study's completion waits while it is open, and the study page names it among the senders.
``associations.protocol``: ``dicom`` (an association; every row before this revision) or
``stow-rs`` (one STOW-RS request). ``associations.username``: the account whose API token
(or session) made a STOW-RS request; null for DICOM associations, which have AE titles.
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('associations', sa.Column('protocol', sa.String(length=16), nullable=False,
                                            server_default='dicom'))
    op.add_column('associations', sa.Column('username', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('associations') as batch:
        batch.drop_column('username')
        batch.drop_column('protocol')
