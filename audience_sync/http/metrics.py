"""The daemon's Prometheus metrics and its health (served by `server` at /metrics and /healthz).

An audience is unhealthy when, past its first run since the daemon started, it has not synced
successfully within schedule.max_interval + metrics.health_margin. An audience still within its
first run counts as healthy: a daemon restarted after an outage, or an initial full sync of
many hours, is not an alert yet. A paused audience is healthy: it is not run on purpose, and
`audience_sync_paused` shows it.

Every metric lives in a `CollectorRegistry` owned by one `Metrics` object, never in
prometheus-client's global registry, so two daemons (or two tests) in one process never share
a counter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from ..support.clock import utcnow

# A run lasts seconds (a few changes) to hours (an initial full sync).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, float("inf"))


@dataclass
class _AudienceHealth:
    last_success_at: datetime | None = None
    cycled: bool = False  # a run (or a check that another process ran it) ended since start
    paused: bool = False  # `audience-sync pause`: not run on purpose, so not overdue


class Metrics:
    """The daemon's metrics and health state; thread-safe."""

    def __init__(
        self,
        keys: Iterable[str],
        max_interval: timedelta,
        health_margin: timedelta,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._limit = max_interval + health_margin
        self.started_at = clock()
        self._lock = threading.Lock()
        self._audiences = {key: _AudienceHealth() for key in keys}
        r = self.registry
        self.runs = Counter(
            "audience_sync_runs", "Runs ended, by audience and status", ["audience", "status"], registry=r
        )
        self.sent = Counter(
            "audience_sync_changes_sent", "Changes Planhat accepted", ["audience"], registry=r
        )
        self.failed = Counter(
            "audience_sync_changes_failed", "Changes Planhat did not accept", ["audience"], registry=r
        )
        self.pending = Gauge(
            "audience_sync_pending_changes", "Changes waiting in the outbox", ["audience"], registry=r
        )
        self.last_success = Gauge(
            "audience_sync_last_success_timestamp_seconds",
            "When the audience's last successful run finished (Unix time)",
            ["audience"],
            registry=r,
        )
        self.next_run = Gauge(
            "audience_sync_next_run_timestamp_seconds",
            "When the daemon runs the audience next (Unix time)",
            ["audience"],
            registry=r,
        )
        self.duration = Histogram(
            "audience_sync_run_duration_seconds",
            "Run duration",
            ["audience"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.paused = Gauge(
            "audience_sync_paused",
            "1 while the audience is paused (`audience-sync pause`), else 0",
            ["audience"],
            registry=r,
        )
        self.healthy = Gauge("audience_sync_healthy", "1 while /healthz answers 200, else 0", registry=r)
        self.healthy.set_function(lambda: 1.0 if self.health()[0] else 0.0)
        for key in self._audiences:  # every configured audience shows, at zero, from the start
            self.sent.labels(key)
            self.failed.labels(key)
            self.pending.labels(key)
            self.paused.labels(key)

    # --- updates --------------------------------------------------------------------------

    def record_run(self, key: str, status: str, sent: int, failed: int, duration: float) -> None:
        self.runs.labels(key, status).inc()
        self.sent.labels(key).inc(sent)
        self.failed.labels(key).inc(failed)
        if status != "skipped":
            self.duration.labels(key).observe(duration)

    def set_pending(self, key: str, count: int) -> None:
        self.pending.labels(key).set(count)

    def set_paused(self, key: str, paused: bool) -> None:
        with self._lock:
            self._audiences.setdefault(key, _AudienceHealth()).paused = paused
        self.paused.labels(key).set(1.0 if paused else 0.0)

    def set_last_success(self, key: str, at: datetime | None) -> None:
        if at is None:
            return
        with self._lock:
            self._audiences.setdefault(key, _AudienceHealth()).last_success_at = at
        self.last_success.labels(key).set(at.timestamp())

    def set_next_run(self, key: str, at: datetime) -> None:
        self.next_run.labels(key).set(at.timestamp())

    def forget(self, key: str) -> None:
        """An audience removed from the config (a reload): no longer part of the health."""
        with self._lock:
            self._audiences.pop(key, None)

    def mark_cycled(self, key: str) -> None:
        """The audience's first run since the daemon started has ended."""
        with self._lock:
            self._audiences.setdefault(key, _AudienceHealth()).cycled = True

    # --- reading --------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details): unhealthy when an audience, past its first run since start, has
        not synced successfully for longer than max_interval + health_margin."""
        now = self._clock()
        audiences: dict[str, Any] = {}
        with self._lock:
            items = list(self._audiences.items())
        for key, state in items:
            since = state.last_success_at or self.started_at
            overdue = now - since > self._limit
            healthy = not state.cycled or not overdue or state.paused
            audiences[key] = {
                "healthy": healthy,
                "paused": state.paused,
                "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
                "first_run_since_start": not state.cycled,
            }
        ok = all(entry["healthy"] for entry in audiences.values())
        return ok, {"healthy": ok, "limit_seconds": self._limit.total_seconds(), "audiences": audiences}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
