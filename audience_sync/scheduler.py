"""The daemon behind `audience-sync run`: Engage's cadence, manual resyncs, a graceful stop.

    start    plan each audience's first run from the state database: never synced -> at once
             (its initial full sync); otherwise its last run + a random draw in
             [schedule.min_interval, schedule.max_interval], at once when that is past
    cadence  one APScheduler job per audience, a date trigger re-armed after every run with a
             fresh draw; the re-arm happens once the run has ended, so one audience's runs
             never overlap in this process, and the lease taken in engine.sync keeps every
             other process (another daemon, `audience-sync sync`) out at the same time
    resync   a poll job reads `resync_requests` every daemon.resync_poll_seconds and moves the
             audience's job to now, or, when it is mid-run, re-arms it right after the run
    history  a prune job deletes `changes` rows older than history.retention_days, at start
             and then daily, in batches; run records are kept
    drift    with reconcile.interval set, a job reads Planhat back every interval (the first
             one interval after start) and repairs drift (`reconcile --fix`), under the same
             leases as the runs
    stop     SIGTERM/SIGINT: no new run; a run in flight stops after its delivery chunk and
             records its state (what was not delivered stays pending); exit 0 within
             daemon.grace_seconds. Past the grace, runs still in flight are recorded as aborted
             and their leases released before the process exits

When a job fires, the daemon first checks the state database: if another process ran the
audience since this one planned its run, the run is not repeated; the next one is drawn from
that run instead. Several daemons against one database so share one cadence.

The decision functions (`draw_interval`, `first_run_at`, `next_run_at`) are pure and tested
directly; the `Daemon` object wires them to APScheduler and the engine.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import Any

import sqlalchemy as sa
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine

from . import engine as sync_engine
from . import lease, store
from . import models as m
from .config import PlanhatSettings, ScheduleSettings, Settings
from .errors import AudienceSyncError, ConfigError
from .metrics import Metrics, MetricsServer
from .planhat import Contact, Outcome
from .sources import SourcePool

log = logging.getLogger("audience_sync.scheduler")

AUDIENCE_JOB = "audience:"
POLL_JOB = "resync-poll"
PRUNE_JOB = "prune-history"
RECONCILE_JOB = "reconcile"
RECONCILE_HOLDING = "(reconcile)"  # its entry among the runs in flight, which stop() waits for
PRUNE_EVERY = timedelta(days=1)
PRUNE_BATCH = 10_000
# A job that failed before its run could start (the state database was unreachable) is tried
# again this soon, or at schedule.min_interval when that is shorter.
RETRY_AFTER_ERROR = timedelta(minutes=1)
# Of the grace, this much is kept for recording aborted runs and exiting.
EXIT_RESERVE_SECONDS = 1.0
ABORTED_ERROR = (
    "the daemon stopped (grace {grace:g}s spent) before the run finished; its changes stay pending"
)


# --- decisions ----------------------------------------------------------------------------


def draw_interval(schedule: ScheduleSettings, rng: random.Random) -> timedelta:
    """A random interval in [min_interval, max_interval], like Engage's 2-3 hour cadence."""
    low = schedule.min_interval.total_seconds()
    high = schedule.max_interval.total_seconds()
    return timedelta(seconds=rng.uniform(low, high))


def first_run_at(
    schedule: ScheduleSettings,
    rng: random.Random,
    *,
    synced: bool,
    last_finished: datetime | None,
    now: datetime | None = None,
) -> datetime:
    """When the daemon first runs an audience after it starts.

    Never synced (no baseline, or no run ever ended): now, for its initial full sync.
    Otherwise a fresh draw after its last run in the state database, or now when that is past.
    """
    now = now or store.utcnow()
    if not synced or last_finished is None:
        return now
    return max(now, last_finished + draw_interval(schedule, rng))


def next_run_at(schedule: ScheduleSettings, rng: random.Random, now: datetime | None = None) -> datetime:
    """After every run, the next one is drawn afresh."""
    return (now or store.utcnow()) + draw_interval(schedule, rng)


