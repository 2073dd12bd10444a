"""One sync run over a set of audiences: what the CLI and the daemon both call.

For each audience: take its lease, open a run record, stream the source into the staging
table, diff in SQL, rewrite the outbox, one transaction (`queueing`). Then deliver the outbox
of every audience in the run together, so a user's changes across audiences coalesce
(`sending`), and close each run record with its counts. Expected failures end in the run
record and the report, never in a lost change: what Planhat did not accept stays in `pending`
for the next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import AudienceSettings, Settings
from ..errors import AudienceSyncError, StateDatabaseError
from ..snapshot.sources import SourcePool
from ..state import audiences, leases, outbox, pauses, resyncs, runs
from ..state.database import database_error, translate_errors
from ..support.clock import utcnow
from ..support.logs import run_context
from ..support.text import first_line
from ..support.threads import beside
from .dry_run import dry_run
from .lease_keeper import LeaseKeeper
from .queueing import queue_all
from .reports import Progress, RunReport, SyncOptions, log_run
from .sending import SenderFactory, deliver_runs, sender_for

log = logging.getLogger(__name__)


def sync(
    settings: Settings,
    engine: Engine,
    keys: list[str] | None = None,
    options: SyncOptions = SyncOptions(),  # noqa: B008 - frozen, never mutated
    *,
    sources: SourcePool | None = None,
    sender_factory: SenderFactory = sender_for,
    holder: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[RunReport]:
    """Run the named audiences (default all) once. Returns one report per audience.

    A state database error that ends the whole run is raised as one StateDatabaseError line
    naming the database (password hidden), once every run record that could be written has been.
    """
    chosen = settings.select(keys)
    pool = sources or SourcePool(settings.sources)
    try:
        with translate_errors("state database", str(engine.url)):
            with engine.begin() as connection:
                audiences.register(connection, chosen)
                # A dry run changes nothing: it may look at a paused audience.
                held_back = {} if options.dry_run else pauses.paused(connection, [a.key for a in chosen])
            if options.dry_run:
                return [dry_run(engine, pool, a, options, settings) for a in chosen]
            skipped = {key: paused_report(settings.audience(key), pause) for key, pause in held_back.items()}
            runnable = [a for a in chosen if a.key not in held_back]
            reports = _sync_leased(
                settings, engine, pool, runnable, options, sender_factory, holder or leases.new_holder(),
                progress, should_stop,
            ) if runnable else []  # fmt: skip
            done = {r.key: r for r in reports} | skipped
            return [done[a.key] for a in chosen if a.key in done]
    finally:
        if sources is None:
            pool.close()


def paused_report(audience: AudienceSettings, pause: pauses.Pause) -> RunReport:
    """The report of an audience not run because it is paused (no run is recorded)."""
    log.info("audience %s: not run: %s", audience.key, pause.describe())
    return RunReport(
        key=audience.key,
        name=audience.name,
        status="paused",
        error=f"{pause.describe()}; `audience-sync resume {audience.key}` to run it again",
    )


def refuse_paused(engine: Engine, keys: list[str]) -> None:
    """Refuse a run asked for by name of an audience that is paused, saying the way out."""
    with translate_errors("state database", str(engine.url)), engine.connect() as connection:
        found = pauses.paused(connection, keys)
    if found:
        named = ", ".join(f"{key} ({pause.describe()})" for key, pause in found.items())
        raise AudienceSyncError(
            f"{named}: not run. Run `audience-sync resume {' '.join(found)}` first, or leave the audience out"
        )


def _sync_leased(
    settings: Settings,
    engine: Engine,
    pool: SourcePool,
    chosen: list[AudienceSettings],
    options: SyncOptions,
    sender_factory: SenderFactory,
    holder: str,
    progress: Progress | None,
    should_stop: Callable[[], bool],
) -> list[RunReport]:
    ttl = settings.daemon.lease_seconds
    reports: dict[str, RunReport] = {}
    held: list[AudienceSettings] = []
    for audience in chosen:
        if leases.try_acquire(engine, audience.key, holder, ttl):
            held.append(audience)
        else:
            reports[audience.key] = already_running(engine, audience)
    try:
        with LeaseKeeper(engine, [a.key for a in held], holder, ttl) as keeper:
            started = time.monotonic()
            reports.update(queue_all(engine, pool, held, options, settings.safety, holder, should_stop))
            ready = {k: r for k, r in reports.items() if r.status == "running" and r.run_id}
            # what the sources still do after the commits (a planner snapshot's advance) runs
            # beside the delivery, and ends before the leases are released
            with beside([r.follow_up for r in reports.values() if r.follow_up is not None]):
                deliver_and_finish(
                    engine, settings, ready, sender_factory, progress,
                    lambda: should_stop() or bool(keeper.lost), keeper, started, {a.key: a for a in held},
                )  # fmt: skip
    finally:
        for audience in held:
            release(engine, audience.key, holder)
    return [reports[a.key] for a in chosen if a.key in reports]


def deliver_and_finish(
    engine: Engine,
    settings: Settings,
    ready: dict[str, RunReport],
    sender_factory: SenderFactory,
    progress: Progress | None,
    should_stop: Callable[[], bool],
    keeper: LeaseKeeper,
    started: float,
    configured: dict[str, AudienceSettings] | None = None,
) -> None:
    """Deliver the queued runs' changes and record how each run ended (also when a bug or
    Ctrl-C ends the delivery: the runs are still recorded with what happened, then it is
    raised; a kill, or a simulated one, which is no Exception, leaves them to the next run's
    `runs.abort_stale`)."""
    try:
        if ready:
            # The audiences go out together: the delivery's lines name every run of the group.
            with run_context(*(report.run_id for report in ready.values())):
                deliver_runs(
                    engine, settings.planhat, ready, sender_factory, progress, should_stop, configured
                )
    except (Exception, KeyboardInterrupt) as exc:
        status = "aborted" if isinstance(exc, KeyboardInterrupt) else "failed"
        finish_all(engine, ready, time.monotonic() - started, f"{status}: {first_line(exc)}")
        raise
    for key in keeper.lost & ready.keys():
        ready[key].error = ready[key].error or "lost the audience's lease; stopped delivering"
    finish_all(engine, ready, time.monotonic() - started)


def finish_all(
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
            failure = failure or database_error("state database", engine.url, exc)
            report.status, report.error = "failed", report.error or failure
            with run_context(report.run_id):
                log.error("audience %s: could not record the run's end: %s", report.key, failure)
    if failure is not None:
        raise StateDatabaseError(failure)


def _finish(engine: Engine, report: RunReport, duration: float) -> None:
    assert report.run_id is not None
    with run_context(report.run_id), engine.begin() as connection:
        report.pending, report.in_doubt = outbox.count(connection, report.key)
        if report.pending == 0 and not report.error:
            report.status = "success"
        elif report.pending and not report.error:
            report.status, report.error = "partial", "stopped before every change was delivered"
        else:
            report.status = "partial" if report.sent else "failed"
        report.duration = duration
        runs.update(
            connection,
            report.run_id,
            status=report.status,
            error=report.error,
            pending=report.pending,  # sent and failed were counted with each acknowledgement
            in_doubt=report.in_doubt,
            finished_at=utcnow(),
        )
        if report.kind == "full":
            resyncs.answer(connection, report.key, report.run_id)
    log_run(report)


def release(engine: Engine, key: str, holder: str) -> None:
    try:
        leases.release(engine, key, holder)
    except sa.exc.SQLAlchemyError as exc:  # it expires on its own
        log.warning(
            "audience %s: could not release the lease: %s",
            key,
            database_error("state database", engine.url, exc),
        )


def already_running(engine: Engine, audience: AudienceSettings) -> RunReport:
    other = leases.current_holder(engine, audience.key) or "another process"
    return RunReport(
        key=audience.key,
        name=audience.name,
        status="skipped",
        error=f"audience {audience.key!r} is already running (lease held by {other})",
    )
