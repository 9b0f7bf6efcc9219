"""growth: counters kept by the database for /metrics and the queue depths; indexes of the jobs and deliveries lists

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 04:00:00

Why: ``/metrics`` counted every study, job, delivery, association and refused instance of the
history on each scrape (and read every finished job's stage times once per process), so a scrape
grew with the database. Now the database keeps the counts as the rows change, by triggers, in the
same transaction as the change: whatever writes the rows (the node, a worker, the CLI, a migration,
plain SQL) keeps them right, and they survive restarts.

``metric_counts`` (metric, label1, label2, label3) -> value; what each metric counts:

* ``studies`` (state), ``jobs`` (state, pipeline), ``deliveries`` (state, destination): the rows in
  each state now (gauges: a row added, moved or deleted moves them);
* ``associations`` (outcome): DICOM associations that ended (outcome not ``open``); ``stow_requests``
  (outcome): STOW-RS requests that ended (``associations.protocol`` ``stow-rs``, migration 0011);
  ``instances_received``, ``bytes_received``: the instances and bytes both stored; ``associations_open``
  (protocol): those open now (a gauge; the only association metric a deleted row changes); ``associations_rejected``
  (reason, reduced to a few labels as ``dicom_node.db.monitoring.normalise_reject_reason`` does);
  ``ingest_errors`` (status, decimal); these only grow (a deleted row is not taken away);
* ``delivery_failures`` (destination): attempts that ended without delivering - a delivery that
  leaves ``sending`` for anything but ``delivered`` without giving its attempt back (a sender
  that stops and hands the delivery back does not count). Monotonic now (a manual retry used to
  reset it); the starting value is what the rows said before (attempts not delivered);
* ``job_stage_bucket`` (stage, pipeline, le) and ``job_stage_sum_us`` (stage, pipeline): each stage
  time of a job whose run ended (it enters succeeded, not_applicable, held, released or discarded
  with ``finished_at`` set), by histogram bucket (not cumulative; ``+Inf`` for the slowest) and its
  sum in microseconds. The buckets are those of ``dicom_node.web.routes.ops.STAGE_BUCKETS``.

SQLite has one writer at a time, so its triggers add to ``metric_counts`` directly. On PostgreSQL,
transactions would queue (or deadlock) on the few counter rows, so its triggers append to
``metric_deltas`` (no locks shared) and the node folds them into ``metric_counts`` every few seconds
(``dicom_node.db.counters.fold``); readers add both in one statement. Its INSERT and DELETE triggers
run once per statement (transition tables: a bulk insert adds one row per label), its UPDATE
triggers once per row, only when a counted column changed (``WHEN``).

Indexes: ``ix_jobs_state_id`` (state, id), ``ix_jobs_pipeline_id`` (pipeline, id),
``ix_deliveries_state_id`` (state, id), ``ix_deliveries_destination_id`` (destination, id): the
jobs and deliveries lists (newest first, by state, pipeline or destination) read one page of an
index and stop. (state, id) replaces (state): SQLite's index on (state) already held the rowid in
that order; PostgreSQL's did not.

Note for later migrations: a ``batch_alter_table`` of studies, jobs, deliveries, associations or
ingest_errors on SQLite rebuilds the table and drops its triggers; such a migration must create them
again (:func:`create_triggers`; tests/db/test_metric_counters.py checks that they are all there).
"""

import json
import logging
from collections import Counter
from typing import NamedTuple

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

logger = logging.getLogger(__name__)

#: Job states whose run ended (their stage times are final).
RAN = ('succeeded', 'not_applicable', 'held', 'released', 'discarded')
#: Histogram bucket bounds of the stage times (seconds), as their labels.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: (text in the reject reason, label), the first that matches wins; none: 'other'.
REJECT_REASONS = (('called AE title', 'called_ae_title'), ('is not allowed from address', 'calling_address'),
                  ('calling AE title', 'calling_ae_title'), ('associations open', 'too_many_associations'),
                  ('without a valid association request', 'invalid_request'))
