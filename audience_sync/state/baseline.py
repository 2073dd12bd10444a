"""The `baseline` table: what Planhat was told and confirmed, per audience and user.

For an audience, the members Planhat has as `true`; for a computed trait, the users Planhat
holds a value for, with that value (`value_json`). It advances only when Planhat accepts a
change (the acknowledgement, `outbox.acknowledge`), and `reconcile --fix` rewrites it to what
Planhat showed. Its rows per audience are kept in `audiences.baseline_count` (`recount`), so
`status` need not count a million rows; `counts` is the one answer to "how many".

The diff's set-based statements read it through the predicates below, over a staged row `s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import audiences
from . import models as m
from .models import UTCDateTime

COLUMNS = "audience_key, user_ref, user_id, email, run_id, told_at, value_json"
UPSERT = (
    "ON CONFLICT (audience_key, user_ref) DO UPDATE SET user_id = excluded.user_id, "
    "email = excluded.email, run_id = excluded.run_id, told_at = excluded.told_at, "
    "value_json = excluded.value_json"
)

# --- predicates over a staged row `s` (the diff's statements; `:key` is the audience) --------

# The baseline row was told under the staged user's email (its user_id is its user_ref, or
# there is none). A user whose ref changed is kept aside anyway: not in the baseline.
SAME_IDS = "(b.email = s.email OR (b.email IS NULL AND s.email IS NULL))"
# Planhat was told about the staged user (under any identifiers).
HAS_USER = "EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref)"
# Planhat has the staged user as a member, told under the same identifiers.
HAS_MEMBER = (
    "EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref "
    f"AND {SAME_IDS})"
)
# Planhat holds the staged user's value (a computed trait's), told under the same identifiers.
HAS_VALUE = (
    "EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref "
    f"AND b.value_json = s.value AND {SAME_IDS})"
)


def not_staged(dialect: str, stage: str) -> str:
    """The baseline row `b` (of the audience `:key`) is of a user not in `stage`: one who left.
    SQLite walks the audience's baseline and the stage side by side in key order (a MERGE of
    an EXCEPT), where a search of the stage per baseline row took twice as long at 1M members;
    PostgreSQL hashes the anti-join."""
    if dialect == "sqlite":
        return (
            "b.user_ref IN (SELECT user_ref FROM baseline WHERE audience_key = :key "
            f"EXCEPT SELECT user_ref FROM {stage} ORDER BY 1)"
        )
    return f"NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = b.user_ref)"


# --- counts -----------------------------------------------------------------------------------


def count(connection: Connection, key: str) -> int:
    """The users Planhat was told about for one audience, counted."""
    query = sa.select(sa.func.count()).select_from(m.baseline).where(m.baseline.c.audience_key == key)
    return int(connection.execute(query).scalar_one())


def count_kept(connection: Connection, key: str) -> int:
    """The audience's baseline rows: the kept count when one is kept, else counted."""
    kept = audiences.kept_baseline_counts(connection).get(key)
    return int(kept) if kept is not None else count(connection, key)


# A planner run whose scope is at most this share of the baseline finds its exits on
# PostgreSQL by one probe of the baseline's key per scope user. Its planner costs each probe as
# a read from disk and hashed the whole baseline instead: at 10M members and 100,000 users in
# scope, 3.8 s against 0.7 s (docs/performance.md). The two break even near 5%.
PROBE_SHARE = 1 / 30


def keep_left(connection: Connection, key: str, scope: str, stage: str, kept: str, previous: int) -> int:
    """Keep aside in the table `kept` (user_ref, user_id, email) the users `scope` names (a
    planner run's changed users) who are in the baseline and not in `stage` (their current
    rows): the users who exited, walked from the scope (SQLite's CROSS JOIN, PostgreSQL's
    LATERAL when the scope is small: one probe of the baseline's key per user). The outbox
    queues their exits from there: one walk of the baseline for both the count and the
    queueing (at 10M members, each walk of 100,000 changed users cost seconds). `previous`:
    the audience's baseline rows (`count_kept`). Returns how many."""
    pairs = f"{scope} x CROSS JOIN baseline b WHERE b.audience_key = :key AND b.user_ref = x.user_ref"
    if connection.dialect.name == "postgresql" and _small_scope(connection, scope, previous):
        pairs = (
            f"{scope} x CROSS JOIN LATERAL (SELECT user_ref, user_id, email FROM baseline "
            "WHERE audience_key = :key AND user_ref = x.user_ref LIMIT 1) b WHERE TRUE"
        )  # LIMIT: the planner may not flatten the subquery into a join it would hash
    statement = f"""
        INSERT INTO {kept} (user_ref, user_id, email)
        SELECT b.user_ref, b.user_id, b.email FROM {pairs}
          AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_ref = b.user_ref)
    """
    return connection.execute(sa.text(statement), {"key": key}).rowcount


