"""Reading Planhat back: compare what it holds with what the state database believes, and repair.

Drift happens outside audience-sync: someone edits a contact by hand, an import overwrites the
field, contacts are merged or deleted, the state database is restored from an old backup. A
reconcile pages through every Planhat contact (`PlanhatReader`, rate-limited; for account-level
keys, every company) into temporary tables of the state database, then compares set-based,
per audience, against the baseline (what Planhat was told and confirmed):

    agree             the contact's field is what the baseline says
    unexpected_true   `true` in Planhat, but not a member as far as Planhat was told
    missing_true      a member, but the contact's field is not `true` (false or absent)
    missing_contact   a member, and Planhat has no such contact (or company) at all; for
                      contacts, the source is read once more to count those it gives no
                      company_id, the likely cause (Planhat discards a call for a contact it
                      does not have unless it names the company)

With `fix`, under the audiences' leases: the baseline is rewritten to what Planhat showed
(so it is again "what Planhat holds"), and outbox rows in doubt lose their doubt (Planhat's
value is now known); then an ordinary run (`kind = reconcile`) snapshots the source, diffs
against that baseline and delivers the corrections, every change recorded in `changes`.

Memory stays a page of contacts: they go straight into the state database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..config import AudienceSettings, Settings
from ..errors import AudienceSyncError
from ..planhat import PlanhatReader
from ..snapshot.contract import ReadStats
from ..snapshot.sources import SourcePool, read_members
from ..snapshot.values import UnusableValue, canonical
from ..state import audiences, baseline, leases, outbox, pauses, runs
from ..state.database import begin_write, translate_errors
from ..state.models import KEY
from ..support.clock import utcnow
from ..support.collector import frozen_gc
from ..support.text import first_line
from .lease_keeper import LeaseKeeper
from .reports import Progress, RunReport, SyncOptions
from .run import sync
from .sending import SenderFactory, sender_for

log = logging.getLogger(__name__)

CONTACTS = "observed_contacts"  # every contact Planhat has: its externalId and email
TRUE = "observed_true"  # (audience, contact) where Planhat holds `true`; a trait: any value
TOLD_EMAILS = "told_emails"  # one audience's email-only members, lowercased
DRIFT = "drift"  # one audience's disagreements, by category
STAGE_TABLES = (CONTACTS, TRUE, TOLD_EMAILS, DRIFT)
SAMPLES = 3
CATEGORIES = ("unexpected_true", "missing_true", "missing_contact")


@dataclass
class ReconcileReport:
    key: str
    name: str
    level: str = "user"  # user: compared with Planhat's contacts; account: with its companies
    status: str = "agree"  # agree | drift | fixed | skipped | failed | blocked | partial
    contacts: int = 0  # contacts (account level: companies) read from Planhat
    members: int = 0  # users Planhat was told are members (the baseline)
    agree: int = 0  # contacts whose field is what the baseline says
    unexpected_true: int = 0
    missing_true: int = 0
    missing_contact: int = 0
    in_doubt: int = 0  # outbox rows in doubt, now known from Planhat's answer
    # Of the missing contacts, how many the source gives no company_id (None: not read). Planhat
    # discards an identify for a contact it does not have unless it names the company.
    missing_without_company: int | None = None
    samples: dict[str, list[str]] = field(default_factory=dict)
    run: RunReport | None = None  # the repairing run, with `fix`
    error: str | None = None

    @property
    def drift(self) -> int:
        return self.unexpected_true + self.missing_true + self.missing_contact

    @property
    def ok(self) -> bool:
        return self.status in ("agree", "fixed")


ReaderFactory = Callable[[Settings], PlanhatReader]


def default_reader(settings: Settings) -> PlanhatReader:
    return PlanhatReader(
        settings.planhat,
        page_size=settings.reconcile.page_size,
        requests_per_second=settings.reconcile.max_requests_per_second,
    )


def reconcile(
    settings: Settings,
    engine: Engine,
    keys: list[str] | None = None,
    *,
    fix: bool = False,
    force: bool = False,
    trigger: str = "cli",
    sources: SourcePool | None = None,
    reader_factory: ReaderFactory = default_reader,
    sender_factory: SenderFactory = sender_for,
    holder: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[ReconcileReport]:
    """Compare Planhat with the state database for the named audiences (default all); with
    `fix`, repair the baseline and deliver the corrections. One report per audience."""
    chosen = settings.select(keys)
    holder = holder or leases.new_holder()
    ttl = settings.daemon.lease_seconds
    reports = {a.key: ReconcileReport(key=a.key, name=a.name, level=a.level) for a in chosen}
    with translate_errors("state database", str(engine.url)):
        with engine.begin() as connection:
            audiences.register(connection, chosen)
            held_back = pauses.paused(connection, [a.key for a in chosen]) if fix else {}
        for key, pause in held_back.items():  # a repair sends: not while paused
            reports[key].status = "skipped"
            reports[key].error = f"{pause.describe()}; not repaired (`audience-sync resume {key}` first)"
        fixable = [a for a in chosen if a.key not in held_back]
        held = _acquire(engine, fixable, reports, holder, ttl) if fix else list(chosen)
        try:
            if held:
                # Reporting reads without leases (a run may change things meanwhile); fixing holds
                # them from the first page read to the last change delivered.
                with LeaseKeeper(engine, [a.key for a in held] if fix else [], holder, ttl) as keeper:
                    missing = _compare(settings, engine, held, reports, reader_factory, fix, keeper)
                    _count_without_company(settings, sources, held, missing, reports)
                if fix:
                    _repair_runs(settings, engine, held, reports, force, trigger, sources, sender_factory,
                                 holder, progress, should_stop)  # fmt: skip
        finally:
            if fix:
                for audience in held:
                    leases.release(engine, audience.key, holder)
    return [reports[a.key] for a in chosen]


def _acquire(
    engine: Engine,
    chosen: list[AudienceSettings],
    reports: dict[str, ReconcileReport],
    holder: str,
    ttl: float,
) -> list[AudienceSettings]:
    held = []
    for audience in chosen:
        if leases.try_acquire(engine, audience.key, holder, ttl):
            held.append(audience)
        else:
            other = leases.current_holder(engine, audience.key) or "another process"
            report = reports[audience.key]
            report.status = "skipped"
            report.error = f"audience {audience.key!r} is running (lease held by {other}); not reconciled"
    return held


def _compare(
    settings: Settings,
    engine: Engine,
    held: list[AudienceSettings],
    reports: dict[str, ReconcileReport],
    reader_factory: ReaderFactory,
    fix: bool,
    keeper: LeaseKeeper,
) -> dict[str, set[str]]:
    """Read Planhat into the stage, count per key and, with `fix`, repair the baselines: the
    contacts for user-level keys, then the companies (`GET /companies`) for account-level ones
    (a company's externalId stands where a contact's does). Returns the missing contacts of
    each user-level key."""
    missing: dict[str, set[str]] = {}
    with reader_factory(settings) as reader:
        for companies in (False, True):
            level = [a for a in held if (a.level == "account") == companies]
            if level:
                _compare_level(engine, reader, level, reports, fix, keeper, companies, missing)
    for audience in held:
        report = reports[audience.key]
        report.status = "drift" if report.drift else "agree"
    return missing


def _compare_level(
    engine: Engine,
    reader: PlanhatReader,
    held: list[AudienceSettings],
    reports: dict[str, ReconcileReport],
    fix: bool,
    keeper: LeaseKeeper,
    companies: bool,
    missing: dict[str, set[str]],
) -> None:
    keys = [a.key for a in held]
    trait_keys = {a.key for a in held if a.trait}
    what = "companies" if companies else "contacts"
    with engine.connect() as connection:
        try:
            _create_stage(connection)
            started = time.monotonic()
            requests = reader.requests
            read = _load(
                connection, reader.pages(companies=True) if companies else reader.pages(), keys, trait_keys
            )
            log.info(
                "read %d Planhat %s in %d requests (%.1fs)",
                read,
                what,
                reader.requests - requests,
                time.monotonic() - started,
            )
            if keeper.lost:
                raise AudienceSyncError(
                    f"lost the lease on {', '.join(sorted(keeper.lost))} while reading Planhat"
                )
            begin_write(connection)
            for key in keys:
                report = reports[key]
                report.contacts = read
                _count(connection, key, report, key in trait_keys)
                if report.missing_contact and not companies:
                    missing[key] = set(
                        connection.exec_driver_sql(
                            f"SELECT user_ref FROM {DRIFT} WHERE category = 'missing_contact'"
                        ).scalars()
                    )
                if fix:
                    _repair_baseline(connection, key, key in trait_keys)
            if fix:  # in the repair's transaction: no reader sees the old count with the new rows
                baseline.recount(connection, keys)
            connection.commit()
        finally:
            connection.rollback()
            for table in STAGE_TABLES:
                connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            connection.commit()


def _count_without_company(
    settings: Settings,
    sources: SourcePool | None,
    held: list[AudienceSettings],
    missing: dict[str, set[str]],
    reports: dict[str, ReconcileReport],
) -> None:
    """For each user-level key with missing contacts, count those whose row in the source has
    no company_id: the likely cause, since Planhat creates a contact only under a company
    (planhat/docs, "User Tracking" > "3. Segment"). Reads the source; a failure leaves the
    count unknown."""
    if not missing:
        return
    with contextlib.ExitStack() as stack:
        pool = sources or stack.enter_context(SourcePool(settings.sources))
        for audience in held:
            refs = missing.get(audience.key)
            if not refs:
                continue
            without = 0
            try:
                for chunk in read_members(pool, audience, ReadStats()):
                    for member in chunk:
                        ref = member[0] or member[1]
                        if ref in refs and member[4] is None:
                            without += 1
            except AudienceSyncError as exc:
                log.warning("%s: could not read the source to explain the missing contacts: %s",
                            audience.key, first_line(exc))  # fmt: skip
                continue
            reports[audience.key].missing_without_company = without
            if without:
                log.warning(
                    "audience %r: %d of the %d missing contacts have no company_id in the source; "
                    "Planhat discards a contact it does not have unless the call names its company: "
                    "return it as the column company_id",
                    audience.key,
                    without,
                    len(refs),
                )


# --- the stage: what Planhat holds ------------------------------------------------------------


def _create_stage(connection: Connection) -> None:
    key = "TEXT" if connection.dialect.name == "sqlite" else f"VARCHAR({KEY})"
    for table in STAGE_TABLES:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {CONTACTS} (external_id {key}, email {key})")
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {TRUE} (audience_key {key}, external_id {key}, email {key}, value_json TEXT)"
    )
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {TOLD_EMAILS} (email {key} PRIMARY KEY)")
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE {DRIFT} (category {key}, user_ref {key}, user_id {key}, email {key}, "
        "value_json TEXT)"
    )


def _load(
    connection: Connection,
    pages: Iterable[list[dict[str, Any]]],
    keys: list[str],
    trait_keys: set[str] | frozenset[str] = frozenset(),
) -> int:
    """Stage every contact and every `true` it holds for these audiences (for a computed
    trait, every value, normalised as the source's are); returns the count.

    Emails are compared lowercased: Planhat may not keep the case the source had.
    """
    contacts = 0
    audience_keys = [k for k in keys if k not in trait_keys]
    insert_contact = sa.text(f"INSERT INTO {CONTACTS} VALUES (:external_id, :email)")
    insert_true = sa.text(f"INSERT INTO {TRUE} VALUES (:audience_key, :external_id, :email, :value_json)")
    with frozen_gc():
        for page in pages:
            rows: list[dict[str, Any]] = []
            trues: list[dict[str, Any]] = []
            for item in page:
                external_id, email = _identity(item.get("externalId")), _identity(item.get("email"))
                if external_id is None and email is None:
                    continue  # no identity audience-sync could ever have written to
                row = {
                    "external_id": external_id,
                    "email": email and email.lower(),
                    "label": external_id or email,
                }
                rows.append(row)
                custom = item.get("custom")
                if isinstance(custom, dict):
                    trues.extend(
                        {"audience_key": k, "value_json": None, **row}
                        for k in audience_keys
                        if _is_true(custom.get(k))
                    )
                    for k in trait_keys:
                        if custom.get(k) is not None:
                            trues.append({"audience_key": k, "value_json": _observed(custom[k]), **row})
            if rows:
                connection.execute(insert_contact, rows)
            if trues:
                connection.execute(insert_true, trues)
            contacts += len(rows)
    for table, column in (
        (CONTACTS, "external_id"),
        (CONTACTS, "email"),
        (TRUE, "external_id"),
        (TRUE, "email"),
    ):
        connection.exec_driver_sql(f"CREATE INDEX ix_{table}_{column} ON {table} ({column})")
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"ANALYZE {CONTACTS}")  # autovacuum never sees temp tables
        connection.exec_driver_sql(f"ANALYZE {TRUE}")
    return contacts


def _identity(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    return text or None


def _observed(value: object) -> str:
    """A trait value read back, as the canonical JSON text the baseline holds; one the source
    could never have produced still reads as a value (it disagrees with every baseline)."""
    try:
        return canonical(value) or "null"
    except UnusableValue:
        return json.dumps(repr(value))


def _is_true(value: object) -> bool:
    """A checkbox field reads back as a boolean; some exports spell it as text."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


# --- comparing -------------------------------------------------------------------------------
# A baseline row names its contact by user_id (user_ref = user_id) or, for an email-only user,
# by email (user_ref = email, compared lowercased). Every probe below is an index or hash
# lookup: `told_emails` holds the email-only members lowercased, so no join needs lower() on an
# indexed column, and each category is computed once into `drift`.

_HAS = (
    "((b.user_id IS NOT NULL AND EXISTS (SELECT 1 FROM {table} o WHERE {key}o.external_id = b.user_ref)) "
    "OR (b.user_id IS NULL AND EXISTS (SELECT 1 FROM {table} o WHERE {key}o.email = lower(b.user_ref))))"
)
_HAS_TRUE = _HAS.format(table=TRUE, key="o.audience_key = :key AND ")
_HAS_CONTACT = _HAS.format(table=CONTACTS, key="")
_FIND_DRIFT = (
    f"""
    INSERT INTO {DRIFT} (category, user_ref, user_id, email)
    SELECT CASE WHEN {_HAS_CONTACT} THEN 'missing_true' ELSE 'missing_contact' END,
           b.user_ref, b.user_id, b.email
    FROM baseline b WHERE b.audience_key = :key AND NOT {_HAS_TRUE}
    """,
    f"""
    INSERT INTO {DRIFT} (category, user_ref, user_id, email)
    SELECT 'unexpected_true', coalesce(o.external_id, o.email), o.external_id, o.email
    FROM {TRUE} o
    WHERE o.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key
                      AND b.user_ref = o.external_id AND b.user_id IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM {TOLD_EMAILS} t WHERE t.email = o.email)
    """,
)


# A computed trait: a baseline row agrees when Planhat holds the same value; `missing_true` is
# a contact holding another value or none, `unexpected_true` a value Planhat was never told.
_HAS_VALUE = _HAS.format(table=TRUE, key="o.audience_key = :key AND o.value_json = b.value_json AND ")
_OBSERVED_VALUE = (
    f"(SELECT min(o.value_json) FROM {TRUE} o WHERE o.audience_key = :key AND "
    "((b.user_id IS NOT NULL AND o.external_id = b.user_ref) "
    "OR (b.user_id IS NULL AND o.email = lower(b.user_ref))))"
)
_FIND_TRAIT_DRIFT = (
    f"""
    INSERT INTO {DRIFT} (category, user_ref, user_id, email, value_json)
    SELECT CASE WHEN {_HAS_CONTACT} THEN 'missing_true' ELSE 'missing_contact' END,
           b.user_ref, b.user_id, b.email, {_OBSERVED_VALUE}
    FROM baseline b WHERE b.audience_key = :key AND NOT {_HAS_VALUE}
    """,
    f"""
    INSERT INTO {DRIFT} (category, user_ref, user_id, email, value_json)
    SELECT 'unexpected_true', coalesce(o.external_id, o.email), o.external_id, o.email, o.value_json
    FROM {TRUE} o
    WHERE o.audience_key = :key
      AND NOT EXISTS (SELECT 1 FROM baseline b WHERE b.audience_key = :key
                      AND b.user_ref = o.external_id AND b.user_id IS NOT NULL)
      AND NOT EXISTS (SELECT 1 FROM {TOLD_EMAILS} t WHERE t.email = o.email)
    """,
)


def _count(connection: Connection, key: str, report: ReconcileReport, trait: bool = False) -> None:
    """Fill the drift table for this audience (or computed trait) and count it."""
    params = {"key": key}
    for table in (DRIFT, TOLD_EMAILS):
        connection.exec_driver_sql(f"DELETE FROM {table}")
    connection.execute(
        sa.text(
            f"INSERT INTO {TOLD_EMAILS} SELECT DISTINCT lower(user_ref) FROM baseline "
            "WHERE audience_key = :key AND user_id IS NULL"
        ),
        params,
    )
    for statement in _FIND_TRAIT_DRIFT if trait else _FIND_DRIFT:
        connection.execute(sa.text(statement), params)
    report.members = baseline.count(connection, key)
    grouped = connection.execute(sa.text(f"SELECT category, count(*) FROM {DRIFT} GROUP BY category"))
    counts: dict[str, int] = {category: int(n) for category, n in grouped}
    for category in CATEGORIES:
        setattr(report, category, int(counts.get(category, 0)))
        report.samples[category] = list(
            connection.execute(
                sa.text(
                    f"SELECT user_ref FROM {DRIFT} WHERE category = :c ORDER BY user_ref LIMIT {SAMPLES}"
                ),
                {"c": category},
            ).scalars()
        )
    # Every contact counts once: it disagrees when it has an unexpected or a missing `true`.
    report.agree = report.contacts - report.unexpected_true - report.missing_true
    report.in_doubt = outbox.count(connection, key)[1]
    if report.drift:
        log.warning(
            "audience %r: Planhat disagrees with the state database on %d contacts "
            "(true but not told: %d, told but not true: %d, contact missing: %d)",
            key,
            report.drift,
            report.unexpected_true,
            report.missing_true,
            report.missing_contact,
        )


def _repair_baseline(connection: Connection, key: str, trait: bool = False) -> None:
    """Make the baseline what Planhat showed (from the drift just counted), and drop the doubt
    its answer settled."""
    baseline.repair_from_drift(connection, key, DRIFT, utcnow(), trait=trait)
    outbox.settle_after_read(connection, key, trait=trait)


# --- repairing ---------------------------------------------------------------------------------


def _repair_runs(
    settings: Settings,
    engine: Engine,
    held: list[AudienceSettings],
    reports: dict[str, ReconcileReport],
    force: bool,
    trigger: str,
    sources: SourcePool | None,
    sender_factory: SenderFactory,
    holder: str,
    progress: Progress | None,
    should_stop: Callable[[], bool],
) -> None:
    """One ordinary run against the repaired baselines delivers the corrections."""
    options = SyncOptions(force=force, trigger=trigger, reconcile=True)
    repairs = sync(
        settings,
        engine,
        [a.key for a in held],
        options,
        sources=sources,
        sender_factory=sender_factory,
        holder=holder,
        progress=progress,
        should_stop=should_stop,
    )
    with engine.begin() as connection:
        for run in repairs:
            report = reports[run.key]
            report.run = run
            if run.run_id is not None:
                runs.update(connection, run.run_id, drift=report.drift)
            report.status = "fixed" if run.ok else run.status
            report.error = run.error
