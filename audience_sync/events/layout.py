"""Where the events live: Segment's documented warehouse layout, and RudderStack's variant.

Both write one schema per source with the same tables:

    tracks        every track call (not read here: the per-event tables hold the same rows)
    <event>       one table per event, named by the snake_cased event name, with the columns
                  of `tracks` (`id`, `user_id`, `anonymous_id`, `timestamp`, `received_at`...)
                  plus one snake_cased column per property
    identifies    one row per identify call: `id`, `user_id`, `timestamp`, `received_at`,
                  one column per trait
    users         `id` (= identifies.user_id) and the latest trait columns (`email`...)

RudderStack's warehouse setting "Skip User Table" is on by default, so `users` may not exist:
with `kind="rudderstack"` the known users are the distinct `identifies.user_id`, and each trait
is the latest non-NULL value of its column in `identifies` per user. Everything that depends on
the layout is here, so a warehouse that differs is one class, not a change spread through the
compiler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from anyascii import anyascii

from audience_sync.errors import ConfigError

LayoutKind = Literal["segment", "rudderstack"]
KINDS: tuple[LayoutKind, ...] = ("segment", "rudderstack")

# Columns of every event table (and of `identifies`) that the compiler reads.
ID, USER_ID, TIMESTAMP, RECEIVED_AT = "id", "user_id", "timestamp", "received_at"
USERS, IDENTIFIES = "users", "identifies"
EMAIL = "email"


def warehouse_name(name: str) -> str:
    """The table or column name Segment's loader gives an event, property or trait name.

    Segment snake_cases with segmentio/go-snakecase: a word is a run of capitals and digits
    followed by a run of lowercase letters and digits, words are joined by `_`, and every
    other character separates words. So "Order Completed" -> `order_completed`, "orderId" ->
    `order_id`, "Base64Encode" -> `base64_encode`, "HTTPServer" -> `httpserver`. Non-ASCII
    letters are transliterated first (anyascii, as audience keys are: "Café" -> `cafe`);
    go-snakecase itself drops them, an uncertain detail kept to this one function.
    """
    text = anyascii(name)
    out: list[str] = []
    at, size = 0, len(text)
    # The prefix that is already snake case stays as it is (go-snakecase's fast path), except
    # that a digit right before a capital starts the next word.
    while at < size and (
        _lower_or_digit(text[at]) or (text[at] == "_" and at + 1 < size and _lower_or_digit(text[at + 1]))
    ):
        at += 1
    if at == size:
        return text
    if at > 0 and text[at - 1].isdigit():
        at -= 1
    word = text[:at]
    if word:
        out.append(word)
    while at < size:
        if not _ascii_alnum(text[at]):
            at += 1
            continue
        start = at
        while at < size and (("A" <= text[at] <= "Z") or text[at].isdigit()):
            at += 1
        while at < size and _lower_or_digit(text[at]):
            at += 1
        out.append(text[start:at].lower())
    return "_".join(out)


def _lower_or_digit(char: str) -> bool:
    return "a" <= char <= "z" or "0" <= char <= "9"


def _ascii_alnum(char: str) -> bool:
    return _lower_or_digit(char) or "A" <= char <= "Z"


@dataclass(frozen=True)
class WarehouseLayout:
    """The layout of the schema a source's events live in.

    `kind`: "segment" (a `users` table) or "rudderstack" (traits from `identifies`).
    `schema`: the warehouse schema (BigQuery: dataset) of the tables; None for the
    connection's default.
    """

    kind: LayoutKind = "segment"
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"events = {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.schema is not None and not self.schema.strip():
            raise ConfigError("schema: empty; leave it out for the connection's default schema")

    @property
    def has_users_table(self) -> bool:
        return self.kind == "segment"

    def table(self, name: str, *columns: str) -> sa.TableClause:
        """A lightweight table of the layout's schema with the named columns.

        Columns are untyped except the two timestamps, so that each comparison takes the type
        of its literal and each dialect renders the window bounds as timestamps.
        """
        return sa.table(name, *(_column(column) for column in dict.fromkeys(columns)), schema=self.schema)

    def event_table_name(self, event: str) -> str:
        return warehouse_name(event)

    def column_name(self, name: str) -> str:
        """The column of a property or a trait."""
        return warehouse_name(name)

    def qualified(self, table: str) -> str:
        return f"{self.schema}.{table}" if self.schema else table


def _column(name: str) -> sa.ColumnClause[object]:
    if name in (TIMESTAMP, RECEIVED_AT):
        return sa.column(name, sa.DateTime(timezone=True))
    return sa.column(name)
