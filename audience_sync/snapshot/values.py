"""A computed trait's values: normalised to canonical JSON text before they are compared.

`1` and `1.0` from two drivers are both `1`; a timestamp read in two time zones is the same
UTC instant (`"2026-11-23T10:00:00Z"`); a date is `"2026-11-23"`; text and lists of text are
JSON strings and arrays. The diff compares this text, and delivery decodes it for the payload.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

MAX_TEXT = 1024  # characters in a text value, and in each item of a list
MAX_LIST = 100  # items in a list value
NULL = "null"  # the pending value that clears the field in Planhat


class UnusableValue(ValueError):
    """A value a trait cannot carry; the row is skipped and counted like a bad identifier."""


def canonical(value: Any) -> str | None:
    """The value as canonical JSON text, or None when the row has no value (NULL).

    Integers and integral decimals become integers; other numbers their shortest float text;
    timestamps ISO 8601 in UTC (naive ones are taken as UTC), dates `YYYY-MM-DD`.
    """
    if value is None:
        return None
    if value.__class__ is str:
        if len(value) > MAX_TEXT:
            raise UnusableValue(f"text of {len(value)} characters (at most {MAX_TEXT})")
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        return _number(value)
    if isinstance(value, datetime):
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return '"' + moment.replace(tzinfo=None).isoformat() + 'Z"'
    if isinstance(value, date):
        return '"' + value.isoformat() + '"'
    if isinstance(value, str):  # a str subclass
        return canonical(str(value))
    if isinstance(value, list | tuple):
        return _text_list(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise UnusableValue("binary data")
    raise UnusableValue(f"a value of type {type(value).__name__} (a nested object?)")


def _number(value: float | Decimal) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise UnusableValue(f"the number {value}")
        if value == value.to_integral_value():
            return str(int(value))
        value = float(value)
    if not math.isfinite(value):
        raise UnusableValue(f"the number {value}")
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _text_list(items: list[Any] | tuple[Any, ...]) -> str:
    if len(items) > MAX_LIST:
        raise UnusableValue(f"a list of {len(items)} items (at most {MAX_LIST})")
    for item in items:
        if not isinstance(item, str):
            raise UnusableValue(f"a list holding {type(item).__name__} (lists carry text only)")
        if len(item) > MAX_TEXT:
            raise UnusableValue(f"a list item of {len(item)} characters (at most {MAX_TEXT})")
    return orjson.dumps([str(item) for item in items]).decode()


def decode(value_json: str) -> Any:
    return orjson.loads(value_json)
