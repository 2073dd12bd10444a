"""One run per audience at a time, across processes and hosts: a lease row in the state database.

Taking a lease is one conditional UPDATE (steal it if expired, or renew our own) or, when no
row exists, one INSERT ... ON CONFLICT DO NOTHING: both atomic on SQLite and PostgreSQL.
A holder renews it while its run is alive; when the holder dies the lease simply expires.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import models as m
from .store import dialect_insert, first_line, utcnow

log = logging.getLogger("audience_sync.lease")


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


class LeaseKeeper:
    """Renews a set of held leases in a background thread until stopped."""

    def __init__(self, engine: Engine, keys: list[str], holder: str, ttl_seconds: float) -> None:
        self.engine = engine
        self.keys = list(keys)
        self.holder = holder
        self.ttl = ttl_seconds
        self.lost: set[str] = set()
        # When each lease was last renewed (monotonic; a call's start, erring early). It was
        # taken just before the keeper was made, which counts as the first renewal.
        self._renewed = dict.fromkeys(self.keys, time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.ttl / 3):
                for key in self.keys:
                    if key not in self.lost:
                        self._renew(key)
        except Exception as exc:  # a bug: without this thread the run would go on unleased
            log.error(
                "lease renewal stopped by an unexpected error (%s: %s): stopping the runs of %s",
                exc.__class__.__name__,
                first_line(exc),
                ", ".join(map(repr, self.keys)),
            )
            self.lost.update(self.keys)

    def _renew(self, key: str) -> None:
        started = time.monotonic()
        try:
            if renew(self.engine, key, self.holder, self.ttl):
                self._renewed[key] = started
            else:
                log.error("lost the lease on audience %r", key)
                self.lost.add(key)
        except sa.exc.SQLAlchemyError as exc:  # transient: try again next tick ...
            log.warning("could not renew the lease on %r: %s", key, exc.__class__.__name__)
            # ... unless the lease has run out meanwhile: another process may take it now.
            unrenewed = time.monotonic() - self._renewed[key]
            if unrenewed >= self.ttl:
                log.error("lost the lease on audience %r: not renewed for %.1fs", key, unrenewed)
                self.lost.add(key)
