"""The `resync_requests` table: full resyncs asked for with `audience-sync resync`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..support.clock import utcnow
from . import models as m
from . import runs


def request(connection: Connection, keys: list[str], requested_by: str) -> list[int]:
    """Record a full resync request per audience (one pending request each is enough)."""
    r = m.resync_requests.c
    ids = []
    for key in keys:
        existing = connection.execute(
            sa.select(r.id).where(r.audience_key == key, r.status == "pending")
        ).scalar_one_or_none()
        if existing is None:
            inserted = connection.execute(
                m.resync_requests.insert().values(
                    audience_key=key, requested_at=utcnow(), requested_by=requested_by, status="pending"
                )
            ).inserted_primary_key
            assert inserted is not None
            existing = inserted[0]
        ids.append(int(existing))
    return ids


def pending_keys(connection: Connection) -> list[str]:
    """The audiences with a resync requested and not yet run."""
    r = m.resync_requests.c
    return list(
        connection.execute(sa.select(r.audience_key).where(r.status == "pending").distinct()).scalars()
    )


def is_requested(connection: Connection, key: str) -> bool:
    r = m.resync_requests.c
    query = sa.select(r.id).where(r.audience_key == key, r.status == "pending").limit(1)
    return connection.execute(query).first() is not None


def answer(connection: Connection, key: str, run_id: int) -> None:
    """A full run of the audience ended: the requests it answers are done. A request made while
    the run was already reading its source is not answered by it: it stays pending and gets a
    full run of its own."""
    r = m.resync_requests.c
    connection.execute(
        m.resync_requests.update()
        .where(r.audience_key == key, r.status == "pending", r.requested_at <= runs.started_at(run_id))
        .values(status="done", run_id=run_id, done_at=utcnow())
    )
