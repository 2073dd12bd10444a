"""Audiences and computed traits defined on events, compiled to SQL for the user's warehouse.

A definition in Segment's query language (docs/events.md) is parsed once when the config
loads, then compiled to one SQLAlchemy `Select` over the Segment or RudderStack warehouse
layout, which every dialect renders in its own SQL:

    condition = parse_condition("event('Order Completed').within(30 days).count() >= 1")
    query = compile_audience(condition, WarehouseLayout("segment", "prod"), key="buyers",
                             resolve=lookup_same_source_audience)
    rows = connection.execute(query.select, query.params(run_started_at))  # user_id, email

    value = parse_value("event('Order Completed').within(180 days).sum(property('revenue'))")
    query = compile_trait(value, layout)        # user_id, email, value
    canonical(query.decode_value(row.value))

`needs()` and `missing()` tell `check` what the warehouse lacks. Modules:

    ast.py       the parsed form          parser.py + grammar.lark   text -> ast (lark, LALR)
    layout.py    tables and names         compiler.py                ast -> Select
    needs.py     what the SQL reads       dialects.py                per-dialect SQL pieces
"""

from __future__ import annotations

from .ast import Condition, Definition, Value, referenced_audiences
from .compiler import (
    EventAudience,
    EventQuery,
    Referenced,
    Resolver,
    SqlAudience,
    compile_audience,
    compile_trait,
)
from .layout import KINDS, LayoutKind, WarehouseLayout, warehouse_name
from .needs import Catalog, Need, missing, needs, read_catalog
from .parser import parse_condition, parse_value

__all__ = [
    "KINDS",
    "Catalog",
    "Condition",
    "Definition",
    "EventAudience",
    "EventQuery",
    "LayoutKind",
    "Need",
    "Referenced",
    "Resolver",
    "SqlAudience",
    "Value",
    "WarehouseLayout",
    "compile_audience",
    "compile_trait",
    "missing",
    "needs",
    "parse_condition",
    "parse_value",
    "read_catalog",
    "referenced_audiences",
    "warehouse_name",
]
