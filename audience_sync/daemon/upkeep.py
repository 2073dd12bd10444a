"""The daemon's jobs besides the runs: the resync poll, history pruning, the reconcile, and
the runs asked for over the HTTP API (`run_requests`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler

from ..config import Settings
from ..errors import AudienceSyncError
from ..state import changes, leases, pauses, resyncs, run_requests
from ..support.clock import format_utc, utcnow
from ..support.text import one_line, span
from .flights import RunsInFlight
from .runtime import Runtime

log = logging.getLogger(__name__)

POLL_JOB = "resync-poll"
API_JOB = "api-runs"
API_HOLDING = "(api request {})"  # its entry among the runs in flight
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
        poll = self.settings.daemon.resync_poll_seconds
        self._every(self.poll_resync, poll, POLL_JOB, "resync poll")
        self._every(self.run_requested, poll, API_JOB, "API run requests")
        prune = PRUNE_EVERY.total_seconds()
        self._every(self.prune, prune, PRUNE_JOB, "history pruning", next_run_time=utcnow())
        self._arm_reconcile()

    def reconfigure(self, old: Settings) -> None:
        """After a reload: a new poll period or reconcile interval takes effect."""
        if self.settings.daemon.resync_poll_seconds != old.daemon.resync_poll_seconds:
            for job in (POLL_JOB, API_JOB):
                self._scheduler.reschedule_job(
                    job, trigger="interval", seconds=self.settings.daemon.resync_poll_seconds
                )
        if self.settings.reconcile.interval != old.reconcile.interval:
            self._arm_reconcile()

    def _arm_reconcile(self) -> None:
        interval = self.settings.reconcile.interval
        if interval is None:
            if self._scheduler.get_job(RECONCILE_JOB) is not None:
                self._scheduler.remove_job(RECONCILE_JOB)
            return
        seconds = interval.total_seconds()
        self._every(self.reconcile, seconds, RECONCILE_JOB, "reconcile", replace_existing=True)
        log.info("reconciling with Planhat every %s", span(interval.total_seconds()))

    def _every(self, job: Callable[[], None], seconds: float, job_id: str, name: str, **options: Any) -> None:
        """An upkeep job on an interval: one at a time, late runs folded into one, never dropped."""
        self._scheduler.add_job(
            job,
            "interval",
            seconds=seconds,
            id=job_id,
            name=name,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
            **options,
        )

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

    def run_requested(self) -> None:
        """Run what the API asked for (`POST /api/runs`), oldest request first. Each is claimed
        in the state database first, so of several daemons one runs it. A request naming an
        audience that a run holds now waits for the next poll: the pipeline's data must be
        read by a run that starts after it asked."""
        engine = self.runtime.engine
        try:
            with engine.connect() as connection:
                waiting = [run_requests.find(connection, i) for i in run_requests.pending_ids(connection)]
            for request in waiting:
                if self.runtime.stopping.is_set():
                    return
                if request is None or self._busy(request.audiences):
                    continue
                request_id = request.id
                holder = leases.new_holder()
                with engine.begin() as connection:
                    found = run_requests.claim(connection, request_id, holder)
                if found is not None:
                    self._run_request(found, holder)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read the API's run requests: %s", exc.__class__.__name__)

    def _busy(self, keys: list[str]) -> bool:
        busy = [key for key in keys if leases.current_holder(self.runtime.engine, key) is not None]
        if busy:
            log.debug("API run request waits: %s running", ", ".join(busy))
        return bool(busy)

    def _run_request(self, found: run_requests.RunRequest, holder: str) -> None:
        from ..sync.reports import RunReport, SyncOptions
        from ..sync.run import sync

        runtime = self.runtime
        configured = set(runtime.keys)
        keys = [key for key in found.audiences if key in configured]
        problems = [f"no longer configured: {key}" for key in found.audiences if key not in configured]
        reports: list[RunReport] = []
        log.info("API run request %d: running %s%s", found.id, ", ".join(keys) or "nothing",
                 " (full)" if found.full else "")  # fmt: skip
        with self._flights.holding(API_HOLDING.format(found.id), holder, keys):
            try:
                if keys:
                    reports = sync(
                        self.settings,
                        runtime.engine,
                        keys,
                        SyncOptions(full=found.full, trigger="api"),
                        sources=runtime.sources,
                        sender_factory=runtime.sender,
                        holder=holder,
                        should_stop=runtime.stopping.is_set,
                    )
                for report in reports:
                    runtime.metrics.record_run(report.key, report.status, report.sent, report.failed,
                                               report.duration)  # fmt: skip
                runtime.refresh_metrics(keys)
            except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
                problems.append(one_line(exc))
                log.error("API run request %d failed: %s", found.id, one_line(exc))
            except Exception:  # a bug: logged in full; the daemon goes on
                problems.append("unexpected error; see the daemon's log")
                log.exception("API run request %d: unexpected error", found.id)
        problems += [f"{r.key}: {r.status}: {r.error}" if r.error else f"{r.key}: {r.status}"
                     for r in reports if not r.ok]  # fmt: skip
        run_ids = [r.run_id for r in reports if r.run_id is not None]
        with runtime.engine.begin() as connection:
            run_requests.finish(connection, found.id, not problems, run_ids, "; ".join(problems) or None)
        level = logging.INFO if not problems else logging.WARNING
        log.log(level, "API run request %d: %s (runs %s)", found.id, "done" if not problems else "failed",
                ", ".join(map(str, run_ids)) or "none")  # fmt: skip

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
