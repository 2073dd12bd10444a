"""The planner's SQL (snapshot/planner.py) for PostgreSQL, DuckDB, Snowflake and BigQuery,
compile-only (no server), kept in tests/planner_golden/<statement>.<dialect>.sql. PostgreSQL
and DuckDB also run it (tests/test_planner.py); Snowflake and BigQuery are held to these files.
A change to the SQL fails here; review the diff, then rewrite the files with

    AUDIENCE_SYNC_UPDATE_GOLDEN=1 pytest tests/test_planner_sql.py
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from duckdb_engine import Dialect as DuckDBDialect
from snowflake.sqlalchemy import snowdialect
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy_bigquery import BigQueryDialect  # type: ignore[import-untyped]  # ships no types

from audience_sync.config import AudienceSettings
from audience_sync.events import WarehouseLayout, compile_audience, parse_condition
from audience_sync.snapshot import planner

GOLDEN = Path(__file__).parent / "planner_golden"
UPDATE = os.environ.get("AUDIENCE_SYNC_UPDATE_GOLDEN") == "1"  # read on import (autouse clears it)

DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),
    "duckdb": DuckDBDialect(),
    "snowflake": snowdialect.dialect(),
    "bigquery": BigQueryDialect(),
}
SCHEMA = "audience_sync_planner"
USER_COLUMNS = ["user_id", "email", "name", "title", "company_id"]
PRO = AudienceSettings(
    name="Pro Plan",
    key="pro_plan",
    source="warehouse",
    query="SELECT id AS user_id, email, name, title, company_id FROM prod.users WHERE plan = 'pro';",
)
REVENUE = AudienceSettings(
    name="Revenue",
    key="revenue",
    source="warehouse",
    query="SELECT user_id, value FROM prod.revenue",
    kind="trait",
)
ACCOUNTS = AudienceSettings(
    name="Big Accounts", key="big_accounts", source="warehouse", level="account",
    query="SELECT company_id, name FROM prod.companies WHERE seats > 100",
)  # fmt: skip
BUYERS = AudienceSettings(
    name="Buyers",
    key="buyers",
    source="warehouse",
    query="",
    definition="event('Order Completed').within(30 days).count() >= 1",
    compiled=compile_audience(
        parse_condition("event('Order Completed').within(30 days).count() >= 1"),
        WarehouseLayout("segment", "prod"),
        key="buyers",
    ),
)
PREVIOUS, CURRENT = planner.Generation(SCHEMA, "pro_plan", 6), planner.Generation(SCHEMA, "pro_plan", 7)


def _generations(key: str) -> tuple[planner.Generation, planner.Generation]:
    return planner.Generation(SCHEMA, key, 6), planner.Generation(SCHEMA, key, 7)


STATEMENTS: dict[str, Callable[[], Any]] = {
    "snapshot_sql_audience": lambda: planner.build_snapshot(CURRENT, PRO, USER_COLUMNS),
    "snapshot_event_audience": lambda: planner.build_snapshot(
        _generations("buyers")[1],
        BUYERS,
        planner.contract_columns(BUYERS, list(BUYERS.compiled.select.selected_columns.keys())),
    ),
    "changed_rows_audience": lambda: planner.changed_rows(PREVIOUS, CURRENT, PRO, USER_COLUMNS),
    "changed_rows_trait": lambda: planner.changed_rows(
        *_generations("revenue"), REVENUE, ["user_id", "value"]
    ),
    "changed_rows_account": lambda: planner.changed_rows(
        *_generations("big_accounts"), ACCOUNTS, ["company_id", "name"]
    ),
    "rows_of_changed": lambda: planner.rows_of_changed(CURRENT.changes, USER_COLUMNS, now=True),
    "advance_delete": lambda: planner.apply_changes(PREVIOUS.snapshot, CURRENT.changes, USER_COLUMNS)[0],
    "advance_insert": lambda: planner.apply_changes(PREVIOUS.snapshot, CURRENT.changes, USER_COLUMNS)[1],
    "advance_rename": lambda: planner.rename(PREVIOUS.snapshot, CURRENT),
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("name", list(STATEMENTS))
def test_planner_sql_matches_the_golden_file(name: str, dialect: str) -> None:
    rendered = str(STATEMENTS[name]().compile(dialect=DIALECTS[dialect])).strip() + "\n"
    path = GOLDEN / f"{name}.{dialect}.sql"
    if UPDATE:
        path.write_text(rendered)
    assert path.exists(), f"no golden file {path.name}: run with AUDIENCE_SYNC_UPDATE_GOLDEN=1"
    assert rendered == path.read_text()


def test_long_keys_are_cut_and_hashed_to_names_every_dialect_takes() -> None:
    key = "a" * 200
    name = planner.table_name(planner.SNAPSHOT, key, 123456)
    assert len(name) <= 63 and name.endswith("_123456")
    assert planner.table_name(planner.SNAPSHOT, key + "b", 1) != planner.table_name(planner.SNAPSHOT, key, 1)
