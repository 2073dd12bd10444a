"""The planner: an audience's snapshot kept in its source's `planner_schema`, and diffed there.

For a source with `planner_schema`, an audience's snapshot is a table of that schema holding
its query's rows (the contract's columns of `<query>`, or of the compiled definition on
events, with each row's identifier computed once). A run that reads the audience whole (the
first, a full one, one whose snapshot does not fit) writes a new snapshot with
`CREATE TABLE ... AS`. An incremental run joins the query's rows to the snapshot in the
warehouse with set-based SQL and writes only the changed identifiers' rows, as they were and
as they are, into a per-run table; only those rows travel to the state database, through the
query contract as a streamed query's do (`contract`), so both paths read a row the same way.
After the state database has committed the run, the snapshot is changed in place from the
per-run table (delete the changed identifiers' rows, insert their new ones: applying it twice
leaves the same snapshot) and renamed to the new generation. The hand-off protocol (which
generation counts, how a killed advance is finished) is in sync/planned.py and docs/design.md.

Tables, per audience key and generation N (1, 2, ...), in the planner schema:

    as_snap_<key>_<N>   the snapshot as of generation N (renamed when it advances in place)
    as_chg_<key>_<N>    the rows of the identifiers that changed between N - 1 and N: their
                        rows in N - 1 (planner_new false) and in N (planner_new true)

Everything here is SQLAlchemy Core, so one function renders the SQL for PostgreSQL, DuckDB,
Snowflake and BigQuery (tests/test_planner_sql.py keeps golden copies of the last two).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from ..config import AudienceSettings
from .contract import IDENTIFIER_COLUMNS, TRAIT_COLUMNS, VALUE_COLUMN

SNAPSHOT = "as_snap"
CHANGES = "as_chg"
REF = "planner_ref"  # each row's identifier, in the snapshot and the per-run table
NEW = "planner_new"  # the per-run table's side: true a row as it is now, false as it was
_MAX_STEM = 40  # a key longer than this is cut and hashed: names stay under every dialect's limit


class CreateTableAs(Executable, ClauseElement):
    """`CREATE TABLE <schema>.<name> AS <select>`, its parameters bound as the select's are."""

    inherit_cache = False

    def __init__(self, table: sa.TableClause, select: sa.Select[Any] | sa.CompoundSelect[Any]) -> None:
        self.table = table
        self.select = select


@compiles(CreateTableAs)
def _create_table_as(element: CreateTableAs, compiler: SQLCompiler, **kw: Any) -> str:
    name = compiler.preparer.format_table(element.table)
    return f"CREATE TABLE {name} AS {compiler.process(element.select, **kw)}"


class RenameTable(Executable, ClauseElement):
    """`ALTER TABLE <schema>.<name> RENAME TO <new name>`, within the same schema."""

    inherit_cache = False

    def __init__(self, table: sa.TableClause, name: str) -> None:
        self.table = table
        self.name = name


@compiles(RenameTable)
def _rename_table(element: RenameTable, compiler: SQLCompiler, **kw: Any) -> str:
    old = compiler.preparer.format_table(element.table)
    return f"ALTER TABLE {old} RENAME TO {compiler.preparer.quote(element.name)}"


@compiles(RenameTable, "snowflake")
def _rename_table_snowflake(element: RenameTable, compiler: SQLCompiler, **kw: Any) -> str:
    # Snowflake moves a table renamed to an unqualified name into the session's schema.
    old = compiler.preparer.format_table(element.table)
    new = compiler.preparer.format_table(table(element.table.schema or "", element.name))
    return f"ALTER TABLE {old} RENAME TO {new}"


class CreateRefIndex(Executable, ClauseElement):
    """`CREATE INDEX ON <snapshot> (planner_ref)`, PostgreSQL's (it names the index itself, so
    a snapshot renamed to a later generation keeps an index whose name no later one takes)."""

    inherit_cache = False

    def __init__(self, table: sa.TableClause) -> None:
        self.table = table


