"""The compiled SQL's shape (set-based, joins chosen by the condition), audience references,
the parameters of a run and the decoding of list values. No database beyond SQLite."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from audience_sync.errors import ConfigError
from audience_sync.events import (
    EventAudience,
    EventQuery,
    SqlAudience,
    WarehouseLayout,
    compile_audience,
    compile_trait,
    parse_condition,
    parse_value,
    warehouse_name,
)

SEGMENT = WarehouseLayout("segment", "prod")


def sql(condition: str, layout: WarehouseLayout = SEGMENT, **kwargs: object) -> str:
    query = compile_audience(parse_condition(condition), layout, key="this", **kwargs)  # type: ignore[arg-type]
    return query.render(postgresql.dialect())


def test_performed_is_an_inner_join_on_distinct_user_ids() -> None:
    text = sql("event('Order Completed').within(30 days).count() >= 1")
    assert "SELECT DISTINCT e.user_id" in text and "count(" not in text
    assert "FROM prod.users AS u JOIN events_1 ON events_1.user_id = u.id" in text
    assert "OUTER" not in text and "\nWHERE" not in text.split("events_1.user_id = u.id")[-1]


def test_did_not_perform_is_an_anti_join_over_all_users() -> None:
    for condition in (
        "event('Order Completed').within(30 days).count() = 0",
        "event('Order Completed').within(30 days).count() < 1",
        "not event('Order Completed').within(30 days).count() >= 1",
    ):
        text = sql(condition)
        assert "FROM prod.users AS u LEFT OUTER JOIN events_1 ON events_1.user_id = u.id" in text
        assert text.endswith("WHERE events_1.user_id IS NULL"), condition


def test_a_count_that_is_more_than_presence_is_counted_once_per_id() -> None:
    text = sql("event('Order Completed').count() >= 2")
    assert "count(DISTINCT e.id) AS count_1" in text and "GROUP BY e.user_id" in text
    assert "JOIN events_1" in text and "OUTER" not in text  # >= 2 needs an event: inner join


def test_sum_dedupes_rows_by_id_first() -> None:
    text = sql("event('Order Completed').sum(property('revenue')) > 5")
    assert "FROM (SELECT DISTINCT e.user_id AS user_id, e.id AS id, e.revenue AS revenue" in text
    assert "sum(d.revenue) AS sum_1" in text


def test_aggregates_over_one_stream_share_one_group_by() -> None:
    text = sql(
        "event('Order Completed').within(90 days).count() >= 2 and "
        "event('Order Completed').within(90 days).avg(property('revenue')) < 300 or "
        "event('Order Completed').within(90 days).count() = 0"
    )
    assert text.count("FROM prod.order_completed") == 1
    assert "count(*) AS count_1, avg(d.revenue) AS avg_2" in text
    assert "LEFT OUTER JOIN events_1" in text  # the `or count() = 0` keeps users without events


def test_a_comparison_under_not_spells_out_null() -> None:
    assert "WHERE u.plan = 'x'" in sql("trait('plan') = 'x'")
    assert "WHERE NOT (u.plan IS NOT NULL AND u.plan = 'x')" in sql("not trait('plan') = 'x'")


def test_windows_are_named_parameters_relative_to_as_of() -> None:
    text = sql("event('A').between(36 hours, 2 days).count() >= 1")
    assert "e.timestamp >= %(as_of_minus_2_days)s" in text
    assert "e.timestamp < %(as_of_minus_36_hours)s" in text
    assert "now()" not in text.lower() and "current_timestamp" not in text.lower()


def test_params_are_the_window_edges_in_utc() -> None:
    query = compile_audience(
        parse_condition("event('A').between(36 hours, 2 days).count() >= 1"), SEGMENT, key="k"
    )
    as_of = datetime(2026, 11, 23, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert query.params(as_of) == {
        "as_of_minus_36_hours": datetime(2026, 11, 21, 22, 0, tzinfo=UTC),
        "as_of_minus_2_days": datetime(2026, 11, 21, 10, 0, tzinfo=UTC),
    }
    with pytest.raises(ValueError, match="aware"):
        query.params(datetime(2026, 11, 23, 10, 0))
    untimed = compile_audience(parse_condition("event('A').count() >= 1"), SEGMENT, key="k")
    assert untimed.params(as_of) == {}


def test_rudderstack_reads_users_and_traits_from_identifies() -> None:
    text = sql("trait('plan') = 'pro'", WarehouseLayout("rudderstack"))
    assert "users" not in text.replace("known_users", "")
    assert "FROM identifies AS i" in text and "ORDER BY i.timestamp DESC NULLS LAST" in text
    assert "i.plan IS NOT NULL" in text  # the latest identify that carries the trait


def test_names_follow_segments_snake_case() -> None:
    text = sql("event('Checkout Step Viewed').where(property('orderId') = 'x').count() >= 1")
    assert "prod.checkout_step_viewed AS e" in text and "e.order_id = 'x'" in text
    assert [warehouse_name(n) for n in ("Order Completed", "orderId", "Café Owners", "Base64Encode")] == [
        "order_completed",
        "order_id",
        "cafe_owners",
        "base64_encode",
    ]


def test_an_sql_audience_is_inlined_verbatim_its_colons_included() -> None:
    engine = sa.create_engine("sqlite://")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE users (id TEXT, email TEXT, note TEXT)")
        connection.exec_driver_sql("INSERT INTO users VALUES ('u1', 'a@x', 'at 10:30'), ('u2', 'b@x', 'x')")
        churned = SqlAudience("SELECT id AS user_id FROM users WHERE note = 'at 10:30' ;")
        condition = parse_condition("not audience('churned')")
        query = compile_audience(condition, WarehouseLayout(), key="kept", resolve={"churned": churned}.get)
        assert [tuple(row) for row in connection.execute(query.select, query.params(datetime.now(UTC)))] == [
            ("u2", "b@x")
        ]


def test_an_event_audience_is_inlined_as_its_condition() -> None:
    buyers = EventAudience(parse_condition("event('Order Completed').count() >= 1"))
    inlined = sql("audience('buyers') and trait('plan') = 'pro'", resolve={"buyers": buyers}.get)
    written = sql("event('Order Completed').count() >= 1 and trait('plan') = 'pro'")
    assert inlined == written


def test_an_unknown_audience_names_both() -> None:
    with pytest.raises(
        ConfigError, match="audience 'this' refers to audience 'nope': no such audience on its source"
    ):
        sql("audience('nope')", resolve={}.get)
    with pytest.raises(ConfigError, match="refers to audience 'nope'"):
        sql("audience('nope')")  # no resolver at all


def test_a_cycle_names_both_audiences() -> None:
    audiences = {
        "a": EventAudience(parse_condition("audience('b') or trait('x') = 1")),
        "b": EventAudience(parse_condition("not audience('a')")),
    }
    with pytest.raises(ConfigError) as raised:
        compile_audience(audiences["a"].condition, SEGMENT, key="a", resolve=audiences.get)
    assert str(raised.value) == "audience 'b' refers to audience 'a', which leads back to it: a -> b -> a"
    with pytest.raises(
        ConfigError, match="audience 'this' refers to audience 'this', which leads back to it"
    ):
        sql("audience('this')", resolve={"this": EventAudience(parse_condition("audience('this')"))}.get)


def test_a_trait_query_returns_value_and_skips_users_without_one() -> None:
    query = compile_trait(parse_value("event('A').within(7 days).max(property('p'))"), SEGMENT)
    text = query.render(postgresql.dialect())
    assert [c.name for c in query.select.selected_columns] == ["user_id", "email", "value"]
    assert (
        "JOIN events_1" in text and "OUTER" not in text and text.endswith("WHERE events_1.max_1 IS NOT NULL")
    )
    counted = compile_trait(parse_value("event('A').count()"), SEGMENT).render(postgresql.dialect())
    assert "coalesce(events_1.count_1, 0) AS value" in counted and "LEFT OUTER JOIN" in counted


def test_an_audience_query_returns_the_contract_columns() -> None:
    query = compile_audience(parse_condition("trait('a') = 1"), SEGMENT, key="k")
    assert [c.name for c in query.select.selected_columns] == ["user_id", "email"]
    assert query.value_kind == "none"


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (["b", "a", "B"], ["B", "a", "b"]),
        ('["b", "a", "a"]', ["a", "b"]),
        ("[]", None),
        ([], None),
        (None, None),
        ([1, 2], ["1", "2"]),
    ],
)
def test_unique_lists_are_decoded_sorted_by_code_point(raw: object, decoded: object) -> None:
    query = compile_trait(parse_value("event('A').unique(property('p'))"), SEGMENT)
    assert query.value_kind == "list"
    assert query.decode_value(raw) == decoded


def test_scalar_values_pass_through() -> None:
    query = compile_trait(parse_value("event('A').first(property('p'))"), SEGMENT)
    assert query.value_kind == "scalar" and query.decode_value('["x"]') == '["x"]'


def test_the_layout_refuses_an_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="events = 'mixpanel': expected one of segment, rudderstack"):
        WarehouseLayout("mixpanel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="schema: empty"):
        WarehouseLayout("segment", " ")


def test_compiling_twice_gives_the_same_sql() -> None:
    condition = "event('A').mode(property('p')) = 'x' and event('B').last(property('q')).exists()"
    assert sql(condition) == sql(condition)


def test_event_query_is_frozen() -> None:
    query = compile_audience(parse_condition("trait('a') = 1"), SEGMENT, key="k")
    assert isinstance(query, EventQuery)
    with pytest.raises(AttributeError):
        query.value_kind = "list"  # type: ignore[misc]
