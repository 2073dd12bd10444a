"""The run of an audience whose source has `planner_schema`: its snapshot is kept and diffed
in the warehouse (snapshot/planner.py), and only the changed users' rows travel to the state
database, where the usual queueing rewrites their outbox rows.

The hand-off between the two databases (docs/design.md, "The planner"):

1. **Recover.** The state database's `planner_snapshots` row names generation G, the snapshot
   the outbox was last computed from. If G's snapshot is not there but G - 1's and G's per-run
   table are, a kill stopped G's advance after its commit: the advance is finished first (step
   4, which may run any number of times). Every other planner table of the audience is a
   leftover and is dropped: a newer one is a run that died before its outbox commit (its
   changes were never queued, so they are computed again).
2. **Diff in the warehouse.** The query's rows are joined to G's snapshot, and the rows of
   the identifiers that changed, as they were and as they are, go into G + 1's per-run table.
   No new snapshot is written.
3. **Queue.** Those rows are read out; in one state transaction the outbox of those users is
   rewritten, the baseline-based guard applies, and the `planner_snapshots` row moves to
   G + 1. This commit is the hand-off.
4. **Advance.** G's snapshot is changed in place from the per-run table (the changed
   identifiers' rows deleted, their new rows inserted: idempotent), renamed to G + 1's, and the
   per-run table is dropped, each step in a transaction of its own. It runs beside the
   delivery (`RunReport.follow_up`, sync/run.py); an error there leaves it to the next run.

A kill before step 3 commits leaves G the committed generation: the next run drops G + 1's
table and diffs against G again, so no change is lost. A kill after it leaves G + 1 committed:
the next run finishes the advance (applying the per-run table again if the kill came before
the rename) and diffs against G + 1, so nothing is queued twice. The outbox is keyed on the
user, so a change queued again can only be the same value.

A full run, a reconcile's repairing run, a first run, and any run whose committed generation
does not fit (another query, another schema, a streamed run since, a snapshot table gone)
write G + 1's snapshot whole (`CREATE TABLE ... AS`) and diff it against the baseline as a
streamed run does; its advance drops every other table.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..config import AudienceSettings, SafetySettings
from ..errors import SourceError
from ..snapshot import diff, identities, planner, staging, traits
from ..snapshot.contract import ReadStats
from ..snapshot.sources import SourcePool, read_members
from ..state import outbox, runs
from ..state import planner as planner_state
from ..state.database import begin_write, driver_message
from ..support.logs import run_context
from ..support.text import first_line
from .queueing import discard_stage, queue_unless_blocked, stage_and_measure
from .reports import RunReport, SyncOptions

log = logging.getLogger(__name__)

SCHEMA_ATTEMPTS = 4


@dataclass(frozen=True)
class Plan:
    """What this run does in the warehouse."""

    current: planner.Generation
    previous: planner.Generation | None  # None: the new snapshot is read whole
    columns: list[str]  # the snapshot's contract columns
    committed: planner_state.Committed | None


def stage_and_queue(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
    as_of: datetime,
) -> tuple[diff.DiffCounts, int]:
    """queueing's `_stage_and_queue` for a planner source: steps 1 to 4 above."""
    with engine.connect() as connection:
        committed = planner_state.committed(connection, audience.key)
        own_last = committed is not None and runs.last_queued(connection, audience.key) == committed.run_id
    plan = diff_in_warehouse(pool, audience, report.kind, committed, own_last, as_of)
    try:
        counts, skipped = _queue(engine, pool, audience, report, options, safety, as_of, plan)
    except Exception:
        discard(pool, audience, plan.current)  # best effort: the next run's recovery does it too
        raise
    if report.status == "blocked":
        discard(pool, audience, plan.current)
    else:  # committed: the advance runs beside the delivery (sync/run.py)
        report.follow_up = functools.partial(advance_or_leave, pool, audience, plan, report.run_id)
    return counts, skipped


