"""The daemon's HTTP server: metrics, health and the status page on one port.

GET /metrics   the daemon's own registry, in the Prometheus text format
GET /healthz   200 while the daemon is healthy (`metrics.Metrics.health`), 503 otherwise;
               a JSON body names each audience's state
GET /          the status page (`status_page`), when the server is given one; with the
               access token when `metrics.token` is set. /metrics and /healthz are not
               gated: they carry audience keys, counts and times, never names or errors
/api/runs      the run API (`api`), when the server is given one: always behind the token
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import ConfigError
from .api import RunApi
from .auth import MAX_FORM, require_token
from .metrics import Metrics
from .status_page import StatusPage

log = logging.getLogger(__name__)


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
        api: RunApi | None = None,
        setting: str = "metrics.port",
    ) -> None:
        self.metrics = metrics
        self.page = page
        self.api = api
        self._address = (host, port)
        self._setting = setting  # names the port in a "cannot listen" error
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        host, port = self._address
        if self.page is not None:
            require_token(host, self.page.token)
        try:
            server = _Server(self._address, _Handler, self.metrics, self.page, self.api)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"{self._setting}: cannot listen on {host}:{port}: {reason}") from exc
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
        shown = host.decode() if isinstance(host, bytes) else host
        return f"http://{shown}:{port}"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None


class _Server(ThreadingHTTPServer):
    """The HTTP server, holding what its handlers answer from."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], metrics: Metrics | None,
        page: StatusPage | None, api: RunApi | None = None,
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self.page = page
        self.api = api
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "audience-sync"
    server: _Server

    def do_GET(self) -> None:
        metrics = self.server.metrics
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
        metrics, page, api = self.server.metrics, self.server.page, self.server.api
        health = metrics.health if metrics is not None else None
        answer = api.handle(method, self.path, self.headers, body) if api is not None else None
        if answer is None and page is not None:
            answer = page.handle(method, self.path, self.headers, body, health)
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
