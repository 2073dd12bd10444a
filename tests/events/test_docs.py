"""docs/events.md shows, under each example definition, the SQL it compiles to on PostgreSQL.
Those blocks are generated, never written by hand: this test regenerates each one and fails
when the file differs; `AUDIENCE_SYNC_UPDATE_GOLDEN=1` rewrites it.

An example is a fenced block whose info string is `condition` or `value` (then optionally
`rudderstack`), followed by a fenced `sql` block.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.dialects import postgresql

from audience_sync.events import (
    EventAudience,
    Referenced,
    SqlAudience,
    WarehouseLayout,
    compile_audience,
    compile_trait,
    parse_condition,
    parse_value,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"
UPDATE = os.environ.get("AUDIENCE_SYNC_UPDATE_GOLDEN") == "1"  # read before the autouse fixture clears it
EXAMPLE = re.compile(r"```(condition|value)( rudderstack)?\n(.*?)\n```\n\n```sql\n(.*?)```", re.DOTALL)
# The audiences the examples refer to, as docs/events.md describes them.
REFERENCED: dict[str, Referenced] = {
    "churned": SqlAudience("SELECT user_id FROM prod.churn_scores WHERE score > 0.8"),
    "buyers": EventAudience(parse_condition("event('Order Completed').within(30 days).count() >= 1")),
}


def compiled(kind: str, rudderstack: str, definition: str) -> str:
    layout = WarehouseLayout("rudderstack" if rudderstack else "segment", "prod")
    if kind == "condition":
        query = compile_audience(parse_condition(definition), layout, key="example", resolve=REFERENCED.get)
    else:
        query = compile_trait(parse_value(definition), layout)
    return query.render(postgresql.dialect()).strip() + "\n"


def regenerate(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, rudderstack, definition, _ = match.groups()
        sql = compiled(kind, rudderstack or "", definition)
        return f"```{kind}{rudderstack or ''}\n{definition}\n```\n\n```sql\n{sql}```"

    return EXAMPLE.sub(replace, text)


def test_the_sql_in_the_docs_is_what_the_compiler_makes() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert len(EXAMPLE.findall(text)) >= 20
    current = regenerate(text)
    if UPDATE:
        DOC.write_text(current, encoding="utf-8")
    assert current == text, "docs/events.md is stale: run with AUDIENCE_SYNC_UPDATE_GOLDEN=1"
