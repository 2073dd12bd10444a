"""Compiling a parsed definition to one set-based SQLAlchemy Core `Select`.

The result has the columns of the query contract: `user_id`, `email` (an audience), plus
`value` (a trait). Its shape, for `A.count() >= 2 and not audience('x')`:

    WITH events_1 AS (SELECT user_id, count(DISTINCT id) AS count_1 FROM <event table>
                      WHERE <filter> AND <window> AND user_id IS NOT NULL GROUP BY user_id)
    SELECT u.id AS user_id, u.email AS email
    FROM users AS u LEFT OUTER JOIN events_1 ON events_1.user_id = u.id
    LEFT OUTER JOIN audience_1 ON ...
    WHERE coalesce(events_1.count_1, 0) >= 2 AND audience_1.user_id IS NULL

Semantics, and why:

- Members are the known users: the `users` table (RudderStack: the distinct
  `identifies.user_id`). A condition is evaluated for every one of them, so "did not perform"
  (`count() = 0`, `not ...`) finds users with no such event. Anonymous-only activity (rows
  without `user_id`) never counts, nor does activity of a user_id that was never identified.
- One GROUP BY per stream (event + where + window), shared by all the aggregates over it, left-
  joined to the users: the database hashes each event table once, never once per user. A stream
  the condition cannot do without (it is false for a user with no row in it) is inner-joined,
  so `A.count() >= 1` becomes a plain join, as one would write it by hand; a count compared so
  that it only asks "any?" (`>= 1`, `> 0`, `!= 0`, `= 0`, `< 1`) reads `DISTINCT user_id`.
- A row is counted once per `id` (warehouses keep duplicate loads): count(DISTINCT id), and
  sum/avg over `SELECT DISTINCT user_id, id, <properties>` (duplicates are the same row
  loaded twice; min, max, unique, mode's count(DISTINCT id), first and last need no step).
- Windows are half open, `as_of - far <= timestamp < as_of - near`, with `as_of` the run's
  start given at execution (EventQuery.params), never the database's clock. No window: every
  event, whatever its timestamp.
- NULL: count of nothing is 0; every other aggregate of nothing (or of only NULLs) is NULL.
  Each comparison is two-valued: a NULL subject makes it false, except `absent()` (true) and
  `omits()` (`not contains`); so `not` of a comparison holds for users without a value.
- first/last: the property's value on the first/last event (by `timestamp`, then
  `received_at`, then `id`) among the events where it is not NULL. mode: the most frequent
  value as text (count of distinct event ids), ties to the smallest text by code point.
  unique: the sorted distinct non-NULL values as text (EventQuery.decode_value).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from typing import Literal as TypingLiteral

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement

from audience_sync.errors import ConfigError

from . import dialects
from .ast import (
    Aggregate,
    And,
    AudienceRef,
    Compare,
    Condition,
    Literal,
    Not,
    Or,
    Property,
    Stream,
    Trait,
    Value,
    Window,
)
from .layout import EMAIL, ID, IDENTIFIES, RECEIVED_AT, TIMESTAMP, USER_ID, USERS, WarehouseLayout

ValueKind = TypingLiteral["none", "scalar", "list"]


@dataclass(frozen=True)
class SqlAudience:
    """A referenced audience defined by SQL: its query, which must return `user_id`."""

    sql: str


@dataclass(frozen=True)
class EventAudience:
    """A referenced audience defined by a condition (parsed)."""

    condition: Condition


Referenced = SqlAudience | EventAudience
# The caller's lookup of `audience('key')` among the audiences of the same source: None when
# there is none (it may raise ConfigError itself, e.g. to name the other source).
Resolver = Callable[[str], Referenced | None]


@dataclass(frozen=True)
class EventQuery:
    """A compiled definition. Execute `select` with `params(as_of)`; pass each row's `value`
    through `decode_value` before `values.canonical`."""

    select: sa.Select[Any]
    value_kind: ValueKind
    windows: tuple[timedelta, ...] = ()

    def params(self, as_of: datetime) -> dict[str, datetime]:
        """The window edges for a run that started at `as_of` (an aware datetime)."""
        if as_of.tzinfo is None or as_of.utcoffset() is None:
            raise ValueError("as_of must be an aware datetime (the run's start, in UTC)")
        moment = as_of.astimezone(UTC)
        return {bound_name(delta): moment - delta for delta in self.windows}

    def decode_value(self, raw: Any) -> Any:
        """A trait's value as `values.canonical` takes it. `unique` lists come back from the
        drivers as lists (PostgreSQL, DuckDB, BigQuery) or JSON text (SQLite, Snowflake); both
        become a list of text sorted by code point, and an empty list no value (None)."""
        if self.value_kind != "list" or raw is None:
            return raw
        items = orjson.loads(raw) if isinstance(raw, str | bytes) else list(raw)
        values = sorted({str(item) for item in items if item is not None})
        return values or None

    def render(self, dialect: Dialect) -> str:
        """The SQL for `dialect`, literals inline and the window edges as named parameters
        (`:as_of` where the driver's own are positional, as SQLite's `?`)."""
        if dialect.positional:
            dialect = copy.copy(dialect)
            dialect.paramstyle, dialect.positional = "named", False
        compiled = self.select.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
        return "\n".join(line.rstrip() for line in str(compiled).splitlines())


def bound_name(delta: timedelta) -> str:
    if not delta:
        return dialects.AS_OF
    if delta % timedelta(days=1):
        return f"{dialects.AS_OF}_minus_{delta // timedelta(hours=1)}_hours"
    return f"{dialects.AS_OF}_minus_{delta.days}_days"


def compile_audience(
    condition: Condition, layout: WarehouseLayout, *, key: str, resolve: Resolver | None = None
) -> EventQuery:
    """The members of an audience: rows (user_id, email). `key` names the audience in errors
    (an unknown or cyclic `audience(...)`)."""
    inliner = _Inliner(key, resolve)
    expanded = inliner.expand(condition)
    return _Compiler(layout, inliner.sql).audience(expanded)


def compile_trait(value: Value, layout: WarehouseLayout) -> EventQuery:
    """A computed trait: rows (user_id, email, value) for the users who have a value."""
    return _Compiler(layout, {}).trait(value)


# --- audience(...) ---------------------------------------------------------------------------


class _Inliner:
    """Replaces audience('key') by the referenced audience's condition; an SQL audience stays
    a reference, its SQL kept in `sql` for the compiler to join."""

    def __init__(self, key: str, resolve: Resolver | None) -> None:
        self.resolve = resolve
        self.path: list[str] = [key]
        self.sql: dict[str, str] = {}

    def expand(self, condition: Condition) -> Condition:
        if isinstance(condition, And):
            return And(tuple(self.expand(item) for item in condition.items))
        if isinstance(condition, Or):
            return Or(tuple(self.expand(item) for item in condition.items))
        if isinstance(condition, Not):
            return Not(self.expand(condition.item))
        if isinstance(condition, AudienceRef):
            return self.audience(condition)
        return condition

    def audience(self, reference: AudienceRef) -> Condition:
        here, key = self.path[-1], reference.key
        if key in self.path:
            cycle = " -> ".join([*self.path[self.path.index(key) :], key])
            raise ConfigError(
                f"audience {here!r} refers to audience {key!r}, which leads back to it: {cycle}"
            )
        found = self.resolve(key) if self.resolve is not None else None
        if found is None:
            raise ConfigError(f"audience {here!r} refers to audience {key!r}: no such audience on its source")
        if isinstance(found, SqlAudience):
            self.sql[key] = found.sql
            return reference
        self.path.append(key)
        try:
            return self.expand(found.condition)
        finally:
            self.path.pop()


# --- the plan ---------------------------------------------------------------------------------

RelationKind = TypingLiteral["events", "first", "last", "mode", "audience", "trait"]
# Aggregates that each need their own ranking, not a column of a GROUP BY.
_RANKED: dict[str, RelationKind] = {"first": "first", "last": "last", "mode": "mode"}
_RANK = "event_rank"  # the row_number() column of a ranking


@dataclass
class _Relation:
    """One CTE left- or inner-joined to the users on `user_id`.

    events    a stream's GROUP BY (`labels`: its aggregates' columns), or its DISTINCT
              user_ids when only presence is asked
    first/last/mode   one aggregate's ranking, column `value`
    audience  an SQL audience's distinct user_ids
    trait     (RudderStack) a trait's latest non-NULL value per user
    """

    kind: RelationKind
    subject: Any  # Stream | Aggregate | the SQL of an audience | a trait's column
    labels: dict[Aggregate, str] = field(default_factory=dict)
    cte: sa.CTE | None = None  # once built

    @property
    def built(self) -> sa.CTE:
        assert self.cte is not None, "a relation is used before it is built"
        return self.cte

    @property
    def columns(self) -> sa.sql.base.ReadOnlyColumnCollection[str, sa.sql.elements.KeyedColumnElement[Any]]:
        return self.built.c

    @property
    def user_id(self) -> ColumnElement[Any]:
        column: ColumnElement[Any] = self.columns[USER_ID]
        return column


def _existence(compare: Compare) -> str | None:
    """'exists' / 'missing' when a count comparison only asks whether there is any event."""
    subject = compare.subject
    if not (isinstance(subject, Aggregate) and subject.function == "count" and len(compare.operands) == 1):
        return None
    literal = compare.operands[0]
    if literal.kind != "number":
        return None
    n = float(literal.value)
    exists = {">=": 0 < n <= 1, ">": 0 <= n < 1, "!=": n == 0}
    missing = {"=": n == 0, "<": 0 < n <= 1, "<=": 0 <= n < 1}
    if exists.get(compare.op, False):
        return _EXISTS
    if missing.get(compare.op, False):
        return _MISSING
    return None


_EXISTS, _MISSING = "exists", "missing"
Truth = bool | ColumnElement[bool]


class _Compiler:
    def __init__(self, layout: WarehouseLayout, sql_audiences: dict[str, str]) -> None:
        self.layout = layout
        self.sql_audiences = sql_audiences
        self.relations: dict[object, _Relation] = {}  # in order of first use
        self.windows: dict[timedelta, None] = {}
        self.user_traits: dict[str, None] = {EMAIL: None}  # columns of `users` (segment)

    # entry points

    def audience(self, condition: Condition) -> EventQuery:
        self.collect(condition)
        self.trait_column(EMAIL)
        self.build()
        return self.finish(condition, "none")

    def trait(self, value: Value) -> EventQuery:
        self.collect(value)
        self.trait_column(EMAIL)
        self.build()
        kind: ValueKind = "list" if isinstance(value, Aggregate) and value.is_list else "scalar"
        return self.finish(Compare(value, "exists"), kind, value)  # rows without a value carry nothing

    def finish(self, condition: Condition, kind: ValueKind, value: Value | None = None) -> EventQuery:
        required = frozenset(self.required(condition))
        where = self.truth(condition, required, guarded=False)
        joined: sa.FromClause = self.users
        for key, relation in self.relations.items():
            on = relation.user_id == self.user_id
            table = relation.built
            joined = joined.join(table, on) if key in required else joined.outerjoin(table, on)
        email, _ = self.trait_value(EMAIL)
        columns = [self.user_id.label(USER_ID), email.label(EMAIL)]
        if value is not None:
            columns.append(self.value_of(value, required)[0].label("value"))
        select = sa.select(*columns).select_from(joined)
        if where is not True:
            select = select.where(sa.false() if where is False else where)
        return EventQuery(select, kind, tuple(sorted(self.windows)))

    # 1. what the definition reads

    def collect(self, node: Condition | Value | Stream) -> None:
        if isinstance(node, And | Or):
            for item in node.items:
                self.collect(item)
        elif isinstance(node, Not):
            self.collect(node.item)
        elif isinstance(node, AudienceRef):
            self.relation(("audience", node.key), "audience", self.sql_audiences[node.key])
        elif isinstance(node, Compare):
            if isinstance(node.subject, Aggregate):
                self.aggregate(node.subject, presence_only=_existence(node) is not None)
            elif isinstance(node.subject, Trait):
                self.trait_column(node.subject.name)
        elif isinstance(node, Aggregate):
            self.aggregate(node, presence_only=False)
        elif isinstance(node, Trait):
            self.trait_column(node.name)

    def relation(self, key: object, kind: RelationKind, subject: Any) -> _Relation:
        if key not in self.relations:
            self.relations[key] = _Relation(kind, subject)
        return self.relations[key]

    def aggregate(self, aggregate: Aggregate, *, presence_only: bool) -> None:
        window = aggregate.stream.window
        if window is not None:
            self.windows.setdefault(window.near)
            self.windows.setdefault(window.far)
        if aggregate.function in _RANKED:
            self.relation(aggregate, _RANKED[aggregate.function], aggregate)
            return
        relation = self.relation(aggregate.stream, "events", aggregate.stream)
        if not presence_only:
            relation.labels.setdefault(aggregate, "")

    def trait_column(self, name: str) -> None:
        column = self.layout.column_name(name)
        if self.layout.has_users_table:
            self.user_traits.setdefault(column)
        else:
            self.relation(("trait", column), "trait", column)

    # 2. the CTEs

    def build(self) -> None:
        """The users (all traits collected by now) and one CTE per relation, numbered in order
        of first use so that the SQL reads in the order of the definition."""
        self.users: sa.FromClause
        self.user_id: ColumnElement[Any]
        if self.layout.has_users_table:
            self.users = self.layout.table(USERS, ID, *self.user_traits).alias("u")
            self.user_id = self.users.c[ID]
        else:
            identifies = self.layout.table(IDENTIFIES, USER_ID).alias("i")
            known = sa.select(identifies.c[USER_ID]).where(identifies.c[USER_ID].is_not(None)).distinct()
            self.users = known.cte("known_users").alias("u")
            self.user_id = self.users.c[USER_ID]
        for number, relation in enumerate(self.relations.values(), start=1):
            name = f"{relation.kind}_{number}"
            if relation.kind == "events":
                for index, aggregate in enumerate(relation.labels, start=1):
                    relation.labels[aggregate] = f"{aggregate.function}_{index}"
                relation.cte = self.events_cte(relation).cte(name)
            elif relation.kind in _RANKED:
                relation.cte = self.ranked_cte(relation.subject).cte(name)
            elif relation.kind == "audience":
                relation.cte = self.audience_cte(relation.subject).cte(name)
            else:
                relation.cte = self.latest_trait_cte(relation.subject).cte(name)

    def event_table(self, stream: Stream, *columns: str) -> sa.FromClause:
        filtered = [self.layout.column_name(node.name) for node in _properties(stream.where)]
        table = self.layout.table(
            self.layout.event_table_name(stream.event), ID, USER_ID, *columns, *filtered
        )
        return table.alias("e")

    def stream_filter(self, stream: Stream, events: sa.FromClause) -> list[ColumnElement[bool]]:
        """Rows of the stream: a user_id, inside the window, passing `where`."""
        conditions: list[ColumnElement[bool]] = [events.c[USER_ID].is_not(None)]
        if stream.window is not None:
            conditions += _window(events.c[TIMESTAMP], stream.window)
        if stream.where is not None:
            where = self.filter_truth(stream.where, events, guarded=False)
            if where is False:
                conditions.append(sa.false())
            elif where is not True:
                conditions.append(where)
        return conditions

    def events_cte(self, relation: _Relation) -> sa.Select[Any]:
        stream: Stream = relation.subject
        columns = [self.layout.column_name(a.property_name) for a in relation.labels if a.property_name]
        timestamp = (TIMESTAMP,) if stream.window is not None else ()
        events = self.event_table(stream, *timestamp, *columns)
        rows = self.stream_filter(stream, events)
        if not relation.labels:  # presence only
            return sa.select(events.c[USER_ID]).where(*rows).distinct()
        if any(aggregate.function in ("sum", "avg") for aggregate in relation.labels):
            # sum and avg would count a duplicated row twice: one row per id first.
            kept = [events.c[USER_ID], events.c[ID], *(events.c[column] for column in dict.fromkeys(columns))]
            source: sa.FromClause = sa.select(*kept).where(*rows).distinct().subquery("d")
            count: ColumnElement[Any] = sa.func.count()
            rows = []
        else:
            source, count = events, sa.func.count(sa.distinct(events.c[ID]))
        aggregates = [
            _reduce(aggregate, source, count, self.layout).label(label)
            for aggregate, label in relation.labels.items()
        ]
        return sa.select(source.c[USER_ID], *aggregates).where(*rows).group_by(source.c[USER_ID])

    def ranked_cte(self, aggregate: Aggregate) -> sa.Select[Any]:
        stream = aggregate.stream
        column = self.layout.column_name(aggregate.property_name or "")
        events = self.event_table(stream, TIMESTAMP, RECEIVED_AT, column)
        rows = [*self.stream_filter(stream, events), events.c[column].is_not(None)]
        if aggregate.function == "mode":
            text = sa.cast(events.c[column], sa.String())
            frequency = sa.func.count(sa.distinct(events.c[ID]))
            counted = sa.select(events.c[USER_ID], text.label("value"), frequency.label("frequency"))
            counted = counted.where(*rows).group_by(events.c[USER_ID], text)
            if aggregate.min_frequency is not None and aggregate.min_frequency > 1:
                counted = counted.having(frequency >= aggregate.min_frequency)
            values = counted.subquery("c")
            order = [values.c.frequency.desc(), dialects.binary_order(values.c.value).asc()]
            rank = sa.func.row_number().over(partition_by=values.c[USER_ID], order_by=order)
            ranked = sa.select(values.c[USER_ID], values.c.value, rank.label(_RANK)).subquery("r")
        else:
            rows.append(events.c[TIMESTAMP].is_not(None))
            keys = [events.c[TIMESTAMP], events.c[RECEIVED_AT], events.c[ID]]
            first = aggregate.function == "first"
            order = [(key.asc() if first else key.desc()).nulls_last() for key in keys]
            rank = sa.func.row_number().over(partition_by=events.c[USER_ID], order_by=order)
            value = events.c[column].label("value")
            ranked = sa.select(events.c[USER_ID], value, rank.label(_RANK)).where(*rows).subquery("r")
        return sa.select(ranked.c[USER_ID], ranked.c.value).where(ranked.c[_RANK] == 1)

    def audience_cte(self, sql: str) -> sa.Select[Any]:
        # The SQL is the user's, verbatim: escape its colons so none becomes a bind parameter.
        sql = sql.strip().rstrip(";").strip().replace(":", "\\:")
        members = sa.text(sql).columns(sa.column(USER_ID)).subquery("q")
        return sa.select(members.c[USER_ID]).where(members.c[USER_ID].is_not(None)).distinct()

    def latest_trait_cte(self, column: str) -> sa.Select[Any]:
        """RudderStack: the trait's value on the user's latest identify that carries it."""
        identifies = self.layout.table(IDENTIFIES, ID, USER_ID, TIMESTAMP, RECEIVED_AT, column).alias("i")
        order = [identifies.c[c].desc().nulls_last() for c in (TIMESTAMP, RECEIVED_AT, ID)]
        rank = sa.func.row_number().over(partition_by=identifies.c[USER_ID], order_by=order)
        ranked = (
            sa.select(identifies.c[USER_ID], identifies.c[column], rank.label(_RANK))
            .where(identifies.c[USER_ID].is_not(None), identifies.c[column].is_not(None))
            .subquery("r")
        )
        return sa.select(ranked.c[USER_ID], ranked.c[column]).where(ranked.c[_RANK] == 1)

    # 3. which relations the condition cannot do without (inner joins)

    def required(self, condition: Condition) -> Iterator[object]:
        for key in self.relations:
            if _when_absent(condition, key, self.relation_key) is False:
                yield key

    def relation_key(self, node: object) -> object:
        """The relation an atom of the condition reads, or None (the users table)."""
        if isinstance(node, AudienceRef):
            return ("audience", node.key)
        if isinstance(node, Aggregate):
            return node if node.function in _RANKED else node.stream
        if isinstance(node, Trait) and not self.layout.has_users_table:
            return ("trait", self.layout.column_name(node.name))
        return None

    # 4. the condition as SQL

    def truth(self, node: Condition, required: frozenset[object], *, guarded: bool) -> Truth:
        """The condition as SQL. `guarded`: under a `not`, where a NULL comparison must read
        false before it is negated; elsewhere WHERE already treats NULL as false."""
        if isinstance(node, And):
            return _all([self.truth(item, required, guarded=guarded) for item in node.items])
        if isinstance(node, Or):
            return _any([self.truth(item, required, guarded=guarded) for item in node.items])
        if isinstance(node, Not):
            return _not(self.truth(node.item, required, guarded=True))
        if isinstance(node, AudienceRef):
            return self.presence(self.relation_key(node), required)
        if isinstance(node, Compare) and not isinstance(node.subject, Property):  # parser's rule
            existence = _existence(node)
            if existence is not None:
                present = self.presence(self.relation_key(node.subject), required)
                return present if existence == _EXISTS else _not(present)
            expression, nullable = self.value_of(node.subject, required)
            return _compare(expression, node.op, node.operands, nullable=nullable, guarded=guarded)
        raise TypeError(f"not a condition: {node!r}")  # pragma: no cover

    def presence(self, key: object, required: frozenset[object]) -> Truth:
        return True if key in required else self.relations[key].user_id.is_not(None)

    def value_of(self, value: Value, required: frozenset[object]) -> tuple[ColumnElement[Any], bool]:
        """The SQL of a value, and whether it may be NULL."""
        if isinstance(value, Trait):
            return self.trait_value(self.layout.column_name(value.name))
        key = self.relation_key(value)
        relation = self.relations[key]
        if value.function in _RANKED:
            return relation.columns.value, True
        column = relation.columns[relation.labels[value]]
        if value.function in ("count", "unique_count"):
            return (column, False) if key in required else (sa.func.coalesce(column, 0), False)
        return column, True

    def trait_value(self, column: str) -> tuple[ColumnElement[Any], bool]:
        if self.layout.has_users_table:
            return self.users.c[column], True
        return self.relations[("trait", column)].columns[column], True

    def filter_truth(self, node: Condition, events: sa.FromClause, *, guarded: bool) -> Truth:
        """A `where` filter over one event row (`guarded` as in `truth`)."""
        if isinstance(node, And):
            return _all([self.filter_truth(item, events, guarded=guarded) for item in node.items])
        if isinstance(node, Or):
            return _any([self.filter_truth(item, events, guarded=guarded) for item in node.items])
        if isinstance(node, Not):
            return _not(self.filter_truth(node.item, events, guarded=True))
        if isinstance(node, Compare) and isinstance(node.subject, Property):
            column = events.c[self.layout.column_name(node.subject.name)]
            return _compare(column, node.op, node.operands, nullable=True, guarded=guarded)
        raise TypeError(f"not a filter: {node!r}")  # pragma: no cover


# --- helpers ----------------------------------------------------------------------------------


def _properties(where: Condition | None) -> list[Property]:
    if where is None:
        return []
    if isinstance(where, And | Or):
        return [found for item in where.items for found in _properties(item)]
    if isinstance(where, Not):
        return _properties(where.item)
    if isinstance(where, Compare) and isinstance(where.subject, Property):
        return [where.subject]
    return []


def _window(timestamp: ColumnElement[Any], window: Window) -> list[ColumnElement[bool]]:
    return [
        timestamp >= dialects.window_bound(bound_name(window.far)),
        timestamp < dialects.window_bound(bound_name(window.near)),
    ]


def _reduce(
    aggregate: Aggregate, rows: sa.FromClause, count: ColumnElement[Any], layout: WarehouseLayout
) -> ColumnElement[Any]:
    if aggregate.function == "count":
        return count
    column = rows.c[layout.column_name(aggregate.property_name or "")]
    if aggregate.function == "unique":
        # NULL, not an empty list, when there is no value (some dialects aggregate to `[]`).
        return sa.case((sa.func.count(column) > 0, dialects.unique_list(column)))
    if aggregate.function == "unique_count":
        return sa.func.count(sa.distinct(column))
    reduced: ColumnElement[Any] = getattr(sa.func, aggregate.function)(column)  # sum avg min max
    return reduced


def _literal(literal: Literal) -> ColumnElement[Any]:
    kind: sa.types.TypeEngine[Any]
    if literal.kind == "text":
        kind = sa.String()
    elif literal.kind == "boolean":
        kind = sa.Boolean()
    else:
        kind = sa.Integer() if isinstance(literal.value, int) else sa.Float()
    return sa.literal(literal.value, kind)


def _compare(
    value: ColumnElement[Any], op: str, operands: tuple[Literal, ...], *, nullable: bool, guarded: bool
) -> Truth:
    """A comparison that is false when `value` is NULL (but absent()). The NULL test is spelled
    out only where it matters: the value may be NULL and the result is negated later."""
    if op == "exists":
        return value.is_not(None) if nullable else True
    if op == "absent":
        return value.is_(None) if nullable else False
    if op == "omits":
        return _not(_compare(value, "contains", operands, nullable=nullable, guarded=True))
    literals = [_literal(literal) for literal in operands]
    test: ColumnElement[bool]
    if op == "one_of":
        test = value.in_(literals)
    elif op == "contains":
        test = sa.or_(*(dialects.text_contains(value, literal) for literal in literals))
    elif op == "starts_with":
        test = dialects.text_starts_with(value, literals[0])
    elif op == "ends_with":
        test = dialects.text_ends_with(value, literals[0])
    else:
        test = {
            "=": value.__eq__,
            "!=": value.__ne__,
            "<": value.__lt__,
            "<=": value.__le__,
            ">": value.__gt__,
            ">=": value.__ge__,
        }[op](literals[0])
    return sa.and_(value.is_not(None), test) if nullable and guarded else test


def _all(parts: list[Truth]) -> Truth:
    if any(part is False for part in parts):
        return False
    kept = [part for part in parts if not isinstance(part, bool)]
    return True if not kept else kept[0] if len(kept) == 1 else sa.and_(*kept)


def _any(parts: list[Truth]) -> Truth:
    if any(part is True for part in parts):
        return True
    kept = [part for part in parts if not isinstance(part, bool)]
    return False if not kept else kept[0] if len(kept) == 1 else sa.or_(*kept)


def _not(part: Truth) -> Truth:
    return (not part) if isinstance(part, bool) else sa.not_(part)


def _when_absent(node: object, key: object, relation_key: Callable[[object], object]) -> bool | None:
    """The condition's value for a user with no row in relation `key`, when that alone decides
    it (True/False), else None. False means the relation can be inner-joined."""
    if isinstance(node, And):
        values = [_when_absent(item, key, relation_key) for item in node.items]
        return False if False in values else True if all(v is True for v in values) else None
    if isinstance(node, Or):
        values = [_when_absent(item, key, relation_key) for item in node.items]
        return True if True in values else False if all(v is False for v in values) else None
    if isinstance(node, Not):
        inner = _when_absent(node.item, key, relation_key)
        return None if inner is None else not inner
    if isinstance(node, AudienceRef):
        return False if relation_key(node) == key else None
    if isinstance(node, Compare):
        if relation_key(node.subject) != key or key is None:
            return None
        subject = node.subject
        if isinstance(subject, Aggregate) and subject.function in ("count", "unique_count"):
            return _evaluate(0, node.op, node.operands)
        return node.op in ("absent", "omits")  # every other aggregate or trait: NULL
    return None


def _evaluate(value: int, op: str, operands: tuple[Literal, ...]) -> bool | None:
    """A count's comparison evaluated in Python, for a count of 0."""
    if op == "exists":
        return True
    if op == "absent":
        return False
    numbers = [
        literal.value
        for literal in operands
        if literal.kind == "number" and isinstance(literal.value, int | float)
    ]
    if len(numbers) != len(operands):
        return None
    if op == "one_of":
        return value in numbers
    if len(numbers) != 1:
        return None
    other = numbers[0]
    tests = {"=": value == other, "!=": value != other, "<": value < other, "<=": value <= other}
    tests |= {">": value > other, ">=": value >= other}
    return tests.get(op)
