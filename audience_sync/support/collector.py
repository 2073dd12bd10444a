"""Keeping the cyclic garbage collector off a bulk phase's long-lived objects."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_gc_lock = threading.Lock()
_gc_users = 0


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist on entry, for a bulk phase.

    Staging and delivery allocate millions of short-lived tuples, dicts and contacts. Each
    allocation burst triggers collections, and the full ones walk every object the program
    holds (SQLAlchemy, Alembic, httpx, rich: hundreds of thousands), which cost a quarter of a
    million-member run. `gc.freeze()` moves those objects out of the collector's view;
    `gc.unfreeze()` on the way out hands them back, so garbage among them is still collected
    later. Refcounting frees the phase's own objects as usual. Process-wide, so nested and
    concurrent phases (the daemon runs audiences in threads) share one freeze.
    """
    global _gc_users
    with _gc_lock:
        if _gc_users == 0:
            gc.freeze()
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.unfreeze()
