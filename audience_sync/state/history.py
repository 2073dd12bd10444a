"""Read-only views across tables: what `audience-sync status` and the status page show.

Each is a handful of set-based statements whatever the number of audiences; correlated
subqueries walk ix_runs_audience_started backwards from an audience's newest run, so the cost
does not grow with the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import audiences, baseline, outbox, pauses, resyncs, runs
from . import models as m


@dataclass(frozen=True)
class AudienceStatus:
    key: str
    name: str
    configured: bool
    members: int | None
    baseline: int
    pending: int
    in_doubt: int  # of `pending`: Planhat may hold either value
    last_run: dict[str, Any] | None
    last_success_at: datetime | None
    last_error: str | None
    next_run_at: datetime | None
    resync_requested: bool
    retired_at: datetime | None = None  # set by `audience-sync retire`
    paused: pauses.Pause | None = None  # set by `audience-sync pause`


def status(connection: Connection, configured: dict[str, str]) -> list[AudienceStatus]:
    """One entry per audience known to the config or to the database."""
    rows = audiences.rows(connection)
    keys = list(configured) + sorted(k for k in rows if k not in configured)
    pending = outbox.counts(connection)
    told = baseline.counts(connection)
    requested = set(resyncs.pending_keys(connection))
    held_back = pauses.paused(connection)
    latest = _latest_runs(connection)  # one statement for every audience, not four per audience
    last_runs = runs.by_id(connection, [r.last_run_id for r in latest.values() if r.last_run_id is not None])
    result = []
    for key in keys:
        row, facts = rows.get(key), latest.get(key)
        result.append(
            AudienceStatus(
                key=key,
                name=configured.get(key) or (row.name if row else key),
                configured=key in configured,
                members=facts.members if facts else None,
                baseline=told.get(key, 0),
                pending=pending.get(key, (0, 0))[0],
                in_doubt=pending.get(key, (0, 0))[1],
                last_run=last_runs.get(facts.last_run_id) if facts else None,
                last_success_at=facts.last_success_at if facts else None,
                last_error=facts.last_error if facts else None,
                next_run_at=row.next_run_at if row else None,
                resync_requested=key in requested,
                retired_at=row.retired_at if row else None,
                paused=held_back.get(key),
            )
        )
    return result


def _latest_runs(connection: Connection) -> dict[str, Any]:
    """Per audience: its newest run's id, and the newest members count, error and success
    time of any run."""
    r = m.runs.c
    newest = runs.newest_value
    query = sa.select(
        m.audiences.c.key,
        newest(r.id).label("last_run_id"),
        newest(r.members, r.members.is_not(None)).label("members"),
        newest(r.error, r.error.is_not(None)).label("last_error"),
        newest(r.finished_at, r.status == "success", r.finished_at.is_not(None)).label("last_success_at"),
    )
    return {row.key: row for row in connection.execute(query)}


def audience_overview(connection: Connection) -> dict[str, dict[str, Any]]:
    """Every `audiences` row, with the id of its newest run and when its newest successful run
    ended (the status page). One statement."""
    r = m.runs.c
    newest = runs.newest_value
    query = sa.select(
        m.audiences,
        newest(r.id).label("last_run_id"),
        newest(r.finished_at, r.status == "success").label("last_success_at"),
    )
    return {row.key: dict(row._mapping) for row in connection.execute(query)}


def planhat_counts(connection: Connection) -> dict[str, tuple[int, int, int]]:
    """Per audience: (users Planhat has as `true`, changes pending, of which in doubt)."""
    told = baseline.counts(connection)
    pending = outbox.counts(connection)
    return {key: (told.get(key, 0), *pending.get(key, (0, 0))) for key in told.keys() | pending.keys()}