def require_token(settings: Settings) -> None:
    """A daemon without a token would dry-run forever without anyone noticing: refuse."""
    if settings.planhat.token is None:
        raise ConfigError(
            f"no Planhat token set: set {settings.planhat.token_setting}; "
            "the daemon does not start without one"
        )
    if settings.reconcile.interval is not None and settings.planhat.api_token is None:
        raise ConfigError(
            "reconcile.interval is set, and reading Planhat back needs the API token: "
            "set planhat.api_token (or PLANHAT_API_TOKEN)"
        )


# --- delivery turns -----------------------------------------------------------------------


class Turns:
    """First come, first served: one delivery chunk at a time across the daemon's runs.

    Audiences run in parallel (a long initial sync does not hold up the others' cadence or a
    resync), but Planhat's limits are per account: each chunk is sent in turn, so the daemon
    as a whole stays within one client's rate limit and bulk calls go one after another.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> Turns:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._condition.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class TurnTakingSender:
    """A Planhat sender that waits for its turn before each chunk."""

    def __init__(self, sender: Any, turns: Turns) -> None:
        self._sender = sender
        self._turns = turns
        self.chunk_size: int = sender.chunk_size

    @property
    def exhausted(self) -> bool:
        return bool(self._sender.exhausted)

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        with self._turns:
            return self._sender.send(contacts)  # type: ignore[no-any-return]

    def __enter__(self) -> TurnTakingSender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sender.__exit__(exc_type, exc, tb)


# --- the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    key: str
    at: datetime
    reason: str


class Daemon:
    """The scheduler, its jobs and their state. `start()`, then `stop()` (and `abandon()` when
    runs are still in flight after the grace)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        rng: random.Random | None = None,
        sender_factory: Callable[[PlanhatSettings], Any] = sync_engine.sender_for,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.rng = rng or random.Random()
        self.keys = [a.key for a in settings.audiences]
        self._sender_factory = sender_factory
        self._sources = SourcePool(settings.sources)
        self._turns = Turns()
        self._lock = threading.Lock()  # the plan of each audience: busy, seen, armed
        self._busy: set[str] = set()  # jobs started and not yet re-armed
        self._seen: dict[str, datetime | None] = {}  # last run ended, as the plan saw it
        self._in_flight = threading.Condition()
        self._holders: dict[str, str] = {}  # audience -> lease holder of its run in flight
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self.metrics = Metrics(self.keys, settings.schedule.max_interval, settings.metrics.health_margin)
        self.server: MetricsServer | None = None
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                # One worker per audience: a long run never delays another audience's run.
                "runs": ThreadPoolExecutor(max(1, len(self.keys))),
                # The resync poll, the history pruning and the reconcile, which may take minutes.
                "default": ThreadPoolExecutor(3),
            },
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with store.translate_errors("cannot use state database", str(self.engine.url)):
            plans = self._plan_start()
        for name in self.settings.sources:  # create engines now: threads then only read the pool
            self._sources.engine(name)
        if self.settings.metrics.port is not None:
            self.server = MetricsServer(
                self.metrics, self.settings.metrics.host, self.settings.metrics.port
            ).start()
            log.info("metrics on %s/metrics, health on %s/healthz", self.server.url, self.server.url)
        self.scheduler.add_listener(self._on_job_end, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        self.scheduler.start()
        for plan in plans:
            self._arm(plan.key, plan.at, plan.reason)
        now = store.utcnow()
        self.scheduler.add_job(
            self._poll_resync,
            "interval",
            seconds=self.settings.daemon.resync_poll_seconds,
            id=POLL_JOB,
            name="resync poll",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self._prune,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            next_run_time=now,
            id=PRUNE_JOB,
            name="history pruning",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        if (interval := self.settings.reconcile.interval) is not None:
            self.scheduler.add_job(
                self._reconcile,
                "interval",
                seconds=interval.total_seconds(),
                id=RECONCILE_JOB,
                name="reconcile",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=None,
            )
            log.info("reconciling with Planhat every %s", _span(interval.total_seconds()))

    def stop(self, timeout: float) -> bool:
        """Take no new run and wait up to `timeout` seconds for the runs in flight to record
        their state. True when none is left."""
        self._stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + timeout
        with self._in_flight:
            while self._holders and not self._hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._in_flight.wait(min(left, 0.2))
            clean = not self._holders
        if clean:
            self._close()
        return clean

    def hurry(self) -> None:
        """A second signal: stop waiting for the runs in flight."""
        self._hurry.set()

    def running(self) -> list[str]:
        with self._in_flight:
            return list(self._holders)

    def abandon(self) -> list[str]:
        """Record the runs still in flight as aborted and release their leases (the process is
        about to exit). Their changes stay pending for the next run. Returns their audiences."""
        with self._in_flight:
            holders = dict(self._holders)
        error = ABORTED_ERROR.format(grace=self.settings.daemon.grace_seconds)
        for key, holder in holders.items():
            try:
                with self.engine.begin() as connection:
                    pending, in_doubt = store.pending_counts(connection, key)
                    connection.execute(
                        m.runs.update()
                        .where(m.runs.c.holder == holder, m.runs.c.status == "running")
                        .values(
                            status="aborted",
                            error=error,
                            finished_at=store.utcnow(),
                            pending=pending,
                            in_doubt=in_doubt,
                        )
                    )
                lease.release(self.engine, key, holder)
            except sa.exc.SQLAlchemyError as exc:  # the next run's abort_stale_runs tidies up
                log.warning("could not record the aborted run of %r: %s", key, exc.__class__.__name__)
        return list(holders)

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self._sources.close()

    # --- planning -------------------------------------------------------------------------

    def _plan_start(self) -> list[Plan]:
        audiences = self.settings.audiences
        with self.engine.begin() as connection:
            store.register_audiences(connection, [(a.key, a.name) for a in audiences])
            # An audience removed from the config is no longer run: its history stays, its
            # next run goes.
            connection.execute(
                m.audiences.update()
                .where(m.audiences.c.key.not_in(self.keys), m.audiences.c.next_run_at.is_not(None))
                .values(next_run_at=None)
            )
            requested = set(store.pending_resync_keys(connection))
            plans = []
            for key in self.keys:
                last = store.last_run_finished_at(connection, key)
                synced = store.has_baseline(connection, key)
                self._seen[key] = last
                self.metrics.set_last_success(key, store.last_success_at(connection, key))
                self.metrics.set_pending(key, store.pending_count(connection, key))
                if key in requested:
                    plans.append(Plan(key, store.utcnow(), "full resync requested"))
                    continue
                at = first_run_at(self.settings.schedule, self.rng, synced=synced, last_finished=last)
                if not synced or last is None:
                    reason = "never synced: initial full sync"
                elif at <= store.utcnow():
                    reason = f"overdue: last run ended {_when(last)}"
                else:
                    reason = f"last run ended {_when(last)}"
                plans.append(Plan(key, at, reason))
        return plans

    def _arm(self, key: str, at: datetime, reason: str) -> None:
        """(Re)schedule the audience's one job; publish the time in the state database."""
        self.scheduler.add_job(
            self._run_job,
            "date",
            run_date=at,
            args=[key],
            id=AUDIENCE_JOB + key,
            name=f"sync {key}",
            executor="runs",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,  # a run that is late (a busy or suspended host) still runs
        )
        self.metrics.set_next_run(key, at)
        wait = max(0.0, (at - store.utcnow()).total_seconds())
        log.info("audience %s: next run %s (in %s; %s)", key, _when(at), _span(wait), reason)
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    m.audiences.update().where(m.audiences.c.key == key).values(next_run_at=at)
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("audience %s: could not record its next run: %s", key, exc.__class__.__name__)

    # --- the audience job -----------------------------------------------------------------

    def _run_job(self, key: str) -> tuple[datetime, str] | None:
        """One firing of an audience's job; returns when to run next and why (None: stopping)."""
        if self._stopping.is_set():
            return None
        with self._lock:
            self._busy.add(key)
        holder = lease.new_holder()
        with self._in_flight:
            self._holders[key] = holder
        retry = min(RETRY_AFTER_ERROR, self.settings.schedule.min_interval)
        try:
            return self._run(key, holder)
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:  # e.g. the database is down
            log.error("audience %s: the run failed to start or end: %s", key, _one_line(exc))
            return store.utcnow() + retry, "retrying after an error"
        except Exception:  # a bug: log it in full, and never let one audience stop the daemon
            log.exception("audience %s: unexpected error", key)
            return store.utcnow() + retry, "retrying after an error"
        finally:
            with self._in_flight:
                self._holders.pop(key, None)
                self._in_flight.notify_all()

    def _run(self, key: str, holder: str) -> tuple[datetime, str] | None:
        with self.engine.connect() as connection:
            resync = key in store.pending_resync_keys(connection)
            last = store.last_run_finished_at(connection, key)
        if not resync and last != self._seen.get(key) and last is not None:
            # Another process ran it (a second daemon, `audience-sync sync`) since we planned.
            self._seen[key] = last
            self.metrics.mark_cycled(key)
            self._refresh(key)
            at = max(store.utcnow(), last + draw_interval(self.settings.schedule, self.rng))
            return at, f"another process ran it, ending {_when(last)}"
        options = sync_engine.SyncOptions(full=resync, trigger="resync" if resync else "schedule")
        log.info("audience %s: %s run starting", key, "full resync" if resync else "scheduled")
        reports = sync_engine.sync(
            self.settings,
            self.engine,
            [key],
            options,
            sources=self._sources,
            sender_factory=self._sender,
            holder=holder,
            should_stop=self._stopping.is_set,
        )
        for report in reports:
            self.metrics.record_run(report.key, report.status, report.sent, report.failed, report.duration)
            if report.status == "skipped":
                log.info("audience %s: skipped: %s", key, report.error)
        with self.engine.connect() as connection:
            self._seen[key] = store.last_run_finished_at(connection, key)
        self.metrics.mark_cycled(key)
        self._refresh(key)
        if self._stopping.is_set():
            return None
        return next_run_at(self.settings.schedule, self.rng), "drawn after the last run"

    def _sender(self, planhat: PlanhatSettings) -> TurnTakingSender:
        return TurnTakingSender(self._sender_factory(planhat), self._turns)

    def _refresh(self, key: str) -> None:
        """Metrics from the state database, which knows about every process's runs."""
        with self.engine.connect() as connection:
            self.metrics.set_last_success(key, store.last_success_at(connection, key))
            self.metrics.set_pending(key, store.pending_count(connection, key))

    def _on_job_end(self, event: JobExecutionEvent) -> None:
        """Re-arm an audience's job once its run has ended (the executor no longer counts it
        as running, so the new firing can never be refused as an overlap)."""
        if not event.job_id.startswith(AUDIENCE_JOB) or self._stopping.is_set():
            return
        key = event.job_id[len(AUDIENCE_JOB) :]
        planned = event.retval if event.code == EVENT_JOB_EXECUTED else None
        retry_at = store.utcnow() + min(RETRY_AFTER_ERROR, self.settings.schedule.min_interval)
        with self._lock:
            resync = self._resync_pending(key)
            if resync:
                planned = (store.utcnow(), "full resync requested during the run")
            elif planned is None:
                planned = (retry_at, "retrying after an error")
            elif resync is None and retry_at < planned[0]:
                # A resync may be waiting: run again soon rather than hours from now.
                planned = (retry_at, "retrying: could not check for a resync request")
            self._arm(key, *planned)
            self._busy.discard(key)

    def _resync_pending(self, key: str) -> bool | None:
        """Whether a full resync of the audience is requested; None when the check failed."""
        try:
            with self.engine.connect() as connection:
                return key in store.pending_resync_keys(connection)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("audience %s: could not check for a resync request: %s", key, exc.__class__.__name__)
            return None

    # --- resync poll and history pruning ------------------------------------------------------

    def _poll_resync(self) -> None:
        if self._stopping.is_set():
            return
        try:
            with self.engine.connect() as connection:
                requested = store.pending_resync_keys(connection)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read resync requests: %s", exc.__class__.__name__)
            return
        for key in requested:
            if key not in self.keys:
                continue
            with self._lock:
                if key in self._busy:
                    continue  # mid-run: re-armed right after it (see _on_job_end)
                job = self.scheduler.get_job(AUDIENCE_JOB + key)
                now = store.utcnow()
                if job is None or job.next_run_time <= now:
                    continue  # already firing; the run reads the request itself
                try:
                    self.scheduler.modify_job(AUDIENCE_JOB + key, next_run_time=now)
                except JobLookupError:
                    continue
                log.info("audience %s: full resync requested; running it now", key)
                self.metrics.set_next_run(key, now)

    def _reconcile(self) -> None:
        """Read Planhat back and repair drift; an audience mid-run is skipped until next time."""
        from . import reconcile

        if self._stopping.is_set():
            return
        holder = lease.new_holder()
        with self._in_flight:
            self._holders[RECONCILE_HOLDING] = holder
        try:
            reports = reconcile.reconcile(
                self.settings,
                self.engine,
                fix=True,
                trigger="schedule",
                sources=self._sources,
                sender_factory=self._sender,
                holder=holder,
                should_stop=self._stopping.is_set,
            )
            for report in reports:
                if report.run is not None:
                    run = report.run
                    self.metrics.record_run(run.key, run.status, run.sent, run.failed, run.duration)
                    self._refresh(report.key)
                log.info(
                    "reconcile audience=%s status=%s drift=%d in_doubt=%d%s",
                    report.key,
                    report.status,
                    report.drift,
                    report.in_doubt,
                    f" error={report.error!r}" if report.error else "",
                )
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
            log.error("reconcile failed: %s; it runs again in %s", _one_line(exc),
                      _span(self.settings.reconcile.interval.total_seconds()))  # type: ignore[union-attr]  # fmt: skip
        except Exception:  # a bug: logged in full; the daemon goes on
            log.exception("reconcile: unexpected error")
        finally:
            with self._in_flight:
                self._holders.pop(RECONCILE_HOLDING, None)
                self._in_flight.notify_all()

    def _prune(self) -> None:
        cutoff = store.utcnow() - timedelta(days=self.settings.history.retention_days)
        total = 0
        try:
            while not self._stopping.is_set():
                with self.engine.begin() as connection:
                    deleted = store.prune_changes(connection, cutoff, limit=PRUNE_BATCH)
                total += deleted
                if deleted < PRUNE_BATCH:
                    break
        except sa.exc.SQLAlchemyError as exc:
            log.warning("history pruning stopped: %s; it resumes tomorrow", exc.__class__.__name__)
        if total:
            log.info(
                "pruned %d change records from before %s (history.retention_days = %d)",
                total,
                _when(cutoff),
                self.settings.history.retention_days,
            )


# --- the process --------------------------------------------------------------------------


def run_daemon(settings: Settings, engine: Engine) -> int:
    """Run until SIGTERM or SIGINT; returns the exit code (0 after a clean stop)."""
    require_token(settings)
    if not settings.audiences:
        raise ConfigError("no audiences configured: add [[audiences]] to the config")
    daemon = Daemon(settings, engine)
    stop = threading.Event()
    received: list[str] = []
    restore = _handle_signals(stop, daemon, received)
    try:
        daemon.start()
        log.info(
            "daemon started: %d audiences (%s), state database %s, schedule %s-%s, resync poll %gs",
            len(daemon.keys),
            ", ".join(daemon.keys),
            store.safe_url(settings.database_url),
            _span(settings.schedule.min_interval.total_seconds()),
            _span(settings.schedule.max_interval.total_seconds()),
            settings.daemon.resync_poll_seconds,
        )
        while not stop.wait(1.0):
            pass
        grace = settings.daemon.grace_seconds
        stopping_since = time.monotonic()
        busy = daemon.running()
        log.info(
            "%s: stopping: no new runs; %s",
            received[0] if received else "stop requested",
            f"waiting up to {grace:g}s for {', '.join(busy)}" if busy else "no run in flight",
        )
        if daemon.stop(timeout=max(grace - EXIT_RESERVE_SECONDS, grace / 2)):
            log.info("stopped in %.1fs", time.monotonic() - stopping_since)
            return 0
        abandoned = daemon.abandon()
        log.warning(
            "stopped after %.1fs with runs still in flight: recorded %s as aborted; "
            "their changes stay pending for the next run",
            time.monotonic() - stopping_since,
            ", ".join(abandoned),
        )
        _exit_now(0)  # worker threads still inside a request must not hold the process
        return 0  # not reached
    finally:
        restore()


def _handle_signals(stop: threading.Event, daemon: Daemon, received: list[str]) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop`; a second one stops waiting for runs in flight.
    The handler only sets events (logging from a signal handler can deadlock)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            daemon.hurry()
            return
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{round(seconds)}s"
    minutes = round(seconds) // 60
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
