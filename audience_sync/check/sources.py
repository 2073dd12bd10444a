"""The `source NAME` and `audience KEY` lines: each source answers; each audience's query runs,
wrapped with a row limit and under a time limit, returns the contract's columns, and its first
rows are read as a sync reads them. The sources are only read, except that a source with
`planner_schema` gets a `planner NAME` line that proves the sync can create tables there (a
probe table, created and dropped in a transaction rolled back)."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import AudienceSettings, Settings
from ..errors import SourceError
from ..events import WarehouseLayout, missing, needs, parse_condition, parse_value, read_catalog
from ..snapshot import planner

# The query contract's own validation, shared with the sync's reads (not a second copy).
from ..snapshot.contract import ReadStats, row_reader
from ..snapshot.sources import SourcePool, missing_sqlite_file
from ..state.database import driver_message, error_message
from ..support.clock import utcnow
from ..support.redaction import safe_url
from ..support.text import first_line
from ..sync import planned
from .results import CheckResult, fail, ok, skip, warn
from .state import with_connect_timeout
from .timebox import timeboxed

if TYPE_CHECKING:
    from ..events import LayoutKind


def check_sources(settings: Settings, timeout: float, sample_rows: int) -> list[CheckResult]:
    """One line per source, then one per audience (a SKIP when its source is not reachable)."""
    timed = {
        name: replace(s, url=with_connect_timeout(s.url, timeout)) for name, s in settings.sources.items()
    }
    results: list[CheckResult] = []
    reachable: set[str] = set()
    with SourcePool(timed) as pool:
        for name, source in settings.sources.items():
            result = timeboxed(f"source {name}", timeout, partial(_check_source, pool, name, source.url))
            results.append(result)
            if result.status == "OK":
                reachable.add(name)
                if source.planner_schema is not None:
                    planner_check = partial(_check_planner, pool, name, source.planner_schema)
                    results.append(timeboxed(f"planner {name}", timeout, planner_check))
        for audience in settings.audiences:
            index = [a for a in settings.audiences if a.kind == audience.kind].index(audience)
            item = f"audience {audience.key}"
            if audience.source not in reachable:
                results.append(skip(item, f"source {audience.source!r} is not reachable (above)"))
                continue
            query = partial(_check_query, pool, audience, index, timeout, sample_rows)
            results.append(timeboxed(item, timeout, query))
    return results


def _check_source(pool: SourcePool, name: str, url: str) -> CheckResult:
    item, shown = f"source {name}", safe_url(url)
    fix = f"check sources.{name}.url and that the database accepts connections from here"
    try:
        engine = pool.engine(name)
    except SourceError as exc:  # an unparsable URL, or its driver is not installed
        return fail(item, str(exc), f"correct sources.{name}.url, or install the SQLAlchemy driver it names")
    missing = missing_sqlite_file(engine.url)
    if missing is not None:
        return fail(
            item,
            f"{shown}: the SQLite file {missing} does not exist",
            f"correct sources.{name}.url (a relative path starts in {Path.cwd()})",
        )
    try:
        with engine.connect() as connection:
            connection.execute(sa.select(sa.literal(1)))
    except sa.exc.SQLAlchemyError as exc:
        return fail(item, f"cannot connect to {shown}: {error_message(exc)}", fix)
    return ok(item, f"{shown} answers ({engine.dialect.name})")


def _check_planner(pool: SourcePool, name: str, schema: str) -> CheckResult:
    """Prove the CREATE rights a planner run needs: a table created (and the schema, when it is
    missing) in the planner schema, then dropped, in a transaction rolled back, so that
    nothing is left where DDL is transactional (PostgreSQL, DuckDB)."""
    item = f"planner {name}"
    engine = pool.engine(name)
    probe = f"{planner.SNAPSHOT}_check_{os.getpid()}"
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            planner.ensure_schema(connection, schema)
            connection.execute(planner.CreateTableAs(planner.table(schema, probe), sa.select(sa.literal(1))))
            planner.drop(connection, schema, probe)
            transaction.rollback()
    except sa.exc.SQLAlchemyError as exc:
        message = driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else first_line(exc)
        return fail(
            item,
            f"planner_schema {schema!r}: cannot create a table there: {message}",
            f"run, as an owner of the database: {planned.grant(engine, schema)}",
        )
    return ok(item, f"planner_schema {schema!r}: the sync can create its tables there")


def _check_query(
    pool: SourcePool, audience: AudienceSettings, index: int, timeout: float, sample_rows: int
) -> CheckResult:
    item = f"audience {audience.key}"
    where = f"audience {audience.key!r} (source {audience.source!r})"
    deadline = time.monotonic() + timeout
    field_name = "query" if audience.compiled is None else "condition" if not audience.trait else "value"
    try:
        with pool.engine(audience.source).connect() as connection, _statement_timeout(connection, deadline):
            if audience.compiled is not None:
                absent = _missing_in_warehouse(connection, audience, pool)
                if absent:
                    return fail(
                        item,
                        f"{where}: " + "; ".join(absent),
                        f"correct the names in its {field_name}: an event's table and a property's "
                        "column are their snake_cased names (docs/events.md)",
                    )
            keys, rows = _first_rows(connection, audience, sample_rows)
    except (sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
        if time.monotonic() >= deadline:
            return fail(
                item,
                f"{where}: no rows within {timeout:g}s (limit {sample_rows} rows; stopped)",
                "a sync runs the query in full: check its plan (EXPLAIN; an ORDER BY, DISTINCT or "
                "GROUP BY over a large table reads it all first), or allow longer with --timeout",
            )
        message = driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else first_line(exc)
        return fail(
            item,
            f"{where}: the query failed: {message}",
            f"run {_entry(audience, index)}.{field_name} by hand on source {audience.source!r} and correct it"
            + (
                f" (`audience-sync preview {audience.key}` shows its SQL)"
                if audience.compiled is not None
                else ""
            ),
        )
    try:
        read = row_reader(keys, audience, where)
    except SourceError as exc:
        return fail(item, str(exc), _contract_fix(audience))
    stats = ReadStats()
    usable = len(read(rows, stats))
    found = f"columns {', '.join(keys)}"
    if not rows:
        detail = f"{found}; no rows: the audience is empty"
    else:
        skipped = f" ({stats.skipped} skipped, e.g. {stats.samples[0]})" if stats.skipped else ""
        detail = f"{found}; {usable} of the first {len(rows)} rows usable{skipped}"
    if audience.level == "user" and "company_id" not in (key.lower() for key in keys):
        return warn(item, f"{detail}; {NO_COMPANY}", NO_COMPANY_FIX)
    return ok(item, detail)


# Planhat creates a contact it does not have only when the call names its company: otherwise an
# identify or track is discarded (planhat/docs, "User Tracking" > "3. Segment" > "Un Assigned
# Users") and a bulk upsert item refused. Not a failure: contacts Planhat has are updated.
NO_COMPANY = (
    "no company_id column: contacts not yet in Planhat will be discarded by Planhat "
    "(it creates a contact only under a company)"
)
NO_COMPANY_FIX = (
    "return each user's company as a column named company_id (the company's externalId in "
    "Planhat), e.g. `SELECT id AS user_id, email, account_id AS company_id ...`"
)


def _contract_fix(audience: AudienceSettings) -> str:
    if audience.level == "account":
        return "return the company's externalId as a column named company_id (docs: the query contract)"
    if audience.trait:
        return "return the trait's value as a column named value (docs: the query contract)"
    return (
        "return a column named user_id or email, e.g. `SELECT id AS user_id, "
        "email ...` (docs: the query contract)"
    )


def _entry(audience: AudienceSettings, index: int) -> str:
    """`audiences[i]` or `traits[i]`, as the config file numbers it (`index` counts both)."""
    return f"{'traits' if audience.trait else 'audiences'}[{index}]"


def _missing_in_warehouse(connection: Connection, audience: AudienceSettings, pool: SourcePool) -> list[str]:
    """What a definition on events reads and the warehouse lacks: one line per table or column."""
    source = pool.settings(audience.source)
    layout = WarehouseLayout(cast("LayoutKind", source.events), source.schema)
    parse = parse_value if audience.trait else parse_condition
    wanted = needs(parse(audience.definition or ""), layout)
    catalog = read_catalog(connection, layout, {need.table for need in wanted})
    return missing(wanted, catalog, layout)


def _first_rows(
    connection: Connection, audience: AudienceSettings, limit: int
) -> tuple[list[str], list[Any]]:
    """The query's columns and at most `limit` rows, the database told so: the query wrapped as
    a subquery under LIMIT (or the dialect's TOP / FETCH FIRST), so it stops early where it can.
    A definition on events is evaluated as of now."""
    if audience.compiled is not None:
        compiled = audience.compiled.select.subquery("audience_sync_check")
        first: sa.Select[Any] = sa.select(sa.literal_column("*")).select_from(compiled).limit(limit)
        rows = connection.execute(first, audience.compiled.params(utcnow()))
        return list(rows.keys()), list(rows.fetchmany(limit))
    inner = sa.text(audience.query.strip().rstrip(";")).columns().subquery("audience_sync_check")
    result: sa.CursorResult[Any] = connection.execute(
        sa.select(sa.literal_column("*")).select_from(inner).limit(limit)
    )
    return list(result.keys()), list(result.fetchmany(limit))


@contextmanager
def _statement_timeout(connection: Connection, deadline: float) -> Iterator[None]:
    """Stop the query at `deadline` inside the database, where the driver allows it: PostgreSQL's
    statement_timeout (for this transaction only), SQLite's progress handler. Elsewhere only the
    time box applies (the query then runs on in the background until the process ends)."""
    left = max(0.001, deadline - time.monotonic())
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {math.ceil(left * 1000)}")
        yield
    elif connection.dialect.driver == "pysqlite":
        raw = connection.connection.driver_connection
        assert raw is not None
        # Every million VM steps (some milliseconds): each call needs the GIL, and asking more
        # often starves the daemon's runs, which share the process, while a slow query runs.
        raw.set_progress_handler(lambda: int(time.monotonic() >= deadline), 1_000_000)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)
    else:
        yield
