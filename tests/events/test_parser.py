"""The definition language: every operator parses to the AST it means; every mistake is one
line that says where it is and what was expected."""

from __future__ import annotations

from datetime import timedelta

import pytest

from audience_sync.errors import ConfigError
from audience_sync.events import parse_condition, parse_value, referenced_audiences
from audience_sync.events.ast import (
    Aggregate,
    And,
    AudienceRef,
    Compare,
    Literal,
    Not,
    Or,
    Property,
    Stream,
    Trait,
    Window,
)

ORDERS = Stream("Order Completed")
DAYS_30 = Window(timedelta(0), timedelta(days=30))


def number(value: float) -> tuple[Literal]:
    return (Literal(value, "number"),)


def text(*values: str) -> tuple[Literal, ...]:
    return tuple(Literal(value, "text") for value in values)


def count(stream: Stream = ORDERS) -> Aggregate:
    return Aggregate(stream, "count")


def of(function: str, name: str = "revenue", stream: Stream = ORDERS) -> Aggregate:
    return Aggregate(stream, function, name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "event('Order Completed').within(30 days).count() >= 1",
            Compare(count(Stream("Order Completed", None, DAYS_30)), ">=", number(1)),
        ),
        (
            "event('Order Completed').within(1 day).count() > 0",
            Compare(
                count(Stream("Order Completed", None, Window(timedelta(0), timedelta(days=1)))),
                ">",
                number(0),
            ),
        ),
        (
            "event('Order Completed').within(12 HOURS).count() = 2",
            Compare(
                count(Stream("Order Completed", None, Window(timedelta(0), timedelta(hours=12)))),
                "=",
                number(2),
            ),
        ),
        (
            "event('Order Completed').between(14 days, 7 days).count() == 0",  # either order
            Compare(
                count(Stream("Order Completed", None, Window(timedelta(days=7), timedelta(days=14)))),
                "=",
                number(0),
            ),
        ),
        (
            "event('Order Completed').between(1 hour, 2 days).count() != 0",
            Compare(
                count(Stream("Order Completed", None, Window(timedelta(hours=1), timedelta(days=2)))),
                "!=",
                number(0),
            ),
        ),
        ("event('Order Completed').sum(property('revenue')) < 5", Compare(of("sum"), "<", number(5))),
        ("event('Order Completed').avg(property('revenue')) <= 5.5", Compare(of("avg"), "<=", number(5.5))),
        ("event('Order Completed').min(property('revenue')) > -1", Compare(of("min"), ">", number(-1))),
        (
            "event('Order Completed').max(property('revenue')) >= 1e3",
            Compare(of("max"), ">=", number(1000.0)),
        ),
        (
            "event('Order Completed').first(property('sku')) = 'a'",
            Compare(of("first", "sku"), "=", text("a")),
        ),
        (
            "event('Order Completed').last(property('sku')) != 'a'",
            Compare(of("last", "sku"), "!=", text("a")),
        ),
        ("event('Order Completed').mode(property('sku')) = 'a'", Compare(of("mode", "sku"), "=", text("a"))),
        (
            "event('Order Completed').mode(property('sku'), 2).exists()",
            Compare(Aggregate(ORDERS, "mode", "sku", 2), "exists"),
        ),
        (
            "event('Order Completed').unique(property('sku')).count() >= 3",
            Compare(of("unique_count", "sku"), ">=", number(3)),
        ),
        ("trait('plan') = 'enterprise'", Compare(Trait("plan"), "=", text("enterprise"))),
        ("trait('vip') = true", Compare(Trait("vip"), "=", (Literal(True, "boolean"),))),
        ("trait('vip') = FALSE", Compare(Trait("vip"), "=", (Literal(False, "boolean"),))),
        ("trait('plan').equals('a')", Compare(Trait("plan"), "=", text("a"))),
        ("trait('plan').differs('a')", Compare(Trait("plan"), "!=", text("a"))),
        ("trait('age').greater_than(1)", Compare(Trait("age"), ">", number(1))),
        ("trait('age').at_least(1)", Compare(Trait("age"), ">=", number(1))),
        ("trait('age').less_than(1)", Compare(Trait("age"), "<", number(1))),
        ("trait('age').at_most(1)", Compare(Trait("age"), "<=", number(1))),
        ("trait('plan').exists()", Compare(Trait("plan"), "exists")),
        ("trait('plan').absent()", Compare(Trait("plan"), "absent")),
        ("trait('email').contains('a', 'b')", Compare(Trait("email"), "contains", text("a", "b"))),
        ("trait('email').omits('a')", Compare(Trait("email"), "omits", text("a"))),
        ("trait('email').starts_with('a')", Compare(Trait("email"), "starts_with", text("a"))),
        ("trait('email').ends_with('.com')", Compare(Trait("email"), "ends_with", text(".com"))),
        ("trait('plan').one_of('a', 'b')", Compare(Trait("plan"), "one_of", text("a", "b"))),
        ("trait('plan') = literal('a')", Compare(Trait("plan"), "=", text("a"))),
        ("3 <= event('Order Completed').count()", Compare(count(), ">=", number(3))),
        ("audience('churned')", AudienceRef("churned")),
        (
            "event('Order Completed').where(property('price') >= 100 and not property('coupon').exists())"
            ".count() >= 1",
            Compare(
                count(
                    Stream(
                        "Order Completed",
                        And(
                            (
                                Compare(Property("price"), ">=", number(100)),
                                Not(Compare(Property("coupon"), "exists")),
                            )
                        ),
                    )
                ),
                ">=",
                number(1),
            ),
        ),
        (
            "event('Order Completed').where(property('a') = 1).where(property('b') = 2).count() >= 1",
            Compare(
                count(
                    Stream(
                        "Order Completed",
                        And((Compare(Property("a"), "=", number(1)), Compare(Property("b"), "=", number(2)))),
                    )
                ),
                ">=",
                number(1),
            ),
        ),
        # and binds tighter than or; not tighter than and; keywords in any case
        (
            "trait('a') = 1 OR trait('b') = 2 And NOT trait('c') = 3",
            Or(
                (
                    Compare(Trait("a"), "=", number(1)),
                    And((Compare(Trait("b"), "=", number(2)), Not(Compare(Trait("c"), "=", number(3))))),
                )
            ),
        ),
        (
            "(trait('a') = 1 or trait('b') = 2) and trait('c') = 3 and trait('d') = 4",
            And(
                (
                    Or((Compare(Trait("a"), "=", number(1)), Compare(Trait("b"), "=", number(2)))),
                    Compare(Trait("c"), "=", number(3)),
                    Compare(Trait("d"), "=", number(4)),
                )
            ),
        ),
        ("not (audience('a') or audience('b'))", Not(Or((AudienceRef("a"), AudienceRef("b"))))),
        # quotes: double, escaped, typographic (as Segment's docs long printed them)
        ('trait("plan") = "it\'s"', Compare(Trait("plan"), "=", text("it's"))),
        (r"trait('plan') = 'it\'s'", Compare(Trait("plan"), "=", text("it's"))),
        ("event(\u2018Order Completed\u2019).count() >= 1", Compare(count(), ">=", number(1))),
        ("  event('Order Completed')\n  .count()\n  >= 1  ", Compare(count(), ">=", number(1))),
    ],
)
def test_every_operator_parses(source: str, expected: object) -> None:
    assert parse_condition(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "event('Order Completed').within(180 days).sum(property('revenue'))",
            of("sum", stream=Stream("Order Completed", None, Window(timedelta(0), timedelta(days=180)))),
        ),
        ("event('Order Completed').count()", count()),
        ("event('Order Completed').unique(property('sku'))", of("unique", "sku")),
        ("event('Order Completed').unique(property('sku')).count()", of("unique_count", "sku")),
        ("trait('plan')", Trait("plan")),
    ],
)
def test_values_parse(source: str, expected: object) -> None:
    assert parse_value(source) == expected