TABLES = ('studies', 'jobs', 'deliveries', 'associations', 'ingest_errors')
_RAN_SQL = ', '.join(f"'{s}'" for s in RAN)


def _bucket_sql(value: str) -> str:
    cases = ' '.join(f"WHEN {value} <= {b!r} THEN '{b!r}'" for b in BUCKETS)
    return f"CASE {cases} ELSE '+Inf' END"


def _reason_sql(reason: str, dialect: str) -> str:
    find = 'instr({0}, {1}) > 0' if dialect == 'sqlite' else 'strpos({0}, {1}) > 0'
    cases = ' '.join(f"WHEN {find.format(reason, repr(text))} THEN '{label}'" for text, label in REJECT_REASONS)
    return f"CASE {cases} ELSE 'other' END"


# --------------------------------------------------------------------------- what each table counts


class Part(NamedTuple):
    """What one row ``{r}`` adds to one metric: (metric, label1, label2, label3, value) as SQL over ``{r}``,
    optionally over a table function (``each``, as ``s``) and only when ``where`` holds. A row that leaves
    takes the same away (``{sign}``: ``-`` before the value)."""

    columns: tuple[str, str, str, str, str]
    each: str | None = None
    where: str | None = None

    def one(self, row: str, sign: str) -> str:
        """SELECT over the row ``row`` of a row trigger (NEW or OLD)."""
        return self._select(row, sign, None)

    def over(self, source: str, row: str, sign: str) -> str:
        """SELECT over every row of ``source`` (a table, a transition table), each called ``row``."""
        return self._select(row, sign, source)

    def _select(self, row: str, sign: str, source: str | None) -> str:
        names = ('m', 'l1', 'l2', 'l3', 'v')
        values = [c.format(r=row) for c in self.columns]
        values[4] = f"{sign}({values[4]})"
        sql = 'SELECT ' + ', '.join(f"{v} AS {n}" for v, n in zip(values, names))
        each = None if self.each is None else self.each.format(r=row) + ' AS s'
        if source is not None:
            sql += f" FROM {source} AS {row}" + (f" CROSS JOIN {each}" if each else '')
        elif each:
            sql += f" FROM {each}"
        return sql + (f" WHERE {self.where.format(r=row)}" if self.where else '')


def _gauge(metric: str, *labels: str) -> Part:
    padded = [f"coalesce({{r}}.{label}, '')" for label in labels] + ["''"] * (3 - len(labels))
    return Part((f"'{metric}'", *padded, '1'))  # type: ignore[arg-type]


_STUDIES = [_gauge('studies', 'state')]
_JOBS = [_gauge('jobs', 'state', 'pipeline')]
_DELIVERIES = [_gauge('deliveries', 'state', 'destination')]
#: Associations and STOW-RS requests open now, by protocol (a gauge: one that ends or is deleted leaves it).
_OPEN = [Part(("'associations_open'", "coalesce({r}.protocol, 'dicom')", "''", "''", '1'), where="{r}.outcome = 'open'")]
_INGEST = [Part(("'ingest_errors'", 'CAST({r}.status AS TEXT)', "''", "''", '1'))]


def _association_parts(dialect: str) -> list[Part]:
    ended = "{r}.outcome <> 'open'"
    stow = "coalesce({r}.protocol, 'dicom') = 'stow-rs'"
    return [
        Part(("'associations'", '{r}.outcome', "''", "''", '1'), where=f"{ended} AND NOT {stow}"),
        Part(("'stow_requests'", '{r}.outcome', "''", "''", '1'), where=f"{ended} AND {stow}"),
        Part(("'instances_received'", "''", "''", "''", 'coalesce({r}.instances_stored, 0)'), where=ended),
        Part(("'bytes_received'", "''", "''", "''", 'coalesce({r}.bytes_received, 0)'), where=ended),
        Part(("'associations_rejected'", _reason_sql('{r}.reject_reason', dialect), "''", "''", '1'),
             where="{r}.outcome = 'rejected'"),
    ]


