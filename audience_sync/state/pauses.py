"""The `paused_audiences` table: audiences paused with `audience-sync pause`.

A paused audience is not run by the daemon or by `sync`; its outbox and baseline stay as they
are. The row says who paused it, when and why; `resume` deletes it. Every process reads the
table when it is about to run an audience, so every daemon honours a pause at its next run.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..support.clock import format_utc, utcnow
from . import models as m
from .database import dialect_insert

p = m.paused_audiences.c


@dataclass(frozen=True)
class Pause:
    key: str
    paused_at: datetime
    paused_by: str | None
    reason: str | None

    def describe(self) -> str:
        """'paused 2026-12-06 12:00:00 UTC by ops@host: schema change'."""
        by = f" by {self.paused_by}" if self.paused_by else ""
        why = f": {self.reason}" if self.reason else ""
        return f"paused {format_utc(self.paused_at)}{by}{why}"


def operator() -> str:
    """user@host of the process pausing or resuming: who, in the state database."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def pause(connection: Connection, keys: list[str], reason: str | None, by: str) -> list[str]:
    """Pause the audiences; returns those that were not paused already (a second pause keeps
    the first one's who, when and why)."""
    already = set(paused(connection, keys))
    fresh = [key for key in keys if key not in already]
    if fresh:
        now = utcnow()
        insert = dialect_insert(connection)(m.paused_audiences).on_conflict_do_nothing(
            index_elements=["audience_key"]
        )
        rows = [{"audience_key": key, "paused_at": now, "paused_by": by, "reason": reason} for key in fresh]
        connection.execute(insert, rows)
    return fresh


def resume(connection: Connection, keys: list[str]) -> list[str]:
    """Resume the audiences; returns those that were paused."""
    was = list(paused(connection, keys))
    if was:
        connection.execute(m.paused_audiences.delete().where(p.audience_key.in_(was)))
    return was


def paused(connection: Connection, keys: list[str] | None = None) -> dict[str, Pause]:
    """The paused audiences (among `keys`; default all), by key."""
    query = sa.select(m.paused_audiences)
    if keys is not None:
        query = query.where(p.audience_key.in_(keys))
    return {
        row.audience_key: Pause(row.audience_key, row.paused_at, row.paused_by, row.reason)
        for row in connection.execute(query)
    }
