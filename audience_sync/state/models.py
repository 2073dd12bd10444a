"""The state database's tables (documented for operators in docs/design.md, "The state database").

Each table's SQL is written in one module of this package, its owner (the table-ownership
test holds it): audiences (state/audiences.py), baseline (baseline.py), pending and in_flight
(outbox.py), runs (runs.py), changes (changes.py), leases (leases.py), resync_requests
(resyncs.py), paused_audiences (pauses.py), run_requests (run_requests.py),
planner_snapshots (planner.py). Read-only views across tables (`status`, `history`, the
status page) are in history.py.

audiences        one row per configured audience key; baseline_at set once its first full
                 diff is committed, next_run_at written by the daemon, retired_at set by
                 `audience-sync retire` once Planhat holds no `true` for it, and
                 baseline_count its baseline's rows (NULL while a delivery is changing them)
baseline         the members Planhat has confirmed as `true` (what Planhat was told);
                 advances only when Planhat accepts a change; for a computed trait, the users
                 Planhat holds a value for, with that value (`value_json`)
pending          the outbox: changes computed but not yet accepted by Planhat; `in_doubt`
                 marks a pair whose value in Planhat is unknown (a send had no definite
                 answer), so the row stays until a delivery is confirmed
in_flight        one row per audience per chunk on the wire, written before the chunk is
                 sent and removed with its acknowledgement; a row left behind (a kill) puts
                 that chunk's outbox rows in doubt
runs             one row per audience per run, with counts, status and error
changes          one row per change sent (user, audience, value, outcome, when);
                 pruned after history.retention_days
leases           one row per audience being run: who holds it and until when
resync_requests  full resyncs asked for with `audience-sync resync`
paused_audiences one row per audience paused with `audience-sync pause` (who, when, why);
                 removed by `audience-sync resume`
run_requests     runs asked for over the HTTP API (`POST /api/runs`): the audiences, full or
                 not, and what became of them (status, the runs, the error)
planner_snapshots one row per audience of a source with `planner_schema`: the generation of
                 the snapshot in the warehouse that its outbox was last computed from (planner.py)
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# The Alembic revision these tables are at: the head of migrations/versions. Opening the state
# database compares it with the database's own, without loading Alembic; a new migration
# bumps it (tests/test_packaging.py holds it to Alembic's head).
SCHEMA_REVISION = "0009"

KEY = 255  # audience keys and user identifiers
TEXT = 1024  # traits such as name and title


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every backend, read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


audiences = Table(
    "audiences",
    metadata,
    Column("key", String(KEY), primary_key=True),
    Column("name", String(TEXT), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("baseline_at", UTCDateTime, nullable=True),
    Column("next_run_at", UTCDateTime, nullable=True),
    # Retired: gone from the config and every user told `false`; cleared if it comes back.
    Column("retired_at", UTCDateTime, nullable=True),
    # What the key is, from the config (NULL before 0005: a user-level audience).
    Column("kind", String(16), nullable=True),  # audience | trait
    Column("level", String(16), nullable=True),  # user | account
    # Rows in `baseline` for this key, so that `status` and the metrics need not count them;
    # NULL while a delivery may be changing them (readers count those live; baseline.counts).
    Column("baseline_count", Integer, nullable=True),
)

baseline = Table(
    "baseline",
    metadata,
    Column("audience_key", String(KEY), primary_key=True),
    Column("user_ref", String(KEY), primary_key=True),
    Column("user_id", String(KEY), nullable=True),
    Column("email", String(KEY), nullable=True),
    Column("run_id", Integer, nullable=True),
    Column("told_at", UTCDateTime, nullable=False),
    # A computed trait's value as Planhat has it (canonical JSON text); NULL for an audience.
    Column("value_json", Text, nullable=True),
    # Finds the row of a user who comes back under another identifier (identities.py).
    Index("ix_baseline_email", "audience_key", "email"),
    sqlite_with_rowid=False,  # the key's B-tree holds the row: one search per lookup (0009)
)

pending = Table(
    "pending",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", String(KEY), nullable=False),
    Column("user_ref", String(KEY), nullable=False),
    Column("value", Boolean, nullable=False),
    Column("user_id", String(KEY), nullable=True),
    Column("email", String(KEY), nullable=True),
    Column("name", String(TEXT), nullable=True),
    Column("title", String(TEXT), nullable=True),
    Column("company_id", String(KEY), nullable=True),
    Column("run_id", Integer, nullable=True),
    Column("queued_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    # Planhat may hold either value for this pair: never dropped, only superseded and resent.
    Column("in_doubt", Boolean, nullable=False, server_default=sa.false()),
    # A computed trait's value to send (canonical JSON text, `null` clears the field); NULL for
    # an audience, whose `value` is the membership. For a trait `value` is FALSE only for `null`.
    Column("value_json", Text, nullable=True),
    Index("uq_pending_audience_user", "audience_key", "user_ref", unique=True),
    # Delivery reads the outbox in user order, so one user's audiences coalesce.
    Index("ix_pending_user_ref", "user_ref", "audience_key"),
    # In-doubt rows are few: a partial index finds them without scanning the outbox.
    Index(
        "ix_pending_in_doubt",
        "audience_key",
        "user_ref",
        sqlite_where=sa.text("in_doubt"),
        postgresql_where=sa.text("in_doubt"),
    ),
)

in_flight = Table(
    "in_flight",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", String(KEY), nullable=False),
    Column("run_id", Integer, nullable=True),
    # The chunk is this audience's outbox rows with after_ref < user_ref <= last_ref.
    Column("after_ref", String(KEY), nullable=False),
    Column("last_ref", String(KEY), nullable=False),
    Column("sent_at", UTCDateTime, nullable=False),
    Index("ix_in_flight_audience_key", "audience_key"),
)


runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", String(KEY), nullable=False),
    Column("kind", String(16), nullable=False),  # full | incremental | reconcile | retire
    Column("trigger", String(16), nullable=False),  # cli | schedule | resync
    Column("status", String(16), nullable=False),  # running | success | partial | failed | blocked | aborted
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("members", Integer, nullable=True),
    Column("entered", Integer, nullable=False, server_default="0"),
    Column("exited", Integer, nullable=False, server_default="0"),
    Column("sent", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("skipped", Integer, nullable=False, server_default="0"),
    Column("pending", Integer, nullable=False, server_default="0"),
    Column("in_doubt", Integer, nullable=False, server_default="0"),  # of `pending`, in doubt
    Column("drift", Integer, nullable=True),  # reconcile: pairs where Planhat disagreed
    Column("error", Text, nullable=True),
    Column("holder", String(KEY), nullable=True),
    Index("ix_runs_audience_started", "audience_key", "started_at"),
)

changes = Table(
    "changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, nullable=True),
    Column("audience_key", String(KEY), nullable=False),
    Column("user_ref", String(KEY), nullable=False),
    Column("value", Boolean, nullable=False),
    Column("outcome", String(16), nullable=False),  # delivered | failed | in_doubt
    Column("error", Text, nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Column("value_json", Text, nullable=True),  # a computed trait's value (canonical JSON)
    Index("ix_changes_run_id", "run_id"),
    Index("ix_changes_audience_user", "audience_key", "user_ref"),
    Index("ix_changes_at", "at"),
)

leases = Table(
    "leases",
    metadata,
    Column("audience_key", String(KEY), primary_key=True),
    Column("holder", String(KEY), nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

resync_requests = Table(
    "resync_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audience_key", String(KEY), nullable=False),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("requested_by", String(KEY), nullable=True),
    Column("status", String(16), nullable=False),  # pending | done
    Column("run_id", Integer, nullable=True),
    Column("done_at", UTCDateTime, nullable=True),
    Index("ix_resync_requests_status", "status", "audience_key"),
)

paused_audiences = Table(
    "paused_audiences",
    metadata,
    Column("audience_key", String(KEY), primary_key=True),
    Column("paused_at", UTCDateTime, nullable=False),
    Column("paused_by", String(KEY), nullable=True),  # user@host of the command
    Column("reason", Text, nullable=True),
)

run_requests = Table(
    "run_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("audiences", Text, nullable=False),  # a JSON list of audience keys
    Column("full", Boolean, nullable=False, server_default=sa.false()),
    Column("status", String(16), nullable=False),  # pending | running | done | failed
    Column("requested_at", UTCDateTime, nullable=False),
    Column("requested_by", String(KEY), nullable=True),  # api:<client address>
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("holder", String(KEY), nullable=True),  # the daemon that took it (host:pid:id)
    Column("run_ids", Text, nullable=True),  # a JSON list of the runs it produced
    Column("error", Text, nullable=True),
    Index("ix_run_requests_status", "status"),
)

# An audience diffed in its source's planner schema (snapshot/planner.py): which generation of
# its snapshot there the outbox was last computed from. Written in the transaction that
# commits that outbox, so the warehouse's tables of any other generation are leftovers.
planner_snapshots = Table(
    "planner_snapshots",
    metadata,
    Column("audience_key", String(KEY), primary_key=True),
    Column("source", String(KEY), nullable=False),
    Column("planner_schema", String(KEY), nullable=False),
    Column("generation", Integer, nullable=False),
    Column("fingerprint", String(64), nullable=False),  # what the query was (a change: read in full)
    Column("members", Integer, nullable=False),  # that snapshot's members, as the contract reads them
    Column("run_id", Integer, nullable=True),
    Column("committed_at", UTCDateTime, nullable=False),
)
