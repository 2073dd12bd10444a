"""The outbox: `pending` (changes not yet accepted by Planhat) and `in_flight` (chunks on the
wire). Every statement that writes either table is here.

    queueing       the diff rewrites an audience's outbox from its staged snapshot (the
                   `queue_*`, `drop_*` and `doubts_*` functions, inside the diff's transaction);
                   `retire` queues `false` for everyone Planhat may have as `true`
    delivery       `read_page` in user order; `mark_in_flight` before a chunk leaves (its own
                   commit); `acknowledge_delivered` / `record_refusals` after, in one
                   transaction with `clear_in_flight`; `settle_in_flight` puts in doubt what a
                   dead process left on the wire
    repair         `reconcile --fix` clears the doubt its read settled (`settle_after_read`);
                   a user known under a new identifier takes the old one's rows (`move_refs`)
    counts         `counts` is the one answer to "how many pending, how many in doubt"
    upkeep         after a large delivery, `reclaim` gives the deleted rows' space back
                   (PostgreSQL: truncated when empty, else vacuumed)

A row in doubt (sent, no definite answer: Planhat may hold its value) is never dropped as
stale, only set to the truth and sent again; it leaves only on a confirmed delivery (or when a
reconcile read Planhat's value back).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..support.clock import utcnow
from . import baseline, changes
from . import models as m
from .database import analyze, driver_message
from .models import UTCDateTime

log = logging.getLogger(__name__)

p = m.pending.c

# Typed parameters: PostgreSQL cannot infer a type for a bare parameter in a SELECT list.
_PARAMS = (
    sa.bindparam("key", type_=sa.String),
    sa.bindparam("run_id", type_=sa.Integer),
    sa.bindparam("now", type_=UTCDateTime),
)


def on_the_wire() -> sa.Exists:
    """True for an outbox row inside a chunk an in_flight row names (correlated with pending)."""
    f = m.in_flight.c
    return sa.exists().where(
        f.audience_key == p.audience_key, p.user_ref > f.after_ref, p.user_ref <= f.last_ref
    )


# --- counts -----------------------------------------------------------------------------------


def counts(connection: Connection, keys: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Outbox rows per audience (all, or these), and of those the ones in doubt: marked so, or
    inside a chunk that a stopped run left on the wire (settled into the mark by that
    audience's next run). One pass over the outbox for both; audiences with none are absent."""
    doubt = sa.or_(p.in_doubt.is_(True), on_the_wire())
    query = sa.select(p.audience_key, sa.func.count(), sa.func.count().filter(doubt))
    if keys is not None:
        query = query.where(p.audience_key.in_(keys))
    rows = connection.execute(query.group_by(p.audience_key))
    return {key: (int(total), int(in_doubt)) for key, total, in_doubt in rows}


def count(connection: Connection, key: str) -> tuple[int, int]:
    """(changes pending, of which in doubt) for one audience."""
    return counts(connection, [key]).get(key, (0, 0))


def total(connection: Connection, keys: Sequence[str]) -> int:
    """Outbox rows of these audiences together."""
    query = sa.select(sa.func.count()).select_from(m.pending).where(p.audience_key.in_(keys))
    return int(connection.execute(query).scalar_one())


def has_rows(connection: Connection, key: str) -> bool:
    query = sa.select(sa.literal(1)).select_from(m.pending).where(p.audience_key == key).limit(1)
    return connection.execute(query).first() is not None


def refresh_statistics(connection: Connection, keys: Sequence[str]) -> None:
    """ANALYZE the outbox (PostgreSQL) when these audiences together queued more rows than its
    statistics may know of: each audience's diff refreshes them for a large audience of its
    own, but many small ones add up to an outbox the planner takes for an empty one, and it
    then sorts every remaining row of the run for each page (quadratic in the run's changes:
    ten audiences of 2,000 read a page in 10 ms instead of 0.15 ms)."""
    analyze(connection, "pending", total(connection, keys))