def _stage_parts(dialect: str) -> list[Part]:
    """The stage times of job {r} (its run ended), per stage: one bucket and the sum."""
    if dialect == 'sqlite':
        each, value, where = 'json_each({r}.stage_seconds)', 's.value', "s.type IN ('integer', 'real')"
    else:
        each, value = 'jsonb_each(metric_json_object({r}.stage_seconds))', 'CAST(s.value AS double precision)'
        where = "jsonb_typeof(s.value) = 'number'"
    return [Part(("'job_stage_bucket'", 's.key', '{r}.pipeline', _bucket_sql(value), '1'), each, where),
            Part(("'job_stage_sum_us'", 's.key', '{r}.pipeline', "''",
                  f'CAST(round({value} * 1000000) AS BIGINT)'), each, where)]


# --------------------------------------------------------------------------- SQLite

_SQLITE_UPSERT = ("INSERT INTO metric_counts (metric, label1, label2, label3, value) {select} "
                  "ON CONFLICT (metric, label1, label2, label3) DO UPDATE SET value = metric_counts.value + "
                  "excluded.value;")
_SQLITE_JSON_OBJECT = "CASE WHEN json_valid({r}.stage_seconds) THEN json_type({r}.stage_seconds) END = 'object'"


def _sqlite_body(parts: list[Part], row: str, sign: str) -> str:
    statements = []
    for part in parts:
        select = part.one(row, sign)
        if part.where is None:
            select += ' WHERE true'  # an INSERT ... SELECT before ON CONFLICT needs a WHERE (SQLite's parser)
        statements.append(_SQLITE_UPSERT.format(select=select))
    return ' '.join(statements)


def _sqlite_triggers() -> list[str]:
    association = _association_parts('sqlite') + _OPEN
    stages = _stage_parts('sqlite')
    counted = ('studies', _STUDIES, 'state'), ('jobs', _JOBS, 'state, pipeline'), \
        ('deliveries', _DELIVERIES, 'state, destination')
    sql = []
    for table, parts, columns in counted:
        changed = ' OR '.join(f"old.{c} IS NOT new.{c}" for c in columns.split(', '))
        sql += [
            f"CREATE TRIGGER metric_{table}_insert AFTER INSERT ON {table} BEGIN "
            f"{_sqlite_body(parts, 'new', '')} END",
            f"CREATE TRIGGER metric_{table}_update AFTER UPDATE OF {columns} ON {table} WHEN {changed} BEGIN "
            f"{_sqlite_body(parts, 'old', '-')} {_sqlite_body(parts, 'new', '')} END",
            f"CREATE TRIGGER metric_{table}_delete AFTER DELETE ON {table} BEGIN "
            f"{_sqlite_body(parts, 'old', '-')} END",
        ]
    sql += [
        f"CREATE TRIGGER metric_job_stages_insert AFTER INSERT ON jobs WHEN new.state IN ({_RAN_SQL}) "
        f"AND new.finished_at IS NOT NULL AND {_SQLITE_JSON_OBJECT.format(r='new')} BEGIN "
        f"{_sqlite_body(stages, 'new', '')} END",
        f"CREATE TRIGGER metric_job_stages_update AFTER UPDATE OF state ON jobs WHEN new.state IN ({_RAN_SQL}) "
        f"AND old.state NOT IN ({_RAN_SQL}) AND new.finished_at IS NOT NULL "
        f"AND {_SQLITE_JSON_OBJECT.format(r='new')} BEGIN {_sqlite_body(stages, 'new', '')} END",
        "CREATE TRIGGER metric_delivery_failures AFTER UPDATE OF state ON deliveries WHEN old.state = 'sending' "
        "AND new.state NOT IN ('sending', 'delivered') AND new.attempts >= old.attempts BEGIN "
        + _SQLITE_UPSERT.format(select="SELECT 'delivery_failures', new.destination, '', '', 1 WHERE true")
        + " END",
        f"CREATE TRIGGER metric_associations_insert AFTER INSERT ON associations BEGIN "
        f"{_sqlite_body(association, 'new', '')} END",
        "CREATE TRIGGER metric_associations_update AFTER UPDATE OF outcome, instances_stored, bytes_received, "
        "reject_reason, protocol ON associations BEGIN "
        f"{_sqlite_body(association, 'old', '-')} {_sqlite_body(association, 'new', '')} END",
        f"CREATE TRIGGER metric_associations_delete AFTER DELETE ON associations WHEN old.outcome = 'open' BEGIN "
        f"{_sqlite_body(_OPEN, 'old', '-')} END",
        f"CREATE TRIGGER metric_ingest_errors_insert AFTER INSERT ON ingest_errors BEGIN "
        f"{_sqlite_body(_INGEST, 'new', '')} END",
    ]
    return sql


