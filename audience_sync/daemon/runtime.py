"""What the daemon's parts share, behind one explicit interface: the state database, the config
in force (a reload replaces it), the source engines, the metrics, the turn-taking Planhat
sender, and whether the daemon is stopping."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from ..config import PlanhatSettings, Settings
from ..http.metrics import Metrics
from ..snapshot.sources import SourcePool
from ..state import outbox, runs
from .turns import Turns, TurnTakingSender


class Runtime:
    def __init__(
        self, settings: Settings, engine: Engine, sender_factory: Callable[[PlanhatSettings], Any]
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = threading.Event()
        self.metrics = Metrics(self.keys, settings.schedule.max_interval, settings.metrics.health_margin)
        self._sender_factory = sender_factory
        self._turns = Turns()
        self._sources = SourcePool(settings.sources)
        self._old_sources: list[SourcePool] = []  # replaced by a reload; closed at the end

    @property
    def keys(self) -> list[str]:
        """The configured audience keys, in config order."""
        return [a.key for a in self.settings.audiences]

    @property
    def sources(self) -> SourcePool:
        return self._sources

    def open_sources(self) -> None:
        """Create every source's engine now: the runs' threads then only read the pool."""
        for name in self.settings.sources:
            self._sources.engine(name)

    def replace_settings(self, new: Settings) -> None:
        """A reload: the new config is in force for the next runs; runs in flight keep theirs
        (and the sources they read, closed only at the end)."""
        if new.sources != self.settings.sources:
            self._old_sources.append(self._sources)
            self._sources = SourcePool(new.sources)
        self.settings = new

    def sender(self, planhat: PlanhatSettings) -> TurnTakingSender:
        """A Planhat client that takes its turn with the other runs' before each chunk."""
        return TurnTakingSender(self._sender_factory(planhat), self._turns)

    def refresh_metrics(self, keys: list[str]) -> None:
        """Last success and pending changes from the state database, which knows about every
        process's runs."""
        with self.engine.connect() as connection:
            succeeded = runs.last_success_by_audience(connection, keys)
            pending = outbox.counts(connection, keys)
        for key in keys:
            self.metrics.set_last_success(key, succeeded.get(key))
            self.metrics.set_pending(key, pending.get(key, (0, 0))[0])

    def close(self) -> None:
        for pool in [self._sources, *self._old_sources]:
            pool.close()
