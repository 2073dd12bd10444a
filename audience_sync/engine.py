"""One sync run over a set of audiences: the engine the CLI and the daemon both call.

For each audience: take its lease, open a run record, stream the source into the staging
table, diff in SQL, rewrite the outbox (one transaction). Then deliver the outbox of every
audience in the run together, so a user's changes across audiences coalesce, and close each
run record with its counts. Expected failures end in the run record and the report, never in
a lost change: what Planhat did not accept stays in `pending` for the next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import diff, identities, lease, store, traits
from . import models as m
from .config import AudienceSettings, PlanhatSettings, SafetySettings, Settings
from .delivery import DeliveryCounts, Sender, deliver, row_value, settle_in_flight
from .errors import AudienceSyncError, PlanhatError, StateDatabaseError
from .planhat import (
    AUDIENCES,
    Contact,
    KeyMeta,
    PlanhatClient,
    build_company,
    build_enduser,
    build_messages,
    utc_timestamp,
)
from .sources import ReadStats, SourcePool, read_members

log = logging.getLogger("audience_sync.engine")

DRY_RUN_SAMPLES = 3
OK_STATUSES = ("success", "dry-run")


class Progress(Protocol):
    """Told how many changes a run delivers and how far it got (a bar, or log lines)."""

    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def finish(self) -> None: ...


@dataclass(frozen=True)
class SyncOptions:
    full: bool = False
    dry_run: bool = False
    force: bool = False  # let a mass exit through the guard
    trigger: str = "cli"  # cli | schedule | resync
    reconcile: bool = False  # the repairing run of a reconcile (kind `reconcile`, a diff of changes)


@dataclass
class RunReport:
    key: str
    name: str
    kind: str = "incremental"
    status: str = "running"
    run_id: int | None = None
    members: int = 0
    entered: int = 0
    exited: int = 0
    skipped: int = 0
    sent: int = 0
    failed: int = 0
    pending: int = 0
    in_doubt: int = 0  # of `pending`: Planhat may hold these values; resent next run
    error: str | None = None
    duration: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def sender_for(settings: PlanhatSettings) -> PlanhatClient:
    return PlanhatClient(settings)


def sync(
    settings: Settings,
    engine: Engine,
    keys: list[str] | None = None,
    options: SyncOptions = SyncOptions(),
    *,
    sources: SourcePool | None = None,
    sender_factory: Callable[[PlanhatSettings], Any] = sender_for,
    holder: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[RunReport]:
    """Run the named audiences (default all) once. Returns one report per audience.

    A state database error that ends the whole run is raised as one StateDatabaseError line
    naming the database (password hidden), once every run record that could be written has been.
    """
    audiences = settings.select(keys)
    pool = sources or SourcePool(settings.sources)
    try:
        with store.translate_errors("state database", str(engine.url)):
            with engine.begin() as connection:
                store.register_audiences(connection, audiences)
            if options.dry_run:
                return [_dry_run(engine, pool, a, options, settings) for a in audiences]
            return _sync_leased(
                settings,
                engine,
                pool,
                audiences,
                options,
                sender_factory,
                holder or lease.new_holder(),
                progress,
                should_stop,
            )
    finally:
        if sources is None:
            pool.close()


def _sync_leased(
    settings: Settings,
    engine: Engine,
    pool: SourcePool,
    audiences: list[AudienceSettings],
    options: SyncOptions,
    sender_factory: Callable[[PlanhatSettings], Any],
    holder: str,
    progress: Progress | None,
    should_stop: Callable[[], bool],
) -> list[RunReport]:
    ttl = settings.daemon.lease_seconds
    reports: dict[str, RunReport] = {}
    held: list[AudienceSettings] = []
    for audience in audiences:
        if lease.try_acquire(engine, audience.key, holder, ttl):
            held.append(audience)
        else:
            reports[audience.key] = _already_running(engine, audience)
    try:
        with lease.LeaseKeeper(engine, [a.key for a in held], holder, ttl) as keeper:
            started = time.monotonic()
            reports.update(_snapshot_all(engine, pool, held, options, settings.safety, holder, should_stop))
            ready = {k: r for k, r in reports.items() if r.status == "running" and r.run_id}
            try:
                if ready:
                    _deliver(
                        engine,
                        settings.planhat,
                        ready,
                        sender_factory,
                        progress,
                        lambda: should_stop() or bool(keeper.lost),
                        {a.key: a for a in held},
                    )
            except (Exception, KeyboardInterrupt) as exc:
                # A bug or Ctrl-C: the runs are still recorded with what happened. A kill (or a
                # simulated one, which is no Exception) leaves them to abort_stale_runs.
                status = "aborted" if isinstance(exc, KeyboardInterrupt) else "failed"
                _finish_all(engine, ready, time.monotonic() - started, f"{status}: {store.first_line(exc)}")
                raise
            for key in keeper.lost & ready.keys():
                ready[key].error = ready[key].error or "lost the audience's lease; stopped delivering"
            _finish_all(engine, ready, time.monotonic() - started)
    finally:
        for audience in held:
            _release(engine, audience.key, holder)
    return [reports[a.key] for a in audiences if a.key in reports]


def _finish_all(
    engine: Engine, ready: dict[str, RunReport], duration: float, error: str | None = None
) -> None:
    """Record every run's final state; a database error is raised once all were tried."""
    failure: str | None = None
    for report in ready.values():
        if error is not None:
            report.error = report.error or error
        try:
            _finish(engine, report, duration)
        except sa.exc.SQLAlchemyError as exc:
            failure = failure or _db_error(engine, exc)
            report.status, report.error = "failed", report.error or failure
            log.error("audience %s: could not record the run's end: %s", report.key, failure)
    if failure is not None:
        raise StateDatabaseError(failure)


