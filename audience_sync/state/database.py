"""Opening the state database: the engine, its SQLite tuning, the schema check, and turning
SQLAlchemy's errors into one line.

Opening does not import Alembic (with Mako and Pygments, a fifth of a second of every
command): the revision is read with a plain SELECT and compared with `models.SCHEMA_REVISION`;
only an upgrade loads Alembic (`migrations`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import SchemaOutdatedError, StateDatabaseError
from ..support.redaction import safe_url
from ..support.text import first_line
from . import migrations

log = logging.getLogger(__name__)

UPGRADE_HINT = "run `audience-sync db upgrade`"


def create_state_engine(url: str) -> Engine:
    """An engine for the state database, with SQLite tuned for a write-heavy single file."""
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise StateDatabaseError(f"database.url {safe_url(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets `status` and `history` read while a run writes; NORMAL is durable under WAL
    # for everything but a power cut, and the outbox makes a lost tail harmless (resent).
    # Memory stays flat in the audience's size: the staging tables live in a temporary file
    # (temp_store=FILE; in memory they would cost ~200 bytes per member), and each
    # connection's page cache, main and temp, is capped at 8 MiB. The OS caches the files
    # anyway: 16 or 64 MiB bought no speed at a million members, only resident memory that
    # grew with the audience. threads=2 lets the sort that builds the stage use a helper.
    # Checkpointing every 10,000 pages (~40 MiB of WAL) rather than 1,000 writes a page
    # that successive delivery chunks touch once, not once per chunk, and syncs less often.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA temp_store=FILE")
    cursor.execute("PRAGMA cache_size=-8192")
    cursor.execute("PRAGMA temp.cache_size=-8192")
    cursor.execute("PRAGMA threads=2")
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


def open_state(url: str) -> Engine:
    """An engine on a state database at this version's schema (a new, empty one is created)."""
    engine = create_state_engine(url)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def ensure_schema(engine: Engine) -> None:
    """Refuse a schema that is behind. A brand-new, empty database is created at head."""
    with translate_errors("cannot open state database", str(engine.url)), engine.connect() as connection:
        revision = migrations.current_revision(connection)
        empty = revision is None and not sa.inspect(connection).get_table_names()
    if empty:
        log.info("initialising empty state database %s", safe_url(engine.url))
        migrations.upgrade(engine)
        return
    head = migrations.head_revision()
    if revision != head:
        raise SchemaOutdatedError(
            f"state database {safe_url(engine.url)} is at revision {revision or 'none'}, "
            f"this version needs {head}: {UPGRADE_HINT}"
        )


# --- errors -------------------------------------------------------------------------------


@contextmanager
def translate_errors(what: str, url: str) -> Iterator[None]:
    """Turn SQLAlchemy errors into one line naming the state database."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise StateDatabaseError(database_error(what, url, exc)) from exc


def database_error(what: str, url: str | sa.URL, exc: sa.exc.SQLAlchemyError) -> str:
    """One line: what failed, the database (password hidden), and the database's own message."""
    return f"{what} {safe_url(url)}: {error_message(exc)}"


def error_message(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message for a database error, else the error's first line."""
    return driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else first_line(exc)


def driver_message(exc: sa.exc.DBAPIError) -> str:
    """The database's own message, without SQLAlchemy's statement and background link."""
    return first_line(exc.orig if exc.orig is not None else exc)


# --- dialect differences ------------------------------------------------------------------


def dialect_insert(connection: Connection) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (SQLite and PostgreSQL alike)."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def begin_write(connection: Connection) -> None:
    """Start a transaction that reads and then writes the main database.

    SQLite cannot upgrade a read transaction to a write one once another connection has
    committed in between ("database is locked", with no wait), so there the write lock is
    taken up front with BEGIN IMMEDIATE, which does wait (busy_timeout). PostgreSQL needs
    nothing: it has row locks and MVCC.
    """
    if connection.dialect.name != "sqlite":
        return
    connection.commit()  # whatever came before (temporary tables only) is kept
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# Rows written in one go above which PostgreSQL's statistics are refreshed: autovacuum runs
# later (and never on temporary tables), and a planner that takes a million-row table for an
# empty one sorts all of it for every page it reads. Below a tenth of the table's rows (the
# share at which autovacuum analyzes), the statistics still hold: at 10M members, an ANALYZE
# after an incremental run's 100,000 changes cost 0.4 s of reading sampled pages.
ANALYZE_AFTER = 10_000
ANALYZE_SHARE = 0.1


def analyze(connection: Connection, table: str, rows: int) -> None:
    """Refresh PostgreSQL's statistics of `table` after `rows` were written, when that many
    would mislead its planner: more than ANALYZE_AFTER, and more than ANALYZE_SHARE of the
    rows its statistics counted."""
    if connection.dialect.name != "postgresql" or rows <= ANALYZE_AFTER:
        return
    counted = connection.execute(
        sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:table AS regclass)"), {"table": table}
    ).scalar_one()
    if rows > ANALYZE_SHARE * max(counted, 0):  # -1: never analyzed
        connection.exec_driver_sql(f"ANALYZE {table}")
