"""Delivering the outbox: read pending changes in user order, send, acknowledge.

The outbox is read with keyset pagination on (user_ref), so one user's changes across the
run's audiences arrive together and go out as one identify / one contact item.

Before a chunk leaves, one row per audience in it goes into `in_flight` (the chunk's user_ref
range), in its own commit: whatever happens next, a trace of what may be on the wire exists.
After the chunk, one transaction applies its outcome and removes that trace:

    accepted   the baseline advances (`true` inserted, `false` removed), the change is logged
               in `changes`, the outbox row deleted; set-based over the chunk's outbox ids
               (one statement on PostgreSQL, four on SQLite), whatever the chunk's size
    failed     the row stays pending with its attempt count and error
    in doubt   the row stays pending, marked `in_doubt`: Planhat may hold the value, so the
               diff never drops it, only supersedes it with the truth, and it is resent

A process killed between the send and the acknowledgement leaves its `in_flight` rows behind;
the next run of each audience settles them (`settle_in_flight`) by marking that range of its
outbox in doubt. So at most the chunk on the wire is sent twice, and never forgotten.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import models as m
from .diff import ANALYZE_AFTER
from .errors import AudienceSyncError
from .models import UTCDateTime
from .planhat import AUDIENCES, Contact, KeyMeta, Outcome
from .sources import frozen_gc
from .store import utcnow

log = logging.getLogger("audience_sync.delivery")


class Sender(Protocol):
    chunk_size: int
    exhausted: bool

    def send(self, contacts: Sequence[Contact]) -> Outcome: ...


@dataclass
class DeliveryCounts:
    sent: int = 0
    failed: int = 0  # not accepted, in doubt included
    in_doubt: int = 0
    errors: list[str] = field(default_factory=list)


PageRow = tuple[Any, ...]  # one outbox row, columns in the order of _COLUMNS

_COLUMNS = (
    m.pending.c.id,
    m.pending.c.audience_key,
    m.pending.c.user_ref,
    m.pending.c.value,
    m.pending.c.user_id,
    m.pending.c.email,
    m.pending.c.name,
    m.pending.c.title,
    m.pending.c.company_id,
    m.pending.c.value_json,
)


def read_page(engine: Engine, keys: list[str], after: str, limit: int) -> list[PageRow]:
    """The next `limit` outbox rows of these audiences after user `after`, in user order.

    Read through the driver's own cursor: plain tuples, no result-row objects, for a million
    rows in a full sync.
    """
    with engine.connect() as connection:
        marker = "?" if connection.dialect.name == "sqlite" else "%s"
        sql = (
            f"SELECT {', '.join(column.name for column in _COLUMNS)} FROM pending "
            f"WHERE audience_key IN ({', '.join([marker] * len(keys))}) AND user_ref > {marker} "
            f"ORDER BY user_ref, audience_key LIMIT {int(limit)}"
        )
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql, (*keys, after))
            return cursor.fetchall()
        finally:
            cursor.close()


# Positions in a page row (the order of _COLUMNS).
_ID, _KEY, _REF, _VALUE, _USER_ID, _EMAIL, _NAME, _TITLE, _COMPANY, _JSON = range(len(_COLUMNS))


def row_value(value: object, value_json: str | None) -> Any:
    """What Planhat is to hold: an audience's boolean, or a computed trait's value (None, JSON
    null, clears the field)."""
    return bool(value) if value_json is None else orjson.loads(value_json)


def coalesce(
    rows: list[PageRow], complete: bool, one_audience: bool = False, meta: KeyMeta = AUDIENCES
) -> list[tuple[Contact, list[PageRow]]]:
    """Group rows per user. When the page was cut (`complete` False), the last user may be
    missing audiences on the next page, so it is left for the next page. With `one_audience`
    every row is its own user (the outbox holds a user once per audience): no grouping.
    `meta` says how the keys go out (traits, events, companies)."""
    if one_audience:
        kept = rows if complete or len(rows) < 2 else rows[:-1]
        return [(_single_contact(row, meta), [row]) for row in kept]
    groups = [list(group) for _, group in groupby(rows, key=itemgetter(_REF))]
    if not complete and len(groups) > 1:
        groups.pop()
    return [(_contact(group, meta), group) for group in groups]


def _single_contact(row: PageRow, meta: KeyMeta = AUDIENCES) -> Contact:
    """One row, one audience: the common case, and a million of them in a full sync."""
    return Contact(
        row[_REF],
        row[_USER_ID],
        row[_EMAIL],
        row[_NAME],
        row[_TITLE],
        row[_COMPANY],
        {row[_KEY]: bool(row[_VALUE]) if row[_JSON] is None else orjson.loads(row[_JSON])},
        meta,
    )


def _contact(rows: list[PageRow], meta: KeyMeta = AUDIENCES) -> Contact:
    if len(rows) == 1:
        return _single_contact(rows[0], meta)

    def first(position: int) -> str | None:
        return next((r[position] for r in rows if r[position]), None)

    return Contact(
        ref=rows[0][_REF],
        user_id=first(_USER_ID),
        email=first(_EMAIL),
        name=first(_NAME),
        title=first(_TITLE),
        company_id=first(_COMPANY),
        values={row[_KEY]: row_value(row[_VALUE], row[_JSON]) for row in rows},
        meta=meta,
    )


def deliver(
    engine: Engine,
    sender: Sender,
    run_ids: dict[str, int],
    counts: dict[str, DeliveryCounts],
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    meta: KeyMeta = AUDIENCES,
) -> None:
    """Send every pending change of the given audiences, adding up what happened in `counts`
    (the caller's, so the counts survive an error that ends the delivery).

    A chunk is acknowledged by a helper thread while this one reads and groups the next page
    (the database works without the GIL), and the next chunk is sent only once that
    acknowledgement is committed: requests go one after another, and at most the chunk on
    the wire is unacknowledged.

    Raises the sender's fatal error (a rejected token, an answer proving nothing) once the
    chunk it ended has been acknowledged: what was accepted before it stays accepted.
    """
    keys = list(run_ids)
    for key in keys:
        counts.setdefault(key, DeliveryCounts())
    limit = sender.chunk_size + 1

    def page(after: str) -> list[tuple[Contact, list[PageRow]]]:
        rows = read_page(engine, keys, after, limit)
        return (
            coalesce(rows, complete=len(rows) < limit, one_audience=len(keys) == 1, meta=meta) if rows else []
        )

    with frozen_gc(), ThreadPoolExecutor(1, thread_name_prefix="audience-sync-ack") as helper:
        after, batch = "", page("")
        while batch and not sender.exhausted and not should_stop():
            trace = mark_in_flight(engine, batch, run_ids, after)
            outcome = _send(engine, sender, batch, trace)
            acknowledging = helper.submit(acknowledge, engine, batch, outcome, run_ids, counts, trace)
            after = batch[-1][0].ref
            upcoming = page(after) if outcome.stop is None else []  # untouched by the ack
            acknowledging.result()
            if progress:
                progress(sum(len(group) for _, group in batch))
            if outcome.stop is not None:
                raise outcome.stop
            batch = upcoming
    if engine.dialect.name == "postgresql" and sum(c.sent for c in counts.values()) > ANALYZE_AFTER:
        with engine.begin() as connection:  # the next run's diff plans against the new baseline
            connection.exec_driver_sql("ANALYZE baseline")


def _send(
    engine: Engine, sender: Sender, batch: list[tuple[Contact, list[PageRow]]], trace: list[int]
) -> Outcome:
    try:
        return sender.send([contact for contact, _ in batch])
    except AudienceSyncError:
        # Refused before anything left (delivery already stopped): nothing is in doubt. Any
        # other exception keeps the trace, and the next run puts the chunk in doubt.
        with engine.begin() as connection:
            _clear_in_flight(connection, trace)
        raise


# --- what may be on the wire ----------------------------------------------------------------


def mark_in_flight(
    engine: Engine, batch: list[tuple[Contact, list[PageRow]]], run_ids: dict[str, int], after: str
) -> list[int]:
    """Record, in its own commit, that the chunk's outbox rows are about to be sent: one row
    per audience with the chunk's user_ref range. Returns their ids."""
    keys = sorted({row[_KEY] for _, rows in batch for row in rows})
    now = utcnow()
    last = batch[-1][0].ref
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # The trace must outlive this process, not a power cut of the server: committed
            # without waiting for the WAL flush (the chunk's acknowledgement flushes it), it is
            # in the server the moment COMMIT returns. A flush per chunk cost 16% of a full sync.
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
        result = connection.execute(
            m.in_flight.insert().returning(m.in_flight.c.id),
            [
                {
                    "audience_key": k,
                    "run_id": run_ids.get(k),
                    "after_ref": after,
                    "last_ref": last,
                    "sent_at": now,
                }
                for k in keys
            ],
        )
        return [int(row_id) for row_id in result.scalars()]


def _clear_in_flight(connection: sa.Connection, ids: list[int]) -> None:
    if ids:
        connection.execute(m.in_flight.delete().where(m.in_flight.c.id.in_(ids)))


def settle_in_flight(connection: sa.Connection, key: str) -> int:
    """Put in doubt the outbox rows of chunks a dead process left on the wire (inside the
    caller's transaction, under the audience's lease). Returns how many rows that marked."""
    marked = connection.execute(
        m.pending.update()
        .where(m.pending.c.audience_key == key, m.pending.c.in_doubt.is_(False), m.on_the_wire())
        .values(in_doubt=True, last_error="the process ended while this change was on the wire")
    ).rowcount
    connection.execute(m.in_flight.delete().where(m.in_flight.c.audience_key == key))
    if marked:
        log.warning("audience %r: %d changes a stopped run had on the wire are now in doubt", key, marked)
    return marked or 0


def acknowledge(
    engine: Engine,
    batch: list[tuple[Contact, list[PageRow]]],
    outcome: Outcome,
    run_ids: dict[str, int],
    counts: dict[str, DeliveryCounts],
    trace: Sequence[int] = (),
) -> None:
    """Apply one chunk's outcome in one transaction, and remove its in-flight trace.

    What Planhat accepted is applied set-based from the outbox rows themselves (a handful of
    statements per chunk, whatever its size); refusals, usually few, row by row. A row in
    doubt stays in doubt until a delivery of it is confirmed.
    """
    now = utcnow()
    accepted = set(outcome.accepted)
    delivered = [row for contact, rows in batch if contact.ref in accepted for row in rows]
    failed = [
        (row, outcome.failed[contact.ref], contact.ref in outcome.in_doubt)
        for contact, rows in batch
        if contact.ref not in accepted and contact.ref in outcome.failed
        for row in rows
    ]
    with engine.begin() as connection:
        valued = [row for row in delivered if row[_JSON] is not None]
        if valued:
            _apply_delivered_values(connection, valued, run_ids, now)
        if len(valued) < len(delivered):
            _apply_delivered(connection, [row for row in delivered if row[_JSON] is None], run_ids, now)
        if failed:
            connection.execute(
                m.pending.update()
                .where(m.pending.c.id == sa.bindparam("row_id"))
                .values(
                    attempts=m.pending.c.attempts + 1,
                    last_error=sa.bindparam("error"),
                    in_doubt=m.pending.c.in_doubt | sa.bindparam("doubt", type_=sa.Boolean),
                ),
                [{"row_id": row[_ID], "error": error, "doubt": doubt} for row, error, doubt in failed],
            )
            connection.execute(
                m.changes.insert(),
                [
                    _change(row, run_ids, "in_doubt" if doubt else "failed", error, now)
                    for row, error, doubt in failed
                ],
            )
        _clear_in_flight(connection, list(trace))
        _count_in_runs(connection, delivered, failed, run_ids)
    for key, sent in Counter(map(itemgetter(_KEY), delivered)).items():
        counts[key].sent += sent
    for row, error, doubt in failed:
        tally = counts[row[_KEY]]
        tally.failed += 1
        tally.in_doubt += doubt
        if len(tally.errors) < 3:
            tally.errors.append(f"{row[_REF]}: {error}")


def _count_in_runs(
    connection: sa.Connection,
    delivered: list[PageRow],
    failed: list[tuple[PageRow, str, bool]],
    run_ids: dict[str, int],
) -> None:
    """Advance each run's counters with the changes they count, in the same transaction: a run
    killed later still says what it sent."""
    sent = Counter(row[_KEY] for row in delivered)
    refused = Counter(row[_KEY] for row, _, _ in failed)
    runs = m.runs.c
    for key in sent.keys() | refused.keys():
        connection.execute(
            m.runs.update()
            .where(runs.id == run_ids[key])
            .values(sent=runs.sent + sent[key], failed=runs.failed + refused[key])
        )


def _apply_delivered(
    connection: sa.Connection, rows: list[PageRow], run_ids: dict[str, int], now: datetime
) -> None:
    """Advance the baseline, log the changes and empty the outbox for the accepted rows.

    The chunk's outbox ids travel as one parameter (thousands of bound parameters would cost
    more than the statements): an array on PostgreSQL, where one statement does it all, the
    outbox rows read once as they are deleted; a JSON array on SQLite, in four statements.
    """
    ids = [row[_ID] for row in rows]
    params: dict[str, Any] = {"now": now}
    run_id = _run_id_case(run_ids, params)
    now_param = sa.bindparam("now", type_=UTCDateTime)
    if connection.dialect.name == "postgresql":
        params["ids"] = ids
        connection.execute(
            sa.text(
                "WITH done AS (DELETE FROM pending p WHERE p.id = ANY(CAST(:ids AS BIGINT[])) "
                "  RETURNING p.audience_key, p.user_ref, p.value, p.user_id, p.email), "
                "entered AS (INSERT INTO baseline (audience_key, user_ref, user_id, email, run_id, told_at) "
                f"  SELECT p.audience_key, p.user_ref, p.user_id, p.email, {run_id}, :now FROM done p "
                "  WHERE p.value ON CONFLICT (audience_key, user_ref) DO UPDATE SET "
                "  user_id = excluded.user_id, email = excluded.email, run_id = excluded.run_id, "
                "  told_at = excluded.told_at), "
                "exited AS (DELETE FROM baseline b USING done p WHERE NOT p.value "
                "  AND b.audience_key = p.audience_key AND b.user_ref = p.user_ref) "
                "INSERT INTO changes (run_id, audience_key, user_ref, value, outcome, error, at) "
                f"SELECT {run_id}, p.audience_key, p.user_ref, p.value, 'delivered', NULL, :now FROM done p"
            ).bindparams(now_param),
            params,
        )
        return
    params["ids"] = json.dumps(ids)
    chosen = "p.id IN (SELECT value FROM json_each(:ids))"
    if any(row[_VALUE] for row in rows):
        connection.execute(
            sa.text(
                "INSERT INTO baseline (audience_key, user_ref, user_id, email, run_id, told_at) "
                f"SELECT p.audience_key, p.user_ref, p.user_id, p.email, {run_id}, :now "
                f"FROM pending p WHERE {chosen} AND p.value = TRUE "
                "ON CONFLICT (audience_key, user_ref) DO UPDATE SET user_id = excluded.user_id, "
                "email = excluded.email, run_id = excluded.run_id, told_at = excluded.told_at"
            ).bindparams(now_param),
            params,
        )
    if not all(row[_VALUE] for row in rows):
        connection.execute(
            sa.text(
                "DELETE FROM baseline WHERE (audience_key, user_ref) IN ("
                f"SELECT p.audience_key, p.user_ref FROM pending p WHERE {chosen} AND p.value = FALSE)"
            ),
            params,
        )
    connection.execute(
        sa.text(
            "INSERT INTO changes (run_id, audience_key, user_ref, value, outcome, error, at) "
            f"SELECT {run_id}, p.audience_key, p.user_ref, p.value, 'delivered', NULL, :now "
            f"FROM pending p WHERE {chosen}"
        ).bindparams(now_param),
        params,
    )
    connection.execute(sa.text("DELETE FROM pending WHERE id IN (SELECT value FROM json_each(:ids))"), params)


def _apply_delivered_values(
    connection: sa.Connection, rows: list[PageRow], run_ids: dict[str, int], now: datetime
) -> None:
    """_apply_delivered for computed traits: the baseline takes the value Planhat accepted (a
    `null` removes the user's row), `changes` records it. The chunk's ids travel as one
    parameter (a JSON array), on both databases."""
    params: dict[str, Any] = {"now": now, "ids": json.dumps([row[_ID] for row in rows])}
    run_id = _run_id_case(run_ids, params)
    now_param = sa.bindparam("now", type_=UTCDateTime)
    if connection.dialect.name == "postgresql":
        ids = "SELECT CAST(value AS BIGINT) FROM json_array_elements_text(CAST(:ids AS JSON))"
    else:
        ids = "SELECT value FROM json_each(:ids)"
    chosen = f"p.id IN ({ids})"
    connection.execute(
        sa.text(
            "INSERT INTO baseline (audience_key, user_ref, user_id, email, run_id, told_at, value_json) "
            f"SELECT p.audience_key, p.user_ref, p.user_id, p.email, {run_id}, :now, p.value_json "
            f"FROM pending p WHERE {chosen} AND p.value = TRUE "
            "ON CONFLICT (audience_key, user_ref) DO UPDATE SET user_id = excluded.user_id, "
            "email = excluded.email, run_id = excluded.run_id, told_at = excluded.told_at, "
            "value_json = excluded.value_json"
        ).bindparams(now_param),
        params,
    )
    connection.execute(
        sa.text(
            "DELETE FROM baseline WHERE (audience_key, user_ref) IN ("
            f"SELECT p.audience_key, p.user_ref FROM pending p WHERE {chosen} AND p.value = FALSE)"
        ),
        params,
    )
    connection.execute(
        sa.text(
            "INSERT INTO changes (run_id, audience_key, user_ref, value, value_json, outcome, error, at) "
            f"SELECT {run_id}, p.audience_key, p.user_ref, p.value, p.value_json, 'delivered', NULL, :now "
            f"FROM pending p WHERE {chosen}"
        ).bindparams(now_param),
        params,
    )
    connection.execute(sa.text(f"DELETE FROM pending WHERE id IN ({ids})"), params)


def _run_id_case(run_ids: dict[str, int], params: dict[str, Any]) -> str:
    """SQL for "this run's id for the row's audience", its parameters added to `params`."""
    whens = []
    for index, (key, run_id) in enumerate(run_ids.items()):
        params[f"key_{index}"], params[f"run_{index}"] = key, run_id
        whens.append(f"WHEN :key_{index} THEN CAST(:run_{index} AS INTEGER)")
    return f"CASE p.audience_key {' '.join(whens)} END"


def _change(
    row: PageRow, run_ids: dict[str, int], outcome: str, error: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "run_id": run_ids[row[_KEY]],
        "audience_key": row[_KEY],
        "user_ref": row[_REF],
        "value": bool(row[_VALUE]),
        "value_json": row[_JSON],
        "outcome": outcome,
        "error": error,
        "at": now,
    }