def test_positions_take_no_part_in_equality() -> None:
    assert parse_condition("trait('a')  =  1") == parse_condition("trait('a') = 1")
    assert parse_condition("trait('a') = 1") != parse_condition("trait('a') = true")


def test_referenced_audiences_in_order() -> None:
    condition = parse_condition("audience('b') and (audience('a') or not audience('b'))")
    assert referenced_audiences(condition) == ("b", "a")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "event('Order Completed').within(30 days .count() >= 1",
            "condition: expected ')' or ',', found '.' at column 41: "
            '"...pleted\').within(30 days ^.count() >= 1"',
        ),
        ("event('X').count( >= 1", "expected ')' or a value, found '>=' at column 19"),
        ("event('X'", "expected ')', ',' or 'or', found the end at column 10"),
        ("event('X').count() >= ", "found the end at column 22"),
        ("event('X') # 1", "unexpected character '#' at column 12"),
        ("trait('a') = 'x", 'unexpected character "\'" (a quote that is never closed) at column 14'),
        ("trait(\u2018a') = 1", "(an unmatched typographic quote: use straight quotes)"),
        ("x = 'a'", "expected '(', found '=' at column 3"),
        (
            "event('X').count() >= 1 and\n  trait('a') = ",
            "found the end at line 2, column 15: \"trait('a') =^\"",
        ),
        ("   ", "condition: empty"),
    ],
)
def test_syntax_errors_show_the_position(source: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_condition(source)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "event('X').wihtin(3 days).count() >= 1",
            "unknown function 'wihtin' (did you mean 'within'?) at column 12",
        ),
        ("evnt('X').count() >= 1", "unknown function 'evnt' (did you mean 'event'?) at column 1"),
        ("event('X').frobnicate() >= 1", "unknown function 'frobnicate' at column 12"),
        (
            "event('X').within(3 days).between(1 day, 2 days).count() >= 1",
            "a stream takes one window: within(...) or between(...), not both or twice at column 27",
        ),
        ("event('X').within(3 days).within(4 days).count() >= 1", "a stream takes one window"),
        ("event('X') >= 1", "event('X') needs an aggregate before '>=', e.g. .count() at column 1"),
        ("event('X').exists()", "event('X') needs an aggregate before exists(...), e.g. .count()"),
        ("event('X')", "event('X') needs an aggregate and a comparison, e.g. .count() >= 1"),
        ("event('X').count()", "event('X')...count() is a value, not a condition: compare it, e.g. >= 1"),
        ("trait('a') and audience('b')", "trait('a') is a value, not a condition"),
        (
            "event('X').sum() > 1",
            "sum(...) takes property('name'), e.g. sum(property('revenue')) at column 12",
        ),
        ("event('X').mode('a') = 'x'", "mode(...) takes property('name')"),
        ("event('X').max(trait('a')) > 1", "max(...) takes property('name')"),
        ("event('X').count(property('a')) > 1", "count() takes no argument"),
        ("event('X').mode(property('a'), 0) = 'x'", "mode(...)'s minimum frequency is at least 1"),
        ("event('X').mode(property('a'), 1.5) = 'x'", "mode(...)'s second argument is a whole number"),
        ("property('a') = 1", "property(...) belongs inside where(...) or an aggregate at column 1"),
        (
            "event('X').where(trait('a') = 1).count() > 1",
            "where(...) compares properties with literals: trait('a') goes outside",
        ),
        ("event('X').where(audience('a')).count() > 1", "audience(...) belongs outside it"),
        ("event('X').where(3 days).count() > 1", "where(...) takes a condition on properties"),
        ("event('X').unique(property('a')) = 1", "unique(...) is a list: compare unique(...).count()"),
        ("event('X').unique(property('a')).first(property('a')) = 1", "only .count() may follow it"),
        ("event('X').count() = 'a'", "event('X')...count() is a number: compare it with a number"),
        ("event('X').sum(property('r')).contains('a')", "is a number: contains(...) tests text"),
        ("trait('a').contains('')", "contains(...) takes non-empty text"),
        ("trait('a').starts_with(1)", "starts_with(...) takes quoted text"),
        ("trait('a').one_of()", "one_of(...) takes at least one value"),
        ("trait('a').exists(1)", "exists(...) takes no argument"),
        ("trait('a') = trait('b')", "compare trait('a') with a literal"),
        ("trait('a').count() > 1", "count(...) follows event(...), not trait('a')"),
        ("trait(1) = 1", "trait(...) takes a quoted name"),
        ("trait(' ') = 1", "trait(...) with an empty name"),
        ("event('X', 'Y').count() > 1", "event(...) takes one quoted name"),
        ("within(3 days)", "within(...) cannot start an expression"),
        (
            "event('X').within(0 days).count() > 1",
            "a window is a whole number of days or hours above 0, not 0",
        ),
        ("event('X').within(1.5 days).count() > 1", "not 1.5"),
        ("event('X').within(3).count() > 1", "within(...) takes durations such as 30 days or 12 hours"),
        ("event('X').between(3 days).count() > 1", "between(...) takes two durations ago"),
        (
            "event('X').between(3 days, 3 days).count() > 1",
            "between(...) of two equal durations is an empty window",
        ),
        ("audience('a').exists()", "nothing can follow a condition: exists(...)"),
        ("literal(1) = 1", "'=' compares a value (an aggregate, trait or property), not a literal"),
        ("'Order Completed'", "'Order Completed' is a literal, not a condition"),
    ],
)
def test_semantic_errors_are_one_clear_line(source: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_condition(source)
    assert message in str(raised.value)
    assert str(raised.value).startswith("condition: ")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "event('X').count() >= 1",
            "value: a value is an aggregate (e.g. .sum(property('x'))) or trait('x')",
        ),
        ("event('X')", "value: event('X') needs an aggregate, e.g. .count() at column 1"),
        ("property('a')", "value: property(...) belongs inside where(...) or an aggregate"),
        ("audience('a')", "value: a value is an aggregate"),
    ],
)
def test_a_value_must_be_an_aggregate_or_a_trait(source: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_value(source)
    assert message in str(raised.value)
