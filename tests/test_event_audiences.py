"""Audiences and computed traits defined on events (`condition`, `value`), end to end: the config
that loads them, the sync that sends them, `preview`, `check`, and sources on SQLite, PostgreSQL
and DuckDB. The language itself is tested in tests/events/."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from audience_sync.config import load_settings
from audience_sync.errors import SourceError
from audience_sync.snapshot.contract import Member, ReadStats
from audience_sync.snapshot.sources import STREAMING, SourcePool, read_members
from tests.conftest import POSTGRES_URL, Cli, Project, last_run, postgres_schema, run, sync, users

EVENTS = 'events = "segment"'
BUYERS_30 = {"name": "Buyers 30", "condition": "event('Order Completed').within(30 days).count() >= 1"}
BIG_PRO = {
    "name": "Big Pro",
    "condition": "event('Order Completed').within(90 days).sum(property('revenue')) > 100 "
    "and trait('plan') = 'pro'",
}
REVENUE = (
    '\n[[traits]]\nname = "Revenue 180 Days"\nsource = "app"\n'
    "value = \"event('Order Completed').within(180 days).sum(property('revenue'))\"\n"
)
ORDERS = (
    "CREATE TABLE IF NOT EXISTS order_completed (id TEXT, user_id TEXT, anonymous_id TEXT, event TEXT, "
    "event_text TEXT, timestamp TEXT, received_at TEXT, revenue REAL)"
)


def stamp(days_ago: float) -> str:
    """A warehouse timestamp `days_ago` before now, as SQLAlchemy stores one in SQLite."""
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%d %H:%M:%S.%f")


def set_orders(path: Path, orders: list[tuple[str, str | None, float, float]]) -> None:
    """The `order_completed` events: (id, user_id, days ago, revenue); an id given twice is a
    duplicated row, as some warehouses keep."""
    with sqlite3.connect(path) as connection:
        connection.execute(ORDERS)
        connection.execute("DELETE FROM order_completed")
        connection.executemany(
            "INSERT INTO order_completed VALUES "
            "(?, ?, 'anon', 'order_completed', 'Order Completed', ?, ?, ?)",
            [(id_, user, stamp(days), stamp(days), revenue) for id_, user, days, revenue in orders],
        )
    connection.close()


def events_project(project: Project, audiences: list[dict[str, str]], extra: str = "") -> None:
    project.write(
        audiences, transport="endusers", planhat="max_requests_per_second = 150", source=EVENTS, extra=extra
    )
    project.source.set_users(users(range(1, 6), plan="pro"))
    # A definition on events selects users' ids and emails, no company: Planhat creates no
    # contact without one, so these are contacts it has already.
    for n in range(1, 6):
        project.planhat.add_contact(f"u{n}", f"u{n}@example.com")


def test_an_event_audience_sends_its_members_then_only_the_changes(project: Project, cli: Cli) -> None:
    fake = project.planhat
    events_project(project, [BUYERS_30])
    orders = [("o1", "u1", 5, 10), ("o1", "u1", 5, 10), ("o2", "u2", 40, 10), ("o3", "u3", 29, 10)]
    set_orders(project.source.path, [*orders, ("o4", None, 1, 10)])  # anonymous: ignored
    assert sync(cli).code == 0
    assert {ref for ref in ("u1", "u2", "u3", "u4") if fake.value(ref, "buyers_30")} == {"u1", "u3"}
    assert last_run(cli)["members"] == 2  # u1's duplicated order counts once

    set_orders(project.source.path, [("o1", "u1", 5, 10), ("o2", "u2", 1, 10)])  # u2 buys, u3's order gone
    assert sync(cli).code == 0
    run_record = last_run(cli)
    assert (run_record["kind"], run_record["entered"], run_record["exited"]) == ("incremental", 1, 1)
    assert (fake.value("u2", "buyers_30"), fake.value("u3", "buyers_30")) == (True, False)


def test_a_trait_on_events_sends_its_value_and_a_condition_reads_traits(project: Project, cli: Cli) -> None:
    fake = project.planhat
    events_project(project, [BIG_PRO], extra=REVENUE)
    set_orders(project.source.path, [("o1", "u1", 5, 60.5), ("o2", "u1", 80, 60), ("o3", "u2", 100, 500)])
    assert sync(cli).code == 0
    assert fake.value("u1", "revenue_180_days") == 120.5 and fake.value("u2", "revenue_180_days") == 500
    assert fake.value("u1", "big_pro") is True  # 120.5 in 90 days, and on the pro plan
    assert fake.value("u2", "big_pro") is None  # its order is 100 days old
    project.source.set_users([*users([1], plan="free"), *users(range(2, 6), plan="pro")])
    assert sync(cli).code == 0
    assert fake.value("u1", "big_pro") is False


@pytest.mark.parametrize(
    ("entry", "source", "expected"),
    [
        (
            {"name": "Broken", "condition": "event('Order Completed').within(30 days).count() >="},
            EVENTS,
            "audiences[0].condition: 'Broken': expected",
        ),
        (BUYERS_30, "", 'set sources.app.events = "segment"'),
        (
            {
                "name": "Both",
                "query": "SELECT id AS user_id, company_id FROM users",
                "condition": "trait('plan') = 'pro'",
            },
            EVENTS,
            "give either a SQL query or a condition",
        ),
        ({"name": "Loop", "condition": "audience('loop')"}, EVENTS, "loop -> loop"),
        ({"name": "Ghost", "condition": "audience('nobody')"}, EVENTS, "no such audience on its source"),
    ],
    ids=["syntax", "no-layout", "both", "cycle", "unknown"],
)
def test_a_wrong_definition_stops_the_load_with_one_line(
    project: Project, cli: Cli, entry: dict[str, str], source: str, expected: str
) -> None:
    project.write([entry], source=source)
    result = sync(cli)
    assert result.code == 1 and "Traceback" not in result.err
    [line] = result.err.strip().splitlines()
    assert line.startswith("Config error: ") and expected in line, line


def test_a_syntax_error_shows_its_position(project: Project, cli: Cli) -> None:
    project.write([{"name": "Broken", "condition": "event('Order Completed').within(30 days.count() >= 1"}],
                  source=EVENTS)  # fmt: skip
    line = sync(cli).err.strip()
    assert "expected ')'" in line and "at column 40" in line and "^" in line, line


def test_audience_references_stay_within_one_source(project: Project, cli: Cli, tmp_path: Path) -> None:
    other = f'\n[sources.other]\nurl = "sqlite:///{tmp_path / "other.db"}"\n{EVENTS}\n'
    elsewhere = {"name": "Elsewhere", "source": "other", "condition": "trait('plan') = 'pro'"}
    project.write(
        [{"name": "Here", "condition": "audience('elsewhere')"}, elsewhere], source=EVENTS, extra=other
    )
    line = sync(cli).err.strip()
    assert "'Here'" in line and "'Elsewhere'" in line and "source 'other'" in line, line


def test_an_event_audience_can_build_on_a_sql_audience(project: Project, cli: Cli) -> None:
    fake = project.planhat
    pro = {
        "name": "Pro Plan",
        "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'",
    }
    events_project(
        project,
        [pro, {"name": "Pro Buyers", "condition": "audience('pro_plan') and " + BUYERS_30["condition"]}],
    )
    project.source.set_users([*users([1, 2], plan="pro"), *users([3], plan="free")])
    set_orders(project.source.path, [("o1", "u1", 1, 5), ("o3", "u3", 1, 5)])
    assert sync(cli).code == 0
    assert (
        fake.value("u1", "pro_buyers"),
        fake.value("u2", "pro_buyers"),
        fake.value("u3", "pro_buyers"),
    ) == (
        True,
        None,
        None,
    )


def test_preview_shows_the_compiled_sql_the_count_and_samples_and_changes_nothing(
    project: Project, cli: Cli
) -> None:
    events_project(project, [BUYERS_30], extra=REVENUE)
    set_orders(project.source.path, [("o1", "u1", 5, 10), ("o3", "u3", 29, 12.5)])
    shown = run(cli, "preview", "buyers_30")
    assert shown.code == 0, shown.err
    assert (
        "members: 2" in shown.out
        and "FROM order_completed" in shown.out
        and ":as_of_minus_30_days" in shown.out
    )
    assert "u1@example.com" in shown.out
    found = json.loads(run(cli, "preview", "revenue_180_days", "--json").out)
    assert found["members"] == 2 and sorted(found["values"]) == [["10", 1], ["12.5", 1]]
    assert found["dialect"] == "sqlite" and set(found["parameters"]) == {"as_of", "as_of_minus_180_days"}
    assert project.planhat.requests == [] and json.loads(run(cli, "history", "--json").out) == []


def test_check_names_a_missing_event_table_and_the_one_like_it(project: Project, cli: Cli) -> None:
    misspelt = {"name": "Buyers", "condition": "event('Order Complete').within(30 days).count() >= 1"}
    events_project(project, [misspelt])
    set_orders(project.source.path, [])
    result = run(cli, "check", "--json")
    [line] = [c for c in json.loads(result.out)["checks"] if c["item"] == "audience buyers"]
    assert line["status"] == "FAIL"
    assert "no table order_complete" in line["detail"] and "tables like it: order_completed" in line["detail"]


# --- other warehouses -------------------------------------------------------------------------


@pytest.mark.postgres
def test_an_event_audience_over_a_postgresql_warehouse(project: Project, cli: Cli) -> None:
    with postgres_schema() as url:
        schema = url.rsplit("%3D", 1)[1]
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE TABLE {schema}.users (id TEXT, email TEXT, plan TEXT)")
            connection.exec_driver_sql(
                f"CREATE TABLE {schema}.order_completed (id TEXT, user_id TEXT, anonymous_id TEXT, "
                "event TEXT, event_text TEXT, timestamp TIMESTAMPTZ, received_at TIMESTAMPTZ, "
                "revenue NUMERIC)"
            )
            connection.exec_driver_sql(
                f"INSERT INTO {schema}.users VALUES ('u1', 'u1@x.com', 'pro'), ('u2', NULL, 'pro')"
            )
            connection.exec_driver_sql(
                f"INSERT INTO {schema}.order_completed VALUES "
                "('o1', 'u1', NULL, 'order_completed', 'Order Completed', now() - interval '3 days', "
                "now(), 10), ('o2', 'u2', NULL, 'order_completed', 'Order Completed', "
                "now() - interval '31 days', now(), 10)"
            )
        engine.dispose()
        project.write([BUYERS_30], transport="endusers", source=f'{EVENTS}\nschema = "{schema}"')
        project.path.write_text(
            project.path.read_text().replace(f'url = "{project.source.url}"', f'url = "{POSTGRES_URL}"')
        )
        project.planhat.add_contact("u1", "u1@x.com")  # an event definition sends no company
        assert sync(cli).code == 0
        assert (
            project.planhat.value("u1", "buyers_30") is True
            and project.planhat.value("u2", "buyers_30") is None
        )


def duckdb_file(path: Path, buyers: int) -> str:
    """A DuckDB warehouse with `buyers` users who ordered yesterday; its URL."""
    duckdb = pytest.importorskip("duckdb")
    connection = duckdb.connect(str(path))
    connection.execute(
        "CREATE TABLE users AS SELECT 'u' || range AS id, 'u' || range || '@x.com' AS email, "
        "'acme' AS company_id FROM range(?)",
        [buyers],
    )
    connection.execute(
        "CREATE TABLE order_completed AS SELECT 'o' || range AS id, 'u' || range AS user_id, "
        "NULL AS anonymous_id, 'order_completed' AS event, 'Order Completed' AS event_text, "
        "now() - INTERVAL 1 DAY AS timestamp, "
        "now() AS received_at FROM range(?)",
        [buyers],
    )
    connection.close()
    return f"duckdb:///{path}"


def test_a_duckdb_source_serves_sql_and_event_audiences(project: Project, cli: Cli, tmp_path: Path) -> None:
    url = duckdb_file(tmp_path / "warehouse.duckdb", 30)
    everyone = {"name": "Everyone", "query": "SELECT id AS user_id, email, company_id FROM users"}
    project.write([everyone, BUYERS_30], transport="endusers", source=EVENTS)
    project.path.write_text(
        project.path.read_text().replace(f'url = "{project.source.url}"', f'url = "{url}"')
    )
    assert sync(cli).code == 0  # Everyone creates the contacts (it names their company) before Buyers 30
    assert all(project.planhat.value(f"u{n}", key) for n in range(30) for key in ("everyone", "buyers_30"))


def test_a_csv_file_read_through_duckdb_is_a_source(project: Project, cli: Cli, tmp_path: Path) -> None:
    pytest.importorskip("duckdb_engine")
    path = tmp_path / "vips.csv"
    path.write_text("user_id,email,company_id\nv1,v1@x.com,acme\nv2,v2@x.com,acme\n")
    vips = {"name": "Vips", "query": f"SELECT user_id, email, company_id FROM read_csv_auto('{path}')"}
    project.write([vips], transport="endusers")
    project.path.write_text(
        project.path.read_text().replace(f'url = "{project.source.url}"', 'url = "duckdb:///:memory:"')
    )
    assert sync(cli).code == 0
    assert project.planhat.value("v1", "vips") is True and project.planhat.value("v2", "vips") is True


def test_two_audiences_streaming_from_one_duckdb_file_are_never_cut_short(tmp_path: Path) -> None:
    """DuckDB ends a stream early, silently, when its connection runs another query: each
    audience query reads on a connection of its own. Two streams read chunk by chunk in turn
    both end with every row."""
    url = duckdb_file(tmp_path / "warehouse.duckdb", 25_000)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[sources.wh]\nurl = "{url}"\n{EVENTS}\n\n[[audiences]]\nname = "Everyone"\nsource = "wh"\n'
        'query = "SELECT id AS user_id, email, company_id FROM users"\n\n'
        f'[[audiences]]\nname = "Buyers"\nsource = "wh"\ncondition = "{BUYERS_30["condition"]}"\n'
    )
    settings = load_settings(config, {})
    with SourcePool(settings.sources) as pool:
        stats = [ReadStats(), ReadStats()]
        streams: list[Iterator[list[Member]] | None] = [
            read_members(pool, audience, stat, chunk_rows=1000)
            for audience, stat in zip(settings.audiences, stats, strict=True)
        ]
        totals = [0, 0]
        while any(stream is not None for stream in streams):
            for index, stream in enumerate(streams):
                if stream is not None:
                    chunk = next(stream, None)
                    if chunk is None:
                        streams[index] = None
                    else:
                        totals[index] += len(chunk)
    assert totals == [25_000, 25_000]


def test_a_statement_on_a_connection_that_streams_is_refused_not_run(tmp_path: Path) -> None:
    url = duckdb_file(tmp_path / "warehouse.duckdb", 10)
    config = tmp_path / "c.toml"
    config.write_text(f'[sources.wh]\nurl = "{url}"\n')
    with SourcePool(load_settings(config, {}).sources) as pool, pool.engine("wh").connect() as connection:
        connection.info[STREAMING] = "audience 'buyers' (source 'wh')"
        with pytest.raises(SourceError, match="would end the stream early"):
            connection.execute(sa.text("SELECT 1"))
        connection.info.pop(STREAMING)
        assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1


def test_the_demo_has_an_event_audience_and_a_trait(tmp_path: Path, cli: Cli) -> None:
    result = cli("sync")
    assert result.code == 0, result.err
    assert "order_completed_last_30days" in result.out and "total_revenue_180_days" in result.out
    settings = load_settings(None, {})
    assert settings.audience("order_completed_last_30days").definition is not None
    assert Path("audience_sync_demo.db").exists()  # made in the test's own directory