def diff_in_warehouse(
    pool: SourcePool,
    audience: AudienceSettings,
    kind: str,
    committed: planner_state.Committed | None,
    own_last: bool,
    as_of: datetime,
) -> Plan:
    """Steps 1 and 2: finish an interrupted advance, drop the leftovers, then either the per-run
    table of changed rows (when the committed snapshot fits) or a new snapshot, written whole."""
    source = pool.settings(audience.source)
    schema = source.planner_schema
    assert schema is not None
    ours = committed is not None and (committed.source, committed.planner_schema) == (source.name, schema)
    number = (committed.generation if committed is not None and ours else 0) + 1
    current = planner.Generation(schema, audience.key, number)
    previous = planner.Generation(schema, audience.key, number - 1) if ours else None
    _ensure_schema(pool, audience, schema)
    there = previous is not None and finish_advance(pool, audience, previous)
    with _warehouse(pool, audience, schema) as connection:
        keep = previous.snapshot.name if previous is not None and there else None
        planner.drop_all_but(connection, schema, audience.key, keep)
        fits = (
            kind == "incremental"
            and there
            and committed is not None
            and own_last
            and committed.fingerprint == planner.fingerprint(audience)
        )
        params = planner.audience_params(audience, as_of)
        named = planner.columns_of(connection.execute(planner.query_columns(audience), params))
        columns = planner.contract_columns(audience, named)
        started = time.perf_counter()
        if fits and previous is not None:
            connection.execute(planner.changed_rows(previous, current, audience, columns), params)
            plan = Plan(current, previous, columns, committed)
            done = "the changed rows of generation %d found"
        else:
            connection.execute(planner.build_snapshot(current, audience, columns), params)
            planner.index_snapshot(connection, current.snapshot)
            plan = Plan(current, None, columns, committed)
            done = "snapshot %d written whole"
        spent = time.perf_counter() - started
        log.info(f"audience %r: planner schema: {done} in %.2fs", audience.key, number, spent)
    return plan


def finish_advance(pool: SourcePool, audience: AudienceSettings, committed: planner.Generation) -> bool:
    """Step 1: make sure the committed generation's snapshot is there, finishing its advance
    when a kill stopped it after the commit. Returns whether the snapshot is there."""
    schema, key, number = committed.schema, committed.key, committed.number
    earlier = planner.Generation(schema, key, number - 1)
    with _warehouse(pool, audience, schema) as connection:
        if planner.exists(connection, schema, committed.snapshot.name):
            return True
        stopped = planner.exists(connection, schema, committed.changes.name) and planner.exists(
            connection, schema, earlier.snapshot.name
        )
        columns = planner.changed_columns(connection, committed.changes) if stopped else []
    if not stopped:
        return False
    log.info("audience %r: planner schema: finishing the advance to snapshot %d", key, number)
    advance_in_place(pool, audience, earlier, committed, columns)
    return True


def _ensure_schema(pool: SourcePool, audience: AudienceSettings, schema: str) -> None:
    """Create the planner schema when it is missing, in a transaction of its own: two audiences
    of the source may race to create it, and the loser finds it there."""
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with _warehouse(pool, audience, schema) as connection:
                planner.ensure_schema(connection, schema)
            return
        except SourceError:
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))  # the other creator commits (DuckDB: a catalog conflict)


def _queue(
    engine: Engine,
    pool: SourcePool,
    audience: AudienceSettings,
    report: RunReport,
    options: SyncOptions,
    safety: SafetySettings,
    as_of: datetime,
    plan: Plan,
) -> tuple[diff.DiffCounts, int]:
    """Step 3: the changes (or the whole snapshot) into the outbox, and the generation recorded,
    in one state transaction."""
    scope = staging.SCOPE if plan.previous is not None else None
    with engine.connect() as connection:
        try:
            if plan.previous is not None:
                counts, skipped = _stage_changes(connection, pool, audience, as_of, plan)
            else:
                whole = planner.reading(audience, planner.every_row(plan.current.snapshot, plan.columns))
                counts, skipped = stage_and_measure(connection, pool, whole, as_of, write=True)
            now = queue_unless_blocked(
                connection, audience, report, options, safety, counts, skipped, scope=scope
            )
            if now is None:
                return counts, skipped
            assert report.run_id is not None
            source = pool.settings(audience.source)
            assert source.planner_schema is not None
            done = planner_state.Committed(
                source=source.name,
                planner_schema=source.planner_schema,
                generation=plan.current.number,
                fingerprint=planner.fingerprint(audience),
                members=counts.members,
                run_id=report.run_id,
            )
            planner_state.record(connection, audience.key, done, now)
            connection.commit()
            return counts, skipped
        finally:
            discard_stage(connection)


