"""Audiences and traits defined on events (`condition`, `value`), compiled when the config loads.

Each definition is compiled once, over its source's warehouse layout, to the query a run executes
(`events.compile_audience` / `compile_trait`); `audience('key')` resolves to another audience of
the same source (an SQL one as a subquery, an event one inlined). Whatever is wrong (a reference
to an audience on another source, to a trait, to no audience, or a cycle) stops the load with one
line that names the file, the entry and the audiences involved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from ..errors import ConfigError
from .settings import AudienceSettings, SourceSettings

if TYPE_CHECKING:
    from ..events import LayoutKind, Resolver

DEFINITION_FIELDS = {"audience": "condition", "trait": "value"}
EVENT_LAYOUTS = ("segment", "rudderstack")


def compile_definitions(
    entries: Sequence[AudienceSettings], sources: dict[str, SourceSettings], origin: str
) -> list[AudienceSettings]:
    """The entries, those defined on events with their compiled query."""
    if not any(entry.definition for entry in entries):
        return list(entries)
    from ..events import (
        EventAudience,
        Referenced,
        SqlAudience,
        WarehouseLayout,
        compile_audience,
        compile_trait,
        parse_condition,
        parse_value,
    )

    by_key = {entry.key: entry for entry in entries}

    def resolver(here: AudienceSettings) -> Resolver:
        def resolve(key: str) -> Referenced | None:
            found = by_key.get(key)
            if found is None:
                return None
            if found.trait:
                raise ConfigError(f"audience({key!r}) in {here.name!r} names a trait, not an audience")
            if found.source != here.source:
                raise ConfigError(
                    f"audience({key!r}) in {here.name!r} (source {here.source!r}) names {found.name!r} on "
                    f"source {found.source!r}: audience() works within one source"
                )
            if found.definition is None:
                return SqlAudience(found.query)
            return EventAudience(parse_condition(found.definition))

        return resolve

    compiled = []
    for index, entry in enumerate(entries):
        if entry.definition is None:
            compiled.append(entry)
            continue
        source = sources[entry.source]
        field_name = DEFINITION_FIELDS[entry.kind]
        where = (
            f"{origin}: {'traits' if entry.trait else 'audiences'}[{_position(entries, index)}].{field_name}"
        )
        try:
            layout = WarehouseLayout(cast("LayoutKind", source.events), source.schema)
            if entry.trait:
                query = compile_trait(parse_value(entry.definition), layout)
            else:
                condition = parse_condition(entry.definition)
                query = compile_audience(condition, layout, key=entry.key, resolve=resolver(entry))
        except ConfigError as exc:
            raise ConfigError(
                f"{where}: {entry.name!r}: {str(exc).removeprefix(field_name + ': ')}"
            ) from None
        compiled.append(dataclasses.replace(entry, compiled=query))
    return compiled


def _position(entries: Sequence[AudienceSettings], index: int) -> int:
    """The entry's index within its own section ([[audiences]] or [[traits]])."""
    kind = entries[index].kind
    return sum(1 for entry in entries[:index] if entry.kind == kind)
