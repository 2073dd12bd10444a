"""`audience-sync serve`: the status page from the state database alone, without a daemon."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..config import Settings
from ..state.database import create_state_engine
from .api import RunApi
from .auth import require_token
from .server import MetricsServer
from .status_page import StatusPage

DEFAULT_PORT = 8080  # `audience-sync serve` without --port or metrics.port


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    ready: Callable[[str], None],
    stop: threading.Event | None = None,
    setting: str = "--host",
) -> int:
    """Serve the page from the state database until SIGTERM or SIGINT (or `stop` is set).

    No daemon runs here: the page says so and shows no health banner, but a schema that is
    not this version's still shows. The schema is not created or upgraded: this only reads."""
    require_token(host, settings.metrics.token, setting)
    engine = create_state_engine(settings.database_url)
    stop = stop or threading.Event()
    try:
        page = StatusPage(engine, lambda: settings)
        api = RunApi(engine, lambda: settings)  # requests wait for a daemon to pick them up
        server = MetricsServer(None, host, port, page=page, api=api, setting="--port").start()
        previous = _on_signals(stop)
        try:
            ready(server.url)
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
            for number, handler in previous.items():
                signal.signal(number, handler)
    finally:
        engine.dispose()
    return 0


def _on_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM and SIGINT set `stop` (when called in the main thread; tests call it elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(_number: int, _frame: FrameType | None) -> None:
        stop.set()

    return {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
