"""The daemon behind `audience-sync run`: Engage's cadence, run in groups; resyncs, reloads and
a graceful stop. `Daemon` composes its parts, each behind an explicit interface:

    runtime    what they share: the state database, the config in force, the sources, the
               metrics, the turn-taking Planhat sender, whether the daemon is stopping
    planner    what runs when: each audience's next run (`cadence`), published, and the
               wake-up job that hands a due group to the group runs
    flights    the runs in flight: group runs on a pool of their own, which a stop waits for
               and, past the grace, records as aborted
    upkeep     the resync poll, history pruning, the reconcile and the API's run requests
    server     /metrics, /healthz and the status page (`http`), when metrics.port is set

    start    plan each audience from the state database (`cadence.first_run_at`): never
             synced -> at once (its initial full sync); otherwise its last run + a random draw
             in [schedule.min_interval, schedule.max_interval], at once when that is past
    groups   when the wake-up job fires, every idle audience that is due or eligible runs in
             one group run (`cadence.Cadence`), so a user's changes across audiences travel as
             one identify / one contact item; the group is drawn one next time
    resync   the poll reads `resync_requests` every daemon.resync_poll and makes the audience
             due now, or, when it is mid-run, right after its run
    reload   SIGHUP re-reads the config: new audiences are planned (their initial sync at
             once), removed ones are no longer run, a new schedule re-draws the plan; runs in
             flight finish on the config they started with; an invalid config is refused
             with one line and the running one stays in force
    stop     SIGTERM/SIGINT: no new run; a run in flight stops after its delivery chunk and
             records its state; past the grace, runs still in flight are recorded as aborted
             and their leases released before the process exits
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine

from ..config import PlanhatSettings, Settings, load_settings
from ..errors import AudienceSyncError, ConfigError
from ..http.api import RunApi
from ..http.server import MetricsServer
from ..http.status_page import StatusPage
from ..state.database import error_message, translate_errors
from ..support.text import first_line
from ..sync.sending import sender_for
from .cadence import Cadence
from .flights import GroupRuns
from .planner import Planner
from .requirements import require_token
from .runtime import Runtime
from .upkeep import Upkeep

log = logging.getLogger(__name__)


class Daemon:
    """The scheduler, the plan and the runs. `start()`, then `stop()` (and `abandon()` when
    runs are still in flight after the grace); `reload()` on SIGHUP."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        rng: random.Random | None = None,
        sender_factory: Callable[[PlanhatSettings], Any] = sender_for,
    ) -> None:
        self.runtime = Runtime(settings, engine, sender_factory)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "wake": ThreadPoolExecutor(1),  # picks groups: quick, never behind a long job
                # The resync poll, the history pruning, the reconcile and the runs the API asked
                # for, the last two of which may take minutes.
                "default": ThreadPoolExecutor(4),
            },
        )
        rng = rng or random.Random()
        self.planner = Planner(self.runtime, self.scheduler, rng, self._start_group)
        self.groups = GroupRuns(
            self.runtime, rng, self.planner.cadence.last_finished, self.planner.after_group
        )
        self.upkeep = Upkeep(self.runtime, self.scheduler, self.groups.flights, self.planner.request_now)
        self.server: MetricsServer | None = None
        self._hurry = threading.Event()

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    @property
    def keys(self) -> list[str]:
        return self.runtime.keys

    @property
    def cadence(self) -> Cadence:
        return self.planner.cadence

    def next_run(self, key: str) -> datetime | None:
        """When the audience runs next (None while it runs or when it is not configured)."""
        return self.planner.next_run(key)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with translate_errors("cannot use state database", str(self.engine.url)):
            self.planner.plan(self.keys, initial=True)
        self.runtime.open_sources()
        if self.settings.metrics.port is not None:
            # The page asks for the settings on each request: after a reload it shows the new ones.
            page = StatusPage(self.engine, lambda: self.settings)
            api = RunApi(self.engine, lambda: self.settings)
            self.server = MetricsServer(
                self.runtime.metrics,
                self.settings.metrics.host,
                self.settings.metrics.port,
                page=page,
                api=api,
            ).start()
            url = self.server.url
            log.info("status page on %s/, metrics on %s/metrics, health on %s/healthz", url, url, url)
        self.scheduler.start()
        self.planner.arm_wake()
        self.upkeep.start()

    def stop(self, timeout: float) -> bool:
        """Take no new run and wait up to `timeout` seconds for the runs in flight to record
        their state. True when none is left."""
        self.runtime.stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        clean = self.groups.flights.wait_empty(timeout, self._hurry)
        if clean:
            self._close()
        return clean

    def hurry(self) -> None:
        """A second signal: stop waiting for the runs in flight."""
        self._hurry.set()

    def running(self) -> list[str]:
        """The audiences (and the reconcile) with a run in flight."""
        return self.groups.running()

    def abandon(self) -> list[str]:
        """Record the runs still in flight as aborted and release their leases (the process is
        about to exit). Their changes stay pending for the next run. Returns their audiences."""
        return self.groups.abandon()

    def _close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.runtime.close()

    def _start_group(self, group: list[str]) -> None:
        if not self.runtime.stopping.is_set():
            self.groups.start(group)

    # --- reloads --------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file; apply it when valid, else keep the running one. True when
        the new config is in force."""
        old = self.settings
        try:
            new = load_settings(old.path)
            require_token(new)
            _refuse_restart_only_changes(old, new)
        except AudienceSyncError as exc:
            log.error("reload refused, the running config stays in force: %s", first_line(exc))
            return False
        added = [key for key in (a.key for a in new.audiences) if key not in set(self.keys)]
        removed = [key for key in self.keys if key not in {a.key for a in new.audiences}]
        self.runtime.replace_settings(new)
        self.planner.forget(removed)
        try:
            if removed:
                self.planner.unpublish(removed)
            if added:
                self.planner.plan(added, initial=False)
        except sa.exc.SQLAlchemyError as exc:
            log.error("reload: the state database failed: %s; retrying the reload on the next SIGHUP",
                      error_message(exc))  # fmt: skip
        if new.schedule != old.schedule:
            self.planner.reschedule(new.schedule)
        self.upkeep.reconfigure(old)
        self.planner.arm_wake()
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
