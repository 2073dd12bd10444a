"""Keeping the cyclic garbage collector off a bulk phase's long-lived objects, without hiding
garbage from it for good."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# While phases overlap without a break (a daemon of many audiences), a phase that ends this long
# after the freeze began thaws, collects and freezes again: no freeze lasts for good.
REFREEZE_SECONDS = 30.0

_lock = threading.Lock()
_phases = 0  # phases running now, in any thread
_frozen_at = 0.0


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist on entry, for a bulk phase;
    collect in full when the last phase ends.

    Staging and delivery allocate millions of short-lived tuples, dicts and contacts. Each
    allocation burst triggers collections, and the full ones walk every object the program
    holds (SQLAlchemy, Alembic, httpx, rich: hundreds of thousands), which cost a quarter of a
    million-member run. `gc.freeze()` moves those objects out of the collector's view; young
    collections still free the phase's own cyclic garbage (pausing the collector instead,
    `gc.disable()`, doubled a 1M full sync's peak memory). Process-wide, so nested and
    concurrent phases (the daemon runs audiences in threads) share one freeze.

    The freeze also hides the garbage that exists on entry (a finished run's young cycles), and
    `gc.unfreeze()` hands it back into the oldest generation, which only the rare full
    collections look at: the next freeze hid it again, and a daemon freezing every second or
    two grew by ~80 KB a run. So the last phase out collects in full, and overlapping phases
    thaw and collect at least every REFREEZE_SECONDS.
    """
    global _phases, _frozen_at
    with _lock:
        if _phases == 0:
            gc.freeze()
            _frozen_at = time.monotonic()
        _phases += 1
    try:
        yield
    finally:
        with _lock:
            _phases -= 1
            last = _phases == 0
            if last or time.monotonic() - _frozen_at >= REFREEZE_SECONDS:
                gc.unfreeze()
                gc.collect()  # what the freeze hid, now in the oldest generation
                if not last:
                    gc.freeze()
                    _frozen_at = time.monotonic()
