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

import logging
import time
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

from ..errors import AudienceSyncError
from ..planhat import AUDIENCES, Contact, KeyMeta, Outcome
from ..state import baseline, changes, outbox, runs
from ..state.database import analyze
from ..state.outbox import PageRow, SpanMismatch, read_page
from ..support.clock import utcnow
from ..support.collector import frozen_gc
from ..support.logs import carrying_context

log = logging.getLogger(__name__)


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


# Outbox rows one page may hold when a chunk carries several audiences: a chunk is up to
# chunk_size *users*, and a user in fifty audiences has fifty rows. 25,000 rows keep a page (and
# the one read ahead) to about 12 MB each; a bulk request then carries ~500 such users, not 100.
PAGE_ROWS = 25_000


# Positions in a page row (the order of outbox.PAGE_COLUMNS).
_ID, _KEY, _REF, _VALUE, _USER_ID, _EMAIL, _NAME, _TITLE, _COMPANY, _JSON = range(len(outbox.PAGE_COLUMNS))


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
        with engine.begin() as connection:
            outbox.refresh_statistics(connection, keys)
    fresh = first_baselines(engine, keys)
    prepare = engine.dialect.name == "postgresql"  # SQLite has one writer: it would wait on it
    with frozen_gc(), ThreadPoolExecutor(2, thread_name_prefix="audience-sync-delivery") as helpers:
        after, batch = "", page("")
        if not batch:  # nothing to change; a count a killed delivery left unknown is counted
            with engine.begin() as connection:
                baseline.recount(connection, keys, unknown_only=True)
            return
        with engine.begin() as connection:  # kept only while no acknowledgement can change them
            baseline.forget_counts(connection, keys)
        while batch and not sender.exhausted and not should_stop():
            last = batch[-1][0].ref
            trace = outbox.mark_in_flight(engine, _keys_of(batch), run_ids, after, last)
            early = prepare and sum(len(rows) for _, rows in batch) >= PREPARE_FROM
            prepared = (
                helpers.submit(carrying_context(_prepare), engine, batch, run_ids, trace, after, fresh)
                if early
                else None
            )
            # Rows no acknowledgement touches.
            reading = helpers.submit(carrying_context(page), last) if early else None
            outcome = _send(engine, sender, batch, trace, prepared)
            acknowledging = None
            if not _commit_prepared(prepared, batch, outcome, counts):
                acknowledging = helpers.submit(
                    carrying_context(acknowledge),
                    engine,
                    batch,
                    outcome,
                    run_ids,
                    counts,
                    trace,
                    after=after,
                    fresh=fresh,
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
    delivered = sum(c.sent for c in counts.values())
    with engine.begin() as connection:
        baseline.recount(connection, keys)
        analyze(connection, "baseline", delivered)  # the next diff plans on it
    if not should_stop():  # a stopping daemon does not wait for a vacuum
        _reclaim_outbox(engine, delivered)


def _reclaim_outbox(engine: Engine, removed: int) -> None:
    started = time.monotonic()
    reclaimed = outbox.reclaim(engine, removed)
    if reclaimed:
        log.info("outbox %s after the delivery in %.2fs", reclaimed, time.monotonic() - started)


def first_baselines(engine: Engine, keys: list[str]) -> frozenset[str]:
    """The audiences whose baseline is empty as delivery starts (their first sync): Planhat's
    acceptances can only insert into it, never update. PostgreSQL then skips the upsert's
    speculative insertion per row. The lease keeps every other writer out until we are done."""
    if engine.dialect.name != "postgresql" or not keys:
        return frozenset()
    with engine.connect() as connection:
        return baseline.empty_keys(connection, keys)


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
                outbox.clear_in_flight(connection, trace)
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
    span: Span = (_keys_of(batch), after, batch[-1][0].ref, [])
    connection = engine.connect()
    try:
        connection.begin()
        outbox.acknowledge_delivered(connection, rows, run_ids, utcnow(), span, fresh)
        outbox.clear_in_flight(connection, trace)
        _count_in_runs(connection, rows, [], run_ids)
        return connection
    except SpanMismatch:
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
    span: Span | None = None
    if after is not None and delivered and engine.dialect.name == "postgresql":
        kept = [row[_ID] for contact, rows in batch if contact.ref not in accepted for row in rows]
        span = (_keys_of(batch), after, batch[-1][0].ref, kept)
    try:
        _acknowledge(engine, delivered, failed, run_ids, trace, now, span, fresh)
    except SpanMismatch:  # not expected under the lease; the chunk's own ids then decide
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


def _keys_of(batch: list[tuple[Contact, list[PageRow]]]) -> list[str]:
    """The audiences a chunk carries, sorted."""
    return sorted({row[_KEY] for _, rows in batch for row in rows})


Span = tuple[list[str], str, str, list[int]]  # see outbox.acknowledge_delivered


def _acknowledge(
    engine: Engine,
    delivered: list[PageRow],
    failed: list[tuple[PageRow, str, bool]],
    run_ids: dict[str, int],
    trace: Sequence[int],
    now: datetime,
    span: Span | None,
    fresh: frozenset[str],
) -> None:
    with engine.begin() as connection:
        if delivered:
            outbox.acknowledge_delivered(connection, delivered, run_ids, now, span, fresh)
        if failed:
            outbox.record_refusals(connection, [(row[_ID], error, doubt) for row, error, doubt in failed])
            changes.log(
                connection,
                [
                    _change(row, run_ids, "in_doubt" if doubt else "failed", error, now)
                    for row, error, doubt in failed
                ],
            )
        outbox.clear_in_flight(connection, trace)
        _count_in_runs(connection, delivered, failed, run_ids)


def _count_in_runs(
    connection: sa.Connection,
    delivered: list[PageRow],
    failed: list[tuple[PageRow, str, bool]],
    run_ids: dict[str, int],
) -> None:
    """Advance each run's counters with the changes they count, in the same transaction: a run
    killed later still says what it sent."""
    runs.advance_counters(
        connection,
        run_ids,
        Counter(row[_KEY] for row in delivered),
        Counter(row[_KEY] for row, _, _ in failed),
    )


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
