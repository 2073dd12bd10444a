"""Staging a snapshot and diffing it against the baseline, set-based, in the state database.

A run streams its members into a temporary heap table (`stage_raw`, in source order, no
index: appending is all the database does per row, by COPY on PostgreSQL and executemany on
SQLite). One sorted INSERT ... SELECT then builds `stage_members`, keyed on user_ref (user_id
when known, else email), keeping the first row of a user listed twice. Sorting once beats
keeping an index up to date row by row when the source's order is not the key's, and leaves
the stage in key order, so the joins below and the outbox writes walk the indexes in order.
Then one transaction:

* measures: members, entered (staged but not in baseline), exited (baseline but not staged);
* rewrites the audience's outbox (`pending`) so that it holds exactly what Planhat still has
  to be told: stale entries dropped (a pending `true` whose user left again, a pending
  `false` whose user came back), entries `true` upserted for entered users (every member on
  a full sync), entries `false` upserted for exited users.

Both tables are TEMPORARY: the state database never grows by a snapshot. Nothing here holds
an audience in Python: memory is one chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import UTCDateTime
from .sources import MEMBER_FIELDS, Member

STAGE = "stage_members"
RAW = "stage_raw"
_RAW_COLUMNS = ", ".join(MEMBER_FIELDS)


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
    drop_stage(connection)
    sqlite = connection.dialect.name == "sqlite"
    text, key = ("TEXT", "TEXT") if sqlite else ("VARCHAR(1024)", "VARCHAR(255)")
    # SQLite: the heap's rowid is the arrival order. PostgreSQL: a heap's physical order is not
    # guaranteed, so an identity column records it.
    seq = "" if sqlite else "seq BIGINT GENERATED ALWAYS AS IDENTITY, "
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {RAW} ({seq}user_id {key}, email {key}, name {text}, "
        f"title {text}, company_id {key})"
    )
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {STAGE} ("
        f"user_ref {key} NOT NULL PRIMARY KEY, user_id {key}, email {key}, "
        f"name {text}, title {text}, company_id {key})" + (" WITHOUT ROWID" if sqlite else "")
    )


def drop_stage(connection: Connection) -> None:
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {RAW}")
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {STAGE}")


def load_stage(
    connection: Connection,
    chunks: Iterable[list[Member]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stage every member; the first row of a duplicated user wins. Returns rows given.

    `progress`, when given, is told how many rows each chunk added.
    """
    if connection.dialect.name == "postgresql":
        given = _copy_raw(connection, chunks, progress)
        connection.exec_driver_sql(
            f"INSERT INTO {STAGE} (user_ref, {_RAW_COLUMNS}) "
            f"SELECT DISTINCT ON (user_ref) coalesce(user_id, email) AS user_ref, {_RAW_COLUMNS} "
            f"FROM {RAW} ORDER BY user_ref, seq"
        )
        connection.exec_driver_sql(f"DROP TABLE {RAW}")
        connection.exec_driver_sql(f"ANALYZE {STAGE}")  # autovacuum never sees temp tables
        return given
    given = 0
    insert = f"INSERT INTO {RAW} ({_RAW_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
    for chunk in chunks:
        if chunk:
            connection.exec_driver_sql(insert, chunk)  # type: ignore[arg-type]
            given += len(chunk)
            if progress:
                progress(len(chunk))
    connection.exec_driver_sql(
        f"INSERT INTO {STAGE} (user_ref, {_RAW_COLUMNS}) "
        f"SELECT coalesce(user_id, email), {_RAW_COLUMNS} FROM {RAW} "
        "WHERE TRUE ORDER BY coalesce(user_id, email), rowid "
        "ON CONFLICT (user_ref) DO NOTHING"
    )
    connection.exec_driver_sql(f"DROP TABLE {RAW}")
    return given


def _copy_raw(
    connection: Connection, chunks: Iterable[list[Member]], progress: Callable[[int], None] | None
) -> int:
    """COPY the members into the raw stage through psycopg, inside the connection's transaction."""
    driver = connection.connection.driver_connection
    given = 0
    with driver.cursor() as cursor, cursor.copy(f"COPY {RAW} ({_RAW_COLUMNS}) FROM STDIN") as copy:  # type: ignore[union-attr]
        write = copy.write_row
        for chunk in chunks:
            for member in chunk:
                write(member)
            given += len(chunk)
            if progress and chunk:
                progress(len(chunk))
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
