"""Staging a snapshot and diffing it against the baseline, set-based, in the state database.

A run streams its members into a temporary table (`stage_members`, keyed on user_ref, so
duplicates collapse), then one transaction:

* measures: members, entered (staged but not in baseline), exited (baseline but not staged);
* rewrites the audience's outbox (`pending`) so that it holds exactly what Planhat still has
  to be told: stale entries dropped (a pending `true` whose user left again, a pending
  `false` whose user came back), entries `true` upserted for entered users (every member on
  a full sync), entries `false` upserted for exited users.

Nothing here holds an audience in Python: memory is one chunk of rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import UTCDateTime
from .sources import Member

STAGE = "stage_members"
_STAGE_COLUMNS = "user_ref, user_id, email, name, title, company_id"


@dataclass(frozen=True)
class DiffCounts:
    members: int  # distinct users staged
    previous: int  # users Planhat has as `true` (the baseline)
    entered: int
    exited: int

    @property
    def exit_fraction(self) -> float:
        return self.exited / self.previous if self.previous else 0.0


def create_stage(connection: Connection) -> None:
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {STAGE}")
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {STAGE} ("
        "user_ref VARCHAR(255) NOT NULL PRIMARY KEY, user_id VARCHAR(255), email VARCHAR(255), "
        "name VARCHAR(1024), title VARCHAR(1024), company_id VARCHAR(255))"
    )


def drop_stage(connection: Connection) -> None:
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {STAGE}")


def load_stage(connection: Connection, chunks: Iterable[list[Member]]) -> int:
    """Bulk-insert chunks of members; the first row of a duplicated user wins. Returns rows given."""
    marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {STAGE} ({_STAGE_COLUMNS}) VALUES ({', '.join([marker] * 6)}) "
        "ON CONFLICT (user_ref) DO NOTHING"
    )
    given = 0
    for chunk in chunks:
        if chunk:
            connection.exec_driver_sql(sql, chunk)  # type: ignore[arg-type]
            given += len(chunk)
    return given


def measure(connection: Connection, key: str) -> DiffCounts:
    members = connection.exec_driver_sql(f"SELECT count(*) FROM {STAGE}").scalar_one()
    previous = connection.execute(
        sa.text("SELECT count(*) FROM baseline WHERE audience_key = :key"), {"key": key}
    ).scalar_one()
    entered = connection.execute(
        sa.text(
            f"SELECT count(*) FROM {STAGE} s WHERE NOT EXISTS ("
            "SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref)"
        ),
        {"key": key},
    ).scalar_one()
    # Members also in the baseline are members - entered; the rest of the baseline exited.
    exited = previous - (members - entered)
    return DiffCounts(members=members, previous=previous, entered=entered, exited=exited)


_DROP_STALE = sa.text(
    f"""
    DELETE FROM pending WHERE audience_key = :key AND (
        (value = TRUE AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref))
        OR (value = FALSE AND EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref))
    )
    """
)

_UPSERT = """
    ON CONFLICT (audience_key, user_ref) DO UPDATE SET
        value = excluded.value, user_id = excluded.user_id, email = excluded.email,
        name = excluded.name, title = excluded.title, company_id = excluded.company_id,
        run_id = excluded.run_id, queued_at = excluded.queued_at
"""

_QUEUE_ENTRIES = f"""
    INSERT INTO pending (audience_key, user_ref, value, user_id, email, name, title, company_id,
                         run_id, queued_at, attempts)
    SELECT :key, s.user_ref, TRUE, s.user_id, s.email, s.name, s.title, s.company_id,
           :run_id, :now, 0
    FROM {STAGE} s
    WHERE {{condition}}
    {_UPSERT}
"""
_ENTERED = "NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref)"
_EVERY_MEMBER = "TRUE"  # a WHERE clause keeps SQLite from reading ON CONFLICT as a join

# Typed parameters: PostgreSQL cannot infer a type for a bare parameter in a SELECT list.
_PARAMS = (
    sa.bindparam("key", type_=sa.String),
    sa.bindparam("run_id", type_=sa.Integer),
    sa.bindparam("now", type_=UTCDateTime),
)

_QUEUE_EXITS = sa.text(
    f"""
    INSERT INTO pending (audience_key, user_ref, value, user_id, email, name, title, company_id,
                         run_id, queued_at, attempts)
    SELECT :key, b.user_ref, FALSE, b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
    FROM baseline b
    WHERE b.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = b.user_ref)
    {_UPSERT}
    """
).bindparams(*_PARAMS)


def queue_changes(connection: Connection, key: str, run_id: int | None, now: datetime, *, full: bool) -> None:
    """Rewrite the audience's outbox from the staged snapshot (inside the caller's transaction)."""
    params = {"key": key, "run_id": run_id, "now": now}
    connection.execute(_DROP_STALE, {"key": key})
    condition = _EVERY_MEMBER if full else _ENTERED
    entries = sa.text(_QUEUE_ENTRIES.format(condition=condition)).bindparams(*_PARAMS)
    connection.execute(entries, params)
    connection.execute(_QUEUE_EXITS, params)