def _release(engine: Engine, key: str, holder: str) -> None:
    try:
        lease.release(engine, key, holder)
    except sa.exc.SQLAlchemyError as exc:  # it expires on its own
        log.warning("audience %s: could not release the lease: %s", key, _db_error(engine, exc))


def _db_error(engine: Engine, exc: sa.exc.SQLAlchemyError) -> str:
    """One line naming the state database (password hidden) and the driver's message."""
    return store.database_error("state database", engine.url, exc)


def _already_running(engine: Engine, audience: AudienceSettings) -> RunReport:
    other = lease.current_holder(engine, audience.key) or "another process"
    return RunReport(
        key=audience.key,
        name=audience.name,
        status="skipped",
        error=f"audience {audience.key!r} is already running (lease held by {other})",
    )


# --- snapshot and diff --------------------------------------------------------------------

# Audiences snapshotted at once on PostgreSQL. A group run's snapshots are mostly the server's
# work (COPY, the stage's sort and key, the outbox insert), in one backend per connection:
# two keep both cores of a small host busy while this process reads the next source. SQLite
# has one writer, whose diff holds the database: its audiences go one after another.
SNAPSHOT_WORKERS = 2


def _snapshot_all(
    engine: Engine,
    pool: SourcePool,
    audiences: list[AudienceSettings],
    options: SyncOptions,
    safety: SafetySettings,
    holder: str,
    should_stop: Callable[[], bool],
) -> dict[str, RunReport]:
    """Snapshot each audience (one failing does not hold back the others); those not started
    before `should_stop` are left out."""

    def one(audience: AudienceSettings) -> RunReport | None:
        if should_stop():
            return None
        return _snapshot(engine, pool, audience, options, safety, holder)

    workers = min(len(audiences), SNAPSHOT_WORKERS if engine.dialect.name == "postgresql" else 1)
    if workers <= 1:
        done = map(one, audiences)
    else:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="audience-sync-snapshot")
        try:
            done = [future.result() for future in [executor.submit(one, a) for a in audiences]]
        finally:  # Ctrl-C: the snapshots under way finish, the others never start
            executor.shutdown(wait=True, cancel_futures=True)
    return {report.key: report for report in done if report is not None}


def _snapshot(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    options: SyncOptions,
    safety: SafetySettings,
    holder: str,
) -> RunReport:
    """Stage, diff and queue one audience; the report stays 'running' when there is more to do."""
    started = time.monotonic()
    with engine.begin() as connection:
        store.abort_stale_runs(connection, audience.key)
        kind, trigger = _kind(connection, audience.key, options)
        run_id = store.start_run(connection, audience.key, kind, trigger, holder)
    report = RunReport(key=audience.key, name=audience.name, kind=kind, run_id=run_id)
    try:
        counts, skipped = _stage_and_queue(engine, pool, audience, report, options, safety)
    except AudienceSyncError as exc:
        return _fail(engine, report, "failed", str(exc), started)
    except sa.exc.SQLAlchemyError as exc:
        return _fail(engine, report, "failed", _db_error(engine, exc), started)
    report.members, report.entered, report.exited, report.skipped = (
        counts.members,
        counts.entered,
        counts.exited,
        skipped,
    )
    if report.status == "blocked":
        return _fail(engine, report, "blocked", report.error or "", started)
    return report


