"""The Planhat custom field type a key needs: a checkbox for an audience; for a computed trait
the `type` it declares, else one inferred from a sample of its values as the source gives them.

    number         every sampled value is a number
    checkbox       every sampled value is true or false
    date           every sampled value is a date or a timestamp (ISO 8601 text included)
    multipicklist  every sampled value is a list of text (Planhat's `list` holds one value)
    text           anything else, or a mix
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from ..config import AudienceSettings
from ..errors import SourceError
from ..state.database import driver_message
from .sources import SourcePool
from .values import UnusableValue, canonical, decode

SAMPLE = 200  # values read to infer a trait's type
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")


@dataclass(frozen=True)
class FieldType:
    type: str  # Planhat's: checkbox, number, text, date, multipicklist, ...
    how: str  # why this type: "an audience", "declared", "inferred from 200 values", ...


def field_type(pool: SourcePool, audience: AudienceSettings) -> FieldType:
    if not audience.trait:
        return FieldType("checkbox", "an audience is true or false")
    if audience.field_type is not None:
        return FieldType(audience.field_type, f"declared (type = {audience.field_type!r})")
    values = sample_values(pool, audience)
    if not values:
        return FieldType("text", "no values in the source yet to infer from: text (declare `type` to choose)")
    return FieldType(infer(values), f"inferred from {len(values)} of its values")


def sample_values(pool: SourcePool, audience: AudienceSettings, limit: int = SAMPLE) -> list[Any]:
    """Up to `limit` non-null values of the trait, decoded as they would be sent."""
    engine = pool.engine(audience.source)
    compiled = audience.compiled
    if compiled is not None:
        inner = compiled.select.subquery("sampled")
        parameters = compiled.params(datetime.now(UTC))
    else:
        inner = sa.text(audience.query.strip().rstrip(";")).columns().subquery("sampled")
        parameters = {}
    value: sa.ColumnClause[Any] = sa.literal_column("value")
    query = sa.select(value).select_from(inner).where(value.is_not(None)).limit(limit)
    try:
        with engine.connect() as connection:
            raw = [row[0] for row in connection.execute(query, parameters)]
    except sa.exc.DBAPIError as exc:
        raise SourceError(f"trait {audience.key!r}: the query failed: {driver_message(exc)}") from exc
    found = []
    for item in raw:
        try:
            text = canonical(compiled.decode_value(item) if compiled is not None else item)
        except UnusableValue:
            continue
        if text is not None:
            found.append(decode(text))
    return found


def infer(values: list[Any]) -> str:
    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "checkbox"
        if isinstance(value, int | float):
            return "number"
        if isinstance(value, list):
            return "multipicklist"
        if isinstance(value, str) and _ISO_DATE.match(value):
            return "date"
        return "text"

    kinds = {kind(value) for value in values}
    return kinds.pop() if len(kinds) == 1 else "text"
