"""The `run_requests` table: runs asked for over the HTTP API (`POST /api/runs`).

A request is `pending` until a daemon claims it (`claim`: one statement, so of several daemons
on one database exactly one takes it), `running` while it runs, then `done` (every run ended
as it should) or `failed`, with the runs it produced and the first error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..support.clock import utcnow
from . import models as m

q = m.run_requests.c


@dataclass(frozen=True)
class RunRequest:
    id: int
    audiences: list[str]
    full: bool
    status: str  # pending | running | done | failed
    requested_at: datetime
    requested_by: str | None
    started_at: datetime | None
    finished_at: datetime | None
    run_ids: list[int]
    error: str | None


def request(connection: Connection, keys: list[str], full: bool, requested_by: str) -> int:
    """Record a request; returns its id."""
    inserted = connection.execute(
        m.run_requests.insert().values(
            audiences=json.dumps(keys),
            full=full,
            status="pending",
            requested_at=utcnow(),
            requested_by=requested_by,
        )
    ).inserted_primary_key
    assert inserted is not None
    return int(inserted[0])


def find(connection: Connection, request_id: int) -> RunRequest | None:
    row = connection.execute(sa.select(m.run_requests).where(q.id == request_id)).first()
    return None if row is None else _request(row._mapping)


def pending_ids(connection: Connection) -> list[int]:
    """The requests no daemon took yet, oldest first (ix_run_requests_status)."""
    return list(connection.execute(sa.select(q.id).where(q.status == "pending").order_by(q.id)).scalars())


def claim(connection: Connection, request_id: int, holder: str) -> RunRequest | None:
    """Take a pending request for this daemon; None when another took it first."""
    taken = connection.execute(
        m.run_requests.update()
        .where(q.id == request_id, q.status == "pending")
        .values(status="running", started_at=utcnow(), holder=holder)
    ).rowcount
    return find(connection, request_id) if taken == 1 else None


def finish(connection: Connection, request_id: int, ok: bool, run_ids: list[int], error: str | None) -> None:
    connection.execute(
        m.run_requests.update()
        .where(q.id == request_id)
        .values(
            status="done" if ok else "failed", finished_at=utcnow(), run_ids=json.dumps(run_ids), error=error
        )
    )


def _request(row: Any) -> RunRequest:
    return RunRequest(
        id=row["id"],
        audiences=json.loads(row["audiences"]),
        full=bool(row["full"]),
        status=row["status"],
        requested_at=row["requested_at"],
        requested_by=row["requested_by"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        run_ids=json.loads(row["run_ids"]) if row["run_ids"] else [],
        error=row["error"],
    )