# --- queueing: an audience's outbox from its staged snapshot (snapshot.diff) ------------------
# `stage` names the staged snapshot (user_ref, user_id, email, name, title, company_id, value).

_INSERT = """
    INSERT INTO pending (audience_key, user_ref, value, value_json, user_id, email, name, title,
                         company_id, run_id, queued_at, attempts)
"""
_UPSERT = """
    ON CONFLICT (audience_key, user_ref) DO UPDATE SET
        value = excluded.value, value_json = excluded.value_json, user_id = excluded.user_id,
        email = excluded.email, name = excluded.name, title = excluded.title,
        company_id = excluded.company_id, run_id = excluded.run_id, queued_at = excluded.queued_at
"""
_EVERY_ROW = "TRUE"  # a WHERE clause keeps SQLite from reading ON CONFLICT as a join


def _within(scope: str | None, column: str = "pending.user_ref") -> str:
    """`scope` names a table of user_refs (a planner run's changed users, whose stage holds only
    theirs): the statement then touches those users alone. None: every user of the audience."""
    return f" AND {column} IN (SELECT user_ref FROM {scope})" if scope else ""


def drop_stale(connection: Connection, key: str, stage: str, scope: str | None = None) -> None:
    """Drop an audience's queued changes the snapshot made pointless (a pending `true` whose
    user left again, a pending `false` whose user came back); rows in doubt stay. With `scope`,
    only those of the users it names."""
    connection.execute(
        sa.text(
            f"""
            DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt AND (
                (value = TRUE AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref))
                OR (value = FALSE AND EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref))
            ){_within(scope)}
            """
        ),
        {"key": key},
    )


def doubts_follow_membership(connection: Connection, key: str, run_id: int | None, now: datetime,
                             stage: str, scope: str | None = None) -> None:  # fmt: skip
    """In-doubt rows of an audience (few: the partial index ix_pending_in_doubt finds them)
    take the truth: `true` for a staged member, `false` otherwise, and are sent again (with
    `scope`, those of the users it names)."""
    params = {"key": key, "run_id": run_id, "now": now}
    staged = f"(SELECT s.{{column}} FROM {stage} s WHERE s.user_ref = pending.user_ref)"
    to_false = f"""
        UPDATE pending SET value = FALSE, name = NULL, title = NULL, company_id = NULL,
            run_id = :run_id, queued_at = :now
        WHERE audience_key = :key AND in_doubt AND value = TRUE
          AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref){_within(scope)}
    """
    identity = ", ".join(
        f"{c} = {staged.format(column=c)}" for c in ("user_id", "email", "name", "title", "company_id")
    )
    to_true = f"""
        UPDATE pending SET value = TRUE, {identity}, run_id = :run_id, queued_at = :now
        WHERE audience_key = :key AND in_doubt AND value = FALSE
          AND EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref){_within(scope)}
    """
    for statement in (to_false, to_true):
        connection.execute(sa.text(statement).bindparams(*_PARAMS), params)


def queue_entries(connection: Connection, key: str, run_id: int | None, now: datetime, source: str,
                  condition: str = _EVERY_ROW, *, upsert: bool) -> int:  # fmt: skip
    """Queue `true` for the rows of `source` (a stage table, aliased `s`) that meet
    `condition`; with `upsert`, over what the outbox already holds for them. Returns the rows."""
    statement = f"""
        {_INSERT}
        SELECT :key, s.user_ref, TRUE, NULL, s.user_id, s.email, s.name, s.title, s.company_id,
               :run_id, :now, 0
        FROM {source} s
        WHERE {condition}
        {_UPSERT if upsert else ""}
    """
    params = {"key": key, "run_id": run_id, "now": now}
    return connection.execute(sa.text(statement).bindparams(*_PARAMS), params).rowcount


