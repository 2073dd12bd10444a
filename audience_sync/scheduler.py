"""The daemon behind `audience-sync run`: Engage's cadence, run in groups; resyncs, reloads and
a graceful stop.

    start    plan each audience from the state database (`cadence.first_run_at`): never
             synced -> at once (its initial full sync); otherwise its last run + a random draw
             in [schedule.min_interval, schedule.max_interval], at once when that is past
    groups   one wake-up job, armed at the earliest due audience; when it fires, every idle
             audience that is due or eligible runs in one group run (`cadence.Cadence`), so a
             user's changes across audiences travel as one identify / one contact item. The
             group is drawn one next time. Group runs take up to daemon-wide RUN_WORKERS
             workers: an audience added or resynced while a long group runs is not held up
    resync   a poll job reads `resync_requests` every daemon.resync_poll_seconds and makes the
             audience due now, or, when it is mid-run, right after its run
    reload   SIGHUP re-reads the config: new audiences are planned (their initial sync at
             once), removed ones are no longer run, a new schedule re-draws the plan; runs in
             flight finish on the config they started with; an invalid config is refused
             with one line and the running one stays in force
    upkeep   a prune job deletes `changes` rows older than history.retention_days, at start
             and then daily, in batches; with reconcile.interval set, a job reads Planhat back
             every interval and repairs drift (`reconcile --fix`), under the same leases
    stop     SIGTERM/SIGINT: no new run; a run in flight stops after its delivery chunk and
             records its state (what was not delivered stays pending); exit 0 within
             daemon.grace_seconds. Past the grace, runs still in flight are recorded as aborted
             and their leases released before the process exits

When a group starts, the daemon first checks the state database: an audience that another
process ran since this one planned it is not run again; its next run is drawn from that run
instead. Several daemons against one database so share one cadence, and the lease taken in
engine.sync keeps them (and `audience-sync sync`) from running one audience twice at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor as RunPool
from datetime import UTC, datetime, timedelta
from types import FrameType, TracebackType
from typing import Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine

from . import engine as sync_engine
from . import lease, store, web
from . import models as m
from .cadence import Cadence, draw_interval, first_run_at, next_run_at
from .config import PlanhatSettings, Settings, load_settings
from .errors import AudienceSyncError, ConfigError
from .metrics import Metrics, MetricsServer
from .planhat import Contact, Outcome
from .sources import SourcePool
from .web import StatusPage

__all__ = [
    "Daemon",
    "TurnTakingSender",
    "Turns",
    "draw_interval",
    "first_run_at",
    "next_run_at",
    "run_daemon",
]

log = logging.getLogger("audience_sync.scheduler")

WAKE_JOB = "wake"
GROUP_JOB = "group:"
POLL_JOB = "resync-poll"
PRUNE_JOB = "prune-history"
RECONCILE_JOB = "reconcile"
RECONCILE_HOLDING = "(reconcile)"  # its entry among the runs in flight, which stop() waits for
# Group runs at once. Most of the time one group holds every audience; more run only when an
# audience becomes due (added, resynced, retried) while a long group is in flight.
RUN_WORKERS = 4
PRUNE_EVERY = timedelta(days=1)
PRUNE_BATCH = 10_000
# A group that failed before its runs could start (the state database was unreachable) is
# tried again this soon, or at schedule.min_interval when that is shorter.
RETRY_AFTER_ERROR = timedelta(minutes=1)
# Of the grace, this much is kept for recording aborted runs and exiting.
EXIT_RESERVE_SECONDS = 1.0
ABORTED_ERROR = (
    "the daemon stopped (grace {grace:g}s spent) before the run finished; its changes stay pending"
)


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
    if not settings.audiences:
        raise ConfigError("no audiences configured: add [[audiences]] to the config")
    if settings.metrics.port is not None:  # the status page beyond loopback needs its token
        web.require_token(settings.metrics.host, settings.metrics.token)


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


# --- runs in flight -----------------------------------------------------------------------


class RunsInFlight:
    """The group runs (and the reconcile) in flight: what `stop()` waits for and `abandon()`
    records as aborted. Each entry is a lease holder and the audiences it holds."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._entries: dict[str, tuple[str, list[str]]] = {}  # name -> (holder, audiences)

    def add(self, name: str, holder: str, keys: list[str]) -> None:
        with self._condition:
            self._entries[name] = (holder, keys)

    def remove(self, name: str) -> None:
        with self._condition:
            self._entries.pop(name, None)
            self._condition.notify_all()

    def names(self) -> list[str]:
        with self._condition:
            return list(self._entries)

    def entries(self) -> dict[str, tuple[str, list[str]]]:
        with self._condition:
            return dict(self._entries)

    def wait_empty(self, timeout: float, hurry: threading.Event) -> bool:
        """Wait up to `timeout` seconds (or until `hurry`) for every run to end."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._entries and not hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(min(left, 0.2))
            return not self._entries


# --- the daemon ---------------------------------------------------------------------------


class Daemon:
    """The scheduler, the plan and the runs. `start()`, then `stop()` (and `abandon()` when
    runs are still in flight after the grace); `reload()` on SIGHUP."""

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
        self.cadence = Cadence(settings.schedule, self.rng)
        self.flights = RunsInFlight()
        self._sender_factory = sender_factory
        self._sources = SourcePool(settings.sources)
        self._old_sources: list[SourcePool] = []  # replaced by a reload; closed at the end
        self._turns = Turns()
        self._wake_lock = threading.Lock()  # arming the wake-up job
        self._runs = RunPool(RUN_WORKERS, thread_name_prefix="audience-sync-run")
        self._groups = 0
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self.metrics = Metrics(self.keys, settings.schedule.max_interval, settings.metrics.health_margin)
        self.server: MetricsServer | None = None
        self.upkeep = Upkeep(self)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "wake": ThreadPoolExecutor(1),  # picks groups: quick, never behind a long job
                # The resync poll, the history pruning and the reconcile, which may take minutes.
                "default": ThreadPoolExecutor(3),
            },
        )

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.settings.audiences]

    def next_run(self, key: str) -> datetime | None:
        """When the audience runs next (None while it runs or when it is not configured)."""
        return self.cadence.due(key)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with store.translate_errors("cannot use state database", str(self.engine.url)):
            self._plan(self.keys, initial=True)
        for name in self.settings.sources:  # create engines now: threads then only read the pool
            self._sources.engine(name)
        if self.settings.metrics.port is not None:
            # The page asks for the settings on each request: after a reload it shows the new ones.
            page = StatusPage(self.engine, lambda: self.settings)
            self.server = MetricsServer(
                self.metrics, self.settings.metrics.host, self.settings.metrics.port, page=page
            ).start()
            url = self.server.url
            log.info("status page on %s/, metrics on %s/metrics, health on %s/healthz", url, url, url)
        self.scheduler.start()
        self._arm_wake()
        self.upkeep.start()

    def stop(self, timeout: float) -> bool:
        """Take no new run and wait up to `timeout` seconds for the runs in flight to record
        their state. True when none is left."""
        self._stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        clean = self.flights.wait_empty(timeout, self._hurry)
        if clean:
            self._close()
        return clean

    def hurry(self) -> None:
        """A second signal: stop waiting for the runs in flight."""
        self._hurry.set()

    def running(self) -> list[str]:
        """The audiences (and the reconcile) with a run in flight."""
        names = []
        for name, (_holder, keys) in self.flights.entries().items():
            names += keys or [name]
        return names

    def abandon(self) -> list[str]:
        """Record the runs still in flight as aborted and release their leases (the process is
        about to exit). Their changes stay pending for the next run. Returns their audiences."""
        error = ABORTED_ERROR.format(grace=self.settings.daemon.grace_seconds)
        abandoned = []
        for holder, keys in self.flights.entries().values():
            for key in keys:
                try:
                    self._record_aborted(key, holder, error)
                    lease.release(self.engine, key, holder)
                    abandoned.append(key)
                except sa.exc.SQLAlchemyError as exc:  # the next run's abort_stale_runs tidies up
                    log.warning("could not record the aborted run of %r: %s", key, exc.__class__.__name__)
        return abandoned

    def _record_aborted(self, key: str, holder: str, error: str) -> None:
        with self.engine.begin() as connection:
            pending, in_doubt = store.pending_counts(connection, key)
            connection.execute(
                m.runs.update()
                .where(m.runs.c.audience_key == key, m.runs.c.holder == holder, m.runs.c.status == "running")
                .values(
                    status="aborted",
                    error=error,
                    finished_at=store.utcnow(),
                    pending=pending,
                    in_doubt=in_doubt,
                )
            )

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
        for pool in [self._sources, *self._old_sources]:
            pool.close()

    # --- planning -------------------------------------------------------------------------

    def _plan(self, keys: list[str], *, initial: bool) -> None:
        """Plan audiences from the state database, in one query per table whatever their number:
        at start every configured audience, on a reload the added ones."""
        settings = self.settings
        with self.engine.begin() as connection:
            store.register_audiences(connection, settings.select(keys))
            if initial:
                # An audience removed from the config is no longer run: its history stays, its
                # next run goes.
                connection.execute(
                    m.audiences.update()
                    .where(m.audiences.c.key.not_in(self.keys), m.audiences.c.next_run_at.is_not(None))
                    .values(next_run_at=None)
                )
            requested = set(store.pending_resync_keys(connection))
            finished = store.last_finished_by_audience(connection, keys)
            synced = store.baselined_keys(connection)
            succeeded = store.last_success_by_audience(connection, keys)
            pending = store.pending_by_audience(connection)
        now = store.utcnow()
        for key in keys:
            last = finished.get(key)
            self.metrics.set_last_success(key, succeeded.get(key))
            self.metrics.set_pending(key, pending.get(key, 0))
            if key in requested:
                at, reason = now, "full resync requested"
            else:
                at = first_run_at(
                    settings.schedule, self.rng, synced=key in synced, last_finished=last, now=now
                )
                if key not in synced or last is None:
                    reason = "never synced: initial full sync"
                elif at <= now:
                    reason = f"overdue: last run ended {_when(last)}"
                else:
                    reason = f"last run ended {_when(last)}"
            self.cadence.plan(key, at, reason, last)
        self._publish({key: self.cadence.due(key) for key in keys}, reasons=True)

    def _publish(self, planned: dict[str, datetime | None], *, reasons: bool = False) -> None:
        """Show each audience's next run in the metrics, the log and the state database."""
        now = store.utcnow()
        lines: dict[tuple[datetime, str], list[str]] = defaultdict(list)  # one line per group
        for key, at in planned.items():
            if at is None:
                continue
            self.metrics.set_next_run(key, at)
            lines[at, self.cadence.reason(key) if reasons else ""].append(key)
        for (at, why), keys in sorted(lines.items()):
            named = f"audience {keys[0]}" if len(keys) == 1 else f"{len(keys)} audiences ({_names(keys)})"
            log.info("%s: next run %s (in %s%s)", named, _when(at), _span((at - now).total_seconds()),
                     f"; {why}" if why else "")  # fmt: skip
        try:
            with self.engine.begin() as connection:
                store.publish_next_runs(connection, planned)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not record the next runs: %s", exc.__class__.__name__)

    def _arm_wake(self) -> None:
        """One wake-up job at the earliest due audience (now when one is due)."""
        if self._stopping.is_set():
            return
        with self._wake_lock:
            at = self.cadence.next_wake()
            if at is None:
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(WAKE_JOB)
                return
            self.scheduler.add_job(
                self._wake,
                "date",
                run_date=at,
                id=WAKE_JOB,
                name="wake",
                executor="wake",
                replace_existing=True,
                misfire_grace_time=None,  # late (a busy or suspended host) still runs
            )

    def _wake(self) -> None:
        """Start a group run of every audience due now (and those eligible to join it)."""
        if self._stopping.is_set():
            return
        group = self.cadence.take_group()
        if group:
            self._groups += 1
            name = f"{GROUP_JOB}{self._groups}"
            holder = lease.new_holder()
            self.flights.add(name, holder, group)  # before the run: stop() waits for it
            # Straight to a pool of our own: a job handed to APScheduler as stop() shuts it
            # down might never run, and stop() would wait for it in vain.
            self._runs.submit(self._run_group, name, holder, group)
        self._arm_wake()

    # --- the group run --------------------------------------------------------------------

    def _run_group(self, name: str, holder: str, keys: list[str]) -> None:
        if self._stopping.is_set():  # queued behind other groups until the stop
            self.flights.remove(name)
            return
        retry = store.utcnow() + min(RETRY_AFTER_ERROR, self.settings.schedule.min_interval)
        planned: dict[str, tuple[datetime, str]] | None
        try:
            planned = self._run(keys, holder)
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:  # e.g. the database is down
            log.error("audiences %s: the run failed to start or end: %s", _names(keys), _one_line(exc))
            planned = {key: (retry, "retrying after an error") for key in keys}
        except Exception:  # a bug: log it in full, and never let one group stop the daemon
            log.exception("audiences %s: unexpected error", _names(keys))
            planned = {key: (retry, "retrying after an error") for key in keys}
        finally:
            self.flights.remove(name)
        if planned is not None and not self._stopping.is_set():
            self._after_group(planned, retry)

    def _run(self, keys: list[str], holder: str) -> dict[str, tuple[datetime, str]] | None:
        """Run the group's audiences together; returns when each runs next (None: stopping)."""
        settings = self.settings  # a reload during the run leaves this run's config alone
        configured = set(self.keys)
        keys = [key for key in keys if key in configured]
        with self.engine.connect() as connection:
            requested = set(store.pending_resync_keys(connection))
            finished = store.last_finished_by_audience(connection, keys)
        planned: dict[str, tuple[datetime, str]] = {}
        for key in [k for k in keys if k not in requested and self._ran_elsewhere(k, finished.get(k))]:
            last = finished[key]
            self.metrics.mark_cycled(key)
            at = max(store.utcnow(), last + draw_interval(settings.schedule, self.rng))
            planned[key] = (at, f"another process ran it, ending {_when(last)}")
        to_run = [key for key in keys if key not in planned]
        if to_run:
            self._sync(settings, to_run, holder, requested)
        self._refresh(keys)
        if self._stopping.is_set():
            return None
        at = next_run_at(settings.schedule, self.rng)  # one draw for the group: it stays together
        planned.update({key: (at, "drawn after the group's run") for key in to_run})
        return planned

    def _ran_elsewhere(self, key: str, last: datetime | None) -> bool:
        return last is not None and last != self.cadence.last_finished(key)

    def _sync(self, settings: Settings, keys: list[str], holder: str, resyncs: set[str]) -> None:
        together = f" together ({len(keys)} audiences)" if len(keys) > 1 else ""
        resyncing = sorted(resyncs & set(keys))
        log.info(
            "audiences %s: run starting%s%s",
            _names(keys),
            together,
            f"; full resync of {', '.join(resyncing)}" if resyncing else "",
        )
        reports = sync_engine.sync(
            settings,
            self.engine,
            keys,
            sync_engine.SyncOptions(trigger="schedule"),
            sources=self._sources,
            sender_factory=self._sender,
            holder=holder,
            should_stop=self._stopping.is_set,
        )
        for report in reports:
            self.metrics.record_run(report.key, report.status, report.sent, report.failed, report.duration)
            self.metrics.mark_cycled(report.key)
            if report.status == "skipped":
                log.info("audience %s: skipped: %s", report.key, report.error)

    def _after_group(self, planned: dict[str, tuple[datetime, str]], retry: datetime) -> None:
        """Plan the group's audiences again: a resync asked for during the run runs at once; a
        failed check for one runs soon rather than hours from now."""
        try:
            with self.engine.connect() as connection:
                requested: set[str] | None = set(store.pending_resync_keys(connection))
                finished = store.last_finished_by_audience(connection, list(planned))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not check for resync requests: %s", exc.__class__.__name__)
            requested, finished = None, {}
        now = store.utcnow()
        for key, (at, _reason) in list(planned.items()):
            if requested is None:
                if retry < at:
                    planned[key] = (retry, "retrying: could not check for a resync request")
            elif key in requested:
                planned[key] = (now, "full resync requested during the run")
        published = self.cadence.finish(planned, dict(finished))
        self._publish(published, reasons=True)
        self._arm_wake()

    def _sender(self, planhat: PlanhatSettings) -> TurnTakingSender:
        return TurnTakingSender(self._sender_factory(planhat), self._turns)

    def _refresh(self, keys: list[str]) -> None:
        """Metrics from the state database, which knows about every process's runs."""
        with self.engine.connect() as connection:
            succeeded = store.last_success_by_audience(connection, keys)
            pending = store.pending_by_audience(connection)
        for key in keys:
            self.metrics.set_last_success(key, succeeded.get(key))
            self.metrics.set_pending(key, pending.get(key, 0))

    # --- resyncs and reloads --------------------------------------------------------------

    def resync_now(self, keys: list[str]) -> None:
        """Audiences with a resync requested run at once (mid-run: right after their run)."""
        configured = set(self.keys)
        moved = [
            key
            for key in keys
            if key in configured and self.cadence.request_now(key, "full resync requested")
        ]
        if moved:
            log.info("full resync requested for %s: running it now (or right after its run)", _names(moved))
            for key in moved:
                if (at := self.cadence.due(key)) is not None:
                    self.metrics.set_next_run(key, at)
            self._arm_wake()

    def reload(self) -> bool:
        """Re-read the config file; apply it when valid, else keep the running one. True when
        the new config is in force."""
        old = self.settings
        try:
            new = load_settings(old.path)
            require_token(new)
            _refuse_restart_only_changes(old, new)
        except AudienceSyncError as exc:
            log.error("reload refused, the running config stays in force: %s", exc)
            return False
        added = [key for key in (a.key for a in new.audiences) if key not in set(self.keys)]
        removed = [key for key in self.keys if key not in {a.key for a in new.audiences}]
        if new.sources != old.sources:
            self._old_sources.append(self._sources)  # runs in flight still read it
            self._sources = SourcePool(new.sources)
        self.settings = new
        for key in removed:
            self.cadence.remove(key)
            self.metrics.forget(key)
        try:
            if removed:
                with self.engine.begin() as connection:
                    store.publish_next_runs(connection, dict.fromkeys(removed))
            if added:
                self._plan(added, initial=False)
        except sa.exc.SQLAlchemyError as exc:
            log.error("reload: the state database failed: %s; retrying the reload on the next SIGHUP",
                      store.error_message(exc))  # fmt: skip
        if new.schedule != old.schedule:
            moved = self.cadence.reschedule(new.schedule)
            self._publish({key: self.cadence.due(key) for key in moved}, reasons=True)
        self.upkeep.reconfigure(old)
        self._arm_wake()
        log.info(
            "config reloaded from %s: %d audiences; added %s; removed %s%s",
            new.path or "(bundled demo)",
            len(new.audiences),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            "; schedule changed" if new.schedule != old.schedule else "",
        )
        return True


