"""The `leases` table: one run per audience at a time, across processes and hosts.

Taking a lease is one conditional UPDATE (steal it if expired, or renew our own) or, when no
row exists, one INSERT ... ON CONFLICT DO NOTHING: both atomic on SQLite and PostgreSQL.
A holder renews it while its run is alive (`sync.lease_keeper`); when the holder dies the lease
simply expires.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..support.clock import utcnow
from . import models as m
from .database import dialect_insert


def new_holder() -> str:
    """host:pid:random, unique per process and readable in the leases table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def try_acquire(engine: Engine, key: str, holder: str, ttl_seconds: float) -> bool:
    now = utcnow()
    expires = now + timedelta(seconds=ttl_seconds)
    with engine.begin() as connection:
        current = connection.execute(
            sa.select(m.leases.c.holder).where(m.leases.c.audience_key == key)
        ).scalar_one_or_none()
        takeable = sa.or_(m.leases.c.expires_at < now, m.leases.c.holder == holder)
        if current and holder_is_dead(current):
            # A process on this host that was killed: no need to wait for its lease to expire.
            takeable = sa.or_(takeable, m.leases.c.holder == current)
        taken = connection.execute(
            m.leases.update()
            .where(m.leases.c.audience_key == key, takeable)
            .values(holder=holder, acquired_at=now, expires_at=expires)
        ).rowcount
        if taken:
            return True
        insert = dialect_insert(connection)(m.leases).values(
            audience_key=key, holder=holder, acquired_at=now, expires_at=expires
        )
        # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
        inserted = connection.execute(
            insert.on_conflict_do_nothing().returning(m.leases.c.audience_key)
        ).first()
        return inserted is not None


def holder_is_dead(holder: str) -> bool:
    """True only when the holder ran on this host and its process no longer exists."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def renew(engine: Engine, key: str, holder: str, ttl_seconds: float) -> bool:
    """Extend our lease; False when it is no longer ours (it expired and someone took it)."""
    with engine.begin() as connection:
        return bool(
            connection.execute(
                m.leases.update()
                .where(m.leases.c.audience_key == key, m.leases.c.holder == holder)
                .values(expires_at=utcnow() + timedelta(seconds=ttl_seconds))
            ).rowcount
        )


def release(engine: Engine, key: str, holder: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            m.leases.delete().where(m.leases.c.audience_key == key, m.leases.c.holder == holder)
        )


def current_holder(engine: Engine, key: str) -> str | None:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(m.leases.c.holder).where(
                m.leases.c.audience_key == key, m.leases.c.expires_at >= utcnow()
            )
        ).scalar_one_or_none()
