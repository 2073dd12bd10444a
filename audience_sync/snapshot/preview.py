"""`audience-sync preview KEY`: an audience or trait as its source sees it now, changing nothing.

The SQL the source runs (for a definition on events, the compiled query in the source's own
dialect, its window edges as named parameters with their values), how many members the query
returns (a trait: how many users have a value, and its most frequent values), and a few of
them. Only the source is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..config import AudienceSettings
from ..errors import SourceError
from ..state.database import driver_message
from .sources import SourcePool
from .values import UnusableValue, canonical

SAMPLES = 5
TOP_VALUES = 10


@dataclass
class Preview:
    key: str
    name: str
    kind: str  # audience | trait
    source: str
    dialect: str
    as_of: datetime
    sql: str
    parameters: dict[str, datetime] = field(default_factory=dict)  # a definition's window edges
    members: int = 0  # rows the query returns (a trait: users with a value)
    samples: list[dict[str, Any]] = field(default_factory=list)
    values: list[tuple[str, int]] = field(default_factory=list)  # a trait's most frequent, as sent


def preview(pool: SourcePool, audience: AudienceSettings, as_of: datetime, samples: int = SAMPLES) -> Preview:
    engine = pool.engine(audience.source)
    where = f"{audience.noun} {audience.key!r} (source {audience.source!r})"
    compiled = audience.compiled
    if compiled is not None:
        inner = compiled.select.subquery("previewed")
        parameters = compiled.params(as_of)
        sql = compiled.render(engine.dialect)
    else:
        inner = sa.text(audience.query.strip().rstrip(";")).columns().subquery("previewed")
        parameters, sql = {}, audience.query
    found = Preview(
        audience.key,
        audience.name,
        audience.kind,
        audience.source,
        engine.dialect.name,
        as_of,
        sql,
        parameters,
    )
    every: sa.ColumnClause[Any] = sa.literal_column("*")
    try:
        with engine.connect() as connection:
            counted = sa.select(sa.func.count()).select_from(inner)
            found.members = int(connection.execute(counted, parameters).scalar_one())
            rows = connection.execute(sa.select(every).select_from(inner).limit(samples), parameters)
            found.samples = [dict(row._mapping) for row in rows]
            if audience.trait:
                found.values = _top_values(connection, inner, parameters, compiled)
    except sa.exc.DBAPIError as exc:
        raise SourceError(f"{where}: the query failed: {driver_message(exc)}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
    for sample in found.samples:
        if "value" in sample:
            sample["value"] = _as_sent(sample["value"], compiled)
    return found


def _top_values(
    connection: sa.Connection, inner: Any, parameters: dict[str, Any], compiled: Any
) -> list[tuple[str, int]]:
    value: sa.ColumnClause[Any] = sa.literal_column("value")
    users = sa.func.count().label("users")
    query = (
        sa.select(value, users).select_from(inner).group_by(value).order_by(users.desc()).limit(TOP_VALUES)
    )
    return [(_as_sent(row[0], compiled), int(row[1])) for row in connection.execute(query, parameters)]


def _as_sent(raw: Any, compiled: Any) -> str:
    """A trait value as Planhat gets it (canonical JSON), or why it would be skipped."""
    try:
        return canonical(compiled.decode_value(raw) if compiled is not None else raw) or "null"
    except UnusableValue as exc:
        return f"(skipped: {exc})"
