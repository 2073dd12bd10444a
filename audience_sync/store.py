"""The state database: engine, migrations, and the queries operators and the engine share.

Migrations ship inside the package (a wheel maps the top-level `migrations/` folder to
`audience_sync/migrations`); Alembic is configured in code, so `audience-sync db upgrade`
works from any directory with no alembic.ini. Opening the state database does not import
Alembic (with Mako and Pygments, a fifth of a second of every command): the revision is read
with a plain SELECT and compared with `models.SCHEMA_REVISION`; only an upgrade loads Alembic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import models as m
from . import urls
from .errors import SchemaOutdatedError, StateDatabaseError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

    from .config import AudienceSettings

log = logging.getLogger("audience_sync.store")

UPGRADE_HINT = "run `audience-sync db upgrade`"


def utcnow() -> datetime:
    return datetime.now(UTC)


def safe_url(url: str | sa.URL) -> str:
    """A database URL fit for logs and messages: the password and secret parameters hidden."""
    return urls.safe_url(url)


# --- engine -------------------------------------------------------------------------------


def create_state_engine(url: str) -> Engine:
    """An engine for the state database, with SQLite tuned for a write-heavy single file."""
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise StateDatabaseError(f"database.url {safe_url(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets `status` and `history` read while a run writes; NORMAL is durable under WAL
    # for everything but a power cut, and the outbox makes a lost tail harmless (resent).
    # Memory stays flat in the audience's size: the staging tables live in a temporary file
    # (temp_store=FILE; in memory they would cost ~200 bytes per member), and each
    # connection's page cache, main and temp, is capped at 8 MiB. The OS caches the files
    # anyway: 16 or 64 MiB bought no speed at a million members, only resident memory that
    # grew with the audience. threads=2 lets the sort that builds the stage use a helper.
    # Checkpointing every 10,000 pages (~40 MiB of WAL) rather than 1,000 writes a page
    # that successive delivery chunks touch once, not once per chunk, and syncs less often.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA temp_store=FILE")
    cursor.execute("PRAGMA cache_size=-8192")
    cursor.execute("PRAGMA temp.cache_size=-8192")
    cursor.execute("PRAGMA threads=2")
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


@contextmanager
def translate_errors(what: str, url: str) -> Iterator[None]:
    """Turn SQLAlchemy errors into one line naming the state database."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise StateDatabaseError(database_error(what, url, exc)) from exc


def database_error(what: str, url: str | sa.URL, exc: sa.exc.SQLAlchemyError) -> str:
    """One line: what failed, the database (password hidden), and the database's own message."""
    return f"{what} {safe_url(url)}: {error_message(exc)}"


