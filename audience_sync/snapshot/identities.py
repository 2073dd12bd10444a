"""New identifiers on a known user: resend, and never tell the old identity the opposite.

Engage resends a user's audiences and traits when a new identifier appears on the profile.
Here (after the diff has measured, before the outbox is written, in the same transaction):

* same user_ref, another email (or an email-only user's row told without one): the diff's
  comparison of identifiers (state.baseline.SAME_IDS) keeps the user aside with the entered ones, so the
  current value is queued again and the baseline takes the new identifiers when Planhat
  accepts it;
* another user_ref, same email: an email-only user who gained a user_id, or a user whose
  user_id changed. To Planhat this is one contact (matched by email). Left to the diff, the
  old identity would exit (`false` / `null`) while the new one enters, and whichever arrived
  last would win on that one contact. Instead the baseline row moves to the new user_ref (the
  new ref is kept aside with the entered, so its value is queued and sent under the new
  identifiers), and the old identity's outbox rows go with it: nothing is sent to the old
  identity at all.

Only candidates that the diff already found are looked at: users kept aside (ENTERED, few),
and the baseline rows told under their emails (an index lookup each) whose user left the
query. Emails are compared as the source gives them.
"""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..state import baseline, outbox
from .diff import DiffCounts, forget_moved_exits
from .staging import ENTERED, STAGE

MOVED = "stage_moved"  # (old_ref, new_ref) of this run's re-identified users
EMAILS = "stage_new_emails"  # email -> user_ref of the kept-aside users not in the baseline


def carry_over(connection: Connection, key: str, counts: DiffCounts, scope: str | None = None) -> DiffCounts:
    """Move re-identified users' baseline and outbox rows to their new user_ref; returns the
    counts with them counted as resent rather than as an exit and an entry. `scope`: a planner
    run's changed users (its stage holds only theirs): an old identity must be among them."""
    if not (counts.entered and counts.exited):
        return counts
    sqlite = connection.dialect.name == "sqlite"
    key_type = "TEXT" if sqlite else "VARCHAR(255)"
    for table, columns in ((EMAILS, "email"), (MOVED, "old_ref")):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {table} ({columns} {key_type} PRIMARY KEY, new_ref {key_type} NOT NULL)"
        )
    params = {"key": key}
    # The kept-aside users who are not in the baseline, by email (few rows)...
    found = connection.execute(
        sa.text(
            f"INSERT INTO {EMAILS} (email, new_ref) SELECT e.email, min(e.user_ref) FROM {ENTERED} e "
            "WHERE e.email IS NOT NULL AND NOT EXISTS (SELECT 1 FROM baseline n "
            "WHERE n.audience_key = :key AND n.user_ref = e.user_ref) GROUP BY e.email"
        ),
        params,
    ).rowcount
    # ...then, through ix_baseline_email, the baseline rows told under those emails whose user
    # left the query under another ref (an email-only user's email is also its ref). CROSS
    # JOIN makes SQLite walk the few emails and probe the index.
    moved = 0
    if found:
        moved = connection.execute(
            sa.text(
                f"INSERT INTO {MOVED} (old_ref, new_ref) SELECT b.user_ref, min(x.new_ref) "
                f"FROM {EMAILS} x CROSS JOIN baseline b "
                "WHERE b.audience_key = :key AND b.email = x.email AND b.user_ref <> x.new_ref "
                f"AND NOT EXISTS (SELECT 1 FROM {STAGE} s WHERE s.user_ref = b.user_ref) "
                + (f"AND b.user_ref IN (SELECT user_ref FROM {scope}) " if scope else "")
                + "GROUP BY b.user_ref"
            ),
            params,
        ).rowcount
    if moved:
        _move(connection, params)
    for table in (EMAILS, MOVED):
        connection.exec_driver_sql(f"DROP TABLE {table}")
    if not moved:
        return counts
    return dataclasses.replace(
        counts, entered=counts.entered - moved, exited=counts.exited - moved, resent=counts.resent + moved
    )


def _move(connection: Connection, params: dict[str, str]) -> None:
    # One old identity per new ref (two old rows sharing an email: the first keeps it).
    connection.execute(
        sa.text(
            f"DELETE FROM {MOVED} WHERE old_ref <> (SELECT min(m.old_ref) FROM {MOVED} m "
            f"WHERE m.new_ref = {MOVED}.new_ref)"
        )
    )
    # The baseline row moves: Planhat's contact holds this value. The new ref is among the
    # users kept aside (it was not in the baseline), so its value is queued all the same and
    # the acknowledgement gives the row the new identifiers. The old identity's outbox rows go
    # with it: nothing is sent to the old identity at all.
    baseline.move_refs(connection, params["key"], MOVED)
    outbox.move_refs(connection, params["key"], MOVED)
    forget_moved_exits(connection, params["key"], MOVED)
