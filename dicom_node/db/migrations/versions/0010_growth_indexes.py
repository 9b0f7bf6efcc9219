"""growth: indexes for the studies list, the dashboard and the patient-name filter

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 00:50:00

Why: with 100,000 studies the studies list sorted every study on ``last_received_at`` per
page and the dashboard scanned every job and delivery; both grew with the database.

``ix_studies_last_received`` (last_received_at, id): the studies list's order, newest first;
its pages walk this index and stop after one page (keyset pages, ``dicom_node.db.study_views``).
``ix_jobs_finished_at`` / ``ix_deliveries_delivered_at``: the dashboard's throughput finds
the last day's finished jobs and deliveries. ``ix_jobs_state_changed``,
``ix_deliveries_state_changed``, ``ix_associations_outcome_started``: its newest errors
(held, failed, dead, rejected) read 20 rows of the index, not every such row, sorted.

Patient-name filter ("any part of the name, any case") cannot use a B-tree index. On SQLite,
``studies_patient_name`` is an FTS5 table with the trigram tokenizer over ``studies.patient_name``
(external content, kept by three triggers): a filter of three or more characters looks its
trigrams up. On PostgreSQL, a ``pg_trgm`` GIN index on ``lower(patient_name)`` serves the same
``LIKE`` (when the extension cannot be created, the filter scans as before, with a warning).
Note for later migrations: a ``batch_alter_table('studies')`` on SQLite rebuilds the table and
drops its triggers; such a migration must create them again (:func:`create_name_search`).
"""

import logging

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

logger = logging.getLogger(__name__)

NAME_TABLE = 'studies_patient_name'


def create_name_search(bind: sa.engine.Connection) -> None:
    """The patient-name search structure of this dialect (see the module docstring), filled from ``studies``."""
    if bind.dialect.name == 'sqlite':
        try:
            op.execute(f"CREATE VIRTUAL TABLE {NAME_TABLE} USING fts5(patient_name, content='studies', "
                       "content_rowid='id', tokenize='trigram')")
        except sa.exc.OperationalError as exc:  # an SQLite without FTS5 or older than 3.34 (no trigram)
            logger.warning("patient-name search index not created (%s); the filter scans the studies", exc)
            return
        op.execute(f"CREATE TRIGGER {NAME_TABLE}_insert AFTER INSERT ON studies BEGIN "
                   f"INSERT INTO {NAME_TABLE}(rowid, patient_name) VALUES (new.id, new.patient_name); END")
        op.execute(f"CREATE TRIGGER {NAME_TABLE}_delete AFTER DELETE ON studies BEGIN "
                   f"INSERT INTO {NAME_TABLE}({NAME_TABLE}, rowid, patient_name) "
                   "VALUES ('delete', old.id, old.patient_name); END")
        op.execute(f"CREATE TRIGGER {NAME_TABLE}_update AFTER UPDATE OF patient_name ON studies BEGIN "
                   f"INSERT INTO {NAME_TABLE}({NAME_TABLE}, rowid, patient_name) "
                   "VALUES ('delete', old.id, old.patient_name); "
                   f"INSERT INTO {NAME_TABLE}(rowid, patient_name) VALUES (new.id, new.patient_name); END")
        op.execute(f"INSERT INTO {NAME_TABLE}({NAME_TABLE}) VALUES ('rebuild')")
    elif bind.dialect.name == 'postgresql':
        available = bind.execute(sa.text(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")).first() is not None
        if not available:
            logger.warning("PostgreSQL has no pg_trgm extension; the patient-name filter scans the studies")
            return
        try:
            with bind.begin_nested():  # a refusal (not allowed to create extensions) must not end the migration
                bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
                bind.execute(sa.text("CREATE INDEX ix_studies_patient_name_trgm ON studies USING gin "
                                     "(lower(patient_name) gin_trgm_ops)"))
        except sa.exc.DBAPIError as exc:
            logger.warning("pg_trgm index not created (%s); the patient-name filter scans the studies",
                           str(exc).splitlines()[0])


def upgrade() -> None:
    op.create_index('ix_studies_last_received', 'studies', ['last_received_at', 'id'])
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'])
    op.create_index('ix_jobs_state_changed', 'jobs', ['state', 'state_changed_at'])
    op.create_index('ix_deliveries_delivered_at', 'deliveries', ['delivered_at'])
    op.create_index('ix_deliveries_state_changed', 'deliveries', ['state', 'state_changed_at'])
    op.create_index('ix_associations_outcome_started', 'associations', ['outcome', 'started_at'])
    create_name_search(op.get_bind())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        for suffix in ('insert', 'delete', 'update'):
            op.execute(f"DROP TRIGGER IF EXISTS {NAME_TABLE}_{suffix}")
        op.execute(f"DROP TABLE IF EXISTS {NAME_TABLE}")
    elif bind.dialect.name == 'postgresql':
        op.execute("DROP INDEX IF EXISTS ix_studies_patient_name_trgm")
    op.drop_index('ix_associations_outcome_started', table_name='associations')
    op.drop_index('ix_deliveries_state_changed', table_name='deliveries')
    op.drop_index('ix_deliveries_delivered_at', table_name='deliveries')
    op.drop_index('ix_jobs_state_changed', table_name='jobs')
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
    op.drop_index('ix_studies_last_received', table_name='studies')
