"""The `runs` table: one row per audience per run, its counts, status and error."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..support.clock import utcnow
from . import models as m

STALE_ERROR = "the process ended before the run finished; its changes stay pending"


def start(
    connection: Connection, key: str, kind: str, trigger: str, holder: str, started_at: datetime | None = None
) -> int:
    """Open a run record (status `running`); returns its id."""
    result = connection.execute(
        m.runs.insert().values(
            audience_key=key,
            kind=kind,
            trigger=trigger,
            status="running",
            started_at=started_at or utcnow(),
            holder=holder,
        )
    )
    inserted = result.inserted_primary_key
    assert inserted is not None
    return int(inserted[0])


def update(connection: Connection, run_id: int, **values: Any) -> None:
    """Set columns of one run (counts, status, error, finished_at, drift)."""
    connection.execute(m.runs.update().where(m.runs.c.id == run_id).values(**values))


def abort_stale(connection: Connection, key: str) -> int:
    """Runs left 'running' by a process that died: called once we hold the audience's lease."""
    result = connection.execute(
        m.runs.update()
        .where(m.runs.c.audience_key == key, m.runs.c.status == "running")
        .values(status="aborted", finished_at=utcnow(), error=STALE_ERROR)
    )
    return result.rowcount or 0


def abort_held(
    connection: Connection, key: str, holder: str, error: str, pending: int, in_doubt: int
) -> None:
    """Record as aborted the audience's run that `holder` still has running (a daemon stopping
    past its grace)."""
    r = m.runs.c
    connection.execute(
        m.runs.update()
        .where(r.audience_key == key, r.holder == holder, r.status == "running")
        .values(status="aborted", error=error, finished_at=utcnow(), pending=pending, in_doubt=in_doubt)
    )


_ADVANCE = (
    m.runs.update()
    .where(m.runs.c.id == sa.bindparam("run"))
    .values(
        sent=m.runs.c.sent + sa.bindparam("add_sent", type_=sa.Integer),
        failed=m.runs.c.failed + sa.bindparam("add_failed", type_=sa.Integer),
    )
)


def advance_counters(
    connection: Connection, run_ids: dict[str, int], sent: Counter[str], failed: Counter[str]
) -> None:
    """Add a chunk's sent and failed changes to each run's counters, in the chunk's own
    transaction (a run killed later still says what it sent): one statement, executed for each
    run (a chunk of a group run touches hundreds)."""
    if not (sent or failed):
        return
    connection.execute(
        _ADVANCE,
        [
            {"run": run_ids[key], "add_sent": sent[key], "add_failed": failed[key]}
            for key in sorted(sent.keys() | failed.keys())
        ],
    )


def last_finished_by_audience(connection: Connection, keys: list[str] | None = None) -> dict[str, datetime]:
    """When each audience's last run ended (audiences that never finished a run are absent)."""
    return _latest_by_audience(connection, keys)


def last_success_by_audience(connection: Connection, keys: list[str] | None = None) -> dict[str, datetime]:
    """When each audience's last successful run ended."""
    return _latest_by_audience(connection, keys, m.runs.c.status == "success")


def _latest_by_audience(
    connection: Connection, keys: list[str] | None, *where: sa.ColumnElement[bool]
) -> dict[str, datetime]:
    r = m.runs.c
    query = sa.select(r.audience_key, sa.func.max(r.finished_at)).where(r.finished_at.is_not(None), *where)
    if keys is not None:
        query = query.where(r.audience_key.in_(keys))
    return {key: at for key, at in connection.execute(query.group_by(r.audience_key))}


def record(row: Any) -> dict[str, Any]:
    """A run as `history --json` and the status page show it."""
    duration = None
    if row["finished_at"] is not None:
        duration = round((row["finished_at"] - row["started_at"]).total_seconds(), 3)
    return {
        "id": row["id"],
        "audience": row["audience_key"],
        "kind": row["kind"],
        "trigger": row["trigger"],
        "status": row["status"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "duration_seconds": duration,
        "members": row["members"],
        "entered": row["entered"],
        "exited": row["exited"],
        "sent": row["sent"],
        "failed": row["failed"],
        "skipped": row["skipped"],
        "pending": row["pending"],
        "in_doubt": row["in_doubt"],
        "drift": row["drift"],
        "error": row["error"],
    }


def by_id(connection: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    rows = connection.execute(sa.select(m.runs).where(m.runs.c.id.in_(ids)))
    return {row.id: record(row._mapping) for row in rows}


STATUSES = ("running", "success", "partial", "failed", "blocked", "aborted")
KINDS = ("full", "incremental", "reconcile", "retire")


def recent(
    connection: Connection,
    key: str | None = None,
    limit: int = 20,
    *,
    statuses: Sequence[str] = (),
    kinds: Sequence[str] = (),
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """Run records, newest first (`audience-sync history`, the status page), by an index either
    way: across audiences by id (ids are taken as runs start; runs are never pruned, and sorting
    a year of them by started_at took 175 ms on PostgreSQL), for one audience by
    ix_runs_audience_started. Only runs of `statuses` and `kinds` (default any), started at
    or after `since`, when given."""
    r = m.runs.c
    query = sa.select(m.runs).limit(limit)
    if statuses:
        query = query.where(r.status.in_(statuses))
    if kinds:
        query = query.where(r.kind.in_(kinds))
    if since is not None:
        query = query.where(r.started_at >= since)
    if key is None:
        query = query.order_by(r.id.desc())
    else:
        query = query.where(r.audience_key == key).order_by(r.started_at.desc(), r.id.desc())
    return [record(row._mapping) for row in connection.execute(query)]


def since(connection: Connection, keys: list[str], start: datetime) -> list[dict[str, Any]]:
    """The runs of these audiences started at or after `start`, oldest first per audience
    (the keys let ix_runs_audience_started find them without reading older runs)."""
    if not keys:
        return []
    r = m.runs.c
    query = (
        sa.select(m.runs)
        .where(r.audience_key.in_(keys), r.started_at >= start)
        .order_by(r.audience_key, r.started_at, r.id)
    )
    return [record(row._mapping) for row in connection.execute(query)]


def window_summary(
    connection: Connection, keys: list[str], start: datetime, measuring: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per audience, over its runs started at or after `start`: how many, the newest with an
    error, and the newest of the `measuring` kinds that counted members. One grouped query."""
    if not keys:
        return {}
    r = m.runs.c
    query = (
        sa.select(
            r.audience_key,
            sa.func.count().label("runs"),
            sa.func.max(r.id).filter(r.error.is_not(None)).label("error_run_id"),
            sa.func.max(r.id).filter(r.members.is_not(None), r.kind.in_(measuring)).label("measured_run_id"),
        )
        .where(r.audience_key.in_(keys), r.started_at >= start)
        .group_by(r.audience_key)
    )
    return {row.audience_key: dict(row._mapping) for row in connection.execute(query)}


def newest_value(column: sa.Column[Any], *where: sa.ColumnElement[bool]) -> sa.ScalarSelect[Any]:
    """`column` of the audience's newest run (that matches `where`), correlated to `audiences`:
    it walks ix_runs_audience_started backwards from the newest run, so the cost does not grow
    with the history."""
    r = m.runs.c
    return (
        sa.select(column)
        .where(r.audience_key == m.audiences.c.key, *where)
        .order_by(r.started_at.desc(), r.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def started_at(run_id: int) -> sa.ScalarSelect[Any]:
    """When the run started, as a subquery (a resync request answered by it was made before)."""
    return sa.select(m.runs.c.started_at).where(m.runs.c.id == run_id).scalar_subquery()
