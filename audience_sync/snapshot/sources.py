"""Reading an audience's members from the user's database: one engine per source, the query
streamed in chunks (server-side cursors where the driver has them), never held whole in memory.
What the rows must hold is the query contract (`contract`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import AudienceSettings, SourceSettings
from ..errors import SourceError
from ..state.database import driver_message
from ..support.redaction import safe_url
from ..support.text import first_line
from .contract import Member, ReadStats, row_reader

log = logging.getLogger(__name__)

CHUNK_ROWS = 10_000


class SourcePool:
    """One engine per configured source for the life of a process; disposed on close."""

    def __init__(self, sources: dict[str, SourceSettings]) -> None:
        self._sources = sources
        self._engines: dict[str, Engine] = {}

    def engine(self, name: str) -> Engine:
        if name not in self._engines:
            url = self._sources[name].url
            try:
                self._engines[name] = sa.create_engine(url, pool_pre_ping=True)
            except (sa.exc.ArgumentError, ImportError) as exc:
                raise SourceError(f"source {name!r} ({safe_url(url)}): {exc}") from None
        return self._engines[name]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def __enter__(self) -> SourcePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_members(
    pool: SourcePool, audience: AudienceSettings, stats: ReadStats, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[Member]]:
    """Yield the audience's valid members in chunks; bad rows are counted in `stats`."""
    engine = pool.engine(audience.source)
    where = f"audience {audience.key!r} (source {audience.source!r})"
    missing = missing_sqlite_file(engine.url)
    if missing is not None:
        raise SourceError(f"source {audience.source!r}: SQLite file {missing} does not exist")
    try:
        connection = engine.connect()
    except sa.exc.DBAPIError as exc:
        url = safe_url(engine.url)
        raise SourceError(f"{where}: cannot connect to {url}: {driver_message(exc)}") from exc
    try:
        with connection:
            keys, chunks = _query(connection, audience.query, chunk_rows)
            read = row_reader(keys, audience, where)
            for rows in chunks:
                stats.rows += len(rows)
                yield read(rows, stats)
    except sa.exc.DBAPIError as exc:
        raise SourceError(f"{where}: query failed: {driver_message(exc)}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
    except sqlite3.Error as exc:
        raise SourceError(f"{where}: query failed: {first_line(exc)}") from exc


def missing_sqlite_file(url: sa.URL) -> Path | None:
    """The absolute path of the file a SQLite URL names, when that file does not exist.

    Connecting would create it empty, and the query would then fail with a misleading
    "no such table". In-memory databases (`sqlite://`, `:memory:`, `mode=memory`) name none.
    """
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if sa.util.asbool(url.query.get("uri", False)) and database.startswith("file:"):
        if url.query.get("mode") == "memory":
            return None
        database = unquote(urlsplit(database).path)
    if database in ("", ":memory:"):
        return None
    path = Path(database)
    return None if path.exists() else path.resolve()


def _query(connection: sa.Connection, query: str, chunk_rows: int) -> tuple[list[str], Iterator[Any]]:
    """The query's column names and its rows in chunks, streamed.

    SQLite has no server-side cursors to manage: its own cursor streams, and reading it
    directly skips SQLAlchemy's row objects, a third of the read time at a million rows.
    Every other driver goes through SQLAlchemy's streaming result (server-side cursors).
    """
    if connection.dialect.driver == "pysqlite":
        cursor = connection.connection.cursor()
        cursor.execute(query)

        def chunks() -> Iterator[Any]:
            try:
                while rows := cursor.fetchmany(chunk_rows):
                    yield rows
            finally:
                cursor.close()

        return [column[0] for column in cursor.description or ()], chunks()
    result = connection.execution_options(stream_results=True, yield_per=chunk_rows).execute(sa.text(query))
    return list(result.keys()), result.partitions(chunk_rows)
