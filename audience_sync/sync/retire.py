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
`state.audiences.register` and gets an initial full sync.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection, Engine

from ..config import PlanhatSettings, Settings
from ..errors import AlreadyRunningError, AudienceSyncError, ConfigError
from ..planhat.payloads import Contact, build_enduser, build_identify
from ..state import audiences, leases, outbox, runs
from ..state.database import begin_write, translate_errors
from ..support.clock import iso_timestamp, utcnow
from ..support.logs import run_context
from .dry_run import SAMPLES
from .lease_keeper import LeaseKeeper
from .reports import Progress, RunReport
from .run import deliver_and_finish, release
from .sending import SenderFactory, sender_for

log = logging.getLogger(__name__)

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
    sender_factory: SenderFactory = sender_for,
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
    with translate_errors("state database", str(engine.url)):
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
        holder = holder or leases.new_holder()
        ttl = settings.daemon.lease_seconds
        if not leases.try_acquire(engine, key, holder, ttl):
            other = leases.current_holder(engine, key) or "another process"
            raise AlreadyRunningError(f"audience {key!r} is already running (lease held by {other})")
        try:
            with LeaseKeeper(engine, [key], holder, ttl) as keeper:
                return _retire_leased(engine, settings, report, holder, sender_factory, progress, keeper)
        finally:
            release(engine, key, holder)


def _audience_row(connection: Connection, key: str, configured: set[str]) -> Any:
    row = audiences.find(connection, key)
    if row is None:
        retirable = (
            ", ".join(k for k in audiences.unretired_keys(connection) if k not in configured) or "none"
        )
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
        report.users, report.users_in_doubt = outbox.count_retirement(connection, report.key)
        report.samples = _samples(connection, report.key, planhat)
    return report


def _retire_leased(
    engine: Engine,
    settings: Settings,
    report: RetireReport,
    holder: str,
    sender_factory: SenderFactory,
    progress: Progress | None,
    keeper: LeaseKeeper,
) -> RetireReport:
    started = time.monotonic()
    key = report.key
    with engine.connect() as connection:
        begin_write(connection)
        retired_at = audiences.retired_at(connection, key)
        if retired_at is not None:  # by another process, while this one waited
            report.status, report.retired_at = "already-retired", retired_at
            return report
        runs.abort_stale(connection, key)
        outbox.settle_in_flight(connection, key)
        run_id = runs.start(connection, key, KIND, "cli", holder)
        report.users, report.users_in_doubt = outbox.queue_retirement(connection, key, run_id, utcnow())
        runs.update(connection, run_id, members=0, entered=0, exited=report.users)
        connection.commit()
    with run_context(run_id):
        log.info(
            "audience %r: retiring, %d users to tell `false` (%d in doubt)",
            key,
            report.users,
            report.users_in_doubt,
        )
    run = RunReport(key=key, name=report.name, kind=KIND, run_id=run_id, exited=report.users)

    def stop() -> bool:
        return bool(keeper.lost)

    deliver_and_finish(engine, settings, {key: run}, sender_factory, progress, stop, keeper, started)
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


def _samples(connection: Connection, key: str, planhat: PlanhatSettings) -> list[dict[str, Any]]:
    """The first payloads a retire would send, in user order (the order delivery reads)."""
    payloads = []
    for ref, user_id, email in outbox.retirement_samples(connection, key, SAMPLES):
        contact = Contact(ref, user_id, email, None, None, None, {key: False})
        if planhat.transport == "segment":
            payloads.append(build_identify(contact, planhat, "dry-run", iso_timestamp()))
        else:
            payloads.append(build_enduser(contact))
    return payloads


def _mark_retired(engine: Engine, key: str) -> datetime | None:
    """Set retired_at when nothing of the audience is left for Planhat; None when something is."""
    now = utcnow()
    with engine.begin() as connection:
        marked = audiences.mark_retired(connection, key, now)
    if marked:
        log.info("audience %r retired", key)
    return now if marked else None