def queue_exits(connection: Connection, key: str, run_id: int | None, now: datetime, stage: str, *,
                upsert: bool, cleared: str | None = None, kept: str | None = None) -> int:  # fmt: skip
    """Queue `false` for every user of the audience's baseline who is not staged (for a
    computed trait, `value_json` = `cleared`, the JSON null that clears the field); with
    `kept`, for the users of that table (user_ref, user_id, email), which a planner run's diff
    found to be those among its changed users (baseline.keep_left). Returns the rows."""
    if kept is not None:
        source, condition = f"{kept} b", "TRUE"
    else:
        source = "baseline b"
        condition = f"b.audience_key = :key AND {baseline.not_staged(connection.dialect.name, stage)}"
    statement = f"""
        {_INSERT}
        SELECT :key, b.user_ref, FALSE, :cleared, b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
        FROM {source}
        WHERE {condition}
        {_UPSERT if upsert else ""}
    """
    params = {"key": key, "run_id": run_id, "now": now, "cleared": cleared}
    cleared_param = sa.bindparam("cleared", type_=sa.Text)
    return connection.execute(sa.text(statement).bindparams(*_PARAMS, cleared_param), params).rowcount


def drop_queued(connection: Connection, key: str, scope: str | None = None) -> None:
    """Drop every queued (not in doubt) row of a computed trait (with `scope`, of the users it
    names): its diff recomputes them."""
    connection.execute(
        sa.text(f"DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt{_within(scope)}"),
        {"key": key},
    )


def doubts_follow_values(connection: Connection, key: str, run_id: int | None, now: datetime, stage: str,
                         *, cleared: str | None, scope: str | None = None) -> None:  # fmt: skip
    """In-doubt rows of a computed trait take the truth: the staged value, or for a user who
    left `cleared` (the JSON null that clears the field; None: they keep the value they have);
    they are sent again."""
    params = {"key": key, "run_id": run_id, "now": now, "cleared": cleared}
    staged = f"(SELECT s.{{column}} FROM {stage} s WHERE s.user_ref = pending.user_ref)"
    identity = ", ".join(
        f"{c} = {staged.format(column=c)}" for c in ("user_id", "email", "name", "title", "company_id")
    )
    to_value = f"""
        UPDATE pending SET value = TRUE, value_json = {staged.format(column="value")}, {identity},
            run_id = :run_id, queued_at = :now
        WHERE audience_key = :key AND in_doubt
          AND EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref){_within(scope)}
    """
    to_null = f"""
        UPDATE pending SET value = FALSE, value_json = :cleared, name = NULL, title = NULL,
            company_id = NULL, run_id = :run_id, queued_at = :now
        WHERE audience_key = :key AND in_doubt
          AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = pending.user_ref){_within(scope)}
    """
    connection.execute(sa.text(to_value).bindparams(*_PARAMS), params)
    if cleared is not None:
        connection.execute(
            sa.text(to_null).bindparams(*_PARAMS, sa.bindparam("cleared", type_=sa.Text)), params
        )


def queue_values(connection: Connection, key: str, run_id: int | None, now: datetime, source: str,
                 condition: str = _EVERY_ROW) -> int:  # fmt: skip
    """Queue a computed trait's value for the rows of `source` (aliased `s`) that meet
    `condition`, over what the outbox holds for them. Returns the rows."""
    statement = f"""
        {_INSERT}
        SELECT :key, s.user_ref, TRUE, s.value, s.user_id, s.email, s.name, s.title, s.company_id,
               :run_id, :now, 0
        FROM {source} s
        WHERE {condition}
        {_UPSERT}
    """
    params = {"key": key, "run_id": run_id, "now": now}
    return connection.execute(sa.text(statement).bindparams(*_PARAMS), params).rowcount


def analyze_after_queueing(connection: Connection, queued: int) -> None:
    """Fresh statistics after a big diff, or PostgreSQL's planner takes a million-row outbox
    for an empty one and sorts all of it for every delivery page."""
    analyze(connection, "pending", queued)


