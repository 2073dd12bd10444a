"""Computed traits: the diff that sends only what changed.

A trait's query returns the identifier columns of the audience contract plus `value`. Every
value is normalised to canonical JSON text before it is staged (values.py), so that the diff
compares text. The state tables hold that text in `value_json`:

    baseline   the value Planhat holds for the user (the last one it accepted)
    pending    the value to send: a changed or new value (`value` TRUE), or JSON `null`
               (`value` FALSE) for a user who left the query, which clears the field
    changes    the value each change carried

The diff runs in SQL over the same staging tables as an audience's, one transaction: the
trait's outbox is rewritten to exactly what Planhat still has to be told. Rows in doubt (sent
with no definite answer) are never dropped, only set to the truth and resent.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..state import baseline, outbox
from .diff import DiffCounts, count_in_baseline, keep_exited, kept_exits, staged_count
from .staging import ENTERED, EXITED_FOR, MEASURED_FOR, STAGE
from .values import NULL

# connection.info: the trait ENTERED holds (its own mark: an audience's ENTERED holds other rows)
_TRAIT_MEASURED = MEASURED_FOR + ".trait"


def measure(connection: Connection, key: str, on_exit: str) -> DiffCounts:
    """Members; `entered`: users whose value is new or changed (kept aside in ENTERED);
    `exited`: users with a value in Planhat who left the query (0 with on_exit = keep, which
    sends nothing for them)."""
    members = staged_count(connection)
    previous = baseline.count(connection, key)
    connection.info.pop(_TRAIT_MEASURED, None)
    connection.exec_driver_sql(f"DELETE FROM {ENTERED}")
    if previous == 0:
        return DiffCounts(members=members, previous=0, entered=members, exited=0)
    entered = connection.execute(
        sa.text(f"INSERT INTO {ENTERED} SELECT * FROM {STAGE} s WHERE NOT {baseline.HAS_VALUE}"), {"key": key}
    ).rowcount
    changed = count_in_baseline(connection, key)  # of the entered: another value, or new identifiers
    connection.info[_TRAIT_MEASURED] = key
    exited = previous - (members - (entered - changed)) if on_exit == "clear" else 0
    return DiffCounts(members=members, previous=previous, entered=entered, exited=exited)


def measure_changed(connection: Connection, key: str, on_exit: str, scope: str, members: int) -> DiffCounts:
    """`measure` for a planner run, whose stage holds only the current rows of the users
    `scope` names (diff.measure_changed)."""
    previous = baseline.count_kept(connection, key)
    connection.info.pop(_TRAIT_MEASURED, None)
    connection.info.pop(EXITED_FOR, None)
    connection.exec_driver_sql(f"DELETE FROM {ENTERED}")
    entered = connection.execute(
        sa.text(f"INSERT INTO {ENTERED} SELECT * FROM {STAGE} s WHERE NOT {baseline.HAS_VALUE}"), {"key": key}
    ).rowcount
    connection.info[_TRAIT_MEASURED] = key
    # The users who left are kept aside (as an audience's exits) for queue_changes() to clear.
    exited = keep_exited(connection, key, scope, previous) if on_exit == "clear" else 0
    return DiffCounts(members=members, previous=previous, entered=entered, exited=exited)


def queue_changes(
    connection: Connection,
    key: str,
    run_id: int | None,
    now: datetime,
    *,
    full: bool,
    on_exit: str,
    scope: str | None = None,
) -> None:
    """Rewrite the trait's outbox from the staged snapshot (inside the caller's transaction).

    Queued (not in doubt) rows are recomputed from scratch (with `scope`, a planner run's,
    those of the users it names): what is left is the value of every
    user whose value differs from Planhat's (every user on a full sync), and `null` for the
    users who left (on_exit = clear).
    """
    cleared = NULL if on_exit == "clear" else None
    outbox.drop_queued(connection, key, scope)
    outbox.doubts_follow_values(connection, key, run_id, now, STAGE, cleared=cleared, scope=scope)
    if full:
        source, condition = STAGE, "TRUE"
    elif connection.info.get(_TRAIT_MEASURED) == key:  # measured just before, in this transaction
        source, condition = ENTERED, "TRUE"
    else:
        source, condition = STAGE, f"NOT {baseline.HAS_VALUE}"
    queued = outbox.queue_values(connection, key, run_id, now, source, condition)
    if cleared is not None:
        kept = kept_exits(connection, key, scope) if scope is not None else None
        queued += outbox.queue_exits(
            connection, key, run_id, now, STAGE, upsert=True, cleared=cleared, kept=kept
        )
    outbox.analyze_after_queueing(connection, queued)
