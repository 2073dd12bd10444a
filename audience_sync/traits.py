"""Computed traits: normalising their values, and the diff that sends only what changed.

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

from .diff import ANALYZE_AFTER, ENTERED, SAME_IDS, STAGE, DiffCounts, count_in_baseline
from .models import UTCDateTime
from .values import NULL

# --- the diff -------------------------------------------------------------------------------

_MEASURED_FOR = "audience_sync.trait_entered_for"  # connection.info: the trait ENTERED holds

# Planhat holds this value for the user, told under the same identifiers.
_SAME_IN_BASELINE = (
    "EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = s.user_ref "
    f"AND b.value_json = s.value AND {SAME_IDS})"
)


def measure(connection: Connection, key: str, on_exit: str) -> DiffCounts:
    """Members; `entered`: users whose value is new or changed (kept aside in ENTERED);
    `exited`: users with a value in Planhat who left the query (0 with on_exit = keep, which
    sends nothing for them)."""
    members = connection.exec_driver_sql(f"SELECT count(*) FROM {STAGE}").scalar_one()
    previous = connection.execute(
        sa.text("SELECT count(*) FROM baseline WHERE audience_key = :key"), {"key": key}
    ).scalar_one()
    connection.info.pop(_MEASURED_FOR, None)
    connection.exec_driver_sql(f"DELETE FROM {ENTERED}")
    if previous == 0:
        return DiffCounts(members=members, previous=0, entered=members, exited=0)
    entered = connection.execute(
        sa.text(f"INSERT INTO {ENTERED} SELECT * FROM {STAGE} s WHERE NOT {_SAME_IN_BASELINE}"), {"key": key}
    ).rowcount
    changed = count_in_baseline(connection, key)  # of the entered: another value, or new identifiers
    connection.info[_MEASURED_FOR] = key
    exited = previous - (members - (entered - changed)) if on_exit == "clear" else 0
    return DiffCounts(members=members, previous=previous, entered=entered, exited=exited)


_PARAMS = (
    sa.bindparam("key", type_=sa.String),
    sa.bindparam("run_id", type_=sa.Integer),
    sa.bindparam("now", type_=UTCDateTime),
)

_UPSERT = """
    ON CONFLICT (audience_key, user_ref) DO UPDATE SET
        value = excluded.value, value_json = excluded.value_json, user_id = excluded.user_id,
        email = excluded.email, name = excluded.name, title = excluded.title,
        company_id = excluded.company_id, run_id = excluded.run_id, queued_at = excluded.queued_at
"""

_DROP_QUEUED = sa.text("DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt")

# In doubt: Planhat may hold the value sent or the one before; set to the truth and resend.
_DOUBT_TO_VALUE = sa.text(
    f"""
    UPDATE pending SET value = TRUE,
        value_json = (SELECT s.value FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        user_id = (SELECT s.user_id FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        email = (SELECT s.email FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        name = (SELECT s.name FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        title = (SELECT s.title FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        company_id = (SELECT s.company_id FROM {STAGE} s WHERE s.user_ref = pending.user_ref),
        run_id = :run_id, queued_at = :now
    WHERE audience_key = :key AND in_doubt
      AND EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref)
    """
).bindparams(*_PARAMS)
_DOUBT_TO_NULL = sa.text(
    f"""
    UPDATE pending SET value = FALSE, value_json = '{NULL}', name = NULL, title = NULL,
        company_id = NULL, run_id = :run_id, queued_at = :now
    WHERE audience_key = :key AND in_doubt
      AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = pending.user_ref)
    """
).bindparams(*_PARAMS)

_QUEUE_VALUES = f"""
    INSERT INTO pending (audience_key, user_ref, value, value_json, user_id, email, name, title,
                         company_id, run_id, queued_at, attempts)
    SELECT :key, s.user_ref, TRUE, s.value, s.user_id, s.email, s.name, s.title, s.company_id,
           :run_id, :now, 0
    FROM {{table}} s
    WHERE {{condition}}
    {_UPSERT}
"""
_QUEUE_NULLS = sa.text(
    f"""
    INSERT INTO pending (audience_key, user_ref, value, value_json, user_id, email, name, title,
                         company_id, run_id, queued_at, attempts)
    SELECT :key, b.user_ref, FALSE, '{NULL}', b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
    FROM baseline b
    WHERE b.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = b.user_ref)
    {_UPSERT}
    """
).bindparams(*_PARAMS)


def queue_changes(
    connection: Connection,
    key: str,
    run_id: int | None,
    now: datetime,
    *,
    full: bool,
    on_exit: str,
) -> None:
    """Rewrite the trait's outbox from the staged snapshot (inside the caller's transaction).

    Queued (not in doubt) rows are recomputed from scratch: what is left is the value of every
    user whose value differs from Planhat's (every user on a full sync), and `null` for the
    users who left (on_exit = clear).
    """
    params = {"key": key, "run_id": run_id, "now": now}
    connection.execute(_DROP_QUEUED, {"key": key})
    connection.execute(_DOUBT_TO_VALUE, params)
    if on_exit == "clear":
        connection.execute(_DOUBT_TO_NULL, params)
    if full:
        table, condition = STAGE, "TRUE"
    elif connection.info.get(_MEASURED_FOR) == key:  # measured just before, in this transaction
        table, condition = ENTERED, "TRUE"
    else:
        table, condition = STAGE, f"NOT {_SAME_IN_BASELINE}"
    queued = connection.execute(
        sa.text(_QUEUE_VALUES.format(table=table, condition=condition)).bindparams(*_PARAMS), params
    ).rowcount
    if on_exit == "clear":
        queued += connection.execute(_QUEUE_NULLS, params).rowcount
    if connection.dialect.name == "postgresql" and queued > ANALYZE_AFTER:
        connection.exec_driver_sql("ANALYZE pending")
