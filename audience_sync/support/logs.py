"""Logging set-up: plain text or one JSON object per line, to stderr.

Every line logged while a run is under way carries its run id (`run=12`, or `run=12,13` for
the delivery of a group run, whose audiences go out together; JSON: `"run_id"`), so one
search finds a run's whole story: `run_context` sets it for the block (and the thread) it
wraps, and `RunIdFilter` adds it to each record.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_run_ids: ContextVar[tuple[int, ...]] = ContextVar("audience_sync_run_ids", default=())


@contextlib.contextmanager
def run_context(*ids: int | None) -> Iterator[None]:
    """Lines logged in this block (in this thread) carry these run ids."""
    token = _run_ids.set(tuple(i for i in ids if i is not None))
    try:
        yield
    finally:
        _run_ids.reset(token)


def current_run_ids() -> tuple[int, ...]:
    return _run_ids.get()


def carrying_context(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, run in a copy of the caller's context: handed to a worker thread, its lines
    still name the caller's runs (one copy per call: a context is entered by one thread)."""
    context = contextvars.copy_context()
    return functools.partial(context.run, function)


class RunIdFilter(logging.Filter):
    """Adds `run_ids` and `run_suffix` (' run=12', or '') to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _run_ids.get()
        record.run_ids = ids
        record.run_suffix = f" run={','.join(map(str, ids))}" if ids else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = getattr(record, "run_ids", ())
        if ids:
            entry["run_id"] = ids[0] if len(ids) == 1 else list(ids)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "WARNING", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(run_suffix)s")
        )
    handler.addFilter(RunIdFilter())
    root = logging.getLogger("audience_sync")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # httpx logs every request at INFO: one line per contact on the segment transport.
    logging.getLogger("httpx").setLevel(logging.WARNING)