def _small_scope(connection: Connection, scope: str, previous: int) -> bool:
    """The scope is at most PROBE_SHARE of the audience's `previous` baseline rows."""
    in_scope = connection.exec_driver_sql(f"SELECT count(*) FROM {scope}").scalar_one()
    return bool(in_scope <= previous * PROBE_SHARE)


def counts(connection: Connection) -> dict[str, int]:
    """Users in each audience's baseline (audiences with none are absent): the kept
    `baseline_count`, and, for audiences a delivery may be changing (NULL), their rows counted
    through the primary key. Counting every audience took 200 ms at a million rows on
    PostgreSQL. (Two statements: one with a correlated count costs PostgreSQL's planner a
    JIT compilation of 170 ms for the subquery it then never runs.)"""
    kept = audiences.kept_baseline_counts(connection)
    unknown = [key for key, kept_count in kept.items() if kept_count is None]
    if unknown:
        kept.update(_grouped_counts(connection, unknown))
    return {key: int(n) for key, n in kept.items() if n}


def forget_counts(connection: Connection, keys: Sequence[str]) -> None:
    """Before a delivery changes these audiences' baselines: readers count them live."""
    audiences.clear_baseline_counts(connection, keys)


def recount(connection: Connection, keys: Sequence[str], unknown_only: bool = False) -> None:
    """Keep these audiences' baseline counts (or only those not kept), once nothing is
    changing their baselines. One grouped count, not one correlated per audience: PostgreSQL
    JIT-compiles the latter (0.2 s at 200 audiences)."""
    if unknown_only:
        keys = audiences.uncounted(connection, keys)
    if not keys:
        return
    found = _grouped_counts(connection, keys)
    audiences.store_baseline_counts(connection, {key: found.get(key, 0) for key in keys})


def _grouped_counts(connection: Connection, keys: Sequence[str]) -> dict[str, int]:
    """The baseline rows of these audiences, counted (audiences with none are absent)."""
    b = m.baseline.c
    query = sa.select(b.audience_key, sa.func.count()).where(b.audience_key.in_(keys))
    return {key: int(n) for key, n in connection.execute(query.group_by(b.audience_key))}


def empty_keys(connection: Connection, keys: Sequence[str]) -> frozenset[str]:
    """Of these audiences, those with an empty baseline (PostgreSQL)."""
    found = connection.execute(
        sa.text(
            "SELECT k FROM unnest(CAST(:keys AS VARCHAR[])) AS k "
            "WHERE NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = k)"
        ),
        {"keys": list(keys)},
    ).scalars()
    return frozenset(found)


def told(connection: Connection, key: str, limit: int) -> list[tuple[str, str | None, str | None]]:
    """The first users (user_ref, user_id, email) Planhat was told about, in user order."""
    b = m.baseline.c
    query = sa.select(b.user_ref, b.user_id, b.email).where(b.audience_key == key).order_by(b.user_ref)
    return [tuple(row) for row in connection.execute(query.limit(limit))]


# --- advancing: the acknowledgement of accepted changes (outbox.acknowledge) ------------------


