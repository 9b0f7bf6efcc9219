"""Alembic environment: runs migrations on the engine handed over by ``db.session.upgrade``.

On SQLite, changing a table's constraints means rebuilding it (batch mode: copy, drop,
rename). With foreign keys enforced, dropping the old table would first delete every
row that refers to it (``ON DELETE CASCADE``: all instances of every series), so the
migrations run with foreign keys off - the procedure SQLite documents for schema
changes - then the references are checked and enforcement is turned back on.
"""

from alembic import context
from sqlalchemy.engine import Connection

from dicom_node.db.models import Base

target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    with connection.begin():
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if connection.dialect.name == "sqlite":
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"the migration left rows whose references are broken (table, rowid, parent): "
                                   f"{broken[:5]}")


def run_migrations_online() -> None:
    engine = context.config.attributes["engine"]
    with engine.connect() as connection:
        if connection.dialect.name != "sqlite":
            _migrate(connection)
            return
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: before it
        connection.commit()
        try:
            _migrate(connection)
        finally:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


run_migrations_online()
