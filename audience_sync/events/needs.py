"""What a definition reads from the warehouse, and what of it is missing there.

`needs()` lists each table and column a definition reads (with what asked for it, in the
user's words); `read_catalog()` reads the tables and columns a schema has; `missing()` compares
the two and says, for each miss, what exists that looks like it:

    no table order_complete in schema prod (event 'Order Complete'); tables like it: order_completed
    no column revenu in order_completed (property 'revenu' of event 'Order Completed');
        columns like it: revenue

`check` prints these; the compiler never needs them (a missing table fails the query anyway).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from .ast import Aggregate, Definition, Property, Stream, Trait, walk
from .layout import EMAIL, ID, IDENTIFIES, RECEIVED_AT, TIMESTAMP, USER_ID, USERS, WarehouseLayout

Catalog = Mapping[str, Collection[str]]  # table -> its columns, all lowercase


@dataclass(frozen=True)
class Need:
    """`column` of `table` (None: the table itself), read because of `origin`."""

    table: str
    column: str | None
    origin: str


def needs(definition: Definition, layout: WarehouseLayout) -> tuple[Need, ...]:
    """Every table and column the compiled SQL reads, in order of first mention, each once.
    Referenced audiences are not followed: check each audience on its own."""
    found: dict[tuple[str, str | None], Need] = {}

    def need(table: str, column: str | None, origin: str) -> None:
        found.setdefault((table, column), Need(table, column, origin))

    users = USERS if layout.has_users_table else IDENTIFIES
    user_key = ID if layout.has_users_table else USER_ID
    need(users, None, "the users")
    need(users, user_key, "the users")
    need(users, EMAIL, "the users' email")
    if not layout.has_users_table:
        for column in (ID, TIMESTAMP, RECEIVED_AT):
            need(IDENTIFIES, column, "the latest identify per user")
    for node in walk(definition):
        if isinstance(node, Trait):
            need(users, layout.column_name(node.name), f"trait {node.name!r}")
        elif isinstance(node, Aggregate):
            _stream_needs(node.stream, node, layout, need)
    return tuple(found.values())


def _stream_needs(
    stream: Stream,
    aggregate: Aggregate,
    layout: WarehouseLayout,
    need: Callable[[str, str | None, str], None],
) -> None:
    table = layout.event_table_name(stream.event)
    event = f"event {stream.event!r}"
    need(table, None, event)
    for column in (ID, USER_ID):
        need(table, column, event)
    if stream.window is not None or aggregate.function in ("first", "last"):
        need(table, TIMESTAMP, f"{event}'s time")
    if aggregate.function in ("first", "last"):
        need(table, RECEIVED_AT, f"{event}'s time")
    names = [node.name for node in walk(stream) if isinstance(node, Property)]
    if aggregate.property_name is not None:
        names.append(aggregate.property_name)
    for name in names:
        need(table, layout.column_name(name), f"property {name!r} of {event}")


def read_catalog(
    connection: sa.Connection, layout: WarehouseLayout, tables: Collection[str]
) -> dict[str, set[str]]:
    """The layout schema's table names (all of them, for suggestions), each with its columns
    when it is one of `tables`; names lowercased as the layout spells them."""
    inspector = sa.inspect(connection)
    schema = layout.schema
    names = inspector.get_table_names(schema=schema) + inspector.get_view_names(schema=schema)
    catalog: dict[str, set[str]] = {name.lower(): set() for name in names}
    wanted = [name for name in names if name.lower() in {table.lower() for table in tables}]
    if connection.dialect.name == "duckdb":
        # duckdb-engine reflects columns through pg_catalog.pg_collation, which DuckDB lacks.
        for table, column in connection.execute(_DUCKDB_COLUMNS, {"schema": schema}):
            if table in wanted:
                catalog[table.lower()].add(str(column).lower())
        return catalog
    for name in wanted:
        catalog[name.lower()] = {
            str(column["name"]).lower() for column in inspector.get_columns(name, schema=schema)
        }
    return catalog


_DUCKDB_COLUMNS = sa.text(
    "SELECT table_name, column_name FROM information_schema.columns "
    "WHERE table_schema = coalesce(:schema, current_schema())"
)


def missing(wanted: Collection[Need], catalog: Catalog, layout: WarehouseLayout) -> list[str]:
    """One line per missing table or column, with the names that look like it."""
    lines: list[str] = []
    absent_tables: set[str] = set()
    place = f" in schema {layout.schema}" if layout.schema else ""
    for item in wanted:
        if item.column is None:
            if item.table not in catalog:
                absent_tables.add(item.table)
                lines.append(
                    f"no table {item.table}{place} ({item.origin}){_alike(item.table, catalog, 'tables')}"
                )
        elif item.table not in absent_tables and item.table in catalog:
            columns = catalog[item.table]
            if item.column not in columns:
                lines.append(
                    f"no column {item.column} in {layout.qualified(item.table)} ({item.origin})"
                    f"{_alike(item.column, columns, 'columns')}"
                )
    return lines


def _alike(name: str, names: Collection[str], what: str) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f"; {what} like it: {', '.join(close)}" if close else ""
