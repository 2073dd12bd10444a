"""Each operator's members and trait values, compiled and run on SQLite, PostgreSQL and DuckDB,
against the independent Python computation of oracle.py over the same generated rows, for
both warehouse layouts (Segment's users table, RudderStack's latest identifies)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audience_sync.events import (
    EventAudience,
    LayoutKind,
    SqlAudience,
    WarehouseLayout,
    compile_audience,
    compile_trait,
    parse_condition,
    parse_value,
)
from audience_sync.snapshot.values import canonical
from tests.conftest import postgres_schema
from tests.events.conftest import Warehouse
from tests.events.oracle import Oracle
from tests.events.warehouse import AS_OF, Dataset

LAYOUTS: list[LayoutKind] = ["segment", "rudderstack"]

AUDIENCES = {
    # windows, at their edges (warehouse.py puts events exactly on them)
    "within_days": "event('Order Completed').within(30 days).count() >= 1",
    "within_hours": "event('Page Viewed').within(36 hours).count() >= 1",
    "between": "event('Order Completed').between(7 days, 30 days).count() >= 2",
    "between_reversed": "event('Page Viewed').between(36 hours, 7 days).count() = 1",
    "no_window": "event('Signed Up').count() >= 1",
    # counts: at least / exactly / did not perform
    "at_least_3": "event('Order Completed').within(90 days).count() >= 3",
    "exactly_2": "event('Order Completed').within(90 days).count() = 2",
    "none_ever": "event('Order Completed').count() = 0",
    "fewer_than_1": "event('Page Viewed').within(7 days).count() < 1",
    "not_performed": "not event('Order Completed').within(7 days).count() >= 1",
    "at_most_1": "event('Order Completed').within(60 days).count() <= 1",
    "count_one_of": "event('Page Viewed').count().one_of(2, 4)",
    "literal_left": "3 <= event('Page Viewed').count()",
    # aggregates of a property
    "sum": (
        "event('Order Completed').where(property('revenue') >= 100).within(90 days)"
        ".sum(property('revenue')) > 500"
    ),
    "avg": "event('Order Completed').avg(property('revenue')) < 50",
    "min_or_max": (
        "event('Order Completed').min(property('revenue')) <= 10 or event('Order Completed')"
        ".max(property('revenue')) > 190"
    ),
    "first": "event('Order Completed').first(property('sku')) = 'a'",
    "last_differs": "event('Order Completed').last(property('sku')) != 'a'",
    "last_number": "event('Order Completed').within(30 days).last(property('revenue')) > 100",
    "not_last": "not event('Order Completed').last(property('sku')) = 'a'",
    "mode": "event('Order Completed').mode(property('sku')) = 'a'",
    "mode_code_point": "event('Order Completed').mode(property('sku')) = 'B'",
    "mode_min_frequency": "event('Order Completed').mode(property('sku'), 3).exists()",
    "unique_count": "event('Order Completed').unique(property('sku')).count() >= 3",
    "sum_absent": "event('Order Completed').within(7 days).sum(property('revenue')).absent()",
    # where filters
    "contains": "event('Page Viewed').where(property('url').contains('pricing')).count() >= 1",
    "contains_any": "event('Page Viewed').where(property('url').contains('report', 'intro')).count() >= 2",
    "omits": "event('Page Viewed').where(property('url').omits('docs')).count() >= 3",
    "starts_with": "event('Page Viewed').where(property('url').starts_with('/docs')).count() >= 2",
    "ends_with": "event('Page Viewed').where(property('url').ends_with('.pdf')).count() >= 1",
    "exists": "event('Order Completed').where(property('coupon').exists()).count() >= 2",
    "absent": "event('Order Completed').where(property('coupon').absent()).count() >= 2",
    "not_equal_skips_null": "event('Order Completed').where(property('coupon') != 'SAVE10').count() >= 2",
    "not_equals_keeps_null": "event('Order Completed').where(not property('coupon') = 'SAVE10').count() >= 2",
    "or_filter": (
        "event('Order Completed').where(property('sku') = 'a' or property('sku') = 'B').count() >= 2"
    ),
    "boolean": (
        "event('Order Completed').where(property('gift') = true and property('revenue') > 150).count() >= 1"
    ),
    "one_of_filter": "event('Order Completed').where(property('sku').one_of('ä', 'B')).count() >= 1",
    "camel_case_property": "event('signedUp').where(property('sourceChannel') = 'ads').count() >= 1",
    # traits and combinations
    "trait": "trait('plan') = 'enterprise'",
    "not_trait": "not trait('plan') = 'enterprise'",
    "trait_absent": "trait('plan').absent()",
    "trait_ends_with": "trait('email').ends_with('7@example.com')",
    "combined": (
        "(event('Order Completed').within(30 days).count() >= 1 or event('Page Viewed')"
        ".within(30 days).count() >= 5) and not trait('plan') = 'free'"
    ),
    "did_not_and_trait": (
        "trait('plan').one_of('pro', 'enterprise') and event('Page Viewed').within(14 days).count() = 0"
    ),
    "shared_stream": (
        "event('Order Completed').within(90 days).count() >= 2 and event('Order Completed')"
        ".within(90 days).sum(property('revenue')) < 300"
    ),
    "audience_refs": "audience('buyers') and not audience('pro_sql')",
    "nested_audience": "audience('big_buyers') or audience('pro_sql')",
    "never_true": "event('Order Completed').count() < 0",
}

TRAITS = {
    "count": "event('Order Completed').within(30 days).count()",
    "sum": "event('Order Completed').within(180 days).sum(property('revenue'))",
    "avg": "event('Order Completed').within(180 days).avg(property('revenue'))",
    "min": "event('Order Completed').min(property('revenue'))",
    "max": "event('Order Completed').where(property('coupon') = 'SAVE10').max(property('revenue'))",
    "first": "event('Order Completed').first(property('sku'))",
    "last": "event('Order Completed').last(property('sku'))",
    "last_number": "event('Order Completed').within(60 days).last(property('revenue'))",
    "mode": "event('Order Completed').mode(property('sku'))",
    "mode_min_frequency": "event('Order Completed').mode(property('sku'), 2)",
    "unique": "event('Page Viewed').unique(property('url'))",
    "unique_count": "event('Order Completed').unique(property('sku')).count()",
    "trait": "trait('plan')",
    "trait_name": "trait('name')",
}


BUYERS = parse_condition("event('Order Completed').within(30 days).count() >= 1")
BIG_BUYERS = parse_condition(
    "audience('buyers') and event('Order Completed').max(property('revenue')) >= 199"
)


def resolvable(warehouse: Warehouse) -> dict[str, Any]:
    """The audiences audience('...') may name: two event audiences and an SQL one."""
    users = f"{warehouse.schema}.users" if warehouse.schema else "users"
    return {
        "buyers": EventAudience(BUYERS),
        "big_buyers": EventAudience(BIG_BUYERS),
        "pro_sql": SqlAudience(f"SELECT id AS user_id FROM {users} WHERE plan = 'pro';"),
    }


@pytest.fixture(scope="session")
def oracle(dataset: Dataset) -> Oracle:
    pro = {row["id"] for row in dataset.users if row["plan"] == "pro"}
    return Oracle(dataset, AS_OF, {"buyers": BUYERS, "big_buyers": BIG_BUYERS, "pro_sql": pro})


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    """The oracle's answers, computed once for all backends and layouts."""
    return {}


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("name", list(AUDIENCES))
def test_audience_members_match_the_python_computation(
    warehouse: Warehouse,
    dataset: Dataset,
    oracle: Oracle,
    expected: dict[str, Any],
    name: str,
    kind: LayoutKind,
) -> None:
    condition = parse_condition(AUDIENCES[name])
    query = compile_audience(condition, warehouse.layout(kind), key=name, resolve=resolvable(warehouse).get)
    rows = warehouse.rows(query)
    if name not in expected:
        expected[name] = oracle.members(condition)
    members = expected[name]
    assert len(rows) == len({row[0] for row in rows}), "a user listed twice"
    assert dict(rows) == members
    if name != "never_true":
        assert 0 < len(members) < len(dataset.users), "a definition that tests nothing"


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("name", list(TRAITS))
def test_trait_values_match_the_python_computation(
    warehouse: Warehouse, oracle: Oracle, expected: dict[str, Any], name: str, kind: LayoutKind
) -> None:
    value = parse_value(TRAITS[name])
    query = compile_trait(value, warehouse.layout(kind))
    rows = warehouse.rows(query)
    got = {user: (email, canonical(query.decode_value(raw))) for user, email, raw in rows}
    if f"trait {name}" not in expected:
        values = oracle.values(value)
        expected[f"trait {name}"] = {user: (email, canonical(raw)) for user, (email, raw) in values.items()}
    wanted = expected[f"trait {name}"]
    assert len(rows) == len(got), "a user listed twice"
    if name == "avg":  # the database's division need not round as Python's does
        assert got.keys() == wanted.keys()
        for user, (email, average) in got.items():
            assert email == wanted[user][0]
            assert math.isclose(float(average or 0), float(wanted[user][1] or 0), rel_tol=1e-12)
    else:
        assert got == wanted
    assert len(wanted) > 0


