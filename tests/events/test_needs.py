"""What a definition reads from the warehouse, and the one-line fix for each miss."""

from __future__ import annotations

from audience_sync.events import (
    Need,
    WarehouseLayout,
    missing,
    needs,
    parse_condition,
    parse_value,
    read_catalog,
)
from tests.events.conftest import Warehouse

SEGMENT = WarehouseLayout("segment", "prod")


def test_needs_lists_tables_and_columns_with_their_origin() -> None:
    condition = parse_condition(
        "event('Order Completed').where(property('couponCode').exists()).within(30 days)"
        ".first(property('orderId')) = 'x' and trait('plan') = 'pro' and audience('other')"
    )
    assert needs(condition, SEGMENT) == (
        Need("users", None, "the users"),
        Need("users", "id", "the users"),
        Need("users", "email", "the users' email"),
        Need("order_completed", None, "event 'Order Completed'"),
        Need("order_completed", "id", "event 'Order Completed'"),
        Need("order_completed", "user_id", "event 'Order Completed'"),
        Need("order_completed", "timestamp", "event 'Order Completed''s time"),
        Need("order_completed", "received_at", "event 'Order Completed''s time"),
        Need("order_completed", "coupon_code", "property 'couponCode' of event 'Order Completed'"),
        Need("order_completed", "order_id", "property 'orderId' of event 'Order Completed'"),
        Need("users", "plan", "trait 'plan'"),
    )


def test_rudderstack_needs_identifies_not_users() -> None:
    tables = {need.table for need in needs(parse_value("trait('plan')"), WarehouseLayout("rudderstack"))}
    assert tables == {"identifies"}


def test_a_count_without_window_needs_no_timestamp() -> None:
    columns = {need.column for need in needs(parse_condition("event('A').count() >= 1"), SEGMENT)}
    assert "timestamp" not in columns and "received_at" not in columns


def test_missing_says_what_exists_like_it() -> None:
    wanted = needs(
        parse_condition(
            "event('Order Complete').count() >= 1 and event('Page Viewed').sum(property('revenu')) > 1"
            " and trait('plna') = 'x'"
        ),
        SEGMENT,
    )
    catalog = {
        "users": {"id", "email", "plan"},
        "order_completed": {"id", "user_id", "revenue"},
        "page_viewed": {"id", "user_id", "revenue"},
    }
    assert missing(wanted, catalog, SEGMENT) == [
        "no table order_complete in schema prod (event 'Order Complete'); tables like it: order_completed",
        "no column revenu in prod.page_viewed (property 'revenu' of event 'Page Viewed'); "
        "columns like it: revenue",
        "no column plna in prod.users (trait 'plna'); columns like it: plan",
    ]
    assert missing(needs(parse_condition("trait('plan') = 'x'"), SEGMENT), catalog, SEGMENT) == []


def test_read_catalog_on_a_real_warehouse(warehouse: Warehouse) -> None:
    layout = warehouse.layout()
    wanted = needs(parse_condition("event('Order Completed').sum(property('revenue')) > 1"), layout)
    with warehouse.engine.connect() as connection:
        catalog = read_catalog(connection, layout, {need.table for need in wanted})
    assert {"users", "identifies", "order_completed", "page_viewed", "signed_up"} <= catalog.keys()
    assert {"id", "user_id", "timestamp", "revenue", "sku"} <= catalog["order_completed"]
    assert catalog["page_viewed"] == set()  # not asked for: only its name, for suggestions
    assert missing(wanted, catalog, layout) == []
    typo = needs(parse_condition("event('Order Completed').sum(property('revenu')) > 1"), layout)
    assert missing(typo, catalog, layout)[0].startswith("no column revenu in ")