def _kind(connection: sa.Connection, key: str, options: SyncOptions) -> tuple[str, str]:
    """The run's kind and trigger. A scheduled run of an audience with a resync requested is
    that resync (the daemon runs due audiences together, some of them resyncs)."""
    if options.reconcile:
        return "reconcile", options.trigger
    if _resync_requested(connection, key):
        return "full", "resync" if options.trigger == "schedule" else options.trigger
    full = options.full or not store.has_baseline(connection, key)
    return ("full" if full else "incremental"), options.trigger


def _resync_requested(connection: sa.Connection, key: str) -> bool:
    return (
        connection.execute(
            sa.select(m.resync_requests.c.id)
            .where(m.resync_requests.c.audience_key == key, m.resync_requests.c.status == "pending")
            .limit(1)
        ).first()
        is not None
    )


def _stage_and_queue(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
) -> tuple[diff.DiffCounts, int]:
    stats = ReadStats()
    with engine.connect() as connection:
        try:
            diff.create_stage(connection)
            given = diff.load_stage(
                connection, read_members(pool, audience, stats), with_value=audience.trait
            )
            store.begin_write(connection)
            settle_in_flight(connection, audience.key)
            counts = _measure(connection, audience)
            skipped = stats.skipped + (given - counts.members)  # bad rows + duplicates
            _log_skipped(audience.key, stats, given - counts.members)
            blocked = _guard(counts, safety, options, audience.key)
            if blocked:
                report.status, report.error = "blocked", blocked
                connection.rollback()
                return counts, skipped
            now = store.utcnow()
            _queue_changes(connection, audience, report.run_id, now, full=report.kind == "full")
            connection.execute(
                m.audiences.update()
                .where(m.audiences.c.key == audience.key, m.audiences.c.baseline_at.is_(None))
                .values(baseline_at=now)
            )
            store.update_run(
                connection,
                report.run_id,
                members=counts.members,  # type: ignore[arg-type]
                entered=counts.entered,
                exited=counts.exited,
                skipped=skipped,
            )
            connection.commit()
            return counts, skipped
        finally:
            _discard_stage(connection)


def _measure(connection: sa.Connection, audience: AudienceSettings) -> diff.DiffCounts:
    if audience.trait:
        counts = traits.measure(connection, audience.key, audience.on_exit)
    else:
        counts = diff.measure(connection, audience.key)
    # A user known under a new identifier is the same Planhat contact: resent, not exited.
    return identities.carry_over(connection, audience.key, counts)


def _queue_changes(
    connection: sa.Connection, audience: AudienceSettings, run_id: int | None, now: datetime, *, full: bool
) -> None:
    if audience.trait:
        traits.queue_changes(connection, audience.key, run_id, now, full=full, on_exit=audience.on_exit)
    else:
        diff.queue_changes(connection, audience.key, run_id, now, full=full)


def _discard_stage(connection: sa.Connection) -> None:
    """Roll back and drop the staging table without masking the error that got us here."""
    try:
        connection.rollback()
        diff.drop_stage(connection)
        connection.commit()
    except sa.exc.SQLAlchemyError as exc:  # the temp table dies with the connection anyway
        log.warning("could not drop the staging table: %s", exc.__class__.__name__)
        connection.invalidate()


def _guard(counts: diff.DiffCounts, safety: SafetySettings, options: SyncOptions, key: str) -> str | None:
    """The mass-exit guard: a source that suddenly returns (almost) nothing must not tell
    Planhat that everyone left."""
    if options.force or counts.previous < safety.min_members:
        return None
    if counts.exit_fraction <= safety.max_exit_fraction:
        return None
    return (
        f"mass-exit guard: {counts.exited} of {counts.previous} members "
        f"({counts.exit_fraction:.0%}) would exit, above safety.max_exit_fraction "
        f"{safety.max_exit_fraction:g}; nothing sent. If the exit is real, run "
        f"`audience-sync sync --audience {key} --force`"
    )