# --- retiring an audience (sync.retire) -------------------------------------------------------


def queue_retirement(connection: Connection, key: str, run_id: int, now: datetime) -> tuple[int, int]:
    """Make the audience's outbox `false` for every user Planhat has or may have as `true`, and
    nothing else (inside the caller's transaction, after settle_in_flight). Returns (users
    queued, of which in doubt); count_retirement counts the same without writing.

    Never confirmed sent, and for a user Planhat does not have as `true`: nothing to take back.
    What is left is a baseline user or in doubt; the in-doubt mark stays, so the row leaves the
    outbox only on a confirmed delivery."""
    params = {"key": key, "run_id": run_id, "now": now}
    connection.execute(
        sa.text(
            "DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt AND NOT EXISTS "
            "(SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = pending.user_ref)"
        ).bindparams(sa.bindparam("key", type_=sa.String)),
        {"key": key},
    )
    connection.execute(
        sa.text(
            "UPDATE pending SET value = FALSE, name = NULL, title = NULL, company_id = NULL, "
            "run_id = :run_id, queued_at = :now WHERE audience_key = :key"
        ).bindparams(*_PARAMS),
        params,
    )
    queued = connection.execute(
        sa.text(
            f"""
            {_INSERT}
            SELECT :key, b.user_ref, FALSE, NULL, b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
            FROM baseline b
            WHERE b.audience_key = :key
              AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.audience_key = :key AND p.user_ref = b.user_ref)
            """
        ).bindparams(*_PARAMS),
        params,
    ).rowcount
    analyze(connection, "pending", queued)  # delivery pages through it
    return count(connection, key)


def _maybe_true(key: str) -> sa.ColumnElement[bool]:
    """Outbox rows whose value Planhat may hold: in doubt, or on the wire (settled into doubt)."""
    return sa.and_(p.audience_key == key, sa.or_(p.in_doubt.is_(True), on_the_wire()))


def _in_baseline(key: str) -> sa.Exists:
    b = m.baseline.c
    return sa.exists().where(b.audience_key == key, b.user_ref == p.user_ref)


def count_retirement(connection: Connection, key: str) -> tuple[int, int]:
    """(users, of which in doubt) that queue_retirement would queue now: the baseline, and the
    outbox rows Planhat may hold (counted once when also in the baseline)."""
    told = sa.select(sa.func.count()).where(m.baseline.c.audience_key == key).scalar_subquery()
    doubt = sa.select(sa.func.count()).select_from(m.pending).where(_maybe_true(key))
    beyond = doubt.where(~_in_baseline(key)).scalar_subquery()
    users, in_doubt = connection.execute(sa.select(told + beyond, doubt.scalar_subquery())).one()
    return int(users), int(in_doubt)


def retirement_samples(
    connection: Connection, key: str, limit: int
) -> list[tuple[str, str | None, str | None]]:
    """The first users (user_ref, user_id, email) a retire would tell `false`, in user order:
    each part walks its index and stops early (a sorted union would sort the whole baseline)."""
    doubt = sa.select(p.user_ref, p.user_id, p.email).where(_maybe_true(key), ~_in_baseline(key))
    rows = baseline.told(connection, key, limit)
    rows += [tuple(row) for row in connection.execute(doubt.order_by(p.user_ref).limit(limit))]
    return sorted(rows, key=lambda row: row[0])[:limit]


def samples(connection: Connection, key: str, limit: int) -> list[Any]:
    """The first outbox rows of an audience, `true` first (a dry run's sample payloads)."""
    query = sa.select(m.pending).where(p.audience_key == key).order_by(p.value.desc(), p.user_ref)
    return list(connection.execute(query.limit(limit)))


# --- delivery: reading, in flight, acknowledging (sync.delivery) ------------------------------

PAGE_COLUMNS = ("id", "audience_key", "user_ref", "value", "user_id", "email", "name", "title",
                "company_id", "value_json")  # fmt: skip