def _stage_changes(
    connection: Connection, pool: SourcePool, audience: AudienceSettings, as_of: datetime, plan: Plan
) -> tuple[diff.DiffCounts, int]:
    """Stage the changed users' current rows, with every user they touch (their previous rows'
    identifiers too) in the scope; measure them against the baseline under the write lock."""
    assert plan.previous is not None and plan.committed is not None
    current = plan.current
    staging.create_stage(connection)
    before = planner.rows_of_changed(current.changes, plan.columns, now=False)
    earlier = ReadStats()
    staging.load_stage(connection, _read(pool, audience, before, earlier, as_of), with_value=audience.trait)
    were = staging.add_stage_to_scope(connection)  # the changed users who were members
    stats = ReadStats()
    staging.create_stage(connection)
    after = planner.rows_of_changed(current.changes, plan.columns, now=True)
    given = staging.load_stage(
        connection, _read(pool, audience, after, stats, as_of), with_value=audience.trait
    )
    staged = diff.staged_count(connection)
    staging.add_stage_to_scope(connection)
    members = plan.committed.members - were + staged
    begin_write(connection)
    outbox.settle_in_flight(connection, audience.key)
    if audience.trait:
        counts = traits.measure_changed(connection, audience.key, audience.on_exit, staging.SCOPE, members)
    else:
        counts = diff.measure_changed(connection, audience.key, staging.SCOPE, members)
    counts = identities.carry_over(connection, audience.key, counts, staging.SCOPE)
    log.info(
        "audience %r: read %d rows out of the planner schema (%d of the previous snapshot, %d of the new)",
        audience.key,
        earlier.rows + stats.rows,
        earlier.rows,
        stats.rows,
    )
    return counts, stats.skipped + given - staged


def _read(pool: SourcePool, audience: AudienceSettings, select: sa.Select[Any], stats: ReadStats,
          as_of: datetime) -> Any:  # fmt: skip
    return read_members(pool, planner.reading(audience, select), stats, as_of=as_of)


def advance_or_leave(pool: SourcePool, audience: AudienceSettings, plan: Plan, run_id: int | None) -> None:
    """Step 4, after the commit, beside the delivery; a warehouse error leaves it to the next
    run's step 1 (the run's changes are committed: it does not fail for this)."""
    with run_context(run_id):
        try:
            advance(pool, audience, plan)
        except SourceError as exc:
            log.warning("audience %r: %s (the next run finishes the advance)", audience.key, first_line(exc))


def advance(pool: SourcePool, audience: AudienceSettings, plan: Plan) -> None:
    """Step 4, after the commit."""
    if plan.previous is None:  # written whole: every other table goes
        drop_others(pool, audience, plan.current)
        return
    advance_in_place(pool, audience, plan.previous, plan.current, plan.columns)


def advance_in_place(
    pool: SourcePool,
    audience: AudienceSettings,
    previous: planner.Generation,
    current: planner.Generation,
    columns: list[str],
) -> None:
    started = time.perf_counter()
    apply_changes(pool, audience, previous, current, columns)
    rename_snapshot(pool, audience, previous, current)
    drop_changes(pool, audience, current)
    log.info(
        "audience %r: planner schema: snapshot advanced in place to generation %d in %.2fs",
        audience.key,
        current.number,
        time.perf_counter() - started,
    )


