"""Keeping the leases of a run alive: renewed in a background thread until the run ends."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..state import leases
from ..support.text import first_line

log = logging.getLogger(__name__)


class Timer(Protocol):
    """The keeper's time: when now is, and the wait between two renewals."""

    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait `seconds` or until `stop` is set; True when it is set."""
        ...


class WallTimer:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(seconds)


class LeaseKeeper:
    """Renews a set of held leases in a background thread until stopped."""

    def __init__(
        self,
        engine: Engine,
        keys: list[str],
        holder: str,
        ttl_seconds: float,
        *,
        timer: Timer | None = None,  # a test gives one it controls
    ) -> None:
        self.engine = engine
        self.keys = list(keys)
        self.holder = holder
        self.ttl = ttl_seconds
        self.lost: set[str] = set()
        self._timer = timer or WallTimer()
        # When each lease was last renewed (monotonic; a call's start, erring early). It was
        # taken just before the keeper was made, which counts as the first renewal.
        self._renewed = dict.fromkeys(self.keys, self._timer.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl)

    def _loop(self) -> None:
        try:
            while not self._timer.wait(self._stop, self.ttl / 3):
                for key in self.keys:
                    if key not in self.lost:
                        self._renew(key)
        except Exception as exc:  # a bug: without this thread the run would go on unleased
            log.error(
                "lease renewal stopped by an unexpected error (%s: %s): stopping the runs of %s",
                exc.__class__.__name__,
                first_line(exc),
                ", ".join(map(repr, self.keys)),
            )
            self.lost.update(self.keys)

    def _renew(self, key: str) -> None:
        started = self._timer.monotonic()
        try:
            if leases.renew(self.engine, key, self.holder, self.ttl):
                self._renewed[key] = started
            else:
                log.error("lost the lease on audience %r", key)
                self.lost.add(key)
        except sa.exc.SQLAlchemyError as exc:  # transient: try again next tick ...
            log.warning("could not renew the lease on %r: %s", key, exc.__class__.__name__)
            # ... unless the lease has run out meanwhile: another process may take it now.
            unrenewed = self._timer.monotonic() - self._renewed[key]
            if unrenewed >= self.ttl:
                log.error("lost the lease on audience %r: not renewed for %.1fs", key, unrenewed)
                self.lost.add(key)
