"""re-processing and retention: job generations, what a job superseded, what it read; purged studies

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 21:00:00

``jobs.generation``: 1 for the job routing created, 2, 3, ... for each re-run of the same
model on the same series (an operator's re-process, or the node's own when an
incomplete series became complete); the unique index now includes it.
``jobs.supersedes_job_id``: the earlier job whose results this one replaces;
``jobs.superseded_at``: when a later job's results replaced this one's (set when that job
finishes). ``jobs.input_instances``: how many instances the series had when the job was
claimed, so that the node can tell a series that received more since. ``studies.purged_at``:
when retention deleted the study's instances and results (its record stays).
``ix_jobs_pipeline_finished``: the scheduler learns a model's duration from its latest finished
jobs, on every claim, without reading the whole history.
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('generation', sa.Integer(), nullable=False, server_default='1'))
        batch.add_column(sa.Column('supersedes_job_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('superseded_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('input_instances', sa.Integer(), nullable=True))
        batch.drop_index('ux_jobs_study_pipeline_series')
        batch.create_index('ux_jobs_study_pipeline_series_generation',
                           ['study_id', 'pipeline', 'series_instance_uid', 'generation'], unique=True)
        batch.create_index('ix_jobs_pipeline_finished', ['pipeline', 'finished_at'])
    with op.batch_alter_table('studies') as batch:
        batch.add_column(sa.Column('purged_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies') as batch:
        batch.drop_column('purged_at')
    op.execute("DELETE FROM jobs WHERE generation > 1")
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_pipeline_finished')
        batch.drop_index('ux_jobs_study_pipeline_series_generation')
        batch.create_index('ux_jobs_study_pipeline_series', ['study_id', 'pipeline', 'series_instance_uid'],
                           unique=True)
        batch.drop_column('input_instances')
        batch.drop_column('superseded_at')
        batch.drop_column('supersedes_job_id')
        batch.drop_column('generation')