# --------------------------------------------------------------------------- PostgreSQL

def _pg_insert(parts: list[Part], row: str, sign: str, source: str | None = None) -> str:
    """INSERT INTO metric_deltas of ``parts`` over ``row``: NEW or OLD of a row trigger (``source`` None), or
    every row of ``source`` (a transition table), grouped."""
    selects = ' UNION ALL '.join(p.one(row, sign) if source is None else p.over(source, row, sign) for p in parts)
    return ("INSERT INTO metric_deltas (metric, label1, label2, label3, delta) "
            f"SELECT m, l1, l2, l3, sum(v) FROM ({selects}) AS c GROUP BY m, l1, l2, l3 HAVING sum(v) <> 0;")


def _pg_function(name: str, body: str) -> str:
    return (f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NULL; END $$")


def _pg_triggers() -> list[str]:
    association = _association_parts('postgresql') + _OPEN
    stages = _stage_parts('postgresql')
    ran = f"IN ({_RAN_SQL})"
    sql = [
        # a job's stage_seconds as a JSON object, or NULL when it is not one (never an error: a trigger that
        # raised would fail the job's own update)
        "CREATE FUNCTION metric_json_object(raw text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$ "
        "BEGIN RETURN CASE WHEN jsonb_typeof(raw::jsonb) = 'object' THEN raw::jsonb END; "
        "EXCEPTION WHEN others THEN RETURN NULL; END $$",
    ]
    counted = ('studies', _STUDIES, 'state'), ('jobs', _JOBS, 'state, pipeline'), \
        ('deliveries', _DELIVERIES, 'state, destination')
    for table, parts, columns in counted:
        inserted = _pg_insert(parts, 'n', '', 'new_rows')
        if table == 'jobs':  # jobs inserted with their run ended (a copy, a restore): their stage times too
            inserted += ' ' + _pg_insert(stages, 'n', '', f"(SELECT * FROM new_rows WHERE state {ran} "
                                                           "AND finished_at IS NOT NULL)")
        changed = ' OR '.join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns.split(', '))
        sql += [
            _pg_function(f"metric_{table}_inserted", inserted),
            _pg_function(f"metric_{table}_deleted", _pg_insert(parts, 'o', '-', 'old_rows')),
            _pg_function(f"metric_{table}_updated", _pg_insert(parts, 'OLD', '-') + ' '
                         + _pg_insert(parts, 'NEW', '')),
            f"CREATE TRIGGER metric_{table}_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
            f"FOR EACH STATEMENT EXECUTE FUNCTION metric_{table}_inserted()",
            f"CREATE TRIGGER metric_{table}_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows "
            f"FOR EACH STATEMENT EXECUTE FUNCTION metric_{table}_deleted()",
            f"CREATE TRIGGER metric_{table}_update AFTER UPDATE ON {table} FOR EACH ROW WHEN ({changed}) "
            f"EXECUTE FUNCTION metric_{table}_updated()",
        ]
    sql += [
        _pg_function("metric_job_stages_ended", _pg_insert(stages, 'NEW', '')),
        f"CREATE TRIGGER metric_job_stages_update AFTER UPDATE ON jobs FOR EACH ROW WHEN (NEW.state {ran} "
        f"AND OLD.state NOT {ran} AND NEW.finished_at IS NOT NULL) EXECUTE FUNCTION metric_job_stages_ended()",
        _pg_function("metric_delivery_failed", "INSERT INTO metric_deltas (metric, label1, label2, label3, delta) "
                     "VALUES ('delivery_failures', NEW.destination, '', '', 1);"),
        "CREATE TRIGGER metric_delivery_failures AFTER UPDATE ON deliveries FOR EACH ROW WHEN (OLD.state = 'sending' "
        "AND NEW.state NOT IN ('sending', 'delivered') AND NEW.attempts >= OLD.attempts) "
        "EXECUTE FUNCTION metric_delivery_failed()",
        _pg_function("metric_associations_inserted", _pg_insert(association, 'n', '', 'new_rows')),
        _pg_function("metric_associations_updated", _pg_insert(association, 'OLD', '-') + ' '
                     + _pg_insert(association, 'NEW', '')),
        "CREATE TRIGGER metric_associations_insert AFTER INSERT ON associations REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION metric_associations_inserted()",
        _pg_function("metric_associations_deleted", _pg_insert(_OPEN, 'o', '-', 'old_rows')),
        "CREATE TRIGGER metric_associations_delete AFTER DELETE ON associations REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION metric_associations_deleted()",
        "CREATE TRIGGER metric_associations_update AFTER UPDATE ON associations FOR EACH ROW WHEN ("
        "OLD.outcome IS DISTINCT FROM NEW.outcome OR OLD.instances_stored IS DISTINCT FROM NEW.instances_stored "
        "OR OLD.bytes_received IS DISTINCT FROM NEW.bytes_received "
        "OR OLD.reject_reason IS DISTINCT FROM NEW.reject_reason OR OLD.protocol IS DISTINCT FROM NEW.protocol) "
        "EXECUTE FUNCTION metric_associations_updated()",
        _pg_function("metric_ingest_errors_inserted", _pg_insert(_INGEST, 'n', '', 'new_rows')),
        "CREATE TRIGGER metric_ingest_errors_insert AFTER INSERT ON ingest_errors REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION metric_ingest_errors_inserted()",
    ]
    return sql


