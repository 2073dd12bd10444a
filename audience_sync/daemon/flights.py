"""The runs in flight: group runs on a pool of their own, each registered while it lives, so
that a stop can wait for them and, past the grace, record them as aborted."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import sqlalchemy as sa

from ..config import Settings
from ..errors import AudienceSyncError
from ..state import leases, outbox, pauses, resyncs, runs
from ..support.clock import format_utc, utcnow
from ..support.text import names, one_line
from ..sync.reports import SyncOptions
from ..sync.run import sync
from .cadence import draw_interval, next_run_at
from .planner import Planned
from .runtime import Runtime

log = logging.getLogger(__name__)

GROUP = "group:"
# Group runs at once. Most of the time one group holds every audience; more run only when an
# audience becomes due (added, resynced, retried) while a long group is in flight.
RUN_WORKERS = 4
# A group that failed before its runs could start (the state database was unreachable) is
# tried again this soon, or at schedule.min_interval when that is shorter.
RETRY_AFTER_ERROR = timedelta(minutes=1)
ABORTED_ERROR = (
    "the daemon stopped (grace {grace:g}s spent) before the run finished; its changes stay pending"
)


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

    @contextlib.contextmanager
    def holding(self, name: str, holder: str, keys: list[str]) -> Iterator[None]:
        """Registered while the block runs."""
        self.add(name, holder, keys)
        try:
            yield
        finally:
            self.remove(name)

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


class GroupRuns:
    """Runs the groups the planner hands over, one `sync` each, on RUN_WORKERS workers."""

    def __init__(self, runtime: Runtime, rng: random.Random, last_finished: Callable[[str], datetime | None],
                 after_group: Callable[[Planned, datetime], None]) -> None:  # fmt: skip
        self.runtime = runtime
        self.flights = RunsInFlight()
        self._rng = rng
        self._last_finished = last_finished  # as the plan last saw it
        self._after_group = after_group
        self._pool = ThreadPoolExecutor(RUN_WORKERS, thread_name_prefix="audience-sync-run")
        self._groups = 0

    def start(self, group: list[str]) -> None:
        """Run the group's audiences together, now (or when a worker is free)."""
        self._groups += 1
        name = f"{GROUP}{self._groups}"
        holder = leases.new_holder()
        self.flights.add(name, holder, group)  # before the run: stop() waits for it
        # Straight to a pool of our own: a job handed to APScheduler as stop() shuts it down
        # might never run, and stop() would wait for it in vain.
        self._pool.submit(self._run_group, name, holder, group)

    def running(self) -> list[str]:
        """The audiences (and the reconcile) with a run in flight."""
        found = []
        for name, (_holder, keys) in self.flights.entries().items():
            found += keys or [name]
        return found

    def abandon(self) -> list[str]:
        """Record the runs still in flight as aborted and release their leases (the process is
        about to exit). Their changes stay pending for the next run. Returns their audiences."""
        engine = self.runtime.engine
        error = ABORTED_ERROR.format(grace=self.runtime.settings.daemon.grace_seconds)
        abandoned = []
        for holder, keys in self.flights.entries().values():
            for key in keys:
                try:
                    with engine.begin() as connection:
                        pending, in_doubt = outbox.count(connection, key)
                        runs.abort_held(connection, key, holder, error, pending, in_doubt)
                    leases.release(engine, key, holder)
                    abandoned.append(key)
                except sa.exc.SQLAlchemyError as exc:  # the next run's abort_stale tidies up
                    log.warning("could not record the aborted run of %r: %s", key, exc.__class__.__name__)
        return abandoned

    # --- one group run --------------------------------------------------------------------

    def _run_group(self, name: str, holder: str, keys: list[str]) -> None:
        runtime = self.runtime
        if runtime.stopping.is_set():  # queued behind other groups until the stop
            self.flights.remove(name)
            return
        retry = utcnow() + min(RETRY_AFTER_ERROR, runtime.settings.schedule.min_interval)
        planned: Planned | None
        try:
            planned = self._run(keys, holder)
        except (AudienceSyncError, sa.exc.SQLAlchemyError) as exc:  # e.g. the database is down
            log.error("audiences %s: the run failed to start or end: %s", names(keys), one_line(exc))
            planned = {key: (retry, "retrying after an error") for key in keys}
        except Exception:  # a bug: log it in full, and never let one group stop the daemon
            log.exception("audiences %s: unexpected error", names(keys))
            planned = {key: (retry, "retrying after an error") for key in keys}
        finally:
            self.flights.remove(name)
        if planned is not None and not runtime.stopping.is_set():
            self._after_group(planned, retry)

    def _run(self, keys: list[str], holder: str) -> Planned | None:
        """Run the group's audiences together; returns when each runs next (None: stopping).

        An audience that another process ran since this one planned it is not run again: its
        next run is drawn from that run. Several daemons against one database so share one
        cadence, and the lease taken in `sync` keeps them from running one audience twice."""
        runtime = self.runtime
        settings = runtime.settings  # a reload during the run leaves this run's config alone
        configured = set(runtime.keys)
        keys = [key for key in keys if key in configured]
        with runtime.engine.connect() as connection:
            requested = set(resyncs.pending_keys(connection))
            finished = runs.last_finished_by_audience(connection, keys)
            held_back = pauses.paused(connection, keys)
        planned: Planned = {}
        for key, pause in held_back.items():  # planned as usual: `resume` lets its next run happen
            log.info("audience %s: not run: %s", key, pause.describe())
            runtime.metrics.mark_cycled(key)
            planned[key] = (next_run_at(settings.schedule, self._rng), "paused")
        keys = [key for key in keys if key not in held_back]
        requested -= held_back.keys()
        for key in [k for k in keys if k not in requested and self._ran_elsewhere(k, finished.get(k))]:
            last = finished[key]
            runtime.metrics.mark_cycled(key)
            at = max(utcnow(), last + draw_interval(settings.schedule, self._rng))
            planned[key] = (at, f"another process ran it, ending {format_utc(last)}")
        to_run = [key for key in keys if key not in planned]
        if to_run:
            self._sync(settings, to_run, holder, requested)
        runtime.refresh_metrics(keys)
        if runtime.stopping.is_set():
            return None
        at = next_run_at(settings.schedule, self._rng)  # one draw for the group: it stays together
        planned.update({key: (at, "drawn after the group's run") for key in to_run})
        return planned

    def _ran_elsewhere(self, key: str, last: datetime | None) -> bool:
        return last is not None and last != self._last_finished(key)

    def _sync(self, settings: Settings, keys: list[str], holder: str, resyncs_requested: set[str]) -> None:
        runtime = self.runtime
        together = f" together ({len(keys)} audiences)" if len(keys) > 1 else ""
        resyncing = sorted(resyncs_requested & set(keys))
        log.info("audiences %s: run starting%s%s", names(keys), together,
                 f"; full resync of {', '.join(resyncing)}" if resyncing else "")  # fmt: skip
        reports = sync(
            settings,
            runtime.engine,
            keys,
            SyncOptions(trigger="schedule"),
            sources=runtime.sources,
            sender_factory=runtime.sender,
            holder=holder,
            should_stop=runtime.stopping.is_set,
        )
        for report in reports:
            runtime.metrics.record_run(report.key, report.status, report.sent, report.failed, report.duration)
            runtime.metrics.mark_cycled(report.key)
            if report.status == "skipped":
                log.info("audience %s: skipped: %s", report.key, report.error)