@pytest.mark.parametrize(
    "shift", [timedelta(0), timedelta(days=1), timedelta(microseconds=1), -timedelta(days=3)]
)
def test_windows_follow_as_of_not_the_database_clock(
    warehouse: Warehouse, dataset: Dataset, shift: timedelta
) -> None:
    condition = parse_condition("event('Order Completed').between(7 days, 30 days).count() >= 1")
    query = compile_audience(condition, warehouse.layout(), key="k")
    as_of = AS_OF + shift
    assert dict(warehouse.rows(query, as_of)) == Oracle(dataset, as_of).members(condition)


def test_count_of_zero_is_a_value_for_every_known_user(warehouse: Warehouse, dataset: Dataset) -> None:
    query = compile_trait(parse_value("event('Order Completed').within(7 days).count()"), warehouse.layout())
    values = {user: value for user, _, value in warehouse.rows(query)}
    assert values.keys() == {row["id"] for row in dataset.users}
    assert 0 in values.values() and any(value > 0 for value in values.values())


def test_anonymous_and_unidentified_activity_is_ignored(warehouse: Warehouse) -> None:
    """Anonymous rows and a user_id no identify knows buy for 500 each: neither is a member."""
    condition = parse_condition("event('Order Completed').where(property('revenue') = 500).count() >= 1")
    for kind in LAYOUTS:
        rows = warehouse.rows(compile_audience(condition, warehouse.layout(kind), key="k"))
        assert rows == []