def _refuse_restart_only_changes(old: Settings, new: Settings) -> None:
    """Settings a running daemon cannot take over: say so rather than half-apply them."""
    if new.database_url != old.database_url:
        raise ConfigError("database.url changed: restart the daemon to use another state database")
    if (new.metrics.host, new.metrics.port) != (old.metrics.host, old.metrics.port):
        raise ConfigError("metrics.host or metrics.port changed: restart the daemon to move the port")


# --- upkeep -------------------------------------------------------------------------------


class Upkeep:
    """The daemon's jobs besides the runs: the resync poll, history pruning and the reconcile."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @property
    def settings(self) -> Settings:
        return self.daemon.settings

    def start(self) -> None:
        scheduler = self.daemon.scheduler
        scheduler.add_job(
            self.poll_resync,
            "interval",
            seconds=self.settings.daemon.resync_poll_seconds,
            id=POLL_JOB,
            name="resync poll",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        scheduler.add_job(
            self.prune,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            next_run_time=store.utcnow(),
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
            self.daemon.scheduler.reschedule_job(
                POLL_JOB, trigger="interval", seconds=self.settings.daemon.resync_poll_seconds
            )
        if self.settings.reconcile.interval != old.reconcile.interval:
            self._arm_reconcile()

    def _arm_reconcile(self) -> None:
        scheduler = self.daemon.scheduler
        interval = self.settings.reconcile.interval
        if interval is None:
            if scheduler.get_job(RECONCILE_JOB) is not None:
                scheduler.remove_job(RECONCILE_JOB)
            return
        scheduler.add_job(
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
        log.info("reconciling with Planhat every %s", _span(interval.total_seconds()))

    def poll_resync(self) -> None:
        if self.daemon._stopping.is_set():
            return
        try:
            with self.daemon.engine.connect() as connection:
                requested = store.pending_resync_keys(connection)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not read resync requests: %s", exc.__class__.__name__)
            return
        self.daemon.resync_now(requested)

    def reconcile(self) -> None:
        """Read Planhat back and repair drift; an audience mid-run is skipped until next time."""
        from . import reconcile

        daemon = self.daemon
        if daemon._stopping.is_set():
            return
        holder = lease.new_holder()
        daemon.flights.add(RECONCILE_HOLDING, holder, [])
        settings = self.settings
        try:
            reports = reconcile.reconcile(
                settings,
                daemon.engine,
                fix=True,
                trigger="schedule",
                sources=daemon._sources,
                sender_factory=daemon._sender,
                holder=holder,
                should_stop=daemon._stopping.is_set,
            )
            for report in reports:
                if report.run is not None:
                    run = report.run
                    daemon.metrics.record_run(run.key, run.status, run.sent, run.failed, run.duration)
                log.info(
                    "reconcile audience=%s status=%s drift=%d in_doubt=%d%s",
                    report.key,
                    report.status,
                    report.drift,
                    report.in_doubt,
                    f" error={report.error!r}" if report.error else "",
                )
            daemon._refresh([report.key for report in reports if report.run is not None])
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:
            log.error("reconcile failed: %s; it runs again in %s", _one_line(exc),
                      _span(settings.reconcile.interval.total_seconds()))  # type: ignore[union-attr]  # fmt: skip
        except Exception:  # a bug: logged in full; the daemon goes on
            log.exception("reconcile: unexpected error")
        finally:
            daemon.flights.remove(RECONCILE_HOLDING)

    def prune(self) -> None:
        retention = self.settings.history.retention_days
        cutoff = store.utcnow() - timedelta(days=retention)
        total = 0
        try:
            while not self.daemon._stopping.is_set():
                with self.daemon.engine.begin() as connection:
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
                retention,
            )


# --- the process --------------------------------------------------------------------------


def run_daemon(settings: Settings, engine: Engine) -> int:
    """Run until SIGTERM or SIGINT (SIGHUP reloads the config); returns the exit code (0 after
    a clean stop)."""
    require_token(settings)
    daemon = Daemon(settings, engine)
    stop, reload = threading.Event(), threading.Event()
    received: list[str] = []
    restore = _handle_signals(stop, reload, daemon, received)
    try:
        daemon.start()
        _check_in_background(settings, engine)
        log.info(
            "daemon started: %d audiences (%s), state database %s, schedule %s-%s, resync poll %gs",
            len(daemon.keys),
            ", ".join(daemon.keys),
            store.safe_url(settings.database_url),
            _span(settings.schedule.min_interval.total_seconds()),
            _span(settings.schedule.max_interval.total_seconds()),
            settings.daemon.resync_poll_seconds,
        )
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                log.info("SIGHUP: reloading the config")
                daemon.reload()
        grace = daemon.settings.daemon.grace_seconds
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


def _check_in_background(settings: Settings, engine: Engine) -> None:
    """`audience-sync check`, logged line by line beside the first runs: a FAIL is a warning to
    the operator, never a reason not to start (a source down now may be back by its run), and a
    slow item never delays the initial syncs."""
    from . import check

    def run() -> None:
        try:
            check.log_checks(settings, engine)
        except Exception:  # a bug in a check must not take the daemon down
            log.exception("check: unexpected error")

    threading.Thread(target=run, name="audience-sync-check", daemon=True).start()


def _handle_signals(
    stop: threading.Event, reload: threading.Event, daemon: Daemon, received: list[str]
) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop`; a second one stops waiting for runs in flight; SIGHUP
    sets `reload`. The handler only sets events (logging from a signal handler can deadlock)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reload.set()
            return
        if stop.is_set():
            daemon.hurry()
            return
        received.append(signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in signals}

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


def _names(keys: list[str], shown: int = 5) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    if seconds < 120:
        return f"{round(seconds)}s"
    minutes = round(seconds) // 60
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
