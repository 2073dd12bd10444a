"""`audience-sync fields [--create]`: the Planhat custom field each audience and trait writes.

Per key: the model it lives on (contacts, parent `EndUser`, or companies, `Company`, per its
`level`), the type it needs (`snapshot.field_types`), and whether Planhat has it. With
`create`, each missing field is created (`POST /customfields`, once each: a retried create
could make two). An existing field is never changed or deleted: one of the wrong type is
reported with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config import AudienceSettings, Settings
from ..errors import PlanhatError
from ..planhat import PlanhatReader
from ..snapshot.field_types import field_type
from ..snapshot.sources import SourcePool

PARENTS = {"user": "EndUser", "account": "Company"}
SAME_TYPES = {"boolean": "checkbox"}  # what Planhat's list may call a checkbox


@dataclass
class FieldLine:
    key: str
    kind: str  # audience | trait
    level: str  # user | account
    parent: str  # EndUser | Company
    type: str  # the type it needs
    how: str  # why that type
    status: str  # ok | missing | wrong-type | created | failed
    found_type: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "created")


def fields(settings: Settings, *, create: bool = False, pool: SourcePool | None = None) -> list[FieldLine]:
    """One line per configured audience and trait; with `create`, missing fields created."""
    sources = pool or SourcePool(settings.sources)
    try:
        with PlanhatReader(settings.planhat) as reader:
            existing = reader.custom_fields()
            if existing is None:
                raise PlanhatError(
                    "Planhat does not list custom fields here (GET /customfields answered 404): "
                    "create them in Planhat's settings"
                )
            lines = [_line(audience, existing, sources) for audience in settings.audiences]
            if create:
                for line in lines:
                    if line.status == "missing":
                        _create(reader, line)
    finally:
        if pool is None:
            sources.close()
    return lines


def _line(audience: AudienceSettings, existing: list[dict[str, Any]], pool: SourcePool) -> FieldLine:
    parent = PARENTS[audience.level]
    wanted = field_type(pool, audience)
    line = FieldLine(audience.key, audience.kind, audience.level, parent, wanted.type, wanted.how, "missing")
    found = [f for f in existing if str(f.get("name")) == audience.key and _on(f, parent)]
    if not found:
        model = "contacts" if parent == "EndUser" else "companies"
        line.detail = (
            f"no custom field {audience.key!r} on {model}: `audience-sync fields --create` creates it"
        )
        return line
    kind = str(found[0].get("type") or "").lower()
    line.found_type = kind
    if SAME_TYPES.get(kind, kind) == wanted.type:
        line.status = "ok"
        return line
    line.status = "wrong-type"
    fix = f"declare type = {kind!r} on the trait" if audience.trait else "make it a checkbox"
    line.detail = (
        f"{audience.key!r} is a {kind!r} field, not {wanted.type!r} ({wanted.how}); left as it is: "
        f"in Planhat, delete it and run `audience-sync fields --create`, or {fix}"
    )
    return line


def _create(reader: PlanhatReader, line: FieldLine) -> None:
    field = {"name": line.key, "type": line.type, "parent": line.parent, "isHidden": False}
    try:
        created = reader.create_custom_field(field)
    except PlanhatError as exc:
        line.status = "failed"
        line.detail = f"{exc}; run `audience-sync fields` to see whether Planhat made it"
        return
    line.status, line.found_type = "created", str(created.get("type") or line.type)
    line.detail = f"created a {line.type} field on {line.parent} ({line.how})"


def _on(field: dict[str, Any], parent: str) -> bool:
    """A field of the model `parent`; one naming no parent is not ruled out."""
    given = field.get("parent")
    return given is None or re.sub(r"[^a-z]", "", str(given).lower()).rstrip("s") == parent.lower()
