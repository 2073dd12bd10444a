"""The semantics of docs/events.md computed in plain Python, one user at a time, over the rows
of warehouse.py: what the compiled SQL is compared with.

Written from the documented rules, not from the compiler: no SQL, no shared helpers beyond
the parsed AST and the name rule.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from audience_sync.events.ast import (
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
)
from audience_sync.events.layout import warehouse_name as _warehouse_name
from tests.events.warehouse import Dataset, Row

NULL = object()  # "no value", distinct from every value a row can hold
warehouse_name = functools.cache(_warehouse_name)  # the oracle asks for the same names often


class Oracle:
    def __init__(self, data: Dataset, as_of: datetime, audiences: dict[str, Any] | None = None) -> None:
        self.as_of = as_of
        self.users = {row["id"]: row for row in data.users}  # the known users
        self.audiences = audiences or {}  # key -> Condition | set of user ids (an SQL audience)
        self.events: dict[str, dict[str, list[Row]]] = {}
        for table, rows in data.events.items():
            unique = {row["id"]: row for row in rows}  # a duplicated row counts once
            per_user: dict[str, list[Row]] = {}
            for row in unique.values():
                if row["user_id"] is not None:
                    per_user.setdefault(row["user_id"], []).append(row)
            self.events[table] = per_user

    # audiences

    def members(self, condition: Condition) -> dict[str, str | None]:
        """user_id -> email of every known user the condition holds for."""
        return {user: row["email"] for user, row in self.users.items() if self.holds(condition, user)}

    def holds(self, condition: Condition, user: str) -> bool:
        if isinstance(condition, And):
            return all(self.holds(item, user) for item in condition.items)
        if isinstance(condition, Or):
            return any(self.holds(item, user) for item in condition.items)
        if isinstance(condition, Not):
            return not self.holds(condition.item, user)
        if isinstance(condition, AudienceRef):
            audience = self.audiences[condition.key]
            return user in audience if isinstance(audience, set) else self.holds(audience, user)
        assert isinstance(condition, Compare)
        subject = condition.subject
        assert not isinstance(subject, Property)
        return compare(self.value(subject, user), condition.op, condition.operands)

    # traits

    def values(self, value: Value) -> dict[str, tuple[str | None, Any]]:
        """user_id -> (email, value) of every known user with a value."""
        found = {}
        for user, row in self.users.items():
            result = self.value(value, user)
            if result is not NULL:
                found[user] = (row["email"], result)
        return found

    def value(self, value: Value, user: str) -> Any:
        if isinstance(value, Trait):
            trait = self.users[user].get(warehouse_name(value.name))
            return NULL if trait is None else trait
        rows = self.stream(value.stream, user)
        return reduce(value, rows)

    def stream(self, stream: Stream, user: str) -> list[Row]:
        rows = self.events.get(warehouse_name(stream.event), {}).get(user, [])
        if stream.window is not None:
            since, until = self.as_of - stream.window.far, self.as_of - stream.window.near
            rows = [row for row in rows if since <= row["timestamp"] < until]
        if stream.where is not None:
            where = stream.where
            rows = [row for row in rows if passes(where, row)]
        return rows


def passes(condition: Condition, row: Row) -> bool:
    if isinstance(condition, And):
        return all(passes(item, row) for item in condition.items)
    if isinstance(condition, Or):
        return any(passes(item, row) for item in condition.items)
    if isinstance(condition, Not):
        return not passes(condition.item, row)
    assert isinstance(condition, Compare) and isinstance(condition.subject, Property)
    value = row.get(warehouse_name(condition.subject.name))
    return compare(NULL if value is None else value, condition.op, condition.operands)


def compare(value: Any, op: str, operands: tuple[Literal, ...]) -> bool:
    """Two-valued: no value makes every comparison false, but absent (and omits)."""
    if op == "exists":
        return value is not NULL
    if op == "absent":
        return value is NULL
    if op == "omits":
        return not compare(value, "contains", operands)
    if value is NULL:
        return False
    literals = [literal.value for literal in operands]
    tests: dict[str, Callable[[], bool]] = {
        "=": lambda: value == literals[0],
        "!=": lambda: value != literals[0],
        "<": lambda: value < literals[0],
        "<=": lambda: value <= literals[0],
        ">": lambda: value > literals[0],
        ">=": lambda: value >= literals[0],
        "one_of": lambda: value in literals,
        "contains": lambda: any(str(literal) in str(value) for literal in literals),
        "starts_with": lambda: str(value).startswith(str(literals[0])),
        "ends_with": lambda: str(value).endswith(str(literals[0])),
    }
    return tests[op]()


def reduce(aggregate: Aggregate, rows: list[Row]) -> Any:
    if aggregate.function == "count":
        return len(rows)
    name = warehouse_name(aggregate.property_name or "")
    present = [row for row in rows if row[name] is not None]
    values = [row[name] for row in present]
    if aggregate.function == "unique_count":
        return len(set(values))
    if not values:
        return NULL
    if aggregate.function == "sum":
        return sum(values)
    if aggregate.function == "avg":
        return sum(values) / len(values)
    if aggregate.function == "min":
        return min(values)
    if aggregate.function == "max":
        return max(values)
    if aggregate.function in ("first", "last"):
        ordered = sorted(present, key=lambda row: (row["timestamp"], row["received_at"], row["id"]))
        return (ordered[0] if aggregate.function == "first" else ordered[-1])[name]
    if aggregate.function == "mode":
        counts = Counter(as_text(value) for value in values)
        best = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0]
        return best[0] if best[1] >= (aggregate.min_frequency or 1) else NULL
    if aggregate.function == "unique":
        return sorted({as_text(value) for value in values})
    raise AssertionError(aggregate.function)


def as_text(value: Any) -> str:
    return str(value)


def emails(rows: Iterable[tuple[Any, ...]]) -> dict[str, str | None]:
    return {row[0]: row[1] for row in rows}
