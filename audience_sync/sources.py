"""Reading an audience's members from the user's database.

The query contract: `user_id` and/or `email` identify a user (user_id when present, else
email); `name`, `title` and `company_id` travel as traits. Rows are streamed in chunks
(server-side cursors where the driver has them), never held whole in memory.
"""

from __future__ import annotations

import gc
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import AudienceSettings, SourceSettings
from .errors import SourceError
from .keys import MAX_IDENTIFIER_LENGTH, clean_identifier
from .store import driver_message, first_line, safe_url
from .values import UnusableValue, canonical

log = logging.getLogger("audience_sync.sources")

IDENTIFIER_COLUMNS = ("user_id", "email")
TRAIT_COLUMNS = ("name", "title", "company_id")
CHUNK_ROWS = 10_000
MAX_SAMPLES = 5
MAX_TRAIT_LENGTH = 1024
VALUE_COLUMN = "value"  # a computed trait's value


# One staged member: (user_id, email, name, title, company_id), at least one of user_id and
# email set; the identity the diff keys on is user_id when known, else email. Plain tuples:
# a million of them pass through here per run, and a NamedTuple costs a Python call each.
Member = tuple[str | None, str | None, str | None, str | None, str | None]
MEMBER_FIELDS = ("user_id", "email", "name", "title", "company_id")
# A computed trait's member has a sixth field: its value as canonical JSON text (traits.py).


_gc_lock = threading.Lock()
_gc_users = 0


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist on entry, for a bulk phase.

    Staging and delivery allocate millions of short-lived tuples, dicts and contacts. Each
    allocation burst triggers collections, and the full ones walk every object the program
    holds (SQLAlchemy, Alembic, httpx, rich: hundreds of thousands), which cost a quarter of a
    million-member run. `gc.freeze()` moves those objects out of the collector's view;
    `gc.unfreeze()` on the way out hands them back, so garbage among them is still collected
    later. Refcounting frees the phase's own objects as usual. Process-wide, so nested and
    concurrent phases (the daemon runs audiences in threads) share one freeze.
    """
    global _gc_users
    with _gc_lock:
        if _gc_users == 0:
            gc.freeze()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.unfreeze()


@dataclass
class ReadStats:
    rows: int = 0
    skipped: int = 0
    samples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(reason)


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
            value_at = _value_position(keys, where) if audience.trait else -1
            if audience.level == "account":
                company_at = _company_position(keys, where)
                name_at = _position(keys, "name")
                for rows in chunks:
                    stats.rows += len(rows)
                    yield _companies(rows, company_at, name_at, value_at, stats)
                return
            columns = _column_positions(keys, where)
            for rows in chunks:
                stats.rows += len(rows)
                yield _members(rows, columns, stats, value_at)
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


def _column_positions(keys: list[str], where: str) -> dict[str, int]:
    lowered = [key.lower() for key in keys]
    if not any(column in lowered for column in IDENTIFIER_COLUMNS):
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: the query returns neither user_id nor email (columns: {shown})")
    wanted = IDENTIFIER_COLUMNS + TRAIT_COLUMNS
    return {column: lowered.index(column) for column in wanted if column in lowered}


def _position(keys: list[str], column: str) -> int:
    lowered = [key.lower() for key in keys]
    return lowered.index(column) if column in lowered else -1


def _company_position(keys: list[str], where: str) -> int:
    at = _position(keys, "company_id")
    if at < 0:
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: an account-level query must return company_id (columns: {shown})")
    return at


def _companies(rows: Any, company_at: int, name_at: int, value_at: int, stats: ReadStats) -> list[Member]:
    """An account-level chunk: the company's externalId stands where a user's id does (the
    stage keys on it), its `name` travels with it, and a trait's value ends the tuple."""
    members: list[Member] = []
    for row in rows:
        company = clean_identifier(row[company_at])
        if company is None:
            raw = row[company_at]
            stats.skip("row without company_id" if raw is None else f"unusable company_id {_sample(raw)}")
            continue
        value = None
        if value_at >= 0:
            try:
                value = canonical(row[value_at])
            except UnusableValue as exc:
                stats.skip(f"unusable value for company {_sample(company)}: {exc}")
                continue
            if value is None:
                continue
        name = row[name_at] if name_at >= 0 else None
        name = str(name).strip()[:MAX_TRAIT_LENGTH] or None if name is not None else None
        member: Member = (company, None, name, None, None)
        members.append(member if value is None else (*member, value))
    return members


