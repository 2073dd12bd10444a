"""Fixtures of the event-audience tests: one generated dataset, loaded once per session into
SQLite, PostgreSQL (a fresh schema, dropped at the end; skipped with a reason when unreachable)
and DuckDB, and a way to run a compiled definition there."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from audience_sync.events import EventQuery, LayoutKind, WarehouseLayout
from tests.conftest import postgres_schema
from tests.events.warehouse import AS_OF, Dataset, generate, load

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres), "duckdb"]


@dataclass
class Warehouse:
    name: str
    engine: sa.Engine
    schema: str | None

    def layout(self, kind: LayoutKind = "segment") -> WarehouseLayout:
        return WarehouseLayout(kind, self.schema)

    def rows(self, query: EventQuery, as_of: datetime = AS_OF) -> list[tuple[Any, ...]]:
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query.select, query.params(as_of))]


@pytest.fixture(scope="session")
def dataset() -> Dataset:
    return generate()


@pytest.fixture(scope="session", params=BACKENDS)
def warehouse(
    request: pytest.FixtureRequest, dataset: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Warehouse]:
    """The dataset in one backend; PostgreSQL and DuckDB in a named schema, SQLite in its own."""
    scratch = tmp_path_factory.mktemp(request.param)
    if request.param == "postgresql":
        with postgres_schema() as url:
            engine = sa.create_engine(url)
            with engine.begin() as connection:
                schema = connection.exec_driver_sql("SELECT current_schema()").scalar_one()
                load(connection, dataset, schema, scratch)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                for table in sa.inspect(connection).get_table_names(schema=schema):  # statistics, as a
                    connection.exec_driver_sql(f"ANALYZE {schema}.{table}")  # warehouse has them
            yield Warehouse("postgresql", engine, schema)
            engine.dispose()
        return
    if request.param == "sqlite":
        engine, schema = sa.create_engine(f"sqlite:///{scratch / 'events.db'}"), None
    else:
        engine, schema = sa.create_engine(f"duckdb:///{scratch / 'events.duckdb'}"), "prod"
    with engine.begin() as connection:
        if schema is not None:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        load(connection, dataset, schema, scratch)
    yield Warehouse(request.param, engine, schema)
    engine.dispose()
