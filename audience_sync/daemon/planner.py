"""Planning: what runs when. Each audience's next run (`cadence.Cadence`), published to the
metrics, the log and the state database, and one APScheduler wake-up job armed at the earliest
due audience; when it fires, the group due (and those eligible to join it) is handed to the
runs in flight."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from ..config import ScheduleSettings
from ..state import audiences, outbox, pauses, resyncs, runs
from ..support.clock import format_utc, utcnow
from ..support.text import names, span
from .cadence import Cadence, first_run_at
from .runtime import Runtime

log = logging.getLogger(__name__)

WAKE_JOB = "wake"

Planned = dict[str, tuple[datetime, str]]  # audience -> (next run, why)


class Planner:
    """The plan of every configured audience, and the wake-up job that starts group runs."""

    def __init__(
        self,
        runtime: Runtime,
        scheduler: BackgroundScheduler,
        rng: random.Random,
        start_group: Callable[[list[str]], None],
    ) -> None:
        self.runtime = runtime
        self.rng = rng
        self.cadence = Cadence(runtime.settings.schedule, rng)
        self._scheduler = scheduler
        self._start_group = start_group
        self._wake_lock = threading.Lock()  # arming the wake-up job

    def next_run(self, key: str) -> datetime | None:
        """When the audience runs next (None while it runs or when it is not configured)."""
        return self.cadence.due(key)

    # --- planning -------------------------------------------------------------------------

    def plan(self, keys: list[str], *, initial: bool) -> None:
        """Plan audiences from the state database, in one query per table whatever their number:
        at start every configured audience, on a reload the added ones."""
        runtime, settings = self.runtime, self.runtime.settings
        with runtime.engine.begin() as connection:
            audiences.register(connection, settings.select(keys))
            if initial:
                audiences.unplan_others(connection, runtime.keys)
            held_back = pauses.paused(connection, keys)
            # A paused audience's resync waits for its resume, not at the head of every plan.
            requested = set(resyncs.pending_keys(connection)) - held_back.keys()
            finished = runs.last_finished_by_audience(connection, keys)
            synced = audiences.baselined_keys(connection)
            succeeded = runs.last_success_by_audience(connection, keys)
            pending = outbox.counts(connection, keys)
        now = utcnow()
        for key in keys:
            last = finished.get(key)
            runtime.metrics.set_last_success(key, succeeded.get(key))
            runtime.metrics.set_pending(key, pending.get(key, (0, 0))[0])
            runtime.metrics.set_paused(key, key in held_back)
            if key in requested:
                at, reason = now, "full resync requested"
            else:
                at = first_run_at(
                    settings.schedule, self.rng, synced=key in synced, last_finished=last, now=now
                )
                if key not in synced or last is None:
                    reason = "never synced: initial full sync"
                elif at <= now:
                    reason = f"overdue: last run ended {format_utc(last)}"
                else:
                    reason = f"last run ended {format_utc(last)}"
            self.cadence.plan(key, at, reason, last)
        self.publish({key: self.cadence.due(key) for key in keys}, reasons=True)

    def publish(self, planned: dict[str, datetime | None], *, reasons: bool = False) -> None:
        """Show each audience's next run in the metrics, the log and the state database."""
        now = utcnow()
        lines: dict[tuple[datetime, str], list[str]] = defaultdict(list)  # one line per group
        for key, at in planned.items():
            if at is None:
                continue
            self.runtime.metrics.set_next_run(key, at)
            lines[at, self.cadence.reason(key) if reasons else ""].append(key)
        for (at, why), keys in sorted(lines.items()):
            named = f"audience {keys[0]}" if len(keys) == 1 else f"{len(keys)} audiences ({names(keys)})"
            log.info("%s: next run %s (in %s%s)", named, format_utc(at), span((at - now).total_seconds()),
                     f"; {why}" if why else "")  # fmt: skip
        try:
            with self.runtime.engine.begin() as connection:
                audiences.publish_next_runs(connection, planned)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not record the next runs: %s", exc.__class__.__name__)

    def forget(self, keys: list[str]) -> None:
        """Audiences removed from the config (a reload): never run again, no next run shown."""
        for key in keys:
            self.cadence.remove(key)
            self.runtime.metrics.forget(key)

    def unpublish(self, keys: list[str]) -> None:
        with self.runtime.engine.begin() as connection:
            audiences.publish_next_runs(connection, dict.fromkeys(keys))

    def reschedule(self, schedule: ScheduleSettings) -> None:
        """A new [min_interval, max_interval]: every idle audience drawn anew after its last run."""
        moved = self.cadence.reschedule(schedule)
        self.publish({key: self.cadence.due(key) for key in moved}, reasons=True)

    def request_now(self, keys: list[str]) -> None:
        """Audiences with a resync requested run at once (mid-run: right after their run)."""
        configured = set(self.runtime.keys)
        moved = [
            key
            for key in keys
            if key in configured and self.cadence.request_now(key, "full resync requested")
        ]
        if moved:
            log.info("full resync requested for %s: running it now (or right after its run)", names(moved))
            for key in moved:
                if (at := self.cadence.due(key)) is not None:
                    self.runtime.metrics.set_next_run(key, at)
            self.arm_wake()

    def after_group(self, planned: Planned, retry: datetime) -> None:
        """Plan the group's audiences again: a resync asked for during the run runs at once; a
        failed check for one runs soon rather than hours from now."""
        try:
            with self.runtime.engine.connect() as connection:
                held_back = pauses.paused(connection, list(planned))
                requested: set[str] | None = set(resyncs.pending_keys(connection)) - held_back.keys()
                finished = runs.last_finished_by_audience(connection, list(planned))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("could not check for resync requests: %s", exc.__class__.__name__)
            requested, finished = None, {}
        now = utcnow()
        for key, (at, _reason) in list(planned.items()):
            if requested is None:
                if retry < at:
                    planned[key] = (retry, "retrying: could not check for a resync request")
            elif key in requested:
                planned[key] = (now, "full resync requested during the run")
        published = self.cadence.finish(planned, dict(finished))
        self.publish(dict(published), reasons=True)
        self.arm_wake()

    # --- waking ---------------------------------------------------------------------------

    def arm_wake(self) -> None:
        """One wake-up job at the earliest due audience (now when one is due)."""
        if self.runtime.stopping.is_set():
            return
        with self._wake_lock:
            at = self.cadence.next_wake()
            if at is None:
                with contextlib.suppress(JobLookupError):
                    self._scheduler.remove_job(WAKE_JOB)
                return
            self._scheduler.add_job(
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
        if self.runtime.stopping.is_set():
            return
        group = self.cadence.take_group()
        if group:
            self._start_group(group)
        self.arm_wake()