def _value_position(keys: list[str], where: str) -> int:
    lowered = [key.lower() for key in keys]
    if VALUE_COLUMN not in lowered:
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: a trait's query must return a value column (columns: {shown})")
    return lowered.index(VALUE_COLUMN)


def _members(rows: Any, columns: dict[str, int], stats: ReadStats, value_at: int = -1) -> list[Member]:
    """One chunk of rows as members. Rows of plain text take the inline path (this loop runs a
    million times per large audience); anything else (numbers, blanks, over-long values, a
    missing identifier) goes through `_member`, which applies the full contract.

    With `value_at` (a computed trait), each member ends with its value as canonical JSON; a
    row whose value is NULL has no value (the user is not in the trait), and a value the trait
    cannot carry skips the row, counted like a bad identifier."""
    user_id_at, email_at, name_at, title_at, company_at = (columns.get(c, -1) for c in MEMBER_FIELDS)
    longest, trait_limit = MAX_IDENTIFIER_LENGTH, MAX_TRAIT_LENGTH
    members: list[Member] = []
    append = members.append
    for row in rows:
        value = None
        if value_at >= 0:
            try:
                value = canonical(row[value_at])
            except UnusableValue as exc:
                who = row[user_id_at] if user_id_at >= 0 else row[email_at] if email_at >= 0 else None
                stats.skip(f"unusable value for {_sample(who)}: {exc}")
                continue
            if value is None:
                continue
        user_id = row[user_id_at] if user_id_at >= 0 else None
        email = row[email_at] if email_at >= 0 else None
        name = row[name_at] if name_at >= 0 else None
        title = row[title_at] if title_at >= 0 else None
        company = row[company_at] if company_at >= 0 else None
        if (
            (user_id.__class__ is str or user_id is None)
            and (email.__class__ is str or email is None)
            and (name.__class__ is str or name is None)
            and (title.__class__ is str or title is None)
            and (company.__class__ is str or company is None)
        ):
            usable = True
            if user_id is not None:
                user_id = user_id.strip()
                usable = 0 < len(user_id) <= longest
            if email is not None:
                email = email.strip()
                if not 0 < len(email) <= longest:
                    email = None  # without a user_id the slow path below says why
            if usable and (user_id or email):
                member = (
                    user_id,
                    email,
                    name.strip()[:trait_limit] or None if name is not None else None,
                    title.strip()[:trait_limit] or None if title is not None else None,
                    company.strip()[:longest] or None if company is not None else None,
                )
                append(member if value is None else (*member, value))
                continue
        member = _member(row, columns, stats)
        if member is not None:
            append(member if value is None else (*member, value))
    return members


def _member(row: Any, columns: dict[str, int], stats: ReadStats) -> Member | None:
    raw_id = row[columns["user_id"]] if "user_id" in columns else None
    raw_email = row[columns["email"]] if "email" in columns else None
    user_id = clean_identifier(raw_id)
    email = clean_identifier(raw_email)
    if raw_id is not None and user_id is None:
        stats.skip(f"unusable user_id {_sample(raw_id)}")
        return None
    if user_id is None and email is None:
        if raw_email is not None:
            stats.skip(f"unusable email {_sample(raw_email)}")
        else:
            stats.skip("row with neither user_id nor email")
        return None
    return (
        user_id,
        email,
        _trait(row, columns, "name"),
        _trait(row, columns, "title"),
        _trait(row, columns, "company_id", MAX_IDENTIFIER_LENGTH),
    )


def _trait(row: Any, columns: dict[str, int], column: str, limit: int = MAX_TRAIT_LENGTH) -> str | None:
    if column not in columns:
        return None
    value = row[columns[column]]
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text[:limit] or None


def _sample(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
