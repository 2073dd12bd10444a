"""Staging a snapshot: an audience's members streamed into temporary tables of the state database.

A run streams its members into a temporary heap table (`stage_raw`, in source order, no
index: appending is all the database does per row; COPY on PostgreSQL, one statement per
chunk on SQLite). One sorted INSERT ... SELECT then builds `stage_members`, keyed on user_ref
(user_id when known, else email), keeping the first row of a user listed twice. Sorting once
beats keeping an index up to date row by row when the source's order is not the key's, and
leaves the stage in key order, so the joins below and the outbox writes walk the indexes in
order, for the diff (`diff`, `traits`).

A source whose rows come in key order (a query ending `ORDER BY user_id`, a table keyed on
it) skips the sort (`_KeyOrder` tells). On SQLite it skips the heap too: while each chunk's
keys follow the last chunk's, the chunk goes straight into `stage_members`, each row appended
at the end of its B-tree, and only the rows from the first chunk out of order on go through
the heap and the sort. On PostgreSQL the heap is copied into the stage as it is when no user
came twice.

Every staging table is TEMPORARY: the state database never grows by a snapshot. Nothing here
holds an audience in Python: memory is a few chunks of rows.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import cast

import orjson
from sqlalchemy.engine import Connection

from ..support.collector import frozen_gc
from ..support.threads import read_ahead
from .contract import MEMBER_FIELDS, Member

log = logging.getLogger(__name__)

STAGE = "stage_members"
RAW = "stage_raw"
ENTERED = "stage_entered"  # the staged rows not in the baseline, kept by measure() for queue_changes()
# A planner run's changed users (snapshot/planner.py): the stage then holds only their current
# rows, and the outbox and the measures touch only them.
SCOPE = "stage_scope"
# A planner run's exits (user_ref, user_id, email), kept aside by diff.measure_changed() for
# queue_changes(); connection.info[EXITED_FOR] names the audience they are of.
EXITED = "stage_exited"
EXITED_FOR = "audience_sync.stage_exited_for"
# connection.info: the audience (or trait) whose rows ENTERED holds, measured in this transaction
MEASURED_FOR = "audience_sync.stage_entered_for"
_RAW_COLUMNS = ", ".join(MEMBER_FIELDS)
# A computed trait's members carry one more field, its value as canonical JSON (traits.py);
# an audience's stage leaves the column NULL.
VALUE_FIELD = "value"
_STAGE_COLUMNS = f"{_RAW_COLUMNS}, {VALUE_FIELD}"


def create_stage(connection: Connection) -> None:
    """The stage's tables, empty (a planner run's scope, when there is one, stays)."""
    connection.info.pop(MEASURED_FOR, None)
    connection.info.pop(EXITED_FOR, None)
    for table in (RAW, STAGE, ENTERED):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
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
    connection.info.pop(MEASURED_FOR, None)
    connection.info.pop(EXITED_FOR, None)
    for table in (RAW, STAGE, ENTERED, SCOPE, EXITED):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def add_stage_to_scope(connection: Connection) -> int:
    """Add the staged users to the scope (created empty the first time); returns those added."""
    key = "TEXT" if connection.dialect.name == "sqlite" else "VARCHAR(255)"
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {SCOPE} (user_ref {key} NOT NULL PRIMARY KEY)"
    )
    return connection.exec_driver_sql(
        f"INSERT INTO {SCOPE} (user_ref) SELECT s.user_ref FROM {STAGE} s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {SCOPE} x WHERE x.user_ref = s.user_ref)"
    ).rowcount


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
    (executemany takes the GIL back for every row, which stalls the reader), into the keyed
    stage while the keys come in order, else into the heap. `progress`, when given, is told
    how many rows each chunk added; without it, a long load logs a line every
    STAGING_LOG_SECONDS.
    """
    if progress is None:
        progress = _StagingLog()
    with frozen_gc():
        if connection.dialect.name == "postgresql":
            return _load_postgresql(connection, chunks, progress, with_value)
        return _load_sqlite(connection, chunks, progress, with_value)


