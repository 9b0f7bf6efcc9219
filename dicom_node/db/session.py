"""Engines and sessions, built from settings and passed down (no module-level engine)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    """WAL lets readers (CLI, UI) run beside the receiver.

    NORMAL sync keeps every commit across a process crash; after a power loss the last
    commits may be rolled back, but their spool files were fsync'd before the commit, and
    start-up recovery (:mod:`dicom_node.recovery`) indexes them again. That saves one
    fsync per received instance without weakening what an acknowledgement promises.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL with the node's connection settings."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, max_overflow=16
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.get_backend_name() == "postgresql":
        # No JIT: the studies' shown-state query (one CASE of correlated EXISTS) is costed high enough to be
        # JIT-compiled, which took 2-4 s per dashboard refresh for a query that runs in milliseconds.
        # random_page_cost 1.1 (SSD; the default 4 is for spinning disks): with 4, PostgreSQL hashed every
        # job of the database for each EXISTS of that query instead of looking up the few studies' jobs by
        # index (100,000 studies: 635 ms instead of 18 ms), so the dashboard grew with the history.
        return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True,
                             connect_args={"options": "-c jit=off -c random_page_cost=1.1"})
    return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision`` (idempotent)."""
    command.upgrade(_alembic_config(engine), revision)


def head_revision() -> str | None:
    """The newest migration this version of the node ships."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


class DatabaseNotReady(RuntimeError):
    """The node's database is missing, empty or at another revision than this version needs (message says which)."""


def missing_database(url: str) -> str | None:
    """Why ``url`` names no existing node database, or ``None`` when it does.

    Checked before a command that expects the node's database (listing, changing
    settings, a worker): connecting to a SQLite file that does not exist would create
    it empty, and the admin would then work on a second database without knowing.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return None
        if not Path(parsed.database).is_file():
            return f"no database at {parsed.database}"
    engine = make_engine(url)
    try:
        if current_revision(engine) is None:
            return f"the database at {engine.url.render_as_string(hide_password=True)} holds no dicom-node tables"
    finally:
        engine.dispose()
    return None


def open_sessions(url: str, *, migrate: bool) -> sessionmaker[Session]:
    """Sessions on the node's database at ``url``: brought up to date first (``migrate``, for a change),
    else refused with :class:`DatabaseNotReady` when it is at another revision (a listing never migrates)."""
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    else:
        revision, head = current_revision(engine), head_revision()
        if revision != head:
            engine.dispose()
            raise DatabaseNotReady(
                f"the database at {engine.url.render_as_string(hide_password=True)} is at revision "
                f"{revision or 'none'}, this version needs {head}; start the node or run `dicom-node db upgrade`")
    return make_session_factory(engine)
