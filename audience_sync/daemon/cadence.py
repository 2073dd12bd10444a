"""When each audience runs: Engage's cadence per audience, run in groups.

Engage runs an audience's initial full sync, then its changes every two to three hours. The
daemon keeps that per audience (each has its own due time, published in `audiences.next_run_at`)
but runs audiences *together* whenever it can, so that a user in ten audiences gets one identify
carrying ten values instead of ten identifies:

    due        an audience is due at its initial sync (at once), after a resync request (at
               once) or a draw in [schedule.min_interval, schedule.max_interval] after its run
    group      when the first audience falls due, every idle audience that is due *or eligible*
               joins it: eligible means its last run ended at least min_interval ago, so joining
               early never shortens its interval below the minimum
    together   the audiences of a group are drawn one next time, together; so after one cycle the
               audiences of a destination share one cadence, and an audience added later (a new
               one, one back from a resync) joins the group's next run once it is eligible

The functions and the `Cadence` object decide; they read no database and start no thread, so the
rules are tested directly (with freezegun); the daemon (`daemon.py`, `planner.py`) wires them to APScheduler.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..config import ScheduleSettings
from ..support.clock import utcnow


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
    now = now or utcnow()
    if not synced or last_finished is None:
        return now
    return max(now, last_finished + draw_interval(schedule, rng))


def next_run_at(schedule: ScheduleSettings, rng: random.Random, now: datetime | None = None) -> datetime:
    """After every run, the next one is drawn afresh."""
    return (now or utcnow()) + draw_interval(schedule, rng)


@dataclass
class Slot:
    """One audience's place in the plan."""

    due: datetime | None  # None while it runs
    reason: str
    last_finished: datetime | None  # its last run's end, as the plan last saw it
    again: str | None = None  # run it again right after the run in flight (a resync), and why


class Cadence:
    """Every configured audience's due time and whether it is running; thread-safe."""

    def __init__(self, schedule: ScheduleSettings, rng: random.Random) -> None:
        self.schedule = schedule
        self.rng = rng
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()

    # --- planning -------------------------------------------------------------------------

    def plan(self, key: str, at: datetime, reason: str, last_finished: datetime | None) -> None:
        """(Re)plan an idle audience; an audience mid-run is planned when its run ends."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.due is None:
                return
            self._slots[key] = Slot(at, reason, last_finished)

    def remove(self, key: str) -> None:
        """No longer configured: never run again (a run in flight finishes)."""
        with self._lock:
            self._slots.pop(key, None)

    def reschedule(self, schedule: ScheduleSettings, now: datetime | None = None) -> list[str]:
        """A new [min, max]: every idle audience drawn anew after its last run (or kept at once
        when it was due at once). Returns the audiences re-planned."""
        now = now or utcnow()
        with self._lock:
            self.schedule = schedule
            moved = []
            for key, slot in self._slots.items():
                if slot.due is None or slot.last_finished is None or slot.due <= now:
                    continue
                slot.due = max(now, slot.last_finished + draw_interval(schedule, self.rng))
                slot.reason = "schedule changed: drawn again after the last run"
                moved.append(key)
            return moved

    def request_now(self, key: str, reason: str, now: datetime | None = None) -> bool:
        """Run the audience at once, or right after its run in flight. True when that changed
        the plan (False: unknown, or already so)."""
        now = now or utcnow()
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return False
            if slot.due is None:
                changed, slot.again = slot.again is None, reason
                return changed
            if slot.due > now:
                slot.due, slot.reason = now, reason
                return True
            return False

    # --- groups ---------------------------------------------------------------------------

    def take_group(self, now: datetime | None = None) -> list[str]:
        """The audiences to run now, marked running: none unless one is due; then every idle
        audience that is due or eligible (its last run ended min_interval ago or more)."""
        now = now or utcnow()
        with self._lock:
            idle = {key: (slot.due, slot) for key, slot in self._slots.items() if slot.due is not None}
            if not any(due <= now for due, _slot in idle.values()):
                return []
            group = [key for key, (due, slot) in idle.items() if due <= now or self._eligible(slot, now)]
            for key in group:
                self._slots[key].due = None
            return group

    def _eligible(self, slot: Slot, now: datetime) -> bool:
        return slot.last_finished is not None and slot.last_finished + self.schedule.min_interval <= now

    def finish(
        self, planned: dict[str, tuple[datetime, str]], finished: dict[str, datetime | None]
    ) -> dict[str, datetime]:
        """The group's runs ended: plan each audience (a resync asked for meanwhile: at once).
        Returns the due time of every audience still configured, to publish."""
        now = utcnow()
        published = {}
        with self._lock:
            for key, (at, reason) in planned.items():
                slot = self._slots.get(key)
                if slot is None:  # removed from the config during the run
                    continue
                if slot.again is not None:
                    at, reason = now, slot.again
                slot.due, slot.reason, slot.again = at, reason, None
                slot.last_finished = finished.get(key, slot.last_finished)
                published[key] = at
        return published

    # --- reading --------------------------------------------------------------------------

    def next_wake(self) -> datetime | None:
        """The earliest due time of an idle audience (None: nothing to wait for)."""
        with self._lock:
            due = [slot.due for slot in self._slots.values() if slot.due is not None]
        return min(due) if due else None

    def due(self, key: str) -> datetime | None:
        with self._lock:
            slot = self._slots.get(key)
            return slot.due if slot else None

    def reason(self, key: str) -> str:
        with self._lock:
            slot = self._slots.get(key)
            return slot.reason if slot else ""

    def running(self, key: str) -> bool:
        with self._lock:
            slot = self._slots.get(key)
            return slot is not None and slot.due is None

    def last_finished(self, key: str) -> datetime | None:
        with self._lock:
            slot = self._slots.get(key)
            return slot.last_finished if slot else None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._slots)