PageRow = tuple[Any, ...]  # one outbox row, columns in the order of PAGE_COLUMNS


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
            f"SELECT {', '.join(PAGE_COLUMNS)} FROM pending "
            f"WHERE {of_keys}{bound} ORDER BY user_ref, audience_key LIMIT {int(limit)}"
        )
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql, params)
            return cast(list[PageRow], cursor.fetchall())
        finally:
            cursor.close()


def mark_in_flight(
    engine: Engine, keys: list[str], run_ids: dict[str, int], after: str, last: str
) -> list[int]:
    """Record, in its own commit, that a chunk's outbox rows are about to be sent: one row per
    audience with the chunk's user_ref range (after, last]. Returns their ids."""
    sent_at = utcnow()
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
                    "sent_at": sent_at,
                }
                for k in keys
            ],
        )
        return [int(row_id) for row_id in result.scalars()]


def clear_in_flight(connection: Connection, ids: Sequence[int]) -> None:
    if ids:
        connection.execute(m.in_flight.delete().where(m.in_flight.c.id.in_(list(ids))))


def settle_in_flight(connection: Connection, key: str) -> int:
    """Put in doubt the outbox rows of chunks a dead process left on the wire (inside the
    caller's transaction, under the audience's lease). Returns how many rows that marked."""
    marked = connection.execute(
        m.pending.update()
        .where(p.audience_key == key, p.in_doubt.is_(False), on_the_wire())
        .values(in_doubt=True, last_error="the process ended while this change was on the wire")
    ).rowcount
    connection.execute(m.in_flight.delete().where(m.in_flight.c.audience_key == key))
    if marked:
        log.warning("audience %r: %d changes a stopped run had on the wire are now in doubt", key, marked)
    return marked or 0


class SpanMismatch(Exception):
    """The outbox rows of a chunk's span are not the chunk's accepted rows."""


