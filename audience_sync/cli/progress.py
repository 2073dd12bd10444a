"""Progress of a long delivery: a bar on a terminal, periodic log lines otherwise.

The bar is drawn on stderr, the stream `make_progress` checks: stdout stays for the run's
table (or `--json`), also when it is piped.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("audience_sync.progress")


class BarProgress:
    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("delivering"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._bar.add_task("delivering", total=0)

    def start(self, total: int) -> None:
        self._bar.update(self._task, total=total)
        self._bar.start()

    def advance(self, count: int) -> None:
        self._bar.advance(self._task, count)

    def finish(self) -> None:
        self._bar.stop()


class LogProgress:
    """One log line every `interval` seconds while delivering, and one at the end."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.total = self.done = 0
        self._started = self._last = 0.0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self._started = self._last = time.monotonic()
        log.info("delivering %d changes", total)

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            rate = self.done / max(now - self._started, 1e-9)
            log.info("delivered %d of %d changes (%.0f/s)", self.done, self.total, rate)

    def finish(self) -> None:
        elapsed = time.monotonic() - self._started
        log.info("delivery finished: %d of %d changes in %.1fs", self.done, self.total, elapsed)


def make_progress() -> BarProgress | LogProgress:
    return BarProgress() if sys.stderr.isatty() else LogProgress()
