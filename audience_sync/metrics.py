"""Prometheus metrics, a health endpoint and the status page, served by the daemon.

    GET /metrics   the daemon's own registry, in the Prometheus text format
    GET /healthz   200 while every audience synced successfully within
                   schedule.max_interval + metrics.health_margin, 503 otherwise;
                   a JSON body names each audience's state
    GET /          the status page (`web`), when the server is given one; with the
                   access token when `metrics.token` is set. /metrics and /healthz are not
                   gated: they carry audience keys, counts and times, never names or errors

An audience still within its first run since the daemon started counts as healthy: a daemon
restarted after an outage, or an initial full sync of many hours, is not an alert yet.

Every metric lives in a `CollectorRegistry` owned by one `Metrics` object, never in
prometheus-client's global registry, so two daemons (or two tests) in one process never share
a counter.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from .errors import ConfigError
from .store import utcnow
from .web import MAX_FORM, StatusPage, require_token

log = logging.getLogger("audience_sync.metrics")

# A run lasts seconds (a few changes) to hours (an initial full sync).
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, float("inf"))


@dataclass
class _AudienceHealth:
    last_success_at: datetime | None = None
    cycled: bool = False  # a run (or a check that another process ran it) ended since start


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
        self.healthy = Gauge("audience_sync_healthy", "1 while /healthz answers 200, else 0", registry=r)
        self.healthy.set_function(lambda: 1.0 if self.health()[0] else 0.0)
        for key in self._audiences:  # every configured audience shows, at zero, from the start
            self.sent.labels(key)
            self.failed.labels(key)
            self.pending.labels(key)

    # --- updates --------------------------------------------------------------------------

    def record_run(self, key: str, status: str, sent: int, failed: int, duration: float) -> None:
        self.runs.labels(key, status).inc()
        self.sent.labels(key).inc(sent)
        self.failed.labels(key).inc(failed)
        if status != "skipped":
            self.duration.labels(key).observe(duration)

    def set_pending(self, key: str, count: int) -> None:
        self.pending.labels(key).set(count)

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
            healthy = not state.cycled or not overdue
            audiences[key] = {
                "healthy": healthy,
                "last_success_at": state.last_success_at.isoformat() if state.last_success_at else None,
                "first_run_since_start": not state.cycled,
            }
        ok = all(entry["healthy"] for entry in audiences.values())
        return ok, {"healthy": ok, "limit_seconds": self._limit.total_seconds(), "audiences": audiences}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- HTTP ---------------------------------------------------------------------------------


class MetricsServer:
    """Serves /metrics and /healthz, and the status page at / when given one (`web`), on
    host:port in a background thread (port 0: any free port).

    `metrics` is None for `audience-sync serve`, which has no daemon: then only the page is
    served. /metrics and /healthz need no token; the page needs the access token when one is
    set, and a page on a host other than loopback is refused without one."""

    def __init__(
        self,
        metrics: Metrics | None,
        host: str,
        port: int,
        *,
        page: StatusPage | None = None,
        setting: str = "metrics.port",
    ) -> None:
        self.metrics = metrics
        self.page = page
        self._address = (host, port)
        self._setting = setting  # names the port in a "cannot listen" error
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        host, port = self._address
        if self.page is not None:
            require_token(host, self.page.token)
        try:
            server = ThreadingHTTPServer(self._address, _Handler)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"{self._setting}: cannot listen on {host}:{port}: {reason}") from exc
        server.daemon_threads = True
        server.metrics = self.metrics  # type: ignore[attr-defined]
        server.page = self.page  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics", daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None


class _Handler(BaseHTTPRequestHandler):
    server_version = "audience-sync"

    def do_GET(self) -> None:
        metrics: Metrics | None = self.server.metrics  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics" and metrics is not None:
            self._answer(200, metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz" and metrics is not None:
            ok, details = metrics.health()
            self._answer(200 if ok else 503, json.dumps(details).encode(), "application/json")
        else:
            self._page("GET", b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_FORM:
            self._answer(413, b"too large\n", "text/plain")
            return
        self._page("POST", self.rfile.read(length))

    def _page(self, method: str, body: bytes) -> None:
        metrics: Metrics | None = self.server.metrics  # type: ignore[attr-defined]
        page: StatusPage | None = self.server.page  # type: ignore[attr-defined]
        health = metrics.health if metrics is not None else None
        answer = page.handle(method, self.path, self.headers, body, health) if page is not None else None
        if answer is None:
            known = "/, /metrics or /healthz" if page and metrics else "/" if page else "/metrics or /healthz"
            self._answer(404, json.dumps({"error": f"not found; try {known}"}).encode(), "application/json")
            return
        self._answer(answer.status, answer.body, answer.content_type, answer.headers)

    def _answer(
        self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path without its query string: nothing a user typed after `?` reaches a log.
        log.debug("metrics: %s %s %s", self.command, self.path.split("?", 1)[0], code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)
