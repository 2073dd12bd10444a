"""The `audiences` table: one row per audience key the state database has known.

Written from the config (`register`), by the diff (`mark_baselined`, once its first full diff
is committed), by the daemon (`publish_next_runs`), by `retire` (`mark_retired`), and by the
baseline's bookkeeping (`baseline_count`, kept by `baseline.recount`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import AudienceSettings
from ..support.clock import utcnow
from . import models as m
from .database import dialect_insert

log = logging.getLogger(__name__)

a = m.audiences.c


def register(connection: Connection, audiences: Sequence[AudienceSettings]) -> None:
    """Insert unknown audience keys; keep the name, kind and level current for known ones. Safe
    when several processes register the same new audience at once (ON CONFLICT DO NOTHING).

    A retired audience that is back in the config is un-retired as if new: its baseline_at is
    cleared, so it gets an initial full sync (its baseline is empty since its retirement)."""
    now = utcnow()
    existing = {
        row.key: row for row in connection.execute(sa.select(a.key, a.name, a.retired_at, a.kind, a.level))
    }
    new = [
        {"key": e.key, "name": e.name, "created_at": now, "kind": e.kind, "level": e.level}
        for e in audiences
        if e.key not in existing
    ]
    if new:  # one statement for hundreds of audiences (a daemon's first start)
        insert = dialect_insert(connection)(m.audiences).on_conflict_do_nothing(index_elements=["key"])
        connection.execute(insert, new)
    for entry in audiences:
        row = existing.get(entry.key)
        if row is None:
            continue
        update = m.audiences.update().where(a.key == entry.key)
        shape = {"name": entry.name, "kind": entry.kind, "level": entry.level}
        if row.retired_at is not None:
            log.info("audience %r, retired %s, is configured again: initial full sync", entry.key,
                     row.retired_at)  # fmt: skip
            connection.execute(update.values(retired_at=None, baseline_at=None, next_run_at=None, **shape))
        elif (row.name, row.kind, row.level) != (entry.name, entry.kind, entry.level):
            connection.execute(update.values(**shape))


def find(connection: Connection, key: str) -> Any:
    """The audience's row (key, name, retired_at, next_run_at, kind, level), or None."""
    query = sa.select(a.key, a.name, a.retired_at, a.next_run_at, a.kind, a.level).where(a.key == key)
    return connection.execute(query).first()


def unretired_keys(connection: Connection) -> list[str]:
    return list(connection.execute(sa.select(a.key).where(a.retired_at.is_(None)).order_by(a.key)).scalars())


def rows(connection: Connection) -> dict[str, Any]:
    """Every audience's row, by key."""
    return {row.key: row for row in connection.execute(sa.select(m.audiences))}


def has_baseline(connection: Connection, key: str) -> bool:
    """Whether the audience's first full diff is committed (its later runs are incremental)."""
    value = connection.execute(sa.select(a.baseline_at).where(a.key == key)).scalar_one_or_none()
    return value is not None


def baselined_keys(connection: Connection) -> set[str]:
    """Audiences whose first full diff is committed (see has_baseline)."""
    return set(connection.execute(sa.select(a.key).where(a.baseline_at.is_not(None))).scalars())


def mark_baselined(connection: Connection, key: str, now: datetime) -> None:
    """The audience's first diff is committed (inside the diff's transaction)."""
    connection.execute(
        m.audiences.update().where(a.key == key, a.baseline_at.is_(None)).values(baseline_at=now)
    )


# --- the daemon's plan ----------------------------------------------------------------------


def publish_next_runs(connection: Connection, planned: dict[str, datetime | None]) -> None:
    """Write each audience's next run (None: not scheduled) in one executemany."""
    if not planned:
        return
    statement = (
        m.audiences.update().where(a.key == sa.bindparam("audience")).values(next_run_at=sa.bindparam("at"))
    )
    connection.execute(statement, [{"audience": key, "at": at} for key, at in planned.items()])


def unplan_others(connection: Connection, configured: Sequence[str]) -> None:
    """An audience removed from the config is no longer run: its history stays, its next run goes."""
    connection.execute(
        m.audiences.update()
        .where(a.key.not_in(configured), a.next_run_at.is_not(None))
        .values(next_run_at=None)
    )


# --- retiring -------------------------------------------------------------------------------


def retired_at(connection: Connection, key: str) -> datetime | None:
    return connection.execute(sa.select(a.retired_at).where(a.key == key)).scalar_one()


def mark_retired(connection: Connection, key: str, now: datetime) -> bool:
    """Set retired_at when nothing of the audience is left for Planhat (no baseline, outbox or
    in-flight row); False when something is."""
    left = [sa.exists().where(table.c.audience_key == key) for table in (m.pending, m.baseline, m.in_flight)]
    marked = connection.execute(
        m.audiences.update()
        .where(a.key == key, a.retired_at.is_(None), *(~exists for exists in left))
        .values(retired_at=now, next_run_at=None)
    ).rowcount
    return bool(marked)


# --- the kept baseline counts (maintained by baseline.py) -------------------------------------


def kept_baseline_counts(connection: Connection) -> dict[str, int | None]:
    """Every audience's kept `baseline_count` (None: not kept, a delivery may be changing it)."""
    return {key: count for key, count in connection.execute(sa.select(a.key, a.baseline_count))}


def uncounted(connection: Connection, keys: Sequence[str]) -> list[str]:
    """Of these audiences, those whose baseline count is not kept."""
    query = sa.select(a.key).where(a.key.in_(keys), a.baseline_count.is_(None))
    return list(connection.execute(query).scalars())


def clear_baseline_counts(connection: Connection, keys: Sequence[str]) -> None:
    query = m.audiences.update().where(a.key.in_(keys), a.baseline_count.is_not(None))
    connection.execute(query.values(baseline_count=None))


def store_baseline_counts(connection: Connection, counts: dict[str, int]) -> None:
    update = m.audiences.update().where(a.key == sa.bindparam("k")).values(baseline_count=sa.bindparam("n"))
    connection.execute(update, [{"k": key, "n": count} for key, count in counts.items()])
