"""The compiled SQL for PostgreSQL, Snowflake and BigQuery, compile-only (no server), kept in
tests/events/golden/<definition>.<dialect>.sql. A change to the compiler that changes the SQL
fails here; review the diff, then rewrite the files with

    AUDIENCE_SYNC_UPDATE_GOLDEN=1 pytest tests/events/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from snowflake.sqlalchemy import snowdialect
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy_bigquery import BigQueryDialect  # type: ignore[import-untyped]  # ships no types

from audience_sync.events import (
    EventAudience,
    EventQuery,
    Referenced,
    SqlAudience,
    WarehouseLayout,
    compile_audience,
    compile_trait,
    parse_condition,
    parse_value,
)

GOLDEN = Path(__file__).parent / "golden"
# Read on import: the suite's autouse fixture clears AUDIENCE_SYNC_* variables before each test.
UPDATE = os.environ.get("AUDIENCE_SYNC_UPDATE_GOLDEN") == "1"

DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),
    "snowflake": snowdialect.dialect(),
    "bigquery": BigQueryDialect(),
}
SEGMENT = WarehouseLayout("segment", "prod")
RUDDERSTACK = WarehouseLayout("rudderstack", "rudder")
REFERENCED: dict[str, Referenced] = {
    "churned": SqlAudience("SELECT user_id FROM prod.churn_scores WHERE score > 0.8"),
    "buyers": EventAudience(parse_condition("event('Order Completed').within(30 days).count() >= 1")),
}


def audience(condition: str, layout: WarehouseLayout = SEGMENT) -> EventQuery:
    return compile_audience(parse_condition(condition), layout, key="golden", resolve=REFERENCED.get)


def trait(value: str, layout: WarehouseLayout = SEGMENT) -> EventQuery:
    return compile_trait(parse_value(value), layout)


DEFINITIONS = {
    "order_completed_last_30days": lambda: audience("event('Order Completed').within(30 days).count() >= 1"),
    "big_spenders_not_churned": lambda: audience(
        "event('Order Completed').where(property('revenue') >= 100).within(90 days)"
        ".sum(property('revenue')) > 500 and trait('plan') = 'enterprise' and not audience('churned')"
    ),
    "total_revenue_180_days": lambda: trait(
        "event('Order Completed').within(180 days).sum(property('revenue'))"
    ),
    "lapsed_viewers": lambda: audience(
        "audience('buyers') and event('Page Viewed').where(property('url').starts_with('/pricing') or "
        "property('url').contains('plans')).between(36 hours, 14 days).count() = 0",
        RUDDERSTACK,
    ),
    "favourite_sku": lambda: trait("event('Order Completed').mode(property('sku'), 2)", RUDDERSTACK),
    "last_plan_seen": lambda: trait("event('Plan Changed').last(property('newPlan'))"),
    "skus_bought": lambda: trait("event('Order Completed').within(365 days).unique(property('sku'))"),
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_compiled_sql_matches_the_golden_file(name: str, dialect: str) -> None:
    rendered = DEFINITIONS[name]().render(DIALECTS[dialect]).strip() + "\n"
    path = GOLDEN / f"{name}.{dialect}.sql"
    if UPDATE:
        path.write_text(rendered, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run with AUDIENCE_SYNC_UPDATE_GOLDEN=1"
    assert rendered == path.read_text(encoding="utf-8")


def test_every_golden_file_belongs_to_a_definition() -> None:
    expected = {f"{name}.{dialect}.sql" for name in DEFINITIONS for dialect in DIALECTS}
    assert {path.name for path in GOLDEN.glob("*.sql")} == expected