@compiles(CreateRefIndex)
def _create_ref_index(element: CreateRefIndex, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CREATE INDEX ON {compiler.preparer.format_table(element.table)} ({REF})"


# --- names ------------------------------------------------------------------------------------


def stem(key: str) -> str:
    if len(key) <= _MAX_STEM:
        return key
    return f"{key[: _MAX_STEM - 9]}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def table_name(prefix: str, key: str, generation: int) -> str:
    return f"{prefix}_{stem(key)}_{generation}"


def table(schema: str, name: str) -> sa.TableClause:
    return sa.table(name, schema=schema)


def generations(connection: Connection, schema: str, key: str) -> dict[str, int]:
    """The planner tables of one audience in the schema: name -> generation."""
    pattern = re.compile(rf"(?:{SNAPSHOT}|{CHANGES})_{re.escape(stem(key))}_(\d+)")
    found = {}
    for name in sa.inspect(connection).get_table_names(schema=schema):
        match = pattern.fullmatch(name.lower())
        if match:
            found[name] = int(match.group(1))
    return found


def drop(connection: Connection, schema: str, name: str) -> None:
    connection.execute(sa.schema.DropTable(sa.Table(name, sa.MetaData(), schema=schema), if_exists=True))


def drop_all_but(connection: Connection, schema: str, key: str, keep: str | None) -> list[str]:
    """Drop the audience's planner tables except `keep` (the committed snapshot); returns them."""
    dropped = [name for name in generations(connection, schema, key) if name != keep]
    for name in dropped:
        drop(connection, schema, name)
    return dropped


def ensure_schema(connection: Connection, schema: str) -> None:
    if schema not in sa.inspect(connection).get_schema_names():
        connection.execute(sa.schema.CreateSchema(schema, if_not_exists=True))


def exists(connection: Connection, schema: str, name: str) -> bool:
    return sa.inspect(connection).has_table(name, schema=schema)


# --- what the query is --------------------------------------------------------------------------


# The shape of a snapshot table: a snapshot of another shape is not diffed against, but read
# anew (v2: the contract columns only, and the identifier computed once, when it is written;
# v3: changed in place, indexed on the identifier on PostgreSQL).
SNAPSHOT_SHAPE = "v3"


def fingerprint(audience: AudienceSettings) -> str:
    """What the audience's rows mean: a changed query (or definition, kind, level) is not diffed
    against a snapshot of the old one, whose columns may not even compare."""
    text = "\0".join(
        (SNAPSHOT_SHAPE, audience.kind, audience.level, audience.query, audience.definition or "")
    )
    return hashlib.sha256(text.encode()).hexdigest()


def audience_select(audience: AudienceSettings) -> sa.Select[Any]:
    """The audience's rows as one SELECT: its compiled definition on events, or its SQL as a
    subquery."""
    if audience.compiled is not None:
        select: sa.Select[Any] = audience.compiled.select
        return select
    inner = sa.text(audience.query.strip().rstrip(";")).columns().subquery("audience_sync_query")
    return sa.select(sa.literal_column("*")).select_from(inner)


def audience_params(audience: AudienceSettings, as_of: datetime) -> dict[str, Any]:
    return dict(audience.compiled.params(as_of)) if audience.compiled is not None else {}


def contract_columns(audience: AudienceSettings, names: list[str]) -> list[str]:
    """The snapshot's columns that the contract reads (as the warehouse spells them): the rows
    compare on these only."""
    wanted: tuple[str, ...] = (
        ("company_id", "name") if audience.level == "account" else IDENTIFIER_COLUMNS + TRAIT_COLUMNS
    )
    if audience.trait:
        wanted += (VALUE_COLUMN,)
    by_lower = {name.lower(): name for name in names}
    return [by_lower[column] for column in wanted if column in by_lower]


def ref_expression(
    audience: AudienceSettings, source: sa.TableClause | None, columns: list[str]
) -> sa.ColumnElement[Any]:
    """A row's identifier in the warehouse, as the contract takes it: company_id for an account,
    else user_id when given, else email, as trimmed text."""
    lowered = {column.lower(): column for column in columns}

    def text(name: str) -> sa.ColumnElement[Any] | None:
        if name not in lowered:
            return None
        return sa.func.trim(sa.cast(sa.column(lowered[name], _selectable=source), sa.String))

    parts = [text("company_id")] if audience.level == "account" else [text("user_id"), text("email")]
    present = [part for part in parts if part is not None]
    if not present:  # no identifier at all: the contract refuses every row
        return sa.cast(sa.null(), sa.String)
    return present[0] if len(present) == 1 else sa.func.coalesce(*present)


# --- the SQL of a run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One generation's tables of one audience."""

    schema: str
    key: str
    number: int

    @property
    def snapshot(self) -> sa.TableClause:
        return table(self.schema, table_name(SNAPSHOT, self.key, self.number))

    @property
    def changes(self) -> sa.TableClause:
        return table(self.schema, table_name(CHANGES, self.key, self.number))


def query_columns(audience: AudienceSettings) -> sa.Select[Any]:
    """The audience's query with no rows: what its columns are called, before the snapshot is
    written (the warehouse plans it; it reads nothing)."""
    return sa.select(sa.literal_column("*")).select_from(audience_select(audience).subquery()).limit(0)


def columns_of(result: sa.CursorResult[Any]) -> list[str]:
    names = list(result.keys())
    result.close()
    return names


def query_rows(audience: AudienceSettings, columns: list[str]) -> sa.Select[Any]:
    """The query's rows as a snapshot keeps them: each row's identifier (REF, computed here
    once, so that the diff and the read-out compare a stored column instead of trimming and
    casting every row again) and the contract `columns`; the query's other columns are not
    kept."""
    rows = audience_select(audience).subquery("audience_rows")
    ref = ref_expression(audience, None, columns).label(REF)  # unqualified: the one FROM is `rows`
    picked: list[sa.ColumnClause[Any]] = [sa.column(c) for c in columns]
    return sa.select(ref, *picked).select_from(rows)


def build_snapshot(generation: Generation, audience: AudienceSettings, columns: list[str]) -> CreateTableAs:
    """A new snapshot, written whole."""
    return CreateTableAs(generation.snapshot, query_rows(audience, columns))


def index_snapshot(connection: Connection, snapshot: sa.TableClause) -> None:
    """On PostgreSQL, index a new snapshot on its identifier, and give it statistics: the
    per-run table's probes and the advance's delete then touch the changed identifiers' rows
    only, not every row (the other warehouses scan; DuckDB's columnar scan of one column is
    cheap)."""
    if connection.dialect.name == "postgresql":
        connection.execute(CreateRefIndex(snapshot))
        name = connection.dialect.identifier_preparer.format_table(snapshot)
        connection.exec_driver_sql(f"ANALYZE {name}")


def _rows(snapshot: sa.TableClause, columns: list[str]) -> sa.Select[Any]:
    picked: list[sa.ColumnClause[Any]] = [sa.column(c, _selectable=snapshot) for c in (REF, *columns)]
    return sa.select(*picked).select_from(snapshot)


def changed_rows(
    previous: Generation, current: Generation, audience: AudienceSettings, columns: list[str]
) -> CreateTableAs:
    """The per-run table: the rows, in the previous snapshot and now, of every identifier with a
    row on one side and not the same row on the other (entered, exited, or any contract column
    changed).

    The query's rows are joined to the previous snapshot (one full outer join on the
    identifier, the other columns compared NULL-safely in its condition; a hash join in the
    warehouse): a row left unmatched on either side is a change. The identifiers' rows as they
    were are the snapshot's; as they are, their unmatched new rows plus those of their old rows
    that matched (a user listed on several rows may keep some). No new snapshot is written:
    the previous one advances from this table (`apply_changes`). Writing the new snapshot whole,
    joining the two and scanning both to read out took 32.4 s at 10M members on PostgreSQL,
    against 20.6 s for this statement and 3.4 s for the advance (docs/performance.md)."""
    new = query_rows(audience, columns).subquery("new_rows")
    old = _rows(previous.snapshot, columns).subquery("old_rows")
    same = sa.and_(new.c[REF] == old.c[REF], *(new.c[c].is_not_distinct_from(old.c[c]) for c in columns))
    is_new = new.c[REF].is_not(None)
    ref = sa.func.coalesce(new.c[REF], old.c[REF])
    unmatched = (
        sa.select(
            ref.label(REF),
            is_new.label(NEW),
            *(sa.case((is_new, new.c[c]), else_=old.c[c]).label(c) for c in columns),
        )
        .select_from(new.outerjoin(old, same, full=True))
        .where(sa.or_(new.c[REF].is_(None), old.c[REF].is_(None)), ref.is_not(None))
        .cte("unmatched")
    )
    snapshot = previous.snapshot
    was = (
        _rows(snapshot, columns)
        .where(sa.column(REF, _selectable=snapshot).in_(sa.select(unmatched.c[REF])))
        .cte("was")
    )
    gone = unmatched.alias("gone")
    kept = sa.select(sa.true().label(NEW), *_picked(was, columns)).where(
        ~sa.exists().where(
            ~gone.c[NEW],
            gone.c[REF] == was.c[REF],
            *(gone.c[c].is_not_distinct_from(was.c[c]) for c in columns),
        )
    )
    rows = sa.union_all(
        sa.select(sa.false().label(NEW), *_picked(was, columns)),
        sa.select(sa.true().label(NEW), *_picked(unmatched, columns)).where(unmatched.c[NEW]),
        kept,
    )
    return CreateTableAs(current.changes, rows)


def _picked(rows: sa.CTE, columns: list[str]) -> list[sa.ColumnElement[Any]]:
    return [rows.c[c] for c in (REF, *columns)]


def _now(changes: sa.TableClause) -> sa.ColumnClause[bool]:
    """The per-run table's side column: true for a row as it is now."""
    return sa.column(NEW, sa.Boolean, _selectable=changes)


def rows_of_changed(changes: sa.TableClause, columns: list[str], *, now: bool) -> sa.Select[Any]:
    """The changed identifiers' rows (contract columns only), as they are now or as they were."""
    return every_row(changes, columns).where(_now(changes) if now else ~_now(changes))


def apply_changes(snapshot: sa.TableClause, changes: sa.TableClause, columns: list[str]) -> list[Executable]:
    """Advance the snapshot in place: the changed identifiers' rows go, their new ones come.
    Idempotent: applied again, the delete takes the rows the first insert wrote, and the insert
    writes them back, so a kill between (or after) the two statements is finished by applying
    it again."""
    ref: sa.ColumnClause[Any] = sa.column(REF, _selectable=changes)
    delete = sa.delete(snapshot).where(sa.column(REF, _selectable=snapshot).in_(sa.select(ref)))
    new_rows = _rows(changes, columns).where(_now(changes))
    target = sa.table(snapshot.name, *(sa.column(c) for c in (REF, *columns)), schema=snapshot.schema)
    insert = sa.insert(target).from_select([REF, *columns], new_rows)
    return [delete, insert]


def changed_columns(connection: Connection, changes: sa.TableClause) -> list[str]:
    """The contract columns of a per-run table, as it was written (the query may have changed
    since)."""
    names = [column["name"] for column in sa.inspect(connection).get_columns(changes.name, changes.schema)]
    return [name for name in names if name.lower() not in (REF, NEW)]


def rename(snapshot: sa.TableClause, generation: Generation) -> RenameTable:
    return RenameTable(snapshot, generation.snapshot.name)


def every_row(snapshot: sa.TableClause, columns: list[str]) -> sa.Select[Any]:
    picked: list[sa.ColumnClause[Any]] = [sa.column(c, _selectable=snapshot) for c in columns]
    return sa.select(*picked).select_from(snapshot)


@dataclass(frozen=True)
class PlannedRead:
    """A SELECT on planner tables, in the shape `sources.read_members` streams (that of a
    compiled definition on events): the rows then meet the contract exactly as a query's do."""

    select: sa.Select[Any]
    value_kind: str = "scalar"
    decoder: Any = None

    def params(self, as_of: datetime) -> dict[str, Any]:
        return {}

    def decode_value(self, raw: Any) -> Any:
        return self.decoder(raw) if self.decoder is not None else raw


def reading(audience: AudienceSettings, select: sa.Select[Any]) -> AudienceSettings:
    """The audience, reading `select` instead of its own query (the value decoded as its own)."""
    compiled = audience.compiled
    planned = PlannedRead(
        select,
        value_kind=getattr(compiled, "value_kind", "scalar"),
        decoder=getattr(compiled, "decode_value", None),
    )
    return replace(audience, compiled=planned)
