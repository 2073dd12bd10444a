"""`audience-sync run`: the daemon as a process, until SIGTERM or SIGINT (SIGHUP reloads)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from sqlalchemy.engine import Engine

from ..config import Settings
from ..support.redaction import safe_url
from ..support.text import span
from .daemon import Daemon
from .requirements import require_token

log = logging.getLogger(__name__)

# Of the grace, this much is kept for recording aborted runs and exiting.
EXIT_RESERVE_SECONDS = 1.0


def run_daemon(settings: Settings, engine: Engine) -> int:
    """Run until SIGTERM or SIGINT (SIGHUP reloads the config); returns the exit code (0 after
    a clean stop)."""
    require_token(settings)
    daemon = Daemon(settings, engine)
    stop, reload = threading.Event(), threading.Event()
    received: list[str] = []
    restore = _handle_signals(stop, reload, daemon, received)
    try:
        daemon.start()
        _check_in_background(settings, engine)
        log.info(
            "daemon started: %d audiences (%s), state database %s, schedule %s-%s, resync poll %gs",
            len(daemon.keys),
            ", ".join(daemon.keys),
            safe_url(settings.database_url),
            span(settings.schedule.min_interval.total_seconds()),
            span(settings.schedule.max_interval.total_seconds()),
            settings.daemon.resync_poll_seconds,
        )
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                log.info("SIGHUP: reloading the config")
                daemon.reload()
        grace = daemon.settings.daemon.grace_seconds
        stopping_since = time.monotonic()
        busy = daemon.running()
        log.info(
            "%s: stopping: no new runs; %s",
            received[0] if received else "stop requested",
            f"waiting up to {grace:g}s for {', '.join(busy)}" if busy else "no run in flight",
        )
        if daemon.stop(timeout=max(grace - EXIT_RESERVE_SECONDS, grace / 2)):
            log.info("stopped in %.1fs", time.monotonic() - stopping_since)
            return 0
        abandoned = daemon.abandon()
        log.warning(
            "stopped after %.1fs with runs still in flight: recorded %s as aborted; "
            "their changes stay pending for the next run",
            time.monotonic() - stopping_since,
            ", ".join(abandoned),
        )
        _exit_now(0)  # worker threads still inside a request must not hold the process
        return 0  # not reached
    finally:
        restore()


def _check_in_background(settings: Settings, engine: Engine) -> None:
    """`audience-sync check`, logged line by line beside the first runs: a FAIL is a warning to
    the operator, never a reason not to start (a source down now may be back by its run), and a
    slow item never delays the initial syncs."""
    from .. import check

    def run() -> None:
        try:
            check.log_checks(settings, engine)
        except Exception:  # a bug in a check must not take the daemon down
            log.exception("check: unexpected error")

    threading.Thread(target=run, name="audience-sync-check", daemon=True).start()


def _handle_signals(
    stop: threading.Event, reload: threading.Event, daemon: Daemon, received: list[str]
) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop`; a second one stops waiting for runs in flight; SIGHUP
    sets `reload`. The handler only sets events (logging from a signal handler can deadlock)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            reload.set()
            return
        if stop.is_set():
            daemon.hurry()
            return
        received.append(signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in signals}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)
