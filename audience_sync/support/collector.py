"""Keeping the cyclic garbage collector off a bulk phase's long-lived objects, without hiding
garbage from it for good."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# A phase that ends this long after the last full collection collects (thawing first, and
# freezing again if other phases still run). Not every phase: a full collection walks every
# object of the program (50-70 ms of CPU in the daemon), which may end a phase every second.
COLLECT_SECONDS = 10.0

_lock = threading.Lock()
_phases = 0  # phases running now, in any thread
_collected_at = -COLLECT_SECONDS  # monotonic; the first phase to end collects


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist on entry, for a bulk phase.

    Staging and delivery allocate millions of short-lived tuples, dicts and contacts. Each
    allocation burst triggers collections, and the full ones walk every object the program
    holds (SQLAlchemy, Alembic, httpx, rich: hundreds of thousands), which cost a quarter of a
    million-member run. `gc.freeze()` moves those objects out of the collector's view; young
    collections still free the phase's own cyclic garbage (pausing the collector instead,
    `gc.disable()`, doubled a 1M full sync's peak memory). Process-wide, so nested and
    concurrent phases (the daemon runs audiences in threads) share one freeze.

    The freeze also hides the garbage that exists on entry (a finished run's young cycles), and
    `gc.unfreeze()` hands it back, with every object that was alive on entry, into the oldest
    generation. Only full collections look there, and they count only objects promoted by
    young collections, so they hardly ever ran; the next freeze hid it all again, and a daemon
    freezing every second or two grew by ~80 KB a run, for good. So a phase that ends at least
    COLLECT_SECONDS after the last full collection thaws and collects in full, whether other
    phases still run (they are frozen again) or not. What waits for it is bounded: the
    leftovers of the phases that ended within COLLECT_SECONDS of a collection.
    """
    global _phases
    with _lock:
        if _phases == 0:
            gc.freeze()
        _phases += 1
    try:
        yield
    finally:
        with _lock:
            _phases -= 1
            _thaw(collect=time.monotonic() - _collected_at >= COLLECT_SECONDS)


def _thaw(*, collect: bool) -> None:
    """Unfreeze when no phase runs any more; with `collect`, collect in full what the freeze
    hid (now in the oldest generation), freezing again for the phases still running."""
    global _collected_at
    if _phases == 0 or collect:
        gc.unfreeze()
    if collect:
        gc.collect()
        _collected_at = time.monotonic()
        if _phases > 0:
            gc.freeze()
