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
from concurrent.futures import Future, ThreadPoolExecutor
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
from .store import forget_baseline_counts, recount_baselines, utcnow

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


# Outbox rows one page may hold when a chunk carries several audiences: a chunk is up to
# chunk_size *users*, and a user in fifty audiences has fifty rows. 25,000 rows keep a page (and
# the one read ahead) to about 12 MB each; a bulk request then carries ~500 such users, not 100.
PAGE_ROWS = 25_000


def read_page(
    engine: Engine, keys: list[str], after: str, limit: int, users: int | None = None
) -> list[PageRow]:
    """The next outbox rows of these audiences after user `after`, in user order: `limit` rows
    at most, and with `users`, only those of the next `users` users.

    Read through the driver's own cursor: plain tuples, no result-row objects, for a million
    rows in a full sync.
    """
    with engine.connect() as connection:
        marker = "?" if connection.dialect.name == "sqlite" else "%s"
        of_keys = f"audience_key IN ({', '.join([marker] * len(keys))}) AND user_ref > {marker}"
        params: tuple[Any, ...] = (*keys, after)
        bound = ""
        if users is not None:  # up to the users-th distinct user after `after`
            bound = (
                f" AND user_ref <= (SELECT max(user_ref) FROM (SELECT DISTINCT user_ref FROM pending "
                f"WHERE {of_keys} ORDER BY user_ref LIMIT {int(users)}) AS chunk)"
            )
            params += params
        sql = (
            f"SELECT {', '.join(column.name for column in _COLUMNS)} FROM pending "
            f"WHERE {of_keys}{bound} ORDER BY user_ref, audience_key LIMIT {int(limit)}"
        )
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql, params)
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
        {row[_KEY]: row_value(row[_VALUE], row[_JSON])},
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

    While a chunk is on the wire, a helper thread reads and groups the next page. On
    PostgreSQL another one meanwhile applies the chunk as if Planhat accepted all of it, in a
    transaction left open (`_prepare`): when the answer says so, acknowledging is a commit;
    otherwise it is rolled back and the outcome applied as it is. The next chunk is sent only
    once the acknowledgement is committed: requests go one after another, and at most the
    chunk on the wire is unacknowledged (a process killed meanwhile takes the open
    transaction with it, and leaves the chunk's in-flight trace).

    Raises the sender's fatal error (a rejected token, an answer proving nothing) once the
    chunk it ended has been acknowledged: what was accepted before it stays accepted.
    """
    keys = list(run_ids)
    for key in keys:
        counts.setdefault(key, DeliveryCounts())
    one_audience = len(keys) == 1
    # One more row than a page holds: when it comes, the page's last user may have more rows.
    limit = (sender.chunk_size if one_audience else max(sender.chunk_size, PAGE_ROWS)) + 1
    users = None if one_audience else sender.chunk_size

    def page(after: str) -> list[tuple[Contact, list[PageRow]]]:
        rows = read_page(engine, keys, after, limit, users)
        return (
            coalesce(rows, complete=len(rows) < limit, one_audience=one_audience, meta=meta) if rows else []
        )

    if engine.dialect.name == "postgresql" and not one_audience:
        _refresh_statistics(engine, keys)
    fresh = first_baselines(engine, keys)
    prepare = engine.dialect.name == "postgresql"  # SQLite has one writer: it would wait on it
    with frozen_gc(), ThreadPoolExecutor(2, thread_name_prefix="audience-sync-delivery") as helpers:
        after, batch = "", page("")
        if not batch:  # nothing to change; a count a killed delivery left unknown is counted
            with engine.begin() as connection:
                recount_baselines(connection, keys, unknown_only=True)
            return
        with engine.begin() as connection:  # kept only while no acknowledgement can change them
            forget_baseline_counts(connection, keys)
        while batch and not sender.exhausted and not should_stop():
            trace = mark_in_flight(engine, batch, run_ids, after)
            last = batch[-1][0].ref
            early = prepare and sum(len(rows) for _, rows in batch) >= PREPARE_FROM
            prepared = (
                helpers.submit(_prepare, engine, batch, run_ids, trace, after, fresh) if early else None
            )
            reading = helpers.submit(page, last) if early else None  # rows no acknowledgement touches
            outcome = _send(engine, sender, batch, trace, prepared)
            acknowledging = None
            if not _commit_prepared(prepared, batch, outcome, counts):
                acknowledging = helpers.submit(
                    acknowledge, engine, batch, outcome, run_ids, counts, trace, after=after, fresh=fresh
                )
            after = last
            upcoming = [] if outcome.stop is not None else reading.result() if reading else page(after)
            if acknowledging is not None:
                acknowledging.result()
            if progress:
                progress(sum(len(group) for _, group in batch))
            if outcome.stop is not None:
                raise outcome.stop
            batch = upcoming
    # Every acknowledgement is committed; one that raised left the counts to be counted live.
    with engine.begin() as connection:
        recount_baselines(connection, keys)
        if engine.dialect.name == "postgresql" and sum(c.sent for c in counts.values()) > ANALYZE_AFTER:
            connection.exec_driver_sql("ANALYZE baseline")  # the next run's diff plans on the new baseline


def _refresh_statistics(engine: Engine, keys: list[str]) -> None:
    """ANALYZE the outbox when these audiences together queued more than ANALYZE_AFTER rows.

    Each audience's diff refreshes the statistics only for a large audience of its own. Many
    small ones add up to a large outbox the planner takes for an empty one: it then reads and
    sorts every remaining row of the run for each page (ten audiences of 2,000: 10 ms a page
    instead of 0.15 ms, quadratic in the run's changes)."""
    with engine.begin() as connection:
        total = connection.execute(
            sa.text("SELECT count(*) FROM pending WHERE audience_key = ANY(CAST(:keys AS VARCHAR[]))"),
            {"keys": keys},
        ).scalar_one()
        if total > ANALYZE_AFTER:
            connection.exec_driver_sql("ANALYZE pending")


def first_baselines(engine: Engine, keys: list[str]) -> frozenset[str]:
    """The audiences whose baseline is empty as delivery starts (their first sync): Planhat's
    acceptances can only insert into it, never update. PostgreSQL then skips the upsert's
    speculative insertion per row. The lease keeps every other writer out until we are done."""
    if engine.dialect.name != "postgresql" or not keys:
        return frozenset()
    with engine.connect() as connection:
        found = connection.execute(
            sa.text(
                "SELECT k FROM unnest(CAST(:keys AS VARCHAR[])) AS k "
                "WHERE NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = k)"
            ),
            {"keys": keys},
        ).scalars()
        return frozenset(found)


def _send(
    engine: Engine,
    sender: Sender,
    batch: list[tuple[Contact, list[PageRow]]],
    trace: list[int],
    prepared: Future[sa.Connection | None] | None,
) -> Outcome:
    try:
        return sender.send([contact for contact, _ in batch])
    except BaseException as exc:
        _abandon(prepared)  # first: it holds the trace's rows
        if isinstance(exc, AudienceSyncError):
            # Refused before anything left (delivery already stopped): nothing is in doubt. Any
            # other exception keeps the trace, and the next run puts the chunk in doubt.
            with engine.begin() as connection:
                _clear_in_flight(connection, trace)
        raise


# --- acknowledging while the chunk is on the wire (PostgreSQL) --------------------------------

# A chunk this big is applied while it is on the wire; a smaller one is acknowledged after its
# answer, like every chunk on SQLite (whose single writer would hold up everything meanwhile).
PREPARE_FROM = 500


def _prepare(
    engine: Engine,
    batch: list[tuple[Contact, list[PageRow]]],
    run_ids: dict[str, int],
    trace: list[int],
    after: str,
    fresh: frozenset[str],
) -> sa.Connection | None:
    """Apply the chunk as if Planhat accepted all of it, in a transaction left open for
    `_commit_prepared` (or `_abandon`). None when the outbox's span held other rows."""
    rows = [row for _, group in batch for row in group]
    span = _Span(sorted({row[_KEY] for row in rows}), after, batch[-1][0].ref, [])
    connection = engine.connect()
    try:
        connection.begin()
        _apply_delivered(connection, rows, run_ids, utcnow(), span, fresh)
        _clear_in_flight(connection, trace)
        _count_in_runs(connection, rows, [], run_ids)
        return connection
    except _SpanMismatch:
        connection.close()  # rolls back; acknowledge() then goes by the chunk's ids
        return None
    except BaseException:
        connection.close()
        raise


def _commit_prepared(
    prepared: Future[sa.Connection | None] | None,
    batch: list[tuple[Contact, list[PageRow]]],
    outcome: Outcome,
    counts: dict[str, DeliveryCounts],
) -> bool:
    """Commit the prepared acknowledgement when Planhat accepted the whole chunk; otherwise
    roll it back. False when the outcome is still to be applied."""
    if prepared is None:
        return False
    connection = prepared.result()
    if connection is None:
        return False
    accepted = set(outcome.accepted)
    if not all(contact.ref in accepted and contact.ref not in outcome.failed for contact, _ in batch):
        connection.close()
        return False
    try:
        connection.commit()
    finally:
        connection.close()
    for key, sent in Counter(row[_KEY] for _, rows in batch for row in rows).items():
        counts[key].sent += sent
    return True


def _abandon(prepared: Future[sa.Connection | None] | None) -> None:
    """Roll back a prepared acknowledgement, as the server does for a killed client."""
    if prepared is None:
        return
    try:
        connection = prepared.result()
    except BaseException:  # it rolled back on its own; the error that brought us here wins
        return
    if connection is not None:
        connection.close()


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
    *,
    after: str | None = None,
    fresh: frozenset[str] = frozenset(),
) -> None:
    """Apply one chunk's outcome in one transaction, and remove its in-flight trace.

    What Planhat accepted is applied set-based from the outbox rows themselves (a handful of
    statements per chunk, whatever its size); refusals, usually few, row by row. A row in
    doubt stays in doubt until a delivery of it is confirmed. `after` is the user_ref the
    chunk was read after (its outbox rows are those up to its last user), `fresh` the
    audiences whose baseline was empty as delivery started (`first_baselines`).
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
    span = None
    if after is not None and delivered and engine.dialect.name == "postgresql":
        kept = [row[_ID] for contact, rows in batch if contact.ref not in accepted for row in rows]
        span = _Span(sorted({row[_KEY] for _, rows in batch for row in rows}), after, batch[-1][0].ref, kept)
    try:
        _acknowledge(engine, delivered, failed, run_ids, trace, now, span, fresh)
    except _SpanMismatch:  # not expected under the lease; the chunk's own ids then decide
        log.warning("outbox rows after %r changed while their chunk was sent", after)
        _acknowledge(engine, delivered, failed, run_ids, trace, now, None, fresh)
    for key, sent in Counter(map(itemgetter(_KEY), delivered)).items():
        counts[key].sent += sent
    for row, error, doubt in failed:
        tally = counts[row[_KEY]]
        tally.failed += 1
        tally.in_doubt += doubt
        if len(tally.errors) < 3:
            tally.errors.append(f"{row[_REF]}: {error}")


@dataclass(frozen=True)
class _Span:
    """A chunk's place in the outbox: its audiences' rows with after < user_ref <= last, less
    `kept` (the ids of those Planhat did not accept)."""

    keys: list[str]
    after: str
    last: str
    kept: list[int]


class _SpanMismatch(Exception):
    """The outbox rows of a chunk's span are not the chunk's accepted rows."""


def _acknowledge(
    engine: Engine,
    delivered: list[PageRow],
    failed: list[tuple[PageRow, str, bool]],
    run_ids: dict[str, int],
    trace: Sequence[int],
    now: datetime,
    span: _Span | None,
    fresh: frozenset[str],
) -> None:
    with engine.begin() as connection:
        if delivered:
            _apply_delivered(connection, delivered, run_ids, now, span, fresh)
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
    if sent or refused:
        # One statement, executed for each run (a chunk of a group run touches hundreds).
        connection.execute(
            _ADVANCE_RUN,
            [
                {"run": run_ids[key], "add_sent": sent[key], "add_failed": refused[key]}
                for key in sorted(sent.keys() | refused.keys())
            ],
        )


_ADVANCE_RUN = (
    m.runs.update()
    .where(m.runs.c.id == sa.bindparam("run"))
    .values(
        sent=m.runs.c.sent + sa.bindparam("add_sent", type_=sa.Integer),
        failed=m.runs.c.failed + sa.bindparam("add_failed", type_=sa.Integer),
    )
)


_BASELINE_COLUMNS = "audience_key, user_ref, user_id, email, run_id, told_at, value_json"
_BASELINE_UPSERT = (
    "ON CONFLICT (audience_key, user_ref) DO UPDATE SET user_id = excluded.user_id, "
    "email = excluded.email, run_id = excluded.run_id, told_at = excluded.told_at, "
    "value_json = excluded.value_json"
)
_CHANGES_COLUMNS = "run_id, audience_key, user_ref, value, value_json, outcome, error, at"


def _apply_delivered(
    connection: sa.Connection,
    rows: list[PageRow],
    run_ids: dict[str, int],
    now: datetime,
    span: _Span | None = None,
    fresh: frozenset[str] = frozenset(),
) -> None:
    """Advance the baseline, log the changes and empty the outbox for the accepted rows. A
    computed trait's baseline takes the value sent (`value_json`; NULL for an audience), and a
    `null` sent (value FALSE) removes its row, as an exit does.

    PostgreSQL does it all in one statement, the outbox rows read once as they are deleted.
    With the chunk's `span` they are found by one range scan of the outbox's index (less the
    few Planhat did not accept); looking up 5,000 ids one by one cost a sixth of the
    statement. The statement's row count must then be the chunk's, or it is rolled back
    (`_SpanMismatch`). Audiences in `fresh` insert into the baseline without the upsert.
    SQLite takes the ids as a JSON array, in four statements.
    """
    ids = [row[_ID] for row in rows]
    params: dict[str, Any] = {"now": now}
    now_param = sa.bindparam("now", type_=UTCDateTime)
    if connection.dialect.name == "postgresql":
        params.update(run_keys=list(run_ids), run_numbers=list(run_ids.values()))
        if span is None:
            params["ids"] = ids
            chosen = "p.id = ANY(CAST(:ids AS BIGINT[]))"
        else:
            params.update(keys=span.keys, after=span.after, last=span.last, kept=span.kept)
            chosen = (
                "p.audience_key = ANY(CAST(:keys AS VARCHAR[])) AND p.user_ref > :after "
                "AND p.user_ref <= :last AND NOT p.id = ANY(CAST(:kept AS BIGINT[]))"
            )
        params["fresh"] = sorted(fresh)
        statement = sa.text(_postgres_ack(rows, chosen, fresh)).bindparams(now_param)
        result = connection.execute(statement, params)
        if span is not None and result.rowcount != len(rows):
            raise _SpanMismatch
        return
    params["ids"] = json.dumps(ids)
    run_id = _run_id_case(run_ids, params)
    chosen = "p.id IN (SELECT value FROM json_each(:ids))"
    if any(row[_VALUE] for row in rows):
        connection.execute(
            sa.text(
                f"INSERT INTO baseline ({_BASELINE_COLUMNS}) "
                f"SELECT p.audience_key, p.user_ref, p.user_id, p.email, {run_id}, :now, p.value_json "
                f"FROM pending p WHERE {chosen} AND p.value = TRUE {_BASELINE_UPSERT}"
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
            f"INSERT INTO changes ({_CHANGES_COLUMNS}) "
            f"SELECT {run_id}, p.audience_key, p.user_ref, p.value, p.value_json, 'delivered', NULL, :now "
            f"FROM pending p WHERE {chosen}"
        ).bindparams(now_param),
        params,
    )
    connection.execute(sa.text("DELETE FROM pending WHERE id IN (SELECT value FROM json_each(:ids))"), params)


def _postgres_ack(rows: list[PageRow], chosen: str, fresh: frozenset[str]) -> str:
    """One statement: delete the chosen outbox rows, advance the baseline from them (a plain
    insert for audiences in `fresh`), log them in `changes`; its row count is the rows'.

    Each row's run id comes from joining the (audience, run) pairs `:run_keys` and
    `:run_numbers` as the rows are deleted: a CASE over a group run's hundreds of audiences
    compared every row's key with each of them in turn."""
    columns = _BASELINE_COLUMNS
    select = (
        "SELECT p.audience_key, p.user_ref, p.user_id, p.email, p.run_id, :now, p.value_json "
        "FROM done p WHERE p.value"
    )
    ctes = [
        "done AS (DELETE FROM pending p USING unnest(CAST(:run_keys AS VARCHAR[]), "
        "CAST(:run_numbers AS INTEGER[])) AS r (audience_key, run_id) "
        f"WHERE r.audience_key = p.audience_key AND {chosen} "
        "RETURNING p.audience_key, p.user_ref, p.value, p.user_id, p.email, p.value_json, r.run_id)",
    ]
    values = {(row[_KEY] in fresh, bool(row[_VALUE])) for row in rows}
    if (True, True) in values:
        ctes.append(
            f"entered_first AS (INSERT INTO baseline ({columns}) {select} "
            "AND p.audience_key = ANY(CAST(:fresh AS VARCHAR[])))"
        )
    if (False, True) in values:
        ctes.append(
            f"entered AS (INSERT INTO baseline ({columns}) {select} "
            f"AND NOT p.audience_key = ANY(CAST(:fresh AS VARCHAR[])) {_BASELINE_UPSERT})"
        )
    if any(not value for _, value in values):
        ctes.append(
            "exited AS (DELETE FROM baseline b USING done p WHERE NOT p.value "
            "AND b.audience_key = p.audience_key AND b.user_ref = p.user_ref)"
        )
    return (
        f"WITH {', '.join(ctes)} "
        f"INSERT INTO changes ({_CHANGES_COLUMNS}) "
        "SELECT p.run_id, p.audience_key, p.user_ref, p.value, p.value_json, 'delivered', NULL, :now "
        "FROM done p"
    )


def _run_id_case(run_ids: dict[str, int], params: dict[str, Any]) -> str:
    """SQL for "this run's id for the row's audience", its parameters added to `params`
    (SQLite, whose acknowledgement reads the outbox rows by id)."""
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
