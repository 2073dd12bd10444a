"""The first half of a run, per audience: stage its snapshot, diff it, apply the guard, and
rewrite its outbox, in one transaction under its lease.

A run of several audiences on a PostgreSQL state database snapshots two at a time; on SQLite,
whose one writer holds the database during a diff, one after another. One audience's failure
holds back no other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..config import AudienceSettings, SafetySettings
from ..errors import AudienceSyncError
from ..snapshot import diff, identities, staging, traits
from ..snapshot.contract import ReadStats
from ..snapshot.sources import SourcePool, read_members
from ..state import audiences, outbox, resyncs, runs
from ..state.database import begin_write, database_error
from ..support.clock import utcnow
from ..support.logs import run_context
from .guard import blocked
from .reports import RunReport, SyncOptions, log_run

log = logging.getLogger(__name__)

# Audiences snapshotted at once on PostgreSQL. A group run's snapshots are mostly the server's
# work (COPY, the stage's sort and key, the outbox insert), in one backend per connection:
# two keep both cores of a small host busy while this process reads the next source. SQLite
# has one writer, whose diff holds the database: its audiences go one after another.
SNAPSHOT_WORKERS = 2


def queue_all(
    engine: Engine,
    pool: SourcePool,
    chosen: list[AudienceSettings],
    options: SyncOptions,
    safety: SafetySettings,
    holder: str,
    should_stop: Callable[[], bool],
) -> dict[str, RunReport]:
    """Snapshot, diff and queue each audience (one failing does not hold back the others);
    those not started before `should_stop` are left out. A report still `running` has changes
    to deliver."""

    def one(audience: AudienceSettings) -> RunReport | None:
        if should_stop():
            return None
        return queue_one(engine, pool, audience, options, safety, holder)

    workers = min(len(chosen), SNAPSHOT_WORKERS if engine.dialect.name == "postgresql" else 1)
    done: Iterable[RunReport | None]
    if workers <= 1:
        done = map(one, chosen)
    else:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="audience-sync-snapshot")
        try:
            done = [future.result() for future in [executor.submit(one, a) for a in chosen]]
        finally:  # Ctrl-C: the snapshots under way finish, the others never start
            executor.shutdown(wait=True, cancel_futures=True)
    return {report.key: report for report in done if report is not None}


def queue_one(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    options: SyncOptions,
    safety: SafetySettings,
    holder: str,
) -> RunReport:
    """Stage, diff and queue one audience; the report stays 'running' when there is more to do."""
    started, started_at = time.monotonic(), utcnow()
    with engine.begin() as connection:
        runs.abort_stale(connection, audience.key)
        kind, trigger = run_kind(connection, audience.key, options)
        run_id = runs.start(connection, audience.key, kind, trigger, holder, started_at)
    report = RunReport(key=audience.key, name=audience.name, kind=kind, run_id=run_id)
    with run_context(run_id):  # this thread's lines name the run
        return _queue_started(engine, pool, audience, report, options, safety, started, started_at)


def _queue_started(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
    started: float,
    started_at: datetime,
) -> RunReport:
    stage_and_queue = _stage_and_queue
    if pool.settings(audience.source).planner_schema is not None:
        from .planned import stage_and_queue  # the planner's run, built on this module's steps
    try:
        counts, skipped = stage_and_queue(engine, pool, audience, report, options, safety, started_at)
    except AudienceSyncError as exc:
        return fail(engine, report, "failed", str(exc), started)
    except sa.exc.SQLAlchemyError as exc:
        return fail(engine, report, "failed", database_error("state database", engine.url, exc), started)
    report.members, report.entered, report.exited, report.skipped = (
        counts.members,
        counts.entered,
        counts.exited,
        skipped,
    )
    if report.status == "blocked":
        return fail(engine, report, "blocked", report.error or "", started)
    return report


def run_kind(connection: Connection, key: str, options: SyncOptions) -> tuple[str, str]:
    """The run's kind and trigger. A scheduled run of an audience with a resync requested is
    that resync (the daemon runs due audiences together, some of them resyncs)."""
    if options.reconcile:
        return "reconcile", options.trigger
    if resyncs.is_requested(connection, key):
        return "full", "resync" if options.trigger == "schedule" else options.trigger
    full = options.full or not audiences.has_baseline(connection, key)
    return ("full" if full else "incremental"), options.trigger


def _stage_and_queue(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
    as_of: datetime,
) -> tuple[diff.DiffCounts, int]:
    with engine.connect() as connection:
        try:
            counts, skipped = stage_and_measure(connection, pool, audience, as_of, write=True)
            if queue_unless_blocked(connection, audience, report, options, safety, counts, skipped):
                connection.commit()
            return counts, skipped
        finally:
            discard_stage(connection)


def queue_unless_blocked(
    connection: Connection,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
    counts: diff.DiffCounts,
    skipped: int,
    *,
    scope: str | None = None,
) -> datetime | None:
    """The guard, then the measured changes into the outbox and the counts onto the run's record,
    in the caller's write transaction (the caller commits). Returns when they were queued, or
    None when the guard blocked the run (the report says why; the transaction is rolled back)."""
    reason = blocked(counts, safety, audience.key, force=options.force)
    if reason:
        report.status, report.error = "blocked", reason
        connection.rollback()
        return None
    now = utcnow()
    assert report.run_id is not None
    queue_changes(connection, audience, report.run_id, now, full=report.kind == "full", scope=scope)
    audiences.mark_baselined(connection, audience.key, now)
    runs.update(
        connection,
        report.run_id,
        members=counts.members,
        entered=counts.entered,
        exited=counts.exited,
        skipped=skipped,
    )
    return now


def stage_and_measure(
    connection: Connection, pool: SourcePool, audience: AudienceSettings, as_of: datetime, *, write: bool
) -> tuple[diff.DiffCounts, int]:
    """Stream the audience's members (as of `as_of`, the run's start, for one defined on events)
    into the stage and diff them against its baseline; with `write`, in a transaction that
    holds the write lock (the caller commits or rolls back). Returns the counts and the rows
    skipped (unusable rows and duplicates)."""
    stats = ReadStats()
    staging.create_stage(connection)
    members = read_members(pool, audience, stats, as_of=as_of)
    given = staging.load_stage(connection, members, with_value=audience.trait)
    if write:
        begin_write(connection)
    outbox.settle_in_flight(connection, audience.key)
    counts = _measure(connection, audience)
    duplicates = given - counts.members
    _log_skipped(audience.key, stats, duplicates)
    return counts, stats.skipped + duplicates


def _measure(connection: Connection, audience: AudienceSettings) -> diff.DiffCounts:
    if audience.trait:
        counts = traits.measure(connection, audience.key, audience.on_exit)
    else:
        counts = diff.measure(connection, audience.key)
    # A user known under a new identifier is the same Planhat contact: resent, not exited.
    return identities.carry_over(connection, audience.key, counts)


def queue_changes(connection: Connection, audience: AudienceSettings, run_id: int | None, now: datetime, *,
                  full: bool, scope: str | None = None) -> None:  # fmt: skip
    """Rewrite the outbox from the stage (`scope`: a planner run's changed users, see diff)."""
    if audience.trait:
        traits.queue_changes(
            connection, audience.key, run_id, now, full=full, on_exit=audience.on_exit, scope=scope
        )
    else:
        diff.queue_changes(connection, audience.key, run_id, now, full=full, scope=scope)


def discard_stage(connection: Connection) -> None:
    """Roll back and drop the staging tables without masking the error that got us here.

    SQLite keeps them in the connection's temporary database, a file of its own that closing
    the connection deletes whole; dropping them instead freed their pages one by one (0.34 s
    of a 5.2 s incremental run of 1M members). So the connection is closed (invalidated: the
    pool opens another next time)."""
    try:
        connection.rollback()
        if connection.dialect.name == "sqlite":
            connection.invalidate()
            return
        staging.drop_stage(connection)
        connection.commit()
    except sa.exc.SQLAlchemyError as exc:  # the temp table dies with the connection anyway
        log.warning("could not drop the staging table: %s", exc.__class__.__name__)
        connection.invalidate()


def _log_skipped(key: str, stats: ReadStats, duplicates: int) -> None:
    if stats.skipped:
        log.warning(
            "audience %r: skipped %d unusable rows, e.g. %s", key, stats.skipped, "; ".join(stats.samples)
        )
    if duplicates:
        log.info("audience %r: %d duplicate rows counted once", key, duplicates)


def fail(engine: Engine, report: RunReport, status: str, error: str, started: float) -> RunReport:
    """End the audience's run before delivery (its query failed, the guard held it back)."""
    report.status, report.error = status, error
    report.duration = time.monotonic() - started
    assert report.run_id is not None
    with engine.begin() as connection:
        report.pending, report.in_doubt = outbox.count(connection, report.key)
        runs.update(
            connection,
            report.run_id,
            status=status,
            error=error,
            finished_at=utcnow(),
            pending=report.pending,
            in_doubt=report.in_doubt,
            members=report.members or None,
            entered=report.entered,
            exited=report.exited,
            skipped=report.skipped,
        )
    log_run(report)
    return report
