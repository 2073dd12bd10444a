"""Pausing the cyclic garbage collector for a bulk phase, without hiding garbage from it."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# While phases overlap without a break (a daemon of many audiences), a phase that ends this long
# after the last collection collects anyway: the pause never lasts for good.
COLLECT_EVERY_SECONDS = 30.0

_lock = threading.Lock()
_phases = 0  # phases running now, in any thread
_resume = False  # whether the outermost phase found the collector enabled
_collected = time.monotonic()


@contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a bulk phase; collect once when it ends.

    Staging and delivery allocate millions of short-lived tuples, dicts and contacts. Each
    allocation burst triggers collections, and the full ones walk every object the program
    holds (SQLAlchemy, Alembic, httpx, rich: hundreds of thousands), which cost a quarter of a
    million-member run. Refcounting frees the phase's own objects as usual; the collector is
    disabled while any phase runs (process-wide, so nested and concurrent phases, the daemon's
    audiences in threads, share one pause) and the last phase to end collects in full.

    Not `gc.freeze()`: it also hides the cyclic garbage that exists on entry (a finished run's
    young cycles), and `gc.unfreeze()` hands that back into the oldest generation, which only
    the rare full collections look at, so the next phase's freeze hid it again. The daemon,
    freezing every second or two, grew by ~54 KB a run that way, for good.
    """
    global _phases, _resume, _collected
    with _lock:
        if _phases == 0:
            _resume = gc.isenabled()
            gc.disable()
        _phases += 1
    try:
        yield
    finally:
        with _lock:
            _phases -= 1
            if _phases == 0 and _resume:
                gc.enable()
            now = time.monotonic()
            collect = _phases == 0 or now - _collected >= COLLECT_EVERY_SECONDS
            if collect:
                _collected = now
        if collect:
            gc.collect()  # outside the lock: a finalizer it runs may start a phase of its own
