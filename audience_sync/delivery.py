"""Delivering the outbox: read pending changes in user order, send, acknowledge.

The outbox is read with keyset pagination on (user_ref), so one user's changes across the
run's audiences arrive together and go out as one identify / one contact item. After each
chunk, one transaction applies what Planhat accepted: the baseline advances (`true` rows
inserted, `false` rows removed), the change is logged in `changes`, the pending row deleted.
What Planhat did not accept stays pending, with its attempt count and error. A crash loses
at most the acknowledgement of the chunk in flight; those changes are simply sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row

from . import models as m
from .planhat import Contact, Outcome
from .store import dialect_insert, utcnow

log = logging.getLogger("audience_sync.delivery")


class Sender(Protocol):
    chunk_size: int
    exhausted: bool

    def send(self, contacts: Sequence[Contact]) -> Outcome: ...


@dataclass
class DeliveryCounts:
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


_COLUMNS = (
    m.pending.c.id,
    m.pending.c.audience_key,
    m.pending.c.user_ref,
    m.pending.c.value,
    m.pending.c.user_id,
    m.pending.c.email,
    m.pending.c.name,
    m.pending.c.title,
    m.pending.c.company_id,
)


def read_page(engine: Engine, keys: list[str], after: str, limit: int) -> list[Row[Any]]:
    query = (
        sa.select(*_COLUMNS)
        .where(m.pending.c.audience_key.in_(keys), m.pending.c.user_ref > after)
        .order_by(m.pending.c.user_ref, m.pending.c.audience_key)
        .limit(limit)
    )
    with engine.connect() as connection:
        return list(connection.execute(query))


def coalesce(rows: list[Row[Any]], complete: bool) -> list[tuple[Contact, list[Row[Any]]]]:
    """Group rows per user. When the page was cut (`complete` False), the last user may be
    missing audiences on the next page, so it is left for the next page."""
    groups = [list(group) for _, group in groupby(rows, key=lambda row: row.user_ref)]
    if not complete and len(groups) > 1:
        groups.pop()
    return [(_contact(group), group) for group in groups]


def _contact(rows: list[Row[Any]]) -> Contact:
    def first(attribute: str) -> str | None:
        return next((getattr(r, attribute) for r in rows if getattr(r, attribute)), None)

    return Contact(
        ref=rows[0].user_ref,
        user_id=first("user_id"),
        email=first("email"),
        name=first("name"),
        title=first("title"),
        company_id=first("company_id"),
        values={row.audience_key: bool(row.value) for row in rows},
    )


def deliver(
    engine: Engine,
    sender: Sender,
    run_ids: dict[str, int],
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, DeliveryCounts]:
    """Send every pending change of the given audiences; returns counts per audience.

    Raises whatever the sender raises for a fatal error (PlanhatAuthError): everything not yet
    acknowledged stays pending.
    """
    keys = list(run_ids)
    counts = {key: DeliveryCounts() for key in keys}
    after = ""
    limit = sender.chunk_size + 1
    while not sender.exhausted and not should_stop():
        rows = read_page(engine, keys, after, limit)
        if not rows:
            break
        batch = coalesce(rows, complete=len(rows) < limit)
        after = batch[-1][0].ref
        outcome = sender.send([contact for contact, _ in batch])
        acknowledge(engine, batch, outcome, run_ids, counts)
        if progress:
            progress(sum(len(group) for _, group in batch))
    return counts


def acknowledge(
    engine: Engine,
    batch: list[tuple[Contact, list[Row[Any]]]],
    outcome: Outcome,
    run_ids: dict[str, int],
    counts: dict[str, DeliveryCounts],
) -> None:
    """Apply one chunk's outcome in one transaction."""
    now = utcnow()
    accepted = set(outcome.accepted)
    delivered = [row for contact, rows in batch if contact.ref in accepted for row in rows]
    failed = [
        (row, outcome.failed[contact.ref])
        for contact, rows in batch
        if contact.ref not in accepted and contact.ref in outcome.failed
        for row in rows
    ]
    with engine.begin() as connection:
        if delivered:
            _advance_baseline(connection, delivered, run_ids, now)
            connection.execute(m.pending.delete().where(m.pending.c.id.in_([row.id for row in delivered])))
        if failed:
            connection.execute(
                m.pending.update()
                .where(m.pending.c.id == sa.bindparam("row_id"))
                .values(attempts=m.pending.c.attempts + 1, last_error=sa.bindparam("error")),
                [{"row_id": row.id, "error": error} for row, error in failed],
            )
        log_rows = [_change(row, run_ids, "delivered", None, now) for row in delivered]
        log_rows += [_change(row, run_ids, "failed", error, now) for row, error in failed]
        if log_rows:
            connection.execute(m.changes.insert(), log_rows)
    for row in delivered:
        counts[row.audience_key].sent += 1
    for row, error in failed:
        counts[row.audience_key].failed += 1
        if len(counts[row.audience_key].errors) < 3:
            counts[row.audience_key].errors.append(f"{row.user_ref}: {error}")


def _advance_baseline(
    connection: sa.Connection, rows: list[Row[Any]], run_ids: dict[str, int], now: datetime
) -> None:
    entered = [
        {
            "audience_key": row.audience_key,
            "user_ref": row.user_ref,
            "user_id": row.user_id,
            "email": row.email,
            "run_id": run_ids[row.audience_key],
            "told_at": now,
        }
        for row in rows
        if row.value
    ]
    if entered:
        insert = dialect_insert(connection)(m.baseline)
        connection.execute(
            insert.on_conflict_do_update(
                index_elements=["audience_key", "user_ref"],
                set_={
                    "user_id": insert.excluded.user_id,
                    "email": insert.excluded.email,
                    "run_id": insert.excluded.run_id,
                    "told_at": insert.excluded.told_at,
                },
            ),
            entered,
        )
    exited: dict[str, list[str]] = {}
    for row in rows:
        if not row.value:
            exited.setdefault(row.audience_key, []).append(row.user_ref)
    for key, refs in exited.items():
        connection.execute(
            m.baseline.delete().where(m.baseline.c.audience_key == key, m.baseline.c.user_ref.in_(refs))
        )


def _change(
    row: Row[Any], run_ids: dict[str, int], outcome: str, error: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "run_id": run_ids[row.audience_key],
        "audience_key": row.audience_key,
        "user_ref": row.user_ref,
        "value": bool(row.value),
        "outcome": outcome,
        "error": error,
        "at": now,
    }
