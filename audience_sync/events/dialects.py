"""The few SQL pieces no portable SQLAlchemy construct renders right on every warehouse.

Each is a SQLAlchemy function element with one `@compiles` rule per dialect that differs, so a
compiled definition stays one `Select` that PostgreSQL, SQLite, DuckDB, Snowflake and BigQuery
each render in their own SQL:

    window_bound       a window's edge: a named bind parameter, kept as such even when the
                       rest is rendered with literal values (docs, golden files, preview)
    binary_order       text ordered by code point: PostgreSQL's collation would otherwise
                       order 'B' after 'a' in most locales, SQLite/DuckDB/BigQuery do not
    unique_list        the distinct non-NULL values as text, as a list (JSON text on SQLite and
                       Snowflake, whose drivers return it so; decoded by EventQuery)
    text_contains      substring tests that are case-sensitive everywhere (SQLite's LIKE is
    text_starts_with   not), with no pattern characters to escape
    text_ends_with
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

AS_OF = "as_of"
_TEXT = sa.String()


class window_bound(FunctionElement[Any]):
    """`:as_of_minus_30_days`: the only bind parameters of a compiled definition."""

    type = sa.DateTime(timezone=True)
    inherit_cache = True

    def __init__(self, name: str) -> None:
        super().__init__(sa.bindparam(name, type_=sa.DateTime(timezone=True)))


@compiles(window_bound)
def _window_bound(element: window_bound, compiler: SQLCompiler, **kw: Any) -> str:
    (bind,) = element.clauses.clauses
    kw["literal_binds"] = False
    return compiler.process(bind, **kw)


class binary_order(FunctionElement[str]):
    type = _TEXT
    inherit_cache = True


@compiles(binary_order)
def _binary_order(element: binary_order, compiler: SQLCompiler, **kw: Any) -> str:
    (text,) = element.clauses.clauses
    return compiler.process(text, **kw)


@compiles(binary_order, "postgresql")
def _binary_order_postgresql(element: binary_order, compiler: SQLCompiler, **kw: Any) -> str:
    (text,) = element.clauses.clauses
    return f'{compiler.process(text, **kw)} COLLATE "C"'


class unique_list(FunctionElement[Any]):
    """An aggregate: the distinct non-NULL values of its argument, as text."""

    type = sa.types.NullType()
    inherit_cache = True


def _as_text(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses.clauses
    return compiler.process(sa.cast(value, _TEXT), **kw)


@compiles(unique_list)
def _unique_list(element: unique_list, compiler: SQLCompiler, **kw: Any) -> str:
    text = _as_text(element, compiler, **kw)
    return f"array_agg(DISTINCT {text}) FILTER (WHERE {text} IS NOT NULL)"


@compiles(unique_list, "sqlite")
def _unique_list_sqlite(element: unique_list, compiler: SQLCompiler, **kw: Any) -> str:
    text = _as_text(element, compiler, **kw)
    return f"json_group_array(DISTINCT {text}) FILTER (WHERE {text} IS NOT NULL)"


@compiles(unique_list, "duckdb")
def _unique_list_duckdb(element: unique_list, compiler: SQLCompiler, **kw: Any) -> str:
    text = _as_text(element, compiler, **kw)
    return f"list(DISTINCT {text}) FILTER (WHERE {text} IS NOT NULL)"


@compiles(unique_list, "snowflake")
def _unique_list_snowflake(element: unique_list, compiler: SQLCompiler, **kw: Any) -> str:
    return f"ARRAY_AGG(DISTINCT {_as_text(element, compiler, **kw)})"  # ignores NULLs


@compiles(unique_list, "bigquery")
def _unique_list_bigquery(element: unique_list, compiler: SQLCompiler, **kw: Any) -> str:
    return f"ARRAY_AGG(DISTINCT {_as_text(element, compiler, **kw)} IGNORE NULLS)"


class text_contains(FunctionElement[bool]):
    type = sa.Boolean()
    inherit_cache = True


class text_starts_with(FunctionElement[bool]):
    type = sa.Boolean()
    inherit_cache = True


class text_ends_with(FunctionElement[bool]):
    type = sa.Boolean()
    inherit_cache = True


def _operands(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    value, needle = element.clauses.clauses
    return compiler.process(sa.cast(value, _TEXT), **kw), compiler.process(needle, **kw)


@compiles(text_contains)
def _contains(element: text_contains, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"strpos({value}, {needle}) > 0"


@compiles(text_contains, "sqlite")
def _contains_sqlite(element: text_contains, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"instr({value}, {needle}) > 0"


@compiles(text_contains, "snowflake")
def _contains_snowflake(element: text_contains, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"CONTAINS({value}, {needle})"


@compiles(text_starts_with)
def _starts_with(element: text_starts_with, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"substr({value}, 1, length({needle})) = {needle}"


@compiles(text_ends_with)
def _ends_with(element: text_ends_with, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"right({value}, length({needle})) = {needle}"


@compiles(text_ends_with, "sqlite")
def _ends_with_sqlite(element: text_ends_with, compiler: SQLCompiler, **kw: Any) -> str:
    value, needle = _operands(element, compiler, **kw)
    return f"substr({value}, -length({needle})) = {needle}"