def error_message(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message for a database error, else the error's first line."""
    return driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else first_line(exc)


def first_line(exc: BaseException) -> str:
    """An error's first line of text, or its class name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def driver_message(exc: sa.exc.DBAPIError) -> str:
    """The database's own message, without SQLAlchemy's statement and background link."""
    return first_line(exc.orig if exc.orig is not None else exc)


def dialect_insert(connection: Connection) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (SQLite and PostgreSQL alike)."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def begin_write(connection: Connection) -> None:
    """Start a transaction that reads and then writes the main database.

    SQLite cannot upgrade a read transaction to a write one once another connection has
    committed in between ("database is locked", with no wait), so there the write lock is
    taken up front with BEGIN IMMEDIATE, which does wait (busy_timeout). PostgreSQL needs
    nothing: it has row locks and MVCC.
    """
    if connection.dialect.name != "sqlite":
        return
    connection.commit()  # whatever came before (temporary tables only) is kept
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# --- migrations ---------------------------------------------------------------------------


def migrations_dir() -> Path:
    """Shipped inside the package in a wheel; the top-level folder in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise StateDatabaseError("migrations folder not found: the installation is incomplete")


def _alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


VERSION_TABLE = "alembic_version"  # Alembic's default; migrations/env.py keeps it


def head_revision() -> str:
    """The revision this version's schema is at: the head of migrations/versions (a test holds
    the constant to Alembic's own head, so the two cannot drift)."""
    return m.SCHEMA_REVISION


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: no version table, or no row in it), read as
    Alembic's MigrationContext reads it but without importing Alembic."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num"))
    revisions = sorted(connection.execute(sa.select(version.c.version_num)).scalars())
    # Migrations are linear, so there is at most one row; several would read as a revision
    # this version does not know (refused like any other), where Alembic raised.
    return ", ".join(revisions) or None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the schema; returns (revision before, revision after)."""
    from alembic import command

    with translate_errors("cannot upgrade state database", str(engine.url)), engine.begin() as connection:
        before = current_revision(connection)
        command.upgrade(_alembic_config(connection), revision)
        after = current_revision(connection)
    assert after is not None
    return before, after


def ensure_schema(engine: Engine) -> None:
    """Refuse a schema that is behind. A brand-new, empty database is created at head."""
    with translate_errors("cannot open state database", str(engine.url)), engine.connect() as connection:
        revision = current_revision(connection)
        empty = revision is None and not sa.inspect(connection).get_table_names()
    if empty:
        log.info("initialising empty state database %s", safe_url(engine.url))
        upgrade(engine)
        return
    head = head_revision()
    if revision != head:
        raise SchemaOutdatedError(
            f"state database {safe_url(engine.url)} is at revision {revision or 'none'}, "
            f"this version needs {head}: {UPGRADE_HINT}"
        )


def open_state(url: str) -> Engine:
    engine = create_state_engine(url)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


# --- audiences and runs -------------------------------------------------------------------


def register_audiences(connection: Connection, audiences: Sequence[AudienceSettings]) -> None:
    """Insert unknown audience keys; keep the name, kind and level current for known ones. Safe
    when several processes register the same new audience at once (ON CONFLICT DO NOTHING).

    A retired audience that is back in the config is un-retired as if new: its baseline_at is
    cleared, so it gets an initial full sync (its baseline is empty since its retirement)."""
    now = utcnow()
    a = m.audiences.c
    query = sa.select(a.key, a.name, a.retired_at, a.kind, a.level)
    existing = {row.key: row for row in connection.execute(query)}
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


def has_baseline(connection: Connection, key: str) -> bool:
    value = connection.execute(
        sa.select(m.audiences.c.baseline_at).where(m.audiences.c.key == key)
    ).scalar_one_or_none()
    return value is not None


def start_run(connection: Connection, key: str, kind: str, trigger: str, holder: str) -> int:
    result = connection.execute(
        m.runs.insert().values(
            audience_key=key,
            kind=kind,
            trigger=trigger,
            status="running",
            started_at=utcnow(),
            holder=holder,
        )
    )
    return int(result.inserted_primary_key[0])


def update_run(connection: Connection, run_id: int, **values: Any) -> None:
    connection.execute(m.runs.update().where(m.runs.c.id == run_id).values(**values))


def abort_stale_runs(connection: Connection, key: str) -> int:
    """Runs left 'running' by a process that died: called once we hold the audience's lease."""
    result = connection.execute(
        m.runs.update()
        .where(m.runs.c.audience_key == key, m.runs.c.status == "running")
        .values(
            status="aborted",
            finished_at=utcnow(),
            error="the process ended before the run finished; its changes stay pending",
        )
    )
    return result.rowcount or 0


def pending_counts(connection: Connection, key: str) -> tuple[int, int]:
    """(changes pending, of which in doubt) for one audience."""
    total, doubt = connection.execute(
        sa.select(sa.func.count(), sa.func.count().filter(m.pending.c.in_doubt.is_(True)))
        .select_from(m.pending)
        .where(m.pending.c.audience_key == key)
    ).one()
    return int(total), int(doubt)


# --- history and status -------------------------------------------------------------------


