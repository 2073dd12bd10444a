"""Reading an audience's members from the user's database: one engine per source, the query
streamed in chunks (server-side cursors where the driver has them), never held whole in memory.
What the rows must hold is the query contract (`contract`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import AudienceSettings, SourceSettings
from ..errors import SourceError
from ..state.database import driver_message
from ..support.clock import utcnow
from ..support.redaction import safe_url
from ..support.text import first_line
from .contract import Member, ReadStats, row_reader

log = logging.getLogger(__name__)

CHUNK_ROWS = 10_000


# connection.info: the audience whose rows a connection is streaming. DuckDB runs one query per
# connection, and a second one on it ends the first's stream early, with no error: to a sync
# that would look like a mass exit. Each audience query has a connection of its own, and a
# statement on a connection that is streaming is refused (`_refuse_while_streaming`).
STREAMING = "audience_sync.streaming"


class SourcePool:
    """One engine per configured source for the life of a process; disposed on close."""

    def __init__(self, sources: dict[str, SourceSettings]) -> None:
        self._sources = sources
        self._engines: dict[str, Engine] = {}

    def settings(self, name: str) -> SourceSettings:
        return self._sources[name]

    def engine(self, name: str) -> Engine:
        if name not in self._engines:
            url = self._sources[name].url
            writes = self._sources[name].planner_schema is not None
            try:
                engine = sa.create_engine(
                    url, pool_pre_ping=True, **_engine_options(sa.make_url(url), writes)
                )
            except (sa.exc.ArgumentError, ImportError) as exc:
                raise SourceError(f"source {name!r} ({safe_url(url)}): {exc}") from None
            sa.event.listen(engine, "before_cursor_execute", _refuse_while_streaming)
            self._engines[name] = engine
        return self._engines[name]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def __enter__(self) -> SourcePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _engine_options(url: sa.URL, writes: bool = False) -> dict[str, Any]:
    """A DuckDB file is opened read-only: one process may open it read-write, several may read
    it (the daemon and a `sync` at once, or the pipeline that writes it between runs). A source
    with `planner_schema` is written to (its snapshots), so it is opened read-write."""
    database = url.database or ""
    if (
        not writes
        and url.get_backend_name() == "duckdb"
        and database not in ("", ":memory:")
        and Path(database).exists()
    ):
        return {"connect_args": {"read_only": True}}
    return {}


def _refuse_while_streaming(connection: sa.Connection, *_args: Any) -> None:
    streaming = connection.info.get(STREAMING)
    if streaming is not None:
        raise SourceError(
            f"{streaming}: another statement on the connection streaming its rows would end the "
            "stream early (DuckDB runs one query per connection); not run"
        )


def read_members(
    pool: SourcePool,
    audience: AudienceSettings,
    stats: ReadStats,
    chunk_rows: int = CHUNK_ROWS,
    *,
    as_of: datetime | None = None,
) -> Iterator[list[Member]]:
    """Yield the audience's valid members in chunks; bad rows are counted in `stats`. An
    audience defined on events is evaluated at `as_of` (the run's start; now by default)."""
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
            if audience.compiled is not None:
                keys, chunks = _query_compiled(connection, audience.compiled, as_of or utcnow(), chunk_rows)
            else:
                keys, chunks = _query(connection, audience.query, chunk_rows)
            read = row_reader(keys, audience, where)
            connection.info[STREAMING] = where  # no other statement on it until the end
            try:
                for rows in chunks:
                    stats.rows += len(rows)
                    yield read(rows, stats)
            finally:
                connection.info.pop(STREAMING, None)
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


def _query_compiled(
    connection: sa.Connection, compiled: Any, as_of: datetime, chunk_rows: int
) -> tuple[list[str], Iterator[Any]]:
    """An audience or trait defined on events: its compiled query (events.EventQuery), its
    windows measured back from `as_of`, streamed through SQLAlchemy on every dialect (its
    parameters need SQLAlchemy's binding: a SQLite cursor takes no datetime)."""
    streaming = connection.execution_options(stream_results=True, yield_per=chunk_rows)
    result = streaming.execute(compiled.select, compiled.params(as_of))
    return list(result.keys()), result.partitions(chunk_rows)
