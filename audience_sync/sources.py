"""Reading an audience's members from the user's database.

The query contract: `user_id` and/or `email` identify a user (user_id when present, else
email); `name`, `title` and `company_id` travel as traits. Rows are streamed in chunks
(server-side cursors where the driver has them), never held whole in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import AudienceSettings, SourceSettings
from .errors import SourceError
from .keys import MAX_IDENTIFIER_LENGTH, clean_identifier
from .store import safe_url

log = logging.getLogger("audience_sync.sources")

IDENTIFIER_COLUMNS = ("user_id", "email")
TRAIT_COLUMNS = ("name", "title", "company_id")
CHUNK_ROWS = 10_000
MAX_SAMPLES = 5
MAX_TRAIT_LENGTH = 1024


class Member(NamedTuple):
    """One staged row; `ref` is the identity the diff keys on."""

    ref: str
    user_id: str | None
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None


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
    try:
        connection = engine.connect()
    except sa.exc.DBAPIError as exc:
        url = safe_url(engine.url)
        raise SourceError(f"{where}: cannot connect to {url}: {_driver_message(exc)}") from exc
    try:
        with connection:
            result = connection.execution_options(stream_results=True, yield_per=chunk_rows).execute(
                sa.text(audience.query)
            )
            columns = _column_positions(list(result.keys()), where)
            for rows in result.partitions(chunk_rows):
                stats.rows += len(rows)
                yield [member for row in rows if (member := _member(row, columns, stats))]
    except sa.exc.DBAPIError as exc:
        raise SourceError(f"{where}: query failed: {_driver_message(exc)}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"{where}: {exc.__class__.__name__}: {exc}") from exc


def _column_positions(keys: list[str], where: str) -> dict[str, int]:
    lowered = [key.lower() for key in keys]
    if not any(column in lowered for column in IDENTIFIER_COLUMNS):
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: the query returns neither user_id nor email (columns: {shown})")
    wanted = IDENTIFIER_COLUMNS + TRAIT_COLUMNS
    return {column: lowered.index(column) for column in wanted if column in lowered}


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
    return Member(
        ref=user_id or email,  # type: ignore[arg-type]
        user_id=user_id,
        email=email,
        name=_trait(row, columns, "name"),
        title=_trait(row, columns, "title"),
        company_id=_trait(row, columns, "company_id", MAX_IDENTIFIER_LENGTH),
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


def _driver_message(exc: sa.exc.DBAPIError) -> str:
    text = str(exc.orig if exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