def acknowledge_delivered(connection: Connection, rows: list[PageRow], run_ids: dict[str, int], now: datetime,
                          span: tuple[list[str], str, str, list[int]] | None = None,
                          fresh: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """Advance the baseline, log the changes and empty the outbox for the accepted rows. A
    computed trait's baseline takes the value sent (`value_json`; NULL for an audience), and a
    `null` sent (value FALSE) removes its row, as an exit does.

    PostgreSQL does it all in one statement, the outbox rows read once as they are deleted.
    With the chunk's `span` (its audiences, after, last, and the ids of the rows Planhat did
    not accept) they are found by one range scan of the outbox's index; looking up 5,000 ids
    one by one cost a sixth of the statement. The statement's row count must then be the
    chunk's, or it raises SpanMismatch (the caller rolls back). Audiences in `fresh` insert
    into the baseline without the upsert. SQLite takes the ids as a JSON array, in four
    statements.
    """
    ids = [row[0] for row in rows]
    params: dict[str, Any] = {"now": now}
    now_param = sa.bindparam("now", type_=UTCDateTime)
    if connection.dialect.name == "postgresql":
        params.update(run_keys=list(run_ids), run_numbers=list(run_ids.values()))
        if span is None:
            params["ids"] = ids
            chosen = "p.id = ANY(CAST(:ids AS BIGINT[]))"
        else:
            keys, after, last, kept = span
            params.update(keys=keys, after=after, last=last, kept=kept)
            chosen = (
                "p.audience_key = ANY(CAST(:keys AS VARCHAR[])) AND p.user_ref > :after "
                "AND p.user_ref <= :last AND NOT p.id = ANY(CAST(:kept AS BIGINT[]))"
            )
        params["fresh"] = sorted(fresh)
        statement = sa.text(_postgres_acknowledgement(rows, chosen, fresh)).bindparams(now_param)
        result = connection.execute(statement, params)
        if span is not None and result.rowcount != len(rows):
            raise SpanMismatch
        return
    params["ids"] = json.dumps(ids)
    run_id = _run_id_case(run_ids, params)
    chosen = "p.id IN (SELECT value FROM json_each(:ids))"
    baseline.advance_from_outbox(
        connection, chosen, run_id, params,
        entered=any(row[3] for row in rows), exited=not all(row[3] for row in rows),
    )  # fmt: skip
    changes.log_delivered_from_outbox(connection, chosen, run_id, params)
    connection.execute(sa.text("DELETE FROM pending WHERE id IN (SELECT value FROM json_each(:ids))"), params)


def _postgres_acknowledgement(rows: list[PageRow], chosen: str, fresh: frozenset[str]) -> str:
    """One statement: delete the chosen outbox rows, advance the baseline from them (a plain
    insert for audiences in `fresh`), log them in `changes`; its row count is the rows'.

    Each row's run id comes from joining the (audience, run) pairs `:run_keys` and
    `:run_numbers` as the rows are deleted: a CASE over a group run's hundreds of audiences
    compared every row's key with each of them in turn."""
    done = (
        "done AS (DELETE FROM pending p USING unnest(CAST(:run_keys AS VARCHAR[]), "
        "CAST(:run_numbers AS INTEGER[])) AS r (audience_key, run_id) "
        f"WHERE r.audience_key = p.audience_key AND {chosen} "
        "RETURNING p.audience_key, p.user_ref, p.value, p.user_id, p.email, p.value_json, r.run_id)"
    )
    values = {(row[1] in fresh, bool(row[3])) for row in rows}
    ctes = [done] + baseline.advance_ctes(
        "done",
        entered_first=(True, True) in values,
        entered=(False, True) in values,
        exited=any(not value for _, value in values),
    )
    return f"WITH {', '.join(ctes)} {changes.log_delivered_sql('done')}"


def _run_id_case(run_ids: dict[str, int], params: dict[str, Any]) -> str:
    """SQL for "this run's id for the row's audience", its parameters added to `params`
    (SQLite, whose acknowledgement reads the outbox rows by id)."""
    whens = []
    for index, (key, run_id) in enumerate(run_ids.items()):
        params[f"key_{index}"], params[f"run_{index}"] = key, run_id
        whens.append(f"WHEN :key_{index} THEN CAST(:run_{index} AS INTEGER)")
    return f"CASE p.audience_key {' '.join(whens)} END"


def record_refusals(connection: Connection, refused: list[tuple[int, str, bool]]) -> None:
    """Rows Planhat did not accept, each (outbox id, error, in doubt): they stay pending with
    one more attempt and the error; a row in doubt stays in doubt."""
    if not refused:
        return
    connection.execute(
        m.pending.update()
        .where(p.id == sa.bindparam("row_id"))
        .values(
            attempts=p.attempts + 1,
            last_error=sa.bindparam("error"),
            in_doubt=p.in_doubt | sa.bindparam("doubt", type_=sa.Boolean),
        ),
        [{"row_id": row_id, "error": error, "doubt": doubt} for row_id, error, doubt in refused],
    )


# --- after a large delivery (sync.delivery) -----------------------------------------------------

# Acknowledged rows removed by one delivery from which PostgreSQL's outbox is reclaimed.
RECLAIM_FROM = 100_000
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a NOWAIT lock refused


def reclaim(engine: Engine, removed: int) -> str | None:
    """After a delivery removed `removed` outbox rows (PostgreSQL): give back the space of the
    deleted rows now, not when autovacuum comes (never, where it is off). Until then every
    range scan of the outbox walks them: at 10M members, the incremental run right after the
    full sync read each delivery page in 0.18 s. An empty outbox is truncated (milliseconds);
    one that still holds rows (another audience's, refused ones) is vacuumed (7 s after 10M
    deletes). Returns which, or None; a failure is logged, never raised: everything it could
    tidy is already acknowledged."""
    if engine.dialect.name != "postgresql" or removed < RECLAIM_FROM:
        return None
    try:
        with engine.connect() as connection:
            if _truncate_if_empty(connection):
                return "truncated"
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            autocommit.exec_driver_sql("VACUUM (ANALYZE) pending")
            return "vacuumed"
    except sa.exc.SQLAlchemyError as exc:  # e.g. no TRUNCATE right: autovacuum does it later
        reason = driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else exc.__class__.__name__
        log.warning("could not reclaim the outbox's deleted rows: %s", reason)
        return None


def _truncate_if_empty(connection: Connection) -> bool:
    """TRUNCATE the outbox if it holds no row. The lock is taken without waiting: a writer's
    open transaction (rows not yet committed) or a reader in its way means vacuum instead.
    Once taken, others wait for the emptiness check (1.4 s after 10M deletes, in psql).
    (TRUNCATE is not MVCC-safe: a REPEATABLE READ reader that has not read the outbox yet,
    the status page, then sees it empty, as it is.)"""
    try:
        with connection.begin():
            connection.exec_driver_sql("LOCK TABLE pending IN ACCESS EXCLUSIVE MODE NOWAIT")
            if connection.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM pending)").scalar_one():
                return False
            connection.exec_driver_sql("TRUNCATE pending")
            return True
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            return False
        raise