def _load_postgresql(
    connection: Connection, chunks: Iterable[list[Member]], progress: Callable[[int], None], with_value: bool
) -> int:
    order = _KeyOrder()
    given = _copy_raw(connection, chunks, progress, with_value, order)
    # Built in one go and indexed afterwards: a third faster than inserting into the keyed
    # table. Rows that came one per user in key order need no sort to drop repeats.
    first_per_user = (
        f"SELECT coalesce(user_id, email) AS user_ref, {_STAGE_COLUMNS} FROM {RAW}"
        if order.holds and not order.repeats
        else f"SELECT DISTINCT ON (user_ref) coalesce(user_id, email) AS user_ref, {_STAGE_COLUMNS} "
        f"FROM {RAW} ORDER BY user_ref, seq"
    )
    connection.exec_driver_sql(f"DROP TABLE {STAGE}")
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {STAGE} AS {first_per_user}")
    connection.exec_driver_sql(f"ALTER TABLE {STAGE} ADD PRIMARY KEY (user_ref)")
    connection.exec_driver_sql(f"DROP TABLE {RAW}")
    connection.exec_driver_sql(f"ANALYZE {STAGE}")  # autovacuum never sees temp tables
    return given


def _load_sqlite(
    connection: Connection, chunks: Iterable[list[Member]], progress: Callable[[int], None], with_value: bool
) -> int:
    given = 0
    extracted = [f"json_extract(value, '$[{i}]')" for i in range(len(MEMBER_FIELDS) + with_value)]
    fields = ", ".join(extracted)
    columns = _STAGE_COLUMNS if with_value else _RAW_COLUMNS
    into_raw = f"INSERT INTO {RAW} ({columns}) SELECT {fields} FROM json_each(?)"
    # json_each yields the array in order, so the first row of a user listed twice wins;
    # the key is user_id, else email (fields 0 and 1)
    into_stage = (
        f"INSERT INTO {STAGE} (user_ref, {columns}) "
        f"SELECT coalesce({extracted[0]}, {extracted[1]}), {fields} "
        "FROM json_each(?) WHERE TRUE ON CONFLICT (user_ref) DO NOTHING"
    )
    order = _KeyOrder()
    cursor = connection.connection.cursor()
    try:
        for chunk in read_ahead(chunks):
            if chunk:
                insert = into_stage if order.follows(chunk) else into_raw
                cursor.execute(insert, (orjson.dumps(chunk).decode(),))
                given += len(chunk)
                progress(len(chunk))
    finally:
        cursor.close()
    if not order.holds:  # rows staged already came first: they win over the heap's
        connection.exec_driver_sql(
            f"INSERT INTO {STAGE} (user_ref, {_STAGE_COLUMNS}) "
            f"SELECT coalesce(user_id, email), {_STAGE_COLUMNS} FROM {RAW} "
            "WHERE TRUE ORDER BY coalesce(user_id, email), rowid "
            "ON CONFLICT (user_ref) DO NOTHING"
        )
    # RAW stays: the run's end closes the connection, which deletes the temporary database
    # whole (sync.queueing.discard_stage), and create_stage() drops it for another stage on
    # the same connection; a DROP here would free its pages one by one.
    return given


class _KeyOrder:
    """Whether every chunk so far came in the stage's key order: user_id, else email (SQL's
    coalesce), each at least the one before (`repeats`: some equal to it, a user listed
    twice). Once a chunk is out of order, it stays out.

    It decides speed only. Python orders str by code point, as SQLite orders UTF-8 TEXT (its
    BINARY collation), but nothing rests on that: SQLite's keyed stage keeps a user's first row
    in any order, and PostgreSQL skips its sort only when the keys strictly rose, so no two are
    equal whatever the database's collation (and the stage's primary key would refuse two)."""

    def __init__(self) -> None:
        self.holds = True
        self.repeats = False
        self._last: str | None = None

    def follows(self, chunk: list[Member]) -> bool:
        if self.holds:
            keys = [member[0] if member[0] is not None else member[1] for member in chunk]
            if None in keys:  # no key: the sort's insert refuses it, as it always did
                self.holds = False
                return False
            ordered = cast(list[str], keys)
            joins = self._last is None or self._last <= ordered[0]
            strictly = self._last != ordered[0] and _rising(ordered, operator.lt)  # the usual case
            if not joins or not (strictly or _rising(ordered, operator.le)):
                self.holds = False
            self.repeats = self.repeats or not strictly
            self._last = ordered[-1]
        return self.holds


def _rising(keys: list[str], order: Callable[[str, str], bool]) -> bool:
    return all(map(order, keys, islice(keys, 1, None)))


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


def _copy_raw(
    connection: Connection,
    chunks: Iterable[list[Member]],
    progress: Callable[[int], None],
    with_value: bool,
    order: _KeyOrder,
) -> int:
    """COPY the members into the raw stage through psycopg, inside the connection's transaction,
    telling `order` each chunk. The source is read a chunk or two ahead, as on SQLite: its
    driver steps without the GIL while this thread formats rows (a tenth off the staging of a
    million)."""
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
                order.follows(chunk)
                progress(len(chunk))
    return given