def advance_from_outbox(connection: Connection, chosen: str, run_id: str, params: dict[str, Any], *,
                        entered: bool, exited: bool) -> None:  # fmt: skip
    """Apply accepted outbox rows `pending p WHERE {chosen}` (SQLite): a `true` (or a trait's
    value) inserts or updates the user's row, a `false` (or a `null`) removes it."""
    now = sa.bindparam("now", type_=UTCDateTime)
    if entered:
        connection.execute(
            sa.text(
                f"INSERT INTO baseline ({COLUMNS}) "
                f"SELECT p.audience_key, p.user_ref, p.user_id, p.email, {run_id}, :now, p.value_json "
                f"FROM pending p WHERE {chosen} AND p.value = TRUE {UPSERT}"
            ).bindparams(now),
            params,
        )
    if exited:
        connection.execute(
            sa.text(
                "DELETE FROM baseline WHERE (audience_key, user_ref) IN ("
                f"SELECT p.audience_key, p.user_ref FROM pending p WHERE {chosen} AND p.value = FALSE)"
            ),
            params,
        )


def advance_ctes(done: str, *, entered_first: bool, entered: bool, exited: bool) -> list[str]:
    """The same (PostgreSQL), as common table expressions of one statement over the CTE `done`
    (the outbox rows deleted, with their run id): `entered_first` inserts for the audiences in
    `:fresh`, whose baselines were empty (no upsert needed), `entered` upserts for the others."""
    select = (
        "SELECT p.audience_key, p.user_ref, p.user_id, p.email, p.run_id, :now, p.value_json "
        f"FROM {done} p WHERE p.value"
    )
    ctes = []
    if entered_first:
        ctes.append(
            f"entered_first AS (INSERT INTO baseline ({COLUMNS}) {select} "
            "AND p.audience_key = ANY(CAST(:fresh AS VARCHAR[])))"
        )
    if entered:
        ctes.append(
            f"entered AS (INSERT INTO baseline ({COLUMNS}) {select} "
            f"AND NOT p.audience_key = ANY(CAST(:fresh AS VARCHAR[])) {UPSERT})"
        )
    if exited:
        ctes.append(
            f"exited AS (DELETE FROM baseline b USING {done} p WHERE NOT p.value "
            "AND b.audience_key = p.audience_key AND b.user_ref = p.user_ref)"
        )
    return ctes


# --- a user known under a new identifier (snapshot.identities) --------------------------------


def move_refs(connection: Connection, key: str, moved: str) -> None:
    """Move the audience's rows of the old refs in the table `moved` (old_ref, new_ref) to their
    new ref: Planhat's contact (matched by email) holds this value."""
    connection.execute(
        sa.text(
            f"UPDATE baseline SET user_ref = (SELECT m.new_ref FROM {moved} m "
            "WHERE m.old_ref = baseline.user_ref) "
            f"WHERE audience_key = :key AND user_ref IN (SELECT old_ref FROM {moved})"
        ),
        {"key": key},
    )


# --- reconcile --fix: what Planhat showed -----------------------------------------------------


def repair_from_drift(connection: Connection, key: str, drift: str, now: datetime, *, trait: bool) -> None:
    """Make the audience's baseline what Planhat showed, from the table `drift` (category,
    user_ref, user_id, email, value_json) a reconcile just filled: for an audience, the users
    not `true` in Planhat leave it and those `true` there join it; for a computed trait, every
    drifted user takes the value Planhat holds (none: the row goes)."""
    params = {"key": key, "now": now}
    bound = sa.bindparam("now", type_=UTCDateTime)
    if trait:
        statements = (
            f"DELETE FROM baseline WHERE audience_key = :key AND user_ref IN (SELECT user_ref FROM {drift})",
            f"INSERT INTO baseline ({COLUMNS}) "
            f"SELECT :key, user_ref, user_id, email, NULL, :now, value_json FROM {drift} "
            "WHERE value_json IS NOT NULL ON CONFLICT (audience_key, user_ref) DO NOTHING",
        )
    else:
        statements = (
            f"DELETE FROM baseline WHERE audience_key = :key AND user_ref IN "
            f"(SELECT user_ref FROM {drift} WHERE category <> 'unexpected_true')",
            "INSERT INTO baseline (audience_key, user_ref, user_id, email, run_id, told_at) "
            f"SELECT :key, user_ref, user_id, email, NULL, :now FROM {drift} "
            "WHERE category = 'unexpected_true' ON CONFLICT (audience_key, user_ref) DO NOTHING",
        )
    for statement in statements:
        text = sa.text(statement)
        connection.execute(text.bindparams(bound) if ":now" in statement else text, params)