def apply_changes(
    pool: SourcePool,
    audience: AudienceSettings,
    previous: planner.Generation,
    current: planner.Generation,
    columns: list[str],
) -> None:
    with _warehouse(pool, audience, current.schema) as connection:
        for statement in planner.apply_changes(previous.snapshot, current.changes, columns):
            connection.execute(statement)


def rename_snapshot(
    pool: SourcePool, audience: AudienceSettings, previous: planner.Generation, current: planner.Generation
) -> None:
    with _warehouse(pool, audience, current.schema) as connection:
        connection.execute(planner.rename(previous.snapshot, current))


def drop_changes(pool: SourcePool, audience: AudienceSettings, current: planner.Generation) -> None:
    with _warehouse(pool, audience, current.schema) as connection:
        planner.drop(connection, current.schema, current.changes.name)


def drop_others(pool: SourcePool, audience: AudienceSettings, current: planner.Generation) -> None:
    with _warehouse(pool, audience, current.schema) as connection:
        planner.drop_all_but(connection, current.schema, audience.key, current.snapshot.name)


def discard(pool: SourcePool, audience: AudienceSettings, current: planner.Generation) -> None:
    """A run that committed nothing: its own tables go (its per-run table, or the snapshot it
    wrote whole); the committed snapshot stays."""
    try:
        with _warehouse(pool, audience, current.schema) as connection:
            planner.drop(connection, current.schema, current.changes.name)
            planner.drop(connection, current.schema, current.snapshot.name)
    except SourceError as exc:
        log.warning("audience %r: %s (dropped by its next run)", audience.key, first_line(exc))


def drop_tables(pool: SourcePool, key: str, source: str, schema: str) -> list[str]:
    """Every planner table of an audience (retired): returns the names dropped."""
    with _warehouse_of(pool, source, schema, f"audience {key!r}") as connection:
        return planner.drop_all_but(connection, schema, key, None)


class _warehouse_of:
    """A transaction on the source, its errors one SourceError line naming the planner schema
    and the grant it needs."""

    def __init__(self, pool: SourcePool, source: str, schema: str, what: str) -> None:
        self._engine = pool.engine(source)
        self._where = f"{what} (source {source!r}, planner_schema {schema!r})"
        self._schema = schema
        self._context: Any = None

    def __enter__(self) -> Connection:
        try:
            self._context = self._engine.begin()
            connection: Connection = self._context.__enter__()
        except sa.exc.SQLAlchemyError as exc:
            raise self._error(exc) from exc
        return connection

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        try:
            self._context.__exit__(kind, error, trace)
        except sa.exc.SQLAlchemyError as exc:
            raise self._error(exc) from exc
        if isinstance(error, sa.exc.SQLAlchemyError):
            raise self._error(error) from error

    def _error(self, exc: sa.exc.SQLAlchemyError) -> SourceError:
        message = driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else str(exc).splitlines()[0]
        needs = grant(self._engine, self._schema)
        return SourceError(f"{self._where}: {message} (the sync needs CREATE rights there: {needs})")


def _warehouse(pool: SourcePool, audience: AudienceSettings, schema: str) -> _warehouse_of:
    return _warehouse_of(pool, audience.source, schema, f"audience {audience.key!r}")


def grant(engine: Engine, schema: str) -> str:
    """The statement that gives the sync's user what the planner needs, in the source's dialect."""
    user = engine.url.username or "<the sync's user>"
    name = engine.dialect.name
    if name == "snowflake":
        return f"GRANT USAGE, CREATE TABLE ON SCHEMA {schema} TO ROLE <the sync's role>"
    if name == "bigquery":
        return f"grant the sync's service account roles/bigquery.dataEditor on dataset {schema}"
    if name == "duckdb":
        return "open the DuckDB file read-write (no other process holding it)"
    return f"CREATE SCHEMA IF NOT EXISTS {schema}; GRANT USAGE, CREATE ON SCHEMA {schema} TO {user}"
