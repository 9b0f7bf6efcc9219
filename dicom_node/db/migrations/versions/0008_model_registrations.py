"""model registrations: the version history of each model (``dicom-node models add``)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_registrations',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('model_id', sa.String(length=64), nullable=False),
        sa.Column('version', sa.String(length=64), nullable=False),
        sa.Column('format', sa.String(length=32), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('device_uid', sa.String(length=64), nullable=False),
        sa.Column('weights_sha256', sa.String(length=64), nullable=False),
        sa.Column('registered_at', sa.DateTime(), nullable=False),
        sa.Column('registered_by', sa.String(length=64), nullable=False),
        sa.Column('registry_file', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_model_registrations_model_id', 'model_registrations', ['model_id'])


def downgrade() -> None:
    op.drop_index('ix_model_registrations_model_id', table_name='model_registrations')
    op.drop_table('model_registrations')