def test_a_duplicated_row_counts_once(warehouse: Warehouse, dataset: Dataset) -> None:
    """u0300's rows are all loaded twice: sum and count see each id once."""
    rows = [row for row in dataset.events["order_completed"] if row["user_id"] == "u0300"]
    distinct = {row["id"]: row for row in rows}
    assert len(rows) == 2 * len(distinct)
    total = sum(row["revenue"] or 0 for row in distinct.values())
    value = parse_value("event('Order Completed').sum(property('revenue'))")
    count = parse_value("event('Order Completed').count()")
    sums = {user: raw for user, _, raw in warehouse.rows(compile_trait(value, warehouse.layout()))}
    counts = {user: raw for user, _, raw in warehouse.rows(compile_trait(count, warehouse.layout()))}
    assert (sums["u0300"], counts["u0300"]) == (total, len(distinct))


@pytest.mark.parametrize(
    ("window", "members"),
    [
        # Orders at as_of - 30 days, - 7 days, - 36 hours and as_of, each 1 µs early, on time and
        # 1 µs late, by u0100, u0102, ... u0122 (warehouse.py): windows are [as_of - far, as_of - near).
        ("within(30 days)", [102, 104, 106, 108, 110, 112, 114, 116, 118]),
        ("between(7 days, 30 days)", [102, 104, 106]),
        ("within(36 hours)", [114, 116, 118]),
        ("between(1 hours, 36 hours)", [114, 116]),
    ],
)
def test_window_edges(warehouse: Warehouse, window: str, members: list[int]) -> None:
    condition = parse_condition(
        f"event('Order Completed').where(property('coupon') = 'EDGE').{window}.count() > 0"
    )
    rows = warehouse.rows(compile_audience(condition, warehouse.layout(), key="k"))
    assert sorted(user for user, _ in rows) == [f"u{n:04d}" for n in members]


@pytest.mark.postgres
def test_mode_ties_go_by_code_point_under_any_collation() -> None:
    """Under en-US, 'a' sorts before 'B'; Engage's "alphabetically first" here is by code point,
    the same on every warehouse, so 'B' wins the tie."""
    with postgres_schema() as url:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql("CREATE TABLE users (id text, email text)")
                connection.exec_driver_sql(
                    'CREATE TABLE order_completed (id text, user_id text, sku text COLLATE "en-US-x-icu")'
                )
                connection.exec_driver_sql("INSERT INTO users VALUES ('u1', 'a@x')")
                connection.exec_driver_sql(
                    "INSERT INTO order_completed VALUES ('1', 'u1', 'a'), ('2', 'u1', 'B')"
                )
                assert connection.exec_driver_sql("SELECT min(sku) FROM order_completed").scalar() == "a"
                query = compile_trait(
                    parse_value("event('Order Completed').mode(property('sku'))"), WarehouseLayout()
                )
                assert [tuple(row) for row in connection.execute(query.select)] == [("u1", "a@x", "B")]
        finally:
            engine.dispose()
