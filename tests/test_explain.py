"""`audience-sync explain USER`: per audience and trait, member now or not, what Planhat was
last told and when, what is pending or in doubt, and the user's recent changes, newest first;
by user_id or email, on SQLite and PostgreSQL. And that each of its lookups is an index lookup
(the query plans), so it answers as fast on a million members (benchmarks/bench_explain.py)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from audience_sync.state import explain
from tests.conftest import Cli, Project, run, sync, users

ORDERS_TRAIT = (
    '[[traits]]\nname = "Orders"\nsource = "app"\n'
    'query = "SELECT id AS user_id, email, orders AS value FROM users"\n'
)


def story(project: Project, cli: Cli) -> None:
    """u3 enters Pro Plan, leaves it, comes back while Planhat refuses: three runs."""
    project.write(extra=ORDERS_TRAIT)
    others = users([1, 2, 4, 5], plan="pro", orders=1)
    project.source.set_users([*others, {"id": "u3", "email": "u3@example.com", "plan": "pro", "orders": 2}])
    assert sync(cli).code == 0
    project.source.set_users([*others, {"id": "u3", "email": "u3@example.com", "plan": "free", "orders": 5}])
    assert sync(cli).code == 0
    project.source.set_users([*others, {"id": "u3", "email": "u3@example.com", "plan": "pro", "orders": 5}])
    project.planhat.fail_next(50, status=400, body="contact locked")
    assert sync(cli, "--audience", "pro_plan").code == 1
    project.planhat.clear_faults()


def test_explain_tells_a_users_story_per_audience_and_trait(project: Project, cli: Cli) -> None:
    story(project, cli)
    result = run(cli, "explain", "u3", "--json")
    assert result.code == 0, result.err
    found = {a["key"]: a for a in json.loads(result.out)["audiences"]}

    pro = found["pro_plan"]
    assert pro["member"] is True  # by the last snapshot: back in
    assert pro["told"]["value"] is False and pro["told"]["kind"] == "incremental"  # the exit went out
    assert pro["pending"]["value"] is True and "contact locked" in pro["pending"]["last_error"]
    assert [(c["change"], c["outcome"], c["kind"]) for c in pro["changes"]] == [
        ("entered", "failed", "incremental"),
        ("exited", "delivered", "incremental"),
        ("entered", "delivered", "full"),
    ]  # newest first
    runs = [c["run_id"] for c in pro["changes"]]
    assert runs == sorted(runs, reverse=True) and pro["told"]["run_id"] == runs[1]

    orders = found["orders"]
    assert (orders["kind"], orders["value"], orders["told"]["value"]) == ("trait", 5, 5)
    assert orders["pending"] is None
    assert [c["value"] for c in orders["changes"]] == [5, 2]
    buyers = found["buyers"]
    assert (buyers["member"], buyers["told"]["value"], len(buyers["changes"])) == (True, True, 1)

    text = run(cli, "explain", "u3", "--audience", "pro_plan")
    assert text.code == 0
    assert "pro_plan (audience 'Pro Plan'): member now" in text.out
    assert "Planhat was last told false at" in text.out and "(incremental)" in text.out
    assert "pending: true" in text.out and "contact locked" in text.out
    lines = text.out.splitlines()
    first = next(i for i, line in enumerate(lines) if "recent changes" in line)
    assert "entered" in lines[first + 3] and "failed" in lines[first + 3]
    assert "exited" in lines[first + 4] and "entered" in lines[first + 5]
    assert "buyers" not in text.out


def test_explain_finds_a_user_by_email_and_says_when_it_knows_nothing(project: Project, cli: Cli) -> None:
    story(project, cli)
    by_email = json.loads(run(cli, "explain", "u3@example.com", "--json").out)
    assert "u3" in by_email["refs"] and by_email["email"] == "u3@example.com"
    assert {a["key"]: a["member"] for a in by_email["audiences"]}["buyers"] is True

    nobody = run(cli, "explain", "u99")
    assert nobody.code == 1 and "no record of 'u99'" in nobody.err and "Traceback" not in nobody.err
    unknown = run(cli, "explain", "u3", "--audience", "nope")
    assert unknown.code == 1 and "unknown audience 'nope'" in unknown.err


def test_every_lookup_of_explain_is_an_index_lookup(project: Project, cli: Cli) -> None:
    story(project, cli)
    engine = sa.create_engine(project.state_url)
    try:
        with engine.connect() as connection:
            for table, plan in plans(connection, explain.statements(["pro_plan", "buyers"], ["u3"])).items():
                print(f"{connection.dialect.name} {table}: {plan}")
                if connection.dialect.name == "sqlite":
                    # A WITHOUT ROWID table (the baseline) is searched by its primary key.
                    searched = "INDEX" in plan.upper() or "USING PRIMARY KEY" in plan.upper()
                    assert "SCAN" not in plan and "USING" in plan and searched, plan
                else:
                    assert "Seq Scan" not in plan and "Index" in plan, plan
    finally:
        engine.dispose()


def plans(connection: sa.Connection, statements: dict[str, Any]) -> dict[str, str]:
    """Each statement's query plan, as one line. On PostgreSQL a sequential scan is priced out,
    so the plan shows whether an index *can* answer it (with a few rows, a scan is cheaper)."""
    found = {}
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.exec_driver_sql("SET enable_seqscan = off")
    for table, statement in statements.items():
        sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
        prefix = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
        rows = connection.exec_driver_sql(prefix + sql).all()
        found[table] = " | ".join(str(row[0] if postgres else row[-1]) for row in rows)
    return found