def _run_record(row: Any) -> dict[str, Any]:
    duration = None
    if row["finished_at"] is not None:
        duration = round((row["finished_at"] - row["started_at"]).total_seconds(), 3)
    return {
        "id": row["id"],
        "audience": row["audience_key"],
        "kind": row["kind"],
        "trigger": row["trigger"],
        "status": row["status"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "duration_seconds": duration,
        "members": row["members"],
        "entered": row["entered"],
        "exited": row["exited"],
        "sent": row["sent"],
        "failed": row["failed"],
        "skipped": row["skipped"],
        "pending": row["pending"],
        "in_doubt": row["in_doubt"],
        "drift": row["drift"],
        "error": row["error"],
    }


@dataclass(frozen=True)
class AudienceStatus:
    key: str
    name: str
    configured: bool
    members: int | None
    baseline: int
    pending: int
    in_doubt: int  # of `pending`: Planhat may hold either value
    last_run: dict[str, Any] | None
    last_success_at: datetime | None
    last_error: str | None
    next_run_at: datetime | None
    resync_requested: bool
    retired_at: datetime | None = None  # set by `audience-sync retire`


def status(connection: Connection, configured: dict[str, str]) -> list[AudienceStatus]:
    """One entry per audience known to the config or to the database."""
    rows = {r.key: r for r in connection.execute(sa.select(m.audiences))}
    keys = list(configured) + sorted(k for k in rows if k not in configured)
    outbox = outbox_counts(connection)
    baseline = baseline_counts(connection)
    requested = set(
        connection.execute(
            sa.select(m.resync_requests.c.audience_key).where(m.resync_requests.c.status == "pending")
        ).scalars()
    )
    latest = _latest_runs(connection)  # one statement for every audience, not four per audience
    last_runs = runs_by_id(connection, [r.last_run_id for r in latest.values() if r.last_run_id is not None])
    result = []
    for key in keys:
        row, facts = rows.get(key), latest.get(key)
        result.append(
            AudienceStatus(
                key=key,
                name=configured.get(key) or (row.name if row else key),
                configured=key in configured,
                members=facts.members if facts else None,
                baseline=baseline.get(key, 0),
                pending=outbox.get(key, (0, 0))[0],
                in_doubt=outbox.get(key, (0, 0))[1],
                last_run=last_runs.get(facts.last_run_id) if facts else None,
                last_success_at=facts.last_success_at if facts else None,
                last_error=facts.last_error if facts else None,
                next_run_at=row.next_run_at if row else None,
                resync_requested=key in requested,
                retired_at=row.retired_at if row else None,
            )
        )
    return result


def _newest_run_value(column: sa.Column[Any], *where: sa.ColumnElement[bool]) -> sa.ScalarSelect[Any]:
    """`column` of the audience's newest run (that matches `where`), correlated to `audiences`:
    it walks ix_runs_audience_started backwards from the newest run, so the cost does not grow
    with the history."""
    r = m.runs.c
    return (
        sa.select(column)
        .where(r.audience_key == m.audiences.c.key, *where)
        .order_by(r.started_at.desc(), r.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _latest_runs(connection: Connection) -> dict[str, Any]:
    """Per audience: its newest run's id, and the newest members count, error and success
    time of any run. Each correlated subquery walks ix_runs_audience_started backwards from
    the audience's newest run, so the cost does not grow with the history."""
    r = m.runs.c
    newest = _newest_run_value
    query = sa.select(
        m.audiences.c.key,
        newest(r.id).label("last_run_id"),
        newest(r.members, r.members.is_not(None)).label("members"),
        newest(r.error, r.error.is_not(None)).label("last_error"),
        newest(r.finished_at, r.status == "success", r.finished_at.is_not(None)).label("last_success_at"),
    )
    return {row.key: row for row in connection.execute(query)}


def outbox_counts(connection: Connection) -> dict[str, tuple[int, int]]:
    """Outbox rows per audience, and of those the ones in doubt: marked so, or inside a chunk
    that a stopped run left on the wire (settled into the mark by that audience's next run).
    One pass over the outbox for both."""
    p = m.pending.c
    doubt = sa.or_(p.in_doubt.is_(True), m.on_the_wire())
    query = sa.select(p.audience_key, sa.func.count(), sa.func.count().filter(doubt)).group_by(p.audience_key)
    return {key: (int(rows), int(in_doubt)) for key, rows, in_doubt in connection.execute(query)}


def baseline_counts(connection: Connection) -> dict[str, int]:
    """Users in each audience's baseline (audiences with none are absent): the kept
    `baseline_count`, and, for audiences a delivery may be changing (NULL), their rows counted
    through the primary key. Counting every audience took 200 ms at a million rows on
    PostgreSQL. (Two statements: one with a correlated count costs PostgreSQL's planner a
    JIT compilation of 170 ms for the subquery it then never runs.)"""
    a = m.audiences.c
    kept: dict[str, int | None] = {
        key: count for key, count in connection.execute(sa.select(a.key, a.baseline_count))
    }
    unknown = [key for key, count in kept.items() if count is None]
    if unknown:
        kept.update(_count_baselines(connection, unknown))
    return {key: int(count) for key, count in kept.items() if count}


def forget_baseline_counts(connection: Connection, keys: Sequence[str]) -> None:
    """Before a delivery changes these audiences' baselines: readers count them live."""
    query = m.audiences.update().where(m.audiences.c.key.in_(keys), m.audiences.c.baseline_count.is_not(None))
    connection.execute(query.values(baseline_count=None))


def recount_baselines(connection: Connection, keys: Sequence[str], unknown_only: bool = False) -> None:
    """Keep these audiences' baseline counts (or only those not kept), once nothing is
    changing their baselines. One grouped count, not one correlated per audience: PostgreSQL
    JIT-compiles the latter (0.2 s at 200 audiences)."""
    a = m.audiences.c
    if unknown_only:
        unknown = sa.select(a.key).where(a.key.in_(keys), a.baseline_count.is_(None))
        keys = list(connection.execute(unknown).scalars())
    if not keys:
        return
    counts = _count_baselines(connection, keys)
    update = m.audiences.update().where(a.key == sa.bindparam("k")).values(baseline_count=sa.bindparam("n"))
    connection.execute(update, [{"k": key, "n": counts.get(key, 0)} for key in keys])


def _count_baselines(connection: Connection, keys: Sequence[str]) -> dict[str, int]:
    """The baseline rows of these audiences, counted (audiences with none are absent)."""
    b = m.baseline.c
    query = sa.select(b.audience_key, sa.func.count()).where(b.audience_key.in_(keys))
    return {key: int(count) for key, count in connection.execute(query.group_by(b.audience_key))}


# --- the daemon's plan, for many audiences in one query each ------------------------------


def last_finished_by_audience(connection: Connection, keys: list[str] | None = None) -> dict[str, datetime]:
    """When each audience's last run ended (audiences that never finished a run are absent)."""
    return _latest_by_audience(connection, keys)


def last_success_by_audience(connection: Connection, keys: list[str] | None = None) -> dict[str, datetime]:
    return _latest_by_audience(connection, keys, m.runs.c.status == "success")


def _latest_by_audience(
    connection: Connection, keys: list[str] | None, *where: sa.ColumnElement[bool]
) -> dict[str, datetime]:
    r = m.runs.c
    query = sa.select(r.audience_key, sa.func.max(r.finished_at)).where(r.finished_at.is_not(None), *where)
    if keys is not None:
        query = query.where(r.audience_key.in_(keys))
    rows = connection.execute(query.group_by(r.audience_key))
    return dict(rows.all())  # type: ignore[arg-type]


def baselined_keys(connection: Connection) -> set[str]:
    """Audiences whose first full diff is committed (see has_baseline)."""
    query = sa.select(m.audiences.c.key).where(m.audiences.c.baseline_at.is_not(None))
    return set(connection.execute(query).scalars())


def pending_by_audience(connection: Connection) -> dict[str, int]:
    p = m.pending.c
    query = sa.select(p.audience_key, sa.func.count()).group_by(p.audience_key)
    return {key: int(count) for key, count in connection.execute(query)}


def publish_next_runs(connection: Connection, planned: dict[str, datetime | None]) -> None:
    """Write each audience's next run (None: not scheduled) in one executemany."""
    if not planned:
        return
    statement = (
        m.audiences.update()
        .where(m.audiences.c.key == sa.bindparam("audience"))
        .values(next_run_at=sa.bindparam("at"))
    )
    connection.execute(statement, [{"audience": key, "at": at} for key, at in planned.items()])


# --- resync requests ----------------------------------------------------------------------


def request_resync(connection: Connection, keys: list[str], requested_by: str) -> list[int]:
    """Record a full resync request per audience (one pending request each is enough)."""
    ids = []
    for key in keys:
        existing = connection.execute(
            sa.select(m.resync_requests.c.id).where(
                m.resync_requests.c.audience_key == key, m.resync_requests.c.status == "pending"
            )
        ).scalar_one_or_none()
        if existing is None:
            existing = connection.execute(
                m.resync_requests.insert().values(
                    audience_key=key,
                    requested_at=utcnow(),
                    requested_by=requested_by,
                    status="pending",
                )
            ).inserted_primary_key[0]
        ids.append(int(existing))
    return ids


def pending_resync_keys(connection: Connection) -> list[str]:
    return list(
        connection.execute(
            sa.select(m.resync_requests.c.audience_key)
            .where(m.resync_requests.c.status == "pending")
            .distinct()
        ).scalars()
    )


# --- retention ----------------------------------------------------------------------------


def prune_changes(connection: Connection, older_than: datetime, limit: int | None = None) -> int:
    """Delete per-change history (`changes`) recorded before `older_than`, at most `limit` rows
    (None: all); run records are kept. Returns how many rows were deleted."""
    condition = m.changes.c.at < older_than
    if limit is None:
        statement = m.changes.delete().where(condition)
    else:
        batch = sa.select(m.changes.c.id).where(condition).limit(limit)
        statement = m.changes.delete().where(m.changes.c.id.in_(batch))
    return connection.execute(statement).rowcount or 0


# --- the status page: every audience at once, one statement per table -----------------------


def audience_overview(connection: Connection) -> dict[str, dict[str, Any]]:
    """Every `audiences` row, with the id of its newest run and when its newest successful run
    ended. One statement: the correlated subqueries each walk ix_runs_audience_started
    backwards from the audience's newest run, so the cost does not grow with the history."""
    r = m.runs.c
    newest = _newest_run_value
    query = sa.select(
        m.audiences,
        newest(r.id).label("last_run_id"),
        newest(r.finished_at, r.status == "success").label("last_success_at"),
    )
    return {row.key: dict(row._mapping) for row in connection.execute(query)}


def runs_by_id(connection: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    rows = connection.execute(sa.select(m.runs).where(m.runs.c.id.in_(ids)))
    return {row.id: _run_record(row._mapping) for row in rows}


def recent_runs(connection: Connection, key: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """Run records, newest first (`audience-sync history`, the status page), by an index either
    way: across audiences by id (ids are taken as runs start; runs are never pruned, and sorting
    a year of them by started_at took 175 ms on PostgreSQL), for one audience by
    ix_runs_audience_started."""
    r = m.runs.c
    query = sa.select(m.runs).limit(limit)
    if key is None:
        query = query.order_by(r.id.desc())
    else:
        query = query.where(r.audience_key == key).order_by(r.started_at.desc(), r.id.desc())
    return [_run_record(row._mapping) for row in connection.execute(query)]


def runs_since(connection: Connection, keys: list[str], since: datetime) -> list[dict[str, Any]]:
    """The runs of these audiences started at or after `since`, oldest first per audience
    (the keys let ix_runs_audience_started find them without reading older runs)."""
    if not keys:
        return []
    query = (
        sa.select(m.runs)
        .where(m.runs.c.audience_key.in_(keys), m.runs.c.started_at >= since)
        .order_by(m.runs.c.audience_key, m.runs.c.started_at, m.runs.c.id)
    )
    return [_run_record(row._mapping) for row in connection.execute(query)]


def window_summary(
    connection: Connection, keys: list[str], since: datetime, measuring: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per audience, over its runs started at or after `since`: how many, the newest with an
    error, and the newest of the `measuring` kinds that counted members. One grouped query."""
    if not keys:
        return {}
    r = m.runs.c
    query = (
        sa.select(
            r.audience_key,
            sa.func.count().label("runs"),
            sa.func.max(r.id).filter(r.error.is_not(None)).label("error_run_id"),
            sa.func.max(r.id).filter(r.members.is_not(None), r.kind.in_(measuring)).label("measured_run_id"),
        )
        .where(r.audience_key.in_(keys), r.started_at >= since)
        .group_by(r.audience_key)
    )
    return {row.audience_key: dict(row._mapping) for row in connection.execute(query)}


def outbox_and_baseline_counts(connection: Connection) -> dict[str, tuple[int, int, int]]:
    """Per audience: (users Planhat has as `true`, changes pending, of which in doubt)."""
    baseline = baseline_counts(connection)
    outbox = outbox_counts(connection)
    keys = baseline.keys() | outbox.keys()
    return {key: (baseline.get(key, 0), *outbox.get(key, (0, 0))) for key in keys}


COMPOUND_TERMS = 250  # SELECTs per UNION ALL: SQLite allows 500 by default


def change_samples(
    connection: Connection, runs: list[dict[str, Any]], per_run: int
) -> dict[int, list[dict[str, Any]]]:
    """Up to `per_run` recorded changes of each run, its failures and changes in doubt first.

    A UNION ALL of one LIMITed index lookup (ix_changes_run_id) per run, so a run of a
    million changes costs as little as one of ten; one statement per 250 lookups."""
    c = m.changes.c
    columns = (c.id, c.run_id, c.user_ref, c.value, c.outcome, c.error, c.at)
    parts = []
    for run in runs:
        parts.append(sa.select(*columns).where(c.run_id == run["id"]).limit(per_run))
        if run["failed"] or run["in_doubt"]:
            failures = sa.select(*columns).where(c.run_id == run["id"], c.outcome != "delivered")
            parts.append(failures.limit(per_run))
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for first in range(0, len(parts), COMPOUND_TERMS):
        # SQLite takes no LIMIT inside a compound SELECT, only in a subquery.
        union = sa.union_all(*(sa.select(part.subquery()) for part in parts[first : first + COMPOUND_TERMS]))
        for row in connection.execute(union):
            found.setdefault(row.run_id, {})[row.id] = dict(row._mapping)
    samples = {}
    for run_id, changes in found.items():
        ordered = sorted(changes.values(), key=lambda ch: (ch["outcome"] == "delivered", ch["id"]))
        samples[run_id] = ordered[:per_run]
    return samples