# --- repairs ------------------------------------------------------------------------------------


def move_refs(connection: Connection, key: str, moved: str) -> None:
    """A user known under a new identifier (the table `moved`: old_ref, new_ref): an outbox row
    in doubt for the old identity makes the new identity's row in doubt too (Planhat's contact
    may hold it), moves to the new ref when it has none, and whatever else the outbox held for
    the old identity is never sent."""
    statements = (
        f"UPDATE pending SET in_doubt = TRUE WHERE audience_key = :key AND user_ref IN ("
        f"SELECT m.new_ref FROM {moved} m JOIN pending o ON o.user_ref = m.old_ref "
        "WHERE o.audience_key = :key AND o.in_doubt)",
        f"UPDATE pending SET user_ref = (SELECT m.new_ref FROM {moved} m "
        "WHERE m.old_ref = pending.user_ref) "
        f"WHERE audience_key = :key AND in_doubt AND user_ref IN (SELECT old_ref FROM {moved}) "
        f"AND NOT EXISTS (SELECT 1 FROM pending n JOIN {moved} m ON n.user_ref = m.new_ref "
        "WHERE m.old_ref = pending.user_ref AND n.audience_key = :key)",
        f"DELETE FROM pending WHERE audience_key = :key AND user_ref IN (SELECT old_ref FROM {moved})",
    )
    for statement in statements:
        connection.execute(sa.text(statement), {"key": key})


def settle_after_read(connection: Connection, key: str, *, trait: bool) -> None:
    """After `reconcile --fix` rewrote the baseline to what Planhat showed: Planhat's value is
    known for every pair, so nothing is in doubt, nothing on the wire, and an outbox row asking
    for what Planhat already holds has nothing left to do."""
    params = {"key": key}
    connection.execute(
        sa.text("UPDATE pending SET in_doubt = FALSE WHERE audience_key = :key AND in_doubt"), params
    )
    if trait:
        satisfied = (
            "DELETE FROM pending WHERE audience_key = :key AND ("
            "EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = pending.audience_key "
            "AND b.user_ref = pending.user_ref AND b.value_json = pending.value_json) "
            "OR (NOT value AND NOT EXISTS (SELECT 1 FROM baseline b "
            "WHERE b.audience_key = pending.audience_key AND b.user_ref = pending.user_ref)))"
        )
    else:
        satisfied = (
            "DELETE FROM pending WHERE audience_key = :key AND value = EXISTS (SELECT 1 FROM baseline b "
            "WHERE b.audience_key = pending.audience_key AND b.user_ref = pending.user_ref)"
        )
    connection.execute(sa.text(satisfied), params)
    connection.execute(sa.text("DELETE FROM in_flight WHERE audience_key = :key"), params)
