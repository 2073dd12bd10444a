"""Each check in a time box: a thread given up on after the time limit (and a grace for the
driver's own timeout to report first)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import AudienceSyncError
from ..support.text import first_line
from .results import CheckResult, fail

log = logging.getLogger(__name__)

GRACE = 2.0  # seconds past the limit for a driver's own timeout to report before the box gives up


def timeboxed(item: str, seconds: float, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check in a thread, waiting at most `seconds` (and a grace for the driver's own
    timeout to report first). A thread given up on finishes in the background; it is a daemon
    thread, so it never holds the process open."""
    outcome: list[CheckResult] = []

    def run() -> None:
        try:
            outcome.append(check())
        except AudienceSyncError as exc:
            outcome.append(fail(item, str(exc), "see the message"))
        except Exception as exc:  # a check reports; it never takes the others down
            log.debug("check %s raised", item, exc_info=True)
            outcome.append(fail(item, f"{exc.__class__.__name__}: {first_line(exc)}", "see the message"))

    thread = threading.Thread(target=run, name=f"check {item}", daemon=True)
    thread.start()
    thread.join(seconds + GRACE)
    if outcome:
        return outcome[0]
    return fail(
        item,
        f"no answer within {seconds:g}s",
        "check that the host answers from here (network, firewall), or allow longer with --timeout",
    )
