"""Staging a snapshot and diffing it against the baseline, set-based, in the state database.

A run streams its members into a temporary heap table (`stage_raw`, in source order, no
index: appending is all the database does per row; COPY on PostgreSQL, one statement per
chunk on SQLite). One sorted INSERT ... SELECT then builds `stage_members`, keyed on user_ref
(user_id when known, else email), keeping the first row of a user listed twice. Sorting once
beats keeping an index up to date row by row when the source's order is not the key's, and
leaves the stage in key order, so the joins below and the outbox writes walk the indexes in
order. Then one transaction:

* measures: members, entered (staged but not in baseline), exited (baseline but not staged);
  the entered rows are kept aside (`stage_entered`) for the next step;
* rewrites the audience's outbox (`pending`) so that it holds exactly what Planhat still has
  to be told: stale entries dropped (a pending `true` whose user left again, a pending
  `false` whose user came back), entries `true` upserted for entered users (every member on
  a full sync), entries `false` upserted for exited users.

An entry in doubt (sent, no definite answer: Planhat may hold its value) is never dropped as
stale: Planhat may hold the very value the truth has moved away from. It is set to the truth
instead (`true` for a member, `false` otherwise) and sent again, even when the truth moved
back to the value sent: Planhat may not have it.

Every staging table is TEMPORARY: the state database never grows by a snapshot. Nothing here
holds an audience in Python: memory is a few chunks of rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from queue import Full, Queue
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import UTCDateTime
from .sources import MEMBER_FIELDS, Member, frozen_gc

log = logging.getLogger("audience_sync.diff")

STAGE = "stage_members"
RAW = "stage_raw"
ENTERED = "stage_entered"  # the staged rows not in the baseline, kept by measure() for queue_changes()
ANALYZE_AFTER = 10_000  # rows written in one go before PostgreSQL's statistics are refreshed
_ENTERED_FOR = "audience_sync.stage_entered_for"  # connection.info: the audience ENTERED was measured for
_RAW_COLUMNS = ", ".join(MEMBER_FIELDS)
# A computed trait's members carry one more field, its value as canonical JSON (traits.py);
# an audience's stage leaves the column NULL.
VALUE_FIELD = "value"
_STAGE_COLUMNS = f"{_RAW_COLUMNS}, {VALUE_FIELD}"


@dataclass(frozen=True)
class DiffCounts:
    members: int  # distinct users staged
    previous: int  # users Planhat has as `true` (the baseline)
    entered: int
    exited: int
    resent: int = 0  # users whose value goes out again because they have a new identifier

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
        f"title {text}, company_id {key}, {VALUE_FIELD} TEXT)"
    )
    for table in (STAGE, ENTERED):
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {table} ("
            f"user_ref {key} NOT NULL PRIMARY KEY, user_id {key}, email {key}, "
            f"name {text}, title {text}, company_id {key}, {VALUE_FIELD} TEXT)"
            + (" WITHOUT ROWID" if sqlite else "")
        )


def drop_stage(connection: Connection) -> None:
    connection.info.pop(_ENTERED_FOR, None)
    for table in (RAW, STAGE, ENTERED):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def load_stage(
    connection: Connection,
    chunks: Iterable[list[Member]],
    progress: Callable[[int], None] | None = None,
    *,
    with_value: bool = False,
) -> int:
    """Stage every member; the first row of a duplicated user wins. Returns rows given.
    `with_value`: the members are a computed trait's, with the value as a last field.

    A helper thread reads the source a chunk or two ahead. PostgreSQL: one COPY, which the
    server consumes in its own process. SQLite works inside this process: it writes each
    chunk as one statement over a JSON array, and so runs without the GIL for the whole chunk
    (executemany takes the GIL back for every row, which stalls the reader). `progress`, when
    given, is told how many rows each chunk added; without it, a long load logs a line every
    STAGING_LOG_SECONDS.
    """
    if progress is None:
        progress = _StagingLog()
    with frozen_gc():
        if connection.dialect.name == "postgresql":
            given = _copy_raw(connection, chunks, progress, with_value)
            # Built in one go and indexed afterwards: a third faster than inserting into the
            # keyed table.
            connection.exec_driver_sql(f"DROP TABLE {STAGE}")
            connection.exec_driver_sql(
                f"CREATE TEMPORARY TABLE {STAGE} AS "
                f"SELECT DISTINCT ON (user_ref) coalesce(user_id, email) AS user_ref, {_STAGE_COLUMNS} "
                f"FROM {RAW} ORDER BY user_ref, seq"
            )
            connection.exec_driver_sql(f"ALTER TABLE {STAGE} ADD PRIMARY KEY (user_ref)")
            connection.exec_driver_sql(f"DROP TABLE {RAW}")
            connection.exec_driver_sql(f"ANALYZE {STAGE}")  # autovacuum never sees temp tables
            return given
        given = 0
        width = len(MEMBER_FIELDS) + with_value
        fields = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(width))
        columns = _STAGE_COLUMNS if with_value else _RAW_COLUMNS
        insert = f"INSERT INTO {RAW} ({columns}) SELECT {fields} FROM json_each(?)"
        cursor = connection.connection.cursor()
        try:
            for chunk in read_ahead(chunks):
                if chunk:
                    cursor.execute(insert, (orjson.dumps(chunk).decode(),))
                    given += len(chunk)
                    progress(len(chunk))
        finally:
            cursor.close()
        connection.exec_driver_sql(
            f"INSERT INTO {STAGE} (user_ref, {_STAGE_COLUMNS}) "
            f"SELECT coalesce(user_id, email), {_STAGE_COLUMNS} FROM {RAW} "
            "WHERE TRUE ORDER BY coalesce(user_id, email), rowid "
            "ON CONFLICT (user_ref) DO NOTHING"
        )
        connection.exec_driver_sql(f"DROP TABLE {RAW}")
        return given


STAGING_LOG_SECONDS = 10.0


class _StagingLog:
    """A heartbeat for loads of millions of rows: one log line every STAGING_LOG_SECONDS."""

    def __init__(self) -> None:
        self.rows = 0
        self._started = self._last = time.monotonic()

    def __call__(self, count: int) -> None:
        self.rows += count
        now = time.monotonic()
        if now - self._last >= STAGING_LOG_SECONDS:
            self._last = now
            log.info("staged %d rows (%.0f/s)", self.rows, self.rows / (now - self._started))


_END = object()


def read_ahead(chunks: Iterable[list[Member]], depth: int = 2) -> Iterator[list[Member]]:
    """Iterate `chunks` in a helper thread, at most `depth` chunks ahead, so memory stays a few
    chunks. An error in the helper is raised here; leaving early stops the helper after the
    chunk it is reading, which then closes the source."""
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        iterator = iter(chunks)
        try:
            for chunk in iterator:
                if not put(chunk):
                    break
            else:
                put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    helper = threading.Thread(target=work, name="audience-sync-source", daemon=True)
    helper.start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        helper.join()


def _copy_raw(
    connection: Connection,
    chunks: Iterable[list[Member]],
    progress: Callable[[int], None],
    with_value: bool = False,
) -> int:
    """COPY the members into the raw stage through psycopg, inside the connection's transaction.
    The source is read a chunk or two ahead, as on SQLite: its driver steps without the GIL
    while this thread formats rows (a tenth off the staging of a million)."""
    driver = connection.connection.driver_connection
    given = 0
    columns = _STAGE_COLUMNS if with_value else _RAW_COLUMNS
    with driver.cursor() as cursor, cursor.copy(f"COPY {RAW} ({columns}) FROM STDIN") as copy:  # type: ignore[union-attr]
        write = copy.write_row
        for chunk in read_ahead(chunks):
            for member in chunk:
                write(member)
            given += len(chunk)
            if chunk:
                progress(len(chunk))
    return given


def measure(connection: Connection, key: str) -> DiffCounts:
    """Count members, entered and exited. The entered rows are kept aside (ENTERED), so that
    queue_changes() does not walk the whole stage against the baseline a second time."""
    members = connection.exec_driver_sql(f"SELECT count(*) FROM {STAGE}").scalar_one()
    previous = connection.execute(
        sa.text("SELECT count(*) FROM baseline WHERE audience_key = :key"), {"key": key}
    ).scalar_one()
    connection.info.pop(_ENTERED_FOR, None)
    connection.exec_driver_sql(f"DELETE FROM {ENTERED}")
    if previous == 0:  # a first sync: everyone enters, and a full sync queues the stage itself
        entered = members
    else:
        # Kept aside: the users not in the baseline, and those in it under other identifiers
        # (a new email, say), whose `true` is sent again.
        entered = connection.execute(
            sa.text(
                f"INSERT INTO {ENTERED} SELECT * FROM {STAGE} s WHERE NOT EXISTS ("
                "SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref "
                f"AND {SAME_IDS})"
            ),
            {"key": key},
        ).rowcount
        connection.info[_ENTERED_FOR] = key
        resent = count_in_baseline(connection, key)
        # Members also in the baseline are members - entered; the rest of the baseline exited.
        exited = previous - (members - (entered - resent))
        return DiffCounts(members, previous, entered - resent, exited, resent)
    exited = previous - (members - entered)
    return DiffCounts(members=members, previous=previous, entered=entered, exited=exited)


# The baseline row was told under the staged user's email (its user_id is its user_ref, or
# there is none). A user whose ref changed is kept aside anyway: not in the baseline.
SAME_IDS = "(b.email = s.email OR (b.email IS NULL AND s.email IS NULL))"


def count_in_baseline(connection: Connection, key: str) -> int:
    """Of the rows kept aside in ENTERED, those whose user is in the baseline (few)."""
    return connection.execute(
        sa.text(
            f"SELECT count(*) FROM {ENTERED} s WHERE EXISTS (SELECT 1 FROM baseline b "
            "WHERE b.audience_key = :key AND b.user_ref = s.user_ref)"
        ),
        {"key": key},
    ).scalar_one()


_DROP_STALE = sa.text(
    f"""
    DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt AND (
        (value = TRUE AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref))
        OR (value = FALSE AND EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref))
    )
    """
)

# In-doubt entries (few: the partial index ix_pending_in_doubt finds them) follow the truth.
_DOUBT_TO_FALSE = sa.text(
    f"""
    UPDATE pending SET value = FALSE, name = NULL, title = NULL, company_id = NULL,
        run_id = :run_id, queued_at = :now
    WHERE audience_key = :key AND in_doubt AND value = TRUE
      AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref)
    """
)
_DOUBT_TO_TRUE = sa.text(
    f"""
    UPDATE pending SET value = TRUE,
        user_id = (SELECT s.user_id FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        email = (SELECT s.email FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        name = (SELECT s.name FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        title = (SELECT s.title FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        company_id = (SELECT s.company_id FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        run_id = :run_id, queued_at = :now
    WHERE audience_key = :key AND in_doubt AND value = FALSE
      AND EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref)
    """
)

_UPSERT = """
    ON CONFLICT (audience_key, user_ref) DO UPDATE SET
        value = excluded.value, user_id = excluded.user_id, email = excluded.email,
        name = excluded.name, title = excluded.title, company_id = excluded.company_id,
        run_id = excluded.run_id, queued_at = excluded.queued_at
"""

_QUEUE_ENTRIES = """
    INSERT INTO pending (audience_key, user_ref, value, user_id, email, name, title, company_id,
                         run_id, queued_at, attempts)
    SELECT :key, s.user_ref, TRUE, s.user_id, s.email, s.name, s.title, s.company_id,
           :run_id, :now, 0
    FROM {table} s
    WHERE {condition}
    {upsert}
"""
_NOT_IN_BASELINE = (
    "NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref "
    f"AND {SAME_IDS})"
)
_EVERY_ROW = "TRUE"  # a WHERE clause keeps SQLite from reading ON CONFLICT as a join

# Typed parameters: PostgreSQL cannot infer a type for a bare parameter in a SELECT list.
_PARAMS = (
    sa.bindparam("key", type_=sa.String),
    sa.bindparam("run_id", type_=sa.Integer),
    sa.bindparam("now", type_=UTCDateTime),
)

_QUEUE_EXITS = f"""
    INSERT INTO pending (audience_key, user_ref, value, user_id, email, name, title, company_id,
                         run_id, queued_at, attempts)
    SELECT :key, b.user_ref, FALSE, b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
    FROM baseline b
    WHERE b.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = b.user_ref)
    {{upsert}}
"""
_HAS_PENDING = sa.text("SELECT 1 FROM pending WHERE audience_key = :key LIMIT 1")


def queue_changes(connection: Connection, key: str, run_id: int | None, now: datetime, *, full: bool) -> None:
    """Rewrite the audience's outbox from the staged snapshot (inside the caller's transaction)."""
    params = {"key": key, "run_id": run_id, "now": now}
    connection.execute(_DROP_STALE, {"key": key})
    for statement in (_DOUBT_TO_FALSE, _DOUBT_TO_TRUE):
        connection.execute(statement.bindparams(*_PARAMS), params)
    if full:
        table, condition = STAGE, _EVERY_ROW
    elif connection.info.get(_ENTERED_FOR) == key:
        table, condition = ENTERED, _EVERY_ROW  # measured just before, in this transaction
    else:
        table, condition = STAGE, _NOT_IN_BASELINE
    # An outbox with nothing left for the audience (the usual case: the last run delivered
    # everything) takes plain inserts: entries (staged users) and exits (users not staged) are
    # disjoint, and the lease keeps every other writer out. An upsert per row costs a third
    # more on PostgreSQL (a speculative insertion, its lock and one more WAL record each).
    upsert = _UPSERT if connection.execute(_HAS_PENDING, {"key": key}).first() else ""
    entries = _QUEUE_ENTRIES.format(table=table, condition=condition, upsert=upsert)
    exits = _QUEUE_EXITS.format(upsert=upsert)
    queued = sum(
        connection.execute(sa.text(sql).bindparams(*_PARAMS), params).rowcount for sql in (entries, exits)
    )
    if connection.dialect.name == "postgresql" and queued > ANALYZE_AFTER:
        # Fresh statistics, or the planner takes a million-row outbox for an empty one and
        # sorts all of it for every delivery page.
        connection.exec_driver_sql("ANALYZE pending")