def _log_skipped(key: str, stats: ReadStats, duplicates: int) -> None:
    if stats.skipped:
        log.warning(
            "audience %r: skipped %d unusable rows, e.g. %s", key, stats.skipped, "; ".join(stats.samples)
        )
    if duplicates:
        log.info("audience %r: %d duplicate rows counted once", key, duplicates)


def _fail(engine: Engine, report: RunReport, status: str, error: str, started: float) -> RunReport:
    report.status, report.error = status, error
    report.duration = time.monotonic() - started
    with engine.begin() as connection:
        report.pending, report.in_doubt = store.pending_counts(connection, report.key)
        store.update_run(
            connection,
            report.run_id,
            status=status,
            error=error,  # type: ignore[arg-type]
            finished_at=store.utcnow(),
            pending=report.pending,
            in_doubt=report.in_doubt,
            members=report.members or None,
            entered=report.entered,
            exited=report.exited,
            skipped=report.skipped,
        )
    _log_run(report)
    return report


# --- delivery and closing -----------------------------------------------------------------


def _deliver(
    engine: Engine,
    planhat: PlanhatSettings,
    ready: dict[str, RunReport],
    sender_factory: Callable[[PlanhatSettings], Any],
    progress: Progress | None,
    should_stop: Callable[[], bool],
    audiences: dict[str, AudienceSettings] | None = None,
) -> None:
    run_ids = {key: report.run_id for key, report in ready.items() if report.run_id}
    total = _pending_total(engine, list(run_ids))
    if not total:
        return
    if progress:
        progress.start(total)
    counts: dict[str, DeliveryCounts] = {}
    sender: Sender | None = None
    try:
        with sender_factory(planhat) as sender:
            for level_ids, meta in _by_level(run_ids, audiences or {}):  # type: ignore[arg-type]
                deliver(
                    engine,
                    sender,
                    level_ids,
                    counts,
                    progress.advance if progress else None,
                    should_stop,
                    meta=meta,
                )
    except PlanhatError as exc:
        for report in ready.values():
            report.error = str(exc)
    except sa.exc.SQLAlchemyError as exc:  # what was acknowledged stays; the rest stays pending
        for report in ready.values():
            report.error = _db_error(engine, exc)
    finally:
        if progress:
            progress.finish()
    for key, tally in counts.items():
        report = ready[key]
        report.sent, report.failed = tally.sent, tally.failed
        if tally.failed and not report.error:
            doubt = f" ({tally.in_doubt} in doubt)" if tally.in_doubt else ""
            report.error = f"Planhat did not accept {tally.failed} changes{doubt}, e.g. {tally.errors[0]}"
    if sender is not None and sender.exhausted:
        for report in ready.values():
            report.error = report.error or "Planhat unavailable: retry budget spent"


def _by_level(
    run_ids: dict[str, int], audiences: dict[str, AudienceSettings]
) -> list[tuple[dict[str, int], KeyMeta]]:
    """The run's keys split into user level (contacts) and account level (companies), each
    with how its keys go out. Company ids and user refs are separate spaces: never coalesced."""
    groups = []
    for account in (False, True):
        chosen = [
            a for k in run_ids if (a := audiences.get(k)) is not None and (a.level == "account") == account
        ]
        if not account:
            chosen += [AudienceSettings(k, k, "", "") for k in run_ids if k not in audiences]
        if chosen:
            groups.append(({a.key: run_ids[a.key] for a in chosen}, key_meta(chosen, account)))
    return groups


def key_meta(chosen: list[AudienceSettings], account: bool = False) -> KeyMeta:
    """How these keys go out; the plain default when they are user-level audiences only."""
    meta = KeyMeta(
        traits=frozenset(a.key for a in chosen if a.trait),
        events=frozenset(a.key for a in chosen if a.send_as != "property"),
        events_only=frozenset(a.key for a in chosen if a.send_as == "events"),
        account=account,
    )
    return AUDIENCES if meta == AUDIENCES else meta


def _pending_total(engine: Engine, keys: list[str]) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).select_from(m.pending).where(m.pending.c.audience_key.in_(keys))
            ).scalar_one()
        )