_PG_FUNCTIONS = ('metric_studies_inserted', 'metric_studies_deleted', 'metric_studies_updated',
                 'metric_jobs_inserted', 'metric_jobs_deleted', 'metric_jobs_updated', 'metric_job_stages_ended',
                 'metric_deliveries_inserted', 'metric_deliveries_deleted', 'metric_deliveries_updated',
                 'metric_delivery_failed', 'metric_associations_inserted', 'metric_associations_updated',
                 'metric_associations_deleted',
                 'metric_ingest_errors_inserted')


def create_triggers(bind: sa.engine.Connection) -> None:
    """The triggers that keep ``metric_counts`` (see the module docstring), for this dialect."""
    for statement in _sqlite_triggers() if bind.dialect.name == 'sqlite' else _pg_triggers():
        op.execute(statement)


# --------------------------------------------------------------------------- the counts so far


def _starting_counts(bind: sa.engine.Connection) -> Counter:
    """What the triggers would have counted had they always been there, from the rows as they are."""
    counts: Counter = Counter()
    dialect = bind.dialect.name
    tables = [('studies', _STUDIES), ('jobs', _JOBS), ('deliveries', _DELIVERIES),
              ('associations', _association_parts(dialect) + _OPEN), ('ingest_errors', _INGEST)]
    for table, parts in tables:
        for part in parts:
            grouped = f"SELECT m, l1, l2, l3, sum(v) FROM ({part.over(table, 'r', '')}) AS c GROUP BY m, l1, l2, l3"
            for metric, l1, l2, l3, value in bind.execute(sa.text(grouped)):
                counts[(metric, l1, l2, l3)] += int(value)
    # failed delivery attempts as /metrics counted them before: attempts that did not end delivered or still sending
    for destination, state, attempts, rows in bind.execute(sa.text(
            "SELECT destination, state, coalesce(sum(attempts), 0), count(*) FROM deliveries "
            "GROUP BY destination, state")):
        done = int(rows) if state in ('delivered', 'sending') else 0
        if int(attempts) - done > 0:
            counts[('delivery_failures', destination, '', '')] += int(attempts) - done
    # stage times, parsed here (a damaged value is skipped, as the triggers skip it)
    rows = bind.execute(sa.text(f"SELECT pipeline, stage_seconds FROM jobs WHERE state IN ({_RAN_SQL}) "
                                "AND finished_at IS NOT NULL AND stage_seconds IS NOT NULL"))
    for pipeline, raw in rows:
        try:
            stages = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(stages, dict):
            continue
        for stage, seconds in stages.items():
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                continue
            le = next((repr(b) for b in BUCKETS if seconds <= b), '+Inf')
            counts[('job_stage_bucket', stage, pipeline, le)] += 1
            counts[('job_stage_sum_us', stage, pipeline, '')] += int(round(seconds * 1_000_000))
    return counts


