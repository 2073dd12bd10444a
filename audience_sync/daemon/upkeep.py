"""The daemon's jobs besides the runs: the resync poll, history pruning and the reconcile."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler

from ..config import Settings
from ..errors import AudienceSyncError
from ..state import changes, leases, pauses, resyncs
from ..support.clock import format_utc, utcnow
from ..support.text import one_line, span
from .flights import RunsInFlight
from .runtime import Runtime

log = logging.getLogger(__name__)

POLL_JOB = "resync-poll"
PRUNE_JOB = "prune-history"
RECONCILE_JOB = "reconcile"
RECONCILE_HOLDING = "(reconcile)"  # its entry among the runs in flight, which stop() waits for
PRUNE_EVERY = timedelta(days=1)
PRUNE_BATCH = 10_000


class Upkeep:
    """Jobs on the daemon's scheduler: poll `resync_requests` every daemon.resync_poll (and
    hand what it finds to `request_now`, paused audiences left out; the poll also refreshes
    the paused metric), prune `changes` daily, reconcile every
    reconcile.interval (registered among the runs in flight while it holds leases)."""

    def __init__(
        self,
        runtime: Runtime,
        scheduler: BackgroundScheduler,
        flights: RunsInFlight,
        request_now: Callable[[list[str]], None],
    ) -> None:
        self.runtime = runtime
        self._scheduler = scheduler
        self._flights = flights
        self._request_now = request_now

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def start(self) -> None:
        self._scheduler.add_job(
            self.poll_resync,
            "interval",
            seconds=self.settings.daemon.resync_poll_seconds,
            id=POLL_JOB,
            name="resync poll",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        self._scheduler.add_job(
            self.prune,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            next_run_time=utcnow(),
            id=PRUNE_JOB,
            name="history pruning",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        self._arm_reconcile()

    def reconfigure(self, old: Settings) -> None:
        """After a reload: a new poll period or reconcile interval takes effect."""
        if self.settings.daemon.resync_poll_seconds != old.daemon.resync_poll_seconds:
            self._scheduler.reschedule_job(
                POLL_JOB, trigger="interval", seconds=self.settings.daemon.resync_poll_seconds
            )
        if self.settings.reconcile.interval != old.reconcile.interval:
            self._arm_reconcile()

    def _arm_reconcile(self) -> None:
        interval = self.settings.reconcile.interval
        if interval is None:
            if self._scheduler.get_job(RECONCILE_JOB) is not None:
                self._scheduler.remove_job(RECONCILE_JOB)
            return
        self._scheduler.add_job(
            self.reconcile,
            "interval",
            seconds=interval.total_seconds(),
            id=RECONCILE_JOB,
            name="reconcile",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        log.info("reconciling with Planhat every %s", span(interval.total_seconds()))

    # --- the jobs -------------------------------------------------------------------------

    def poll_resync(self) -> None:
        if self.runtime.stopping.is_set():
            return
        try:
            with self.runtime.engine.connect() as connection:
                requested = resyncs.pending_keys(connection)
                held_back = pauses.paused(connection)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read resync requests: %s", exc.__class__.__name__)
            return
        for key in self.runtime.keys:  # a pause or resume by any process shows within the poll
            self.runtime.metrics.set_paused(key, key in held_back)
        self._request_now([key for key in requested if key not in held_back])

    def reconcile(self) -> None:
        """Read Planhat back and repair drift; an audience mid-run is skipped until next time."""
        from ..sync.reconcile import reconcile

        runtime = self.runtime
        if runtime.stopping.is_set():
            return
        holder = leases.new_holder()
        settings = self.settings
        interval = settings.reconcile.interval
        with self._flights.holding(RECONCILE_HOLDING, holder, []):
            try:
                reports = reconcile(
                    settings,
                    runtime.engine,
                    fix=True,
                    trigger="schedule",
                    sources=runtime.sources,
                    sender_factory=runtime.sender,
                    holder=holder,
                    should_stop=runtime.stopping.is_set,
                )
                for report in reports:
                    if report.run is not None:
                        run = report.run
                        runtime.metrics.record_run(run.key, run.status, run.sent, run.failed, run.duration)
                    log.info(
                        "reconcile audience=%s status=%s drift=%d in_doubt=%d%s",
                        report.key,
                        report.status,
                        report.drift,
                        report.in_doubt,
                        f" error={report.error!r}" if report.error else "",
                    )
                runtime.refresh_metrics([report.key for report in reports if report.run is not None])
            except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
                again = span(interval.total_seconds()) if interval else "the next interval"
                log.error("reconcile failed: %s; it runs again in %s", one_line(exc), again)
            except Exception:  # a bug: logged in full; the daemon goes on
                log.exception("reconcile: unexpected error")

    def prune(self) -> None:
        retention = self.settings.history.retention_days
        cutoff = utcnow() - timedelta(days=retention)
        total = 0
        try:
            while not self.runtime.stopping.is_set():
                with self.runtime.engine.begin() as connection:
                    deleted = changes.prune(connection, cutoff, limit=PRUNE_BATCH)
                total += deleted
                if deleted < PRUNE_BATCH:
                    break
        except sa.exc.SQLAlchemyError as exc:
            log.warning("history pruning stopped: %s; it resumes tomorrow", exc.__class__.__name__)
        if total:
            log.info(
                "pruned %d change records from before %s (history.retention_days = %d)",
                total,
                format_utc(cutoff),
                retention,
            )
