"""The `planner_snapshots` table: for each audience of a source with `planner_schema`, the
generation of its snapshot in the warehouse that its outbox was last computed from.

The row is written in the transaction that commits the outbox computed from that generation
(sync/planned.py), so it is the hand-off's one source of truth: the warehouse's tables of any
other generation are an unfinished run's (newer) or an unfinished advance's (older), and the
next run drops them (snapshot/planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import models as m

t = m.planner_snapshots.c


@dataclass(frozen=True)
class Committed:
    """What the state database last committed an outbox from, for one audience."""

    source: str
    planner_schema: str
    generation: int
    fingerprint: str
    members: int
    run_id: int | None


def committed(connection: Connection, key: str) -> Committed | None:
    row = connection.execute(
        sa.select(t.source, t.planner_schema, t.generation, t.fingerprint, t.members, t.run_id).where(
            t.audience_key == key
        )
    ).first()
    return None if row is None else Committed(*row)


def record(connection: Connection, key: str, done: Committed, now: datetime) -> None:
    """Record (inside the outbox's own transaction) the generation its outbox now reflects."""
    values = {
        "source": done.source,
        "planner_schema": done.planner_schema,
        "generation": done.generation,
        "fingerprint": done.fingerprint,
        "members": done.members,
        "run_id": done.run_id,
        "committed_at": now,
    }
    updated = connection.execute(
        m.planner_snapshots.update().where(t.audience_key == key).values(**values)
    ).rowcount
    if not updated:
        connection.execute(m.planner_snapshots.insert().values(audience_key=key, **values))


def forget(connection: Connection, key: str) -> None:
    """The audience has no snapshot in a warehouse any more (retired, its tables dropped)."""
    connection.execute(m.planner_snapshots.delete().where(t.audience_key == key))
