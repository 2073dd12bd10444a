"""The `changes` table: one row per change sent, with its outcome; pruned after
history.retention_days (run records in `runs` are kept)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import models as m

COLUMNS = "run_id, audience_key, user_ref, value, value_json, outcome, error, at"


def log_delivered_from_outbox(
    connection: Connection, chosen: str, run_id: str, params: dict[str, Any]
) -> None:
    """Log the accepted outbox rows `pending p WHERE {chosen}` as delivered (SQLite)."""
    connection.execute(
        sa.text(
            f"INSERT INTO changes ({COLUMNS}) "
            f"SELECT {run_id}, p.audience_key, p.user_ref, p.value, p.value_json, 'delivered', NULL, :now "
            f"FROM pending p WHERE {chosen}"
        ).bindparams(sa.bindparam("now", type_=m.UTCDateTime)),
        params,
    )


def log_delivered_sql(done: str) -> str:
    """The final INSERT of PostgreSQL's one-statement acknowledgement: log the rows of the CTE
    `done` (deleted outbox rows with their run id) as delivered."""
    return (
        f"INSERT INTO changes ({COLUMNS}) "
        "SELECT p.run_id, p.audience_key, p.user_ref, p.value, p.value_json, 'delivered', NULL, :now "
        f"FROM {done} p"
    )


def log(connection: Connection, entries: list[dict[str, Any]]) -> None:
    """Log changes one row each (refusals and changes in doubt, usually few)."""
    if entries:
        connection.execute(m.changes.insert(), entries)


def prune(connection: Connection, older_than: datetime, limit: int | None = None) -> int:
    """Delete per-change history recorded before `older_than`, at most `limit` rows (None:
    all). Returns how many rows were deleted."""
    condition = m.changes.c.at < older_than
    if limit is None:
        statement = m.changes.delete().where(condition)
    else:
        batch = sa.select(m.changes.c.id).where(condition).limit(limit)
        statement = m.changes.delete().where(m.changes.c.id.in_(batch))
    return connection.execute(statement).rowcount or 0


COMPOUND_TERMS = 250  # SELECTs per UNION ALL: SQLite allows 500 by default


def samples(
    connection: Connection, runs: list[dict[str, Any]], per_run: int
) -> dict[int, list[dict[str, Any]]]:
    """Up to `per_run` recorded changes of each run, its failures and changes in doubt first.

    A UNION ALL of one LIMITed index lookup (ix_changes_run_id) per run, so a run of a
    million changes costs as little as one of ten; one statement per 250 lookups."""
    c = m.changes.c
    columns = (c.id, c.run_id, c.user_ref, c.value, c.outcome, c.error, c.at)
    parts = []
    for run in runs:
        parts.append(sa.select(*columns).where(c.run_id == run["id"]).limit(per_run))
        if run["failed"] or run["in_doubt"]:
            failures = sa.select(*columns).where(c.run_id == run["id"], c.outcome != "delivered")
            parts.append(failures.limit(per_run))
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for first in range(0, len(parts), COMPOUND_TERMS):
        # SQLite takes no LIMIT inside a compound SELECT, only in a subquery.
        union = sa.union_all(*(sa.select(part.subquery()) for part in parts[first : first + COMPOUND_TERMS]))
        for row in connection.execute(union):
            found.setdefault(row.run_id, {})[row.id] = dict(row._mapping)
    result = {}
    for run_id, changes in found.items():
        ordered = sorted(changes.values(), key=lambda ch: (ch["outcome"] == "delivered", ch["id"]))
        result[run_id] = ordered[:per_run]
    return result