def _finish(engine: Engine, report: RunReport, duration: float) -> None:
    with engine.begin() as connection:
        report.pending, report.in_doubt = store.pending_counts(connection, report.key)
        if report.pending == 0 and not report.error:
            report.status = "success"
        elif report.pending and not report.error:
            report.status, report.error = "partial", "stopped before every change was delivered"
        else:
            report.status = "partial" if report.sent else "failed"
        report.duration = duration
        store.update_run(
            connection,
            report.run_id,
            status=report.status,
            error=report.error,  # type: ignore[arg-type]
            pending=report.pending,  # sent and failed were counted with each acknowledgement
            in_doubt=report.in_doubt,
            finished_at=store.utcnow(),
        )
        if report.kind == "full":
            connection.execute(
                m.resync_requests.update()
                .where(
                    m.resync_requests.c.audience_key == report.key,
                    m.resync_requests.c.status == "pending",
                    # A request made while this run was already reading its source is not
                    # answered by it: it stays pending and gets a full run of its own.
                    m.resync_requests.c.requested_at
                    <= sa.select(m.runs.c.started_at).where(m.runs.c.id == report.run_id).scalar_subquery(),
                )
                .values(status="done", run_id=report.run_id, done_at=store.utcnow())
            )
    _log_run(report)


def _log_run(report: RunReport) -> None:
    log.info(
        "run audience=%s kind=%s status=%s members=%d entered=%d exited=%d sent=%d failed=%d "
        "skipped=%d pending=%d in_doubt=%d duration=%.2fs%s",
        report.key,
        report.kind,
        report.status,
        report.members,
        report.entered,
        report.exited,
        report.sent,
        report.failed,
        report.skipped,
        report.pending,
        report.in_doubt,
        report.duration,
        f" error={report.error!r}" if report.error else "",
    )


# --- dry run ------------------------------------------------------------------------------


def _dry_run(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    options: SyncOptions,
    settings: Settings,
) -> RunReport:
    """Everything a run would do up to delivery, inside a transaction that is rolled back."""
    started = time.monotonic()
    report = RunReport(key=audience.key, name=audience.name, status="dry-run")
    stats = ReadStats()
    with engine.connect() as connection:
        try:
            report.kind, _trigger = _kind(connection, audience.key, options)
            diff.create_stage(connection)
            given = diff.load_stage(
                connection, read_members(pool, audience, stats), with_value=audience.trait
            )
            settle_in_flight(connection, audience.key)  # rolled back with the rest
            counts = _measure(connection, audience)
            report.members, report.entered, report.exited = counts.members, counts.entered, counts.exited
            report.skipped = stats.skipped + (given - counts.members)
            blocked = _guard(counts, settings.safety, options, audience.key)
            if blocked:
                report.status, report.error = "blocked", blocked
            _queue_changes(connection, audience, None, store.utcnow(), full=report.kind == "full")
            report.pending, report.in_doubt = store.pending_counts(connection, audience.key)
            report.samples = _samples(connection, audience, settings.planhat)
        except AudienceSyncError as exc:
            report.status, report.error = "failed", str(exc)
        except sa.exc.SQLAlchemyError as exc:
            report.status, report.error = "failed", _db_error(engine, exc)
        finally:
            _discard_stage(connection)
    report.duration = time.monotonic() - started
    return report


def _samples(
    connection: sa.Connection, audience: AudienceSettings, planhat: PlanhatSettings
) -> list[dict[str, Any]]:
    key = audience.key
    rows = connection.execute(
        sa.select(m.pending)
        .where(m.pending.c.audience_key == key)
        .order_by(m.pending.c.value.desc(), m.pending.c.user_ref)
        .limit(DRY_RUN_SAMPLES)
    )
    meta = key_meta([audience], audience.level == "account")
    payloads: list[dict[str, Any]] = []
    for row in rows:
        contact = Contact(
            ref=row.user_ref,
            user_id=row.user_id,
            email=row.email,
            name=row.name,
            title=row.title,
            company_id=row.company_id,
            values={key: row_value(row.value, row.value_json)},
            meta=meta,
        )
        if planhat.transport == "segment":
            payloads.extend(build_messages(contact, planhat, utc_timestamp()))
        elif meta.account:
            payloads.append(build_company(contact))
        else:
            payloads.append(build_enduser(contact))
    return payloads
