"""Retiring an audience that is gone from the config: Planhat is left with no `true` for it.

The users Planhat has, or may have, as `true` for the audience are its baseline (told `true`)
and its outbox rows in doubt, whatever their value (a chunk a killed run left on the wire is
put in doubt first). Under the audience's lease, one transaction replaces its outbox with
`false` for exactly those users and drops the rest (changes never confirmed sent: Planhat
holds the baseline value for them). A run of kind `retire` then delivers that outbox through
the ordinary delivery path, so rate limits, retries, refusals and doubt apply as to any run,
and every change lands in `changes`.

The audience is marked retired (`audiences.retired_at`) only once nothing of it is left in the
baseline, the outbox or on the wire; otherwise the run ends `partial` or `failed`, the outbox
stays, and retiring again finishes it. The mass-exit guard does not apply: a retire sends only
when the user confirmed it. A retired audience that comes back in the config is un-retired by
`store.register_audiences` and gets an initial full sync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import lease, store
from . import models as m
from .config import PlanhatSettings, Settings
from .delivery import settle_in_flight
from .diff import ANALYZE_AFTER
from .engine import DRY_RUN_SAMPLES, Progress, RunReport, _deliver, _finish_all, _release, sender_for
from .errors import AlreadyRunningError, AudienceSyncError, ConfigError
from .models import UTCDateTime
from .planhat import Contact, build_enduser, build_identify, utc_timestamp

log = logging.getLogger("audience_sync.retire")

KIND = "retire"  # runs.kind


@dataclass
class RetireReport:
    key: str
    name: str
    status: str  # dry-run | retired | already-retired | partial | failed (the run's)
    users: int = 0  # users told `false` (in a dry run: who would be)
    users_in_doubt: int = 0  # of `users`: Planhat's value unknown (it may be `true`)
    run_id: int | None = None
    sent: int = 0
    failed: int = 0
    pending: int = 0  # left in the outbox when it is not retired
    in_doubt: int = 0  # of `pending`
    error: str | None = None
    retired_at: datetime | None = None
    warning: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("dry-run", "retired", "already-retired")


def retire(
    settings: Settings,
    engine: Engine,
    key: str,
    *,
    confirm: bool = False,
    sender_factory: Callable[[PlanhatSettings], Any] = sender_for,
    holder: str | None = None,
    progress: Progress | None = None,
) -> RetireReport:
    """Retire the audience `key` (`confirm`), or show what retiring it would send (a dry run).

    Raises an AudienceSyncError (one line) when the key is still configured, unknown to the
    state database, held by another run, or, to send, when no Planhat token is set.
    """
    configured = {a.key for a in settings.audiences}
    if key in configured:
        where = f" ({settings.path})" if settings.path else ""
        raise ConfigError(
            f"audience {key!r} is still in the config{where}: remove it from the config first, "
            "or it is synced again"
        )
    with store.translate_errors("state database", str(engine.url)):
        with engine.connect() as connection:
            row = _audience_row(connection, key, configured)
        _refuse_unless_user_audience(row)
        report = RetireReport(key=key, name=row.name, status="dry-run", warning=_daemon_warning(row))
        if row.retired_at is not None:
            report.status, report.retired_at = "already-retired", row.retired_at
            return report
        if not confirm:
            return _preview(engine, settings.planhat, report)
        if settings.planhat.token is None:
            raise ConfigError(f"no Planhat token set: set {settings.planhat.token_setting}; nothing sent")
        holder = holder or lease.new_holder()
        ttl = settings.daemon.lease_seconds
        if not lease.try_acquire(engine, key, holder, ttl):
            other = lease.current_holder(engine, key) or "another process"
            raise AlreadyRunningError(f"audience {key!r} is already running (lease held by {other})")
        try:
            with lease.LeaseKeeper(engine, [key], holder, ttl) as keeper:
                return _retire_leased(
                    engine, settings.planhat, report, holder, sender_factory, progress, keeper
                )
        finally:
            _release(engine, key, holder)


def _audience_row(connection: Connection, key: str, configured: set[str]) -> Any:
    a = m.audiences.c
    row = connection.execute(
        sa.select(a.key, a.name, a.retired_at, a.next_run_at, a.kind, a.level).where(a.key == key)
    ).first()
    if row is None:
        known = connection.execute(sa.select(a.key).where(a.retired_at.is_(None)).order_by(a.key)).scalars()
        retirable = ", ".join(k for k in known if k not in configured) or "none"
        raise AudienceSyncError(
            f"no audience {key!r} in the state database (audiences there and not in the config: {retirable})"
        )
    return row


def _refuse_unless_user_audience(row: Any) -> None:
    """A retire tells contacts `false`. A computed trait would need `null`, an account-level key
    its companies: neither is done here, so say so rather than send the wrong thing."""
    what = "a computed trait" if row.kind == "trait" else "account-level" if row.level == "account" else None
    if what is not None:
        raise AudienceSyncError(
            f"{row.key!r} is {what}; retire clears user-level audiences only. To clear it in Planhat, "
            "put it back in the config with a query that returns no rows and run "
            f"`audience-sync sync --audience {row.key} --force` (the guard asks for --force), then remove it"
        )


def _daemon_warning(row: Any) -> str | None:
    """A daemon publishes the next run of each audience in its config, and clears it for those
    gone from its config when it starts: one still planned may be a daemon running with the old
    config, whose next run would sync the audience again."""
    if row.next_run_at is None or row.retired_at is not None:
        return None
    return (
        f"a daemon planned a run of {row.key!r} for {row.next_run_at:%Y-%m-%d %H:%M:%S} UTC: if a "
        "daemon still runs with a config that lists it, restart that daemon first, or it syncs "
        "the audience again"
    )


def _preview(engine: Engine, planhat: PlanhatSettings, report: RetireReport) -> RetireReport:
    """What retiring would send, read without writing: queue_retirement would write a row per
    user (a million rows on PostgreSQL take many seconds, even rolled back)."""
    with engine.connect() as connection:
        report.users, report.users_in_doubt = count_retirement(connection, report.key)
        report.samples = _samples(connection, report.key, planhat)
    return report


def _retire_leased(
    engine: Engine,
    planhat: PlanhatSettings,
    report: RetireReport,
    holder: str,
    sender_factory: Callable[[PlanhatSettings], Any],
    progress: Progress | None,
    keeper: lease.LeaseKeeper,
) -> RetireReport:
    started = time.monotonic()
    key = report.key
    with engine.connect() as connection:
        store.begin_write(connection)
        retired_at = connection.execute(
            sa.select(m.audiences.c.retired_at).where(m.audiences.c.key == key)
        ).scalar_one()
        if retired_at is not None:  # by another process, while this one waited
            report.status, report.retired_at = "already-retired", retired_at
            return report
        store.abort_stale_runs(connection, key)
        settle_in_flight(connection, key)
        run_id = store.start_run(connection, key, KIND, "cli", holder)
        report.users, report.users_in_doubt = queue_retirement(connection, key, run_id, store.utcnow())
        store.update_run(connection, run_id, members=0, entered=0, exited=report.users)
        connection.commit()
    log.info(
        "audience %r: retiring, %d users to tell `false` (%d in doubt)",
        key,
        report.users,
        report.users_in_doubt,
    )
    run = RunReport(key=key, name=report.name, kind=KIND, run_id=run_id, exited=report.users)
    ready = {key: run}
    try:
        _deliver(engine, planhat, ready, sender_factory, progress, lambda: bool(keeper.lost))
    except (Exception, KeyboardInterrupt) as exc:  # recorded, then raised (as a sync run does)
        status = "aborted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _finish_all(engine, ready, time.monotonic() - started, f"{status}: {store.first_line(exc)}")
        raise
    if keeper.lost:
        run.error = run.error or "lost the audience's lease; stopped delivering"
    _finish_all(engine, ready, time.monotonic() - started)
    report.run_id, report.status, report.error = run_id, run.status, run.error
    report.sent, report.failed, report.pending, report.in_doubt = (
        run.sent,
        run.failed,
        run.pending,
        run.in_doubt,
    )
    if run.status == "success":
        report.retired_at = _mark_retired(engine, key)
        if report.retired_at is not None:
            report.status = "retired"
        else:  # cannot happen under the lease; say so rather than claim it
            report.status, report.error = "partial", "changes for the audience are left; retire it again"
    return report


# --- the outbox of a retire ---------------------------------------------------------------

_PARAMS = (
    sa.bindparam("key", type_=sa.String),
    sa.bindparam("run_id", type_=sa.Integer),
    sa.bindparam("now", type_=UTCDateTime),
)

# Never confirmed sent, and for a user Planhat does not have as `true`: nothing to take back.
_DROP_UNSENT = sa.text(
    """
    DELETE FROM pending WHERE audience_key = :key AND NOT in_doubt
      AND NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key AND b.user_ref = pending.user_ref)
    """
).bindparams(sa.bindparam("key", type_=sa.String))

# What is left is a baseline user or in doubt: Planhat has, or may have, `true`. The in-doubt
# mark stays, so the row leaves the outbox only on a confirmed delivery.
_ALL_TO_FALSE = sa.text(
    """
    UPDATE pending SET value = FALSE, name = NULL, title = NULL, company_id = NULL,
        run_id = :run_id, queued_at = :now
    WHERE audience_key = :key
    """
).bindparams(*_PARAMS)

_QUEUE_BASELINE = sa.text(
    """
    INSERT INTO pending (audience_key, user_ref, value, user_id, email, name, title, company_id,
                         run_id, queued_at, attempts)
    SELECT :key, b.user_ref, FALSE, b.user_id, b.email, NULL, NULL, NULL, :run_id, :now, 0
    FROM baseline b
    WHERE b.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.audience_key = :key AND p.user_ref = b.user_ref)
    """
).bindparams(*_PARAMS)


def queue_retirement(connection: Connection, key: str, run_id: int, now: datetime) -> tuple[int, int]:
    """Make the audience's outbox `false` for every user Planhat has or may have as `true`, and
    nothing else (inside the caller's transaction, after settle_in_flight). Returns (users
    queued, of which in doubt); count_retirement counts the same without writing."""
    params = {"key": key, "run_id": run_id, "now": now}
    connection.execute(_DROP_UNSENT, {"key": key})
    connection.execute(_ALL_TO_FALSE, params)
    queued = connection.execute(_QUEUE_BASELINE, params).rowcount
    if connection.dialect.name == "postgresql" and queued > ANALYZE_AFTER:
        connection.exec_driver_sql("ANALYZE pending")  # delivery pages through it (see diff)
    return store.pending_counts(connection, key)


def _maybe_true(key: str) -> sa.ColumnElement[bool]:
    """Outbox rows whose value Planhat may hold: in doubt, or on the wire (settled into doubt)."""
    p = m.pending.c
    return sa.and_(p.audience_key == key, sa.or_(p.in_doubt.is_(True), m.on_the_wire()))


def _in_baseline(key: str) -> sa.Exists:
    b = m.baseline.c
    return sa.exists().where(b.audience_key == key, b.user_ref == m.pending.c.user_ref)


def count_retirement(connection: Connection, key: str) -> tuple[int, int]:
    """(users, of which in doubt) that queue_retirement would queue now: the baseline, and the
    outbox rows Planhat may hold (counted once when also in the baseline)."""
    told = sa.select(sa.func.count()).where(m.baseline.c.audience_key == key).scalar_subquery()
    doubt = sa.select(sa.func.count()).select_from(m.pending).where(_maybe_true(key))
    beyond = doubt.where(~_in_baseline(key)).scalar_subquery()
    users, in_doubt = connection.execute(sa.select(told + beyond, doubt.scalar_subquery())).one()
    return int(users), int(in_doubt)


def _samples(connection: Connection, key: str, planhat: PlanhatSettings) -> list[dict[str, Any]]:
    """The first payloads a retire would send, in user order (the order delivery reads)."""
    b, p = m.baseline.c, m.pending.c
    told = sa.select(b.user_ref, b.user_id, b.email).where(b.audience_key == key)
    doubt = sa.select(p.user_ref, p.user_id, p.email).where(_maybe_true(key), ~_in_baseline(key))
    # Each part walks its index and stops early; a sorted union would sort the whole baseline.
    rows = [
        row
        for part, ref in ((told, b.user_ref), (doubt, p.user_ref))
        for row in connection.execute(part.order_by(ref).limit(DRY_RUN_SAMPLES))
    ]
    payloads = []
    for ref, user_id, email in sorted(rows, key=lambda row: row[0])[:DRY_RUN_SAMPLES]:
        contact = Contact(ref, user_id, email, None, None, None, {key: False})
        if planhat.transport == "segment":
            payloads.append(build_identify(contact, planhat, "dry-run", utc_timestamp()))
        else:
            payloads.append(build_enduser(contact))
    return payloads


def _mark_retired(engine: Engine, key: str) -> datetime | None:
    """Set retired_at when nothing of the audience is left for Planhat; None when something is."""
    now = store.utcnow()
    left = [sa.exists().where(table.c.audience_key == key) for table in (m.pending, m.baseline, m.in_flight)]
    with engine.begin() as connection:
        marked = connection.execute(
            m.audiences.update()
            .where(m.audiences.c.key == key, m.audiences.c.retired_at.is_(None), *(~e for e in left))
            .values(retired_at=now, next_run_at=None)
        ).rowcount
    if marked:
        log.info("audience %r retired", key)
    return now if marked else None
