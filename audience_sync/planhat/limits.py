"""Keeping within Planhat's limits: the rate limiter, the per-run retry budget, Retry-After."""

from __future__ import annotations

import email.utils
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RateLimiter:
    """Spaces request starts 1/rate apart across all threads (a token bucket of one token)."""

    def __init__(self, rate: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self._interval = 1.0 / rate if rate > 0 and math.isfinite(rate) else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)  # outside the lock: other threads reserve later slots


class RetryBudget:
    """Caps the wall time the client spends waiting to retry.

    Waits in parallel threads overlap, so the budget charges the union of the waiting
    intervals, not their sum: ten workers backing off together for 2 s cost 2 s.
    """

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._remaining = max(0.0, seconds)
        self._clock = clock
        self._covered_until = -math.inf
        self._lock = threading.Lock()

    def reserve(self, wanted: float) -> float | None:
        """The wait granted (capped by what is left), or None when nothing is left."""
        with self._lock:
            now = self._clock()
            start = max(now, self._covered_until)
            free = start - now  # already paid for by another thread's wait
            if wanted <= free:
                return wanted
            if self._remaining <= 0:
                return None
            extra = min(wanted - free, self._remaining)
            self._remaining -= extra
            self._covered_until = start + extra
            return free + extra
