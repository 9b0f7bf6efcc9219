"""model settings: admins enable or disable a model of the registry

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 12:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_settings',
        sa.Column('model_id', sa.String(length=64), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.Column('updated_by', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('model_id'),
    )


def downgrade() -> None:
    op.drop_table('model_settings')