def upgrade() -> None:
    bind = op.get_bind()
    labels = [sa.Column('metric', sa.String(40), nullable=False), sa.Column('label1', sa.Text(), nullable=False),
              sa.Column('label2', sa.Text(), nullable=False), sa.Column('label3', sa.Text(), nullable=False)]
    counts = op.create_table(
        'metric_counts', *labels, sa.Column('value', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('metric', 'label1', 'label2', 'label3', name='pk_metric_counts'))
    op.create_table(
        'metric_deltas', sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), primary_key=True,
                                   autoincrement=True),
        *(sa.Column(c.name, c.type, nullable=False) for c in labels),
        sa.Column('delta', sa.BigInteger(), nullable=False))
    starting = _starting_counts(bind)
    if starting:
        op.bulk_insert(counts, [{'metric': k[0], 'label1': k[1], 'label2': k[2], 'label3': k[3], 'value': v}
                                for k, v in sorted(starting.items())])
    create_triggers(bind)
    op.drop_index('ix_jobs_state', table_name='jobs')
    op.create_index('ix_jobs_state_id', 'jobs', ['state', 'id'])
    op.create_index('ix_jobs_pipeline_id', 'jobs', ['pipeline', 'id'])
    op.drop_index('ix_deliveries_state', table_name='deliveries')
    op.create_index('ix_deliveries_state_id', 'deliveries', ['state', 'id'])
    op.create_index('ix_deliveries_destination_id', 'deliveries', ['destination', 'id'])


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index('ix_deliveries_destination_id', table_name='deliveries')
    op.drop_index('ix_deliveries_state_id', table_name='deliveries')
    op.create_index('ix_deliveries_state', 'deliveries', ['state'])
    op.drop_index('ix_jobs_pipeline_id', table_name='jobs')
    op.drop_index('ix_jobs_state_id', table_name='jobs')
    op.create_index('ix_jobs_state', 'jobs', ['state'])
    triggers = bind.execute(sa.text(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'metric\\_%' ESCAPE '\\'"
        if bind.dialect.name == 'sqlite' else
        "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'metric\\_%' AND NOT tgisinternal"
    )).all()
    for name, table in triggers:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" if bind.dialect.name == 'sqlite' else
                   f"DROP TRIGGER IF EXISTS {name} ON {table}")
    if bind.dialect.name == 'postgresql':
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
        op.execute("DROP FUNCTION IF EXISTS metric_json_object(text)")
    op.drop_table('metric_deltas')
    op.drop_table('metric_counts')
