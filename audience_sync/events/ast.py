"""The parsed form of a definition: frozen dataclasses, so equal parts compare and hash equal.

The compiler relies on that: two aggregates over the same stream (event, filter, window)
share one GROUP BY, and an audience inlined twice adds no second join. Positions (`at`) are
kept for error messages only and take no part in equality.

    Condition   Compare | And | Or | Not | AudienceRef          (an audience's `condition`)
    Value       Aggregate | Trait                               (a trait's `value`)
    Compare     subject (Aggregate | Trait | Property) op operands
    Aggregate   function over a Stream, of a property (all but count)
    Stream      event name, optional `where` filter (a Condition over Property), optional Window
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal as TypingLiteral

Position = tuple[int, int]  # (line, column), both from 1
NOWHERE: Position = (0, 0)

LiteralKind = TypingLiteral["text", "number", "boolean"]


@dataclass(frozen=True)
class Literal:
    """A constant. `kind` keeps `true` and `1` apart (Python holds them equal)."""

    value: str | int | float | bool
    kind: LiteralKind


@dataclass(frozen=True)
class Window:
    """Events with `as_of - far <= timestamp < as_of - near` (half open: consecutive windows
    never share an event). `within(N)` is `near = 0`, `far = N`; `between(A, B)` is A to B ago."""

    near: timedelta
    far: timedelta


@dataclass(frozen=True)
class Property:
    """An event property, in a `where` filter or as an aggregate's argument."""

    name: str
    at: Position = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class Trait:
    """The user's current trait: the users table's column (RudderStack: latest identify)."""

    name: str
    at: Position = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class Stream:
    """The rows of one event table, filtered: what an aggregate reduces per user."""

    event: str
    where: Condition | None = None
    window: Window | None = None


AggregateFunction = TypingLiteral[
    "count", "sum", "avg", "min", "max", "first", "last", "mode", "unique", "unique_count"
]
# Functions that reduce a property (all but count). unique_count is `unique(p).count()`.
PROPERTY_FUNCTIONS: frozenset[str] = frozenset(
    {"sum", "avg", "min", "max", "first", "last", "mode", "unique", "unique_count"}
)


@dataclass(frozen=True)
class Aggregate:
    """`function` of the property `property_name` over `stream`, per user. `min_frequency`:
    mode's second argument (the winner must occur at least that often)."""

    stream: Stream
    function: AggregateFunction
    property_name: str | None = None
    min_frequency: int | None = None
    at: Position = field(default=NOWHERE, compare=False, repr=False)

    @property
    def is_list(self) -> bool:
        return self.function == "unique"


Scalar = Aggregate | Trait | Property
Value = Aggregate | Trait

CompareOp = TypingLiteral[
    "=", "!=", "<", "<=", ">", ">=",
    "exists", "absent", "contains", "omits", "starts_with", "ends_with", "one_of",
]  # fmt: skip


@dataclass(frozen=True)
class Compare:
    """`subject op operands`: a comparison never yields NULL. A subject with no value (NULL)
    makes every comparison false except `absent` (and `omits`, which is `not contains`)."""

    subject: Scalar
    op: CompareOp
    operands: tuple[Literal, ...] = ()
    at: Position = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class And:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    item: Condition


@dataclass(frozen=True)
class AudienceRef:
    """Membership of another audience of the same source, by its key."""

    key: str
    at: Position = field(default=NOWHERE, compare=False, repr=False)


Condition = Compare | And | Or | Not | AudienceRef
Definition = Condition | Value


Node = Condition | Aggregate | Trait | Property | Stream


def walk(node: Node) -> list[Node]:
    """Every node under `node` (itself first), filters of streams included."""
    found: list[Node] = []
    pending: list[Node] = [node]
    while pending:
        item = pending.pop()
        found.append(item)
        if isinstance(item, And | Or):
            pending.extend(reversed(item.items))
        elif isinstance(item, Not):
            pending.append(item.item)
        elif isinstance(item, Compare):
            pending.append(item.subject)
        elif isinstance(item, Aggregate):
            pending.append(item.stream)
        elif isinstance(item, Stream) and item.where is not None:
            pending.append(item.where)
    return found


def referenced_audiences(definition: Definition) -> tuple[str, ...]:
    """The keys of the audiences a definition names, in order of first mention."""
    keys = [node.key for node in walk(definition) if isinstance(node, AudienceRef)]
    return tuple(dict.fromkeys(keys))
