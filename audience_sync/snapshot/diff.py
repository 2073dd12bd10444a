"""The diff of an audience, set-based, in the state database: its staged snapshot (`staging`)
against the baseline (what Planhat was told).

One transaction, under the audience's lease:

* `measure` counts members, entered (staged but not in the baseline) and exited (in the
  baseline but not staged); the entered rows are kept aside (`stage_entered`) for the next step;
* `queue_changes` rewrites the audience's outbox (`state.outbox`) so that it holds exactly what
  Planhat still has to be told: stale entries dropped (a pending `true` whose user left again,
  a pending `false` whose user came back), entries `true` upserted for entered users (every
  member on a full sync), entries `false` upserted for exited users.

An entry in doubt (sent, no definite answer: Planhat may hold its value) is never dropped as
stale: Planhat may hold the very value the truth has moved away from. It is set to the truth
instead (`true` for a member, `false` otherwise) and sent again, even when the truth moved
back to the value sent: Planhat may not have it.

Computed traits diff values instead of membership (`traits`); a user known under new
identifiers is carried over by `identities`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..state import baseline, outbox
from .staging import ENTERED, EXITED, EXITED_FOR, MEASURED_FOR, STAGE


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


def staged_count(connection: Connection) -> int:
    return int(connection.exec_driver_sql(f"SELECT count(*) FROM {STAGE}").scalar_one())


def measure(connection: Connection, key: str) -> DiffCounts:
    """Count members, entered and exited. The entered rows are kept aside (ENTERED), so that
    queue_changes() does not walk the whole stage against the baseline a second time."""
    members = staged_count(connection)
    previous = baseline.count(connection, key)
    _forget_entered(connection)
    if previous == 0:  # a first sync: everyone enters, and a full sync queues the stage itself
        return DiffCounts(members=members, previous=0, entered=members, exited=0)
    entered, resent = _keep_entered(connection, key)
    # Members also in the baseline are members - entered; the rest of the baseline exited.
    exited = previous - (members - (entered - resent))
    return DiffCounts(members, previous, entered - resent, exited, resent)


def measure_changed(connection: Connection, key: str, scope: str, members: int) -> DiffCounts:
    """`measure` for a planner run, whose stage holds only the current rows of the users
    `scope` names (those whose rows changed in the warehouse): entered among the staged,
    exited among the scope; `members` is the snapshot's, counted by the caller."""
    previous = baseline.count_kept(connection, key)
    _forget_entered(connection)
    entered, resent = _keep_entered(connection, key)
    exited = keep_exited(connection, key, scope, previous)
    return DiffCounts(members, previous, entered - resent, exited, resent)


def _forget_entered(connection: Connection) -> None:
    """Empty ENTERED, which an earlier measure of another audience may have filled, and forget
    whose rows ENTERED and EXITED hold (EXITED is emptied when it is filled again)."""
    connection.info.pop(MEASURED_FOR, None)
    connection.info.pop(EXITED_FOR, None)
    connection.exec_driver_sql(f"DELETE FROM {ENTERED}")


def keep_exited(connection: Connection, key: str, scope: str, previous: int) -> int:
    """Keep aside in EXITED the scope's users who exited (a planner run's), for queue_changes():
    one walk of the baseline (of `previous` rows) for both the count and the queueing. Returns
    how many."""
    kind = "TEXT" if connection.dialect.name == "sqlite" else "VARCHAR(255)"
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {EXITED} "
        f"(user_ref {kind} NOT NULL PRIMARY KEY, user_id {kind}, email {kind})"
    )
    connection.exec_driver_sql(f"DELETE FROM {EXITED}")
    exited = baseline.keep_left(connection, key, scope, STAGE, EXITED, previous)
    connection.info[EXITED_FOR] = key
    return exited


def kept_exits(connection: Connection, key: str, scope: str) -> str:
    """The table of the scope's exits, kept aside when measured in this transaction, else now."""
    if connection.info.get(EXITED_FOR) != key:
        keep_exited(connection, key, scope, baseline.count_kept(connection, key))
    return EXITED


def forget_moved_exits(connection: Connection, key: str, moved: str) -> None:
    """Users who exited under an old identity that moved to a new one (`moved`: old_ref,
    new_ref; identities.carry_over) are no exits: nothing is sent to the old identity."""
    if connection.info.get(EXITED_FOR) == key:
        connection.exec_driver_sql(f"DELETE FROM {EXITED} WHERE user_ref IN (SELECT old_ref FROM {moved})")


def _keep_entered(connection: Connection, key: str) -> tuple[int, int]:
    """Keep aside in ENTERED the staged users not in the baseline, and those in it under other
    identifiers (a new email, say), whose `true` is sent again. Returns how many were kept and
    how many of those were resends."""
    entered = connection.execute(
        sa.text(f"INSERT INTO {ENTERED} SELECT * FROM {STAGE} s WHERE NOT {baseline.HAS_MEMBER}"),
        {"key": key},
    ).rowcount
    connection.info[MEASURED_FOR] = key
    return entered, count_in_baseline(connection, key)


def count_in_baseline(connection: Connection, key: str) -> int:
    """Of the rows kept aside in ENTERED, those whose user is in the baseline (few)."""
    return int(
        connection.execute(
            sa.text(f"SELECT count(*) FROM {ENTERED} s WHERE {baseline.HAS_USER}"), {"key": key}
        ).scalar_one()
    )


def queue_changes(connection: Connection, key: str, run_id: int | None, now: datetime, *, full: bool,
                  scope: str | None = None) -> None:  # fmt: skip
    """Rewrite the audience's outbox from the staged snapshot (inside the caller's transaction).
    `scope`: a planner run's, whose stage is the current rows of the users it names; the
    outbox rows of everyone else stay as they are."""
    outbox.drop_stale(connection, key, STAGE, scope)
    outbox.doubts_follow_membership(connection, key, run_id, now, STAGE, scope)
    if full:
        source, condition = STAGE, "TRUE"
    elif connection.info.get(MEASURED_FOR) == key:
        source, condition = ENTERED, "TRUE"  # measured just before, in this transaction
    else:
        source, condition = STAGE, f"NOT {baseline.HAS_MEMBER}"
    # An outbox with nothing left for the audience (the usual case: the last run delivered
    # everything) takes plain inserts: entries (staged users) and exits (users not staged) are
    # disjoint, and the lease keeps every other writer out. An upsert per row costs a third
    # more on PostgreSQL (a speculative insertion, its lock and one more WAL record each).
    upsert = outbox.has_rows(connection, key)
    queued = outbox.queue_entries(connection, key, run_id, now, source, condition, upsert=upsert)
    kept = kept_exits(connection, key, scope) if scope is not None else None
    queued += outbox.queue_exits(connection, key, run_id, now, STAGE, upsert=upsert, kept=kept)
    outbox.analyze_after_queueing(connection, queued)
