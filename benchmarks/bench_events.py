"""Benchmark: compiled event definitions against the best hand-written SQL, on PostgreSQL.

Run by hand; it prints figures and asserts nothing about time (it does check that each
compiled query and each hand-written one return the same rows). In a fresh schema it builds,
server-side with generate_series:

    users             --users rows (id, email, plan)
    order_completed   --events rows in Segment's layout over the year before as_of, 60% of the
                      users active, 1% of the rows with no user_id (anonymous), and 1% of the
                      rows loaded twice (the same id), as warehouses keep them

with the same indexes for every query (users.id unique, order_completed.timestamp), then
VACUUM ANALYZE. Each case runs the compiled query (audience_sync.events, executed as
the sync would: `connection.execute(select, params)`, every row fetched) and each hand-written
variant, after one warm-up, `--runs` times in turn; it prints the median wall time, the server
time of one more run (EXPLAIN ANALYZE's execution time) and compiled / best hand-written.

    python benchmarks/bench_events.py                          # 1M users, 20M events
    python benchmarks/bench_events.py --users 10000 --events 200000 --runs 3

With `--sync`, the same warehouse then serves an audience defined on events through the CLI,
as `bench_sync.py` runs an audience written in SQL: `audience-sync sync` (a full sync of
"performed Order Completed in the last 30 days"), 1% churn in the warehouse (0.5% of the members'
recent orders deleted, as many other users given one yesterday), and an incremental sync, each
in its own process against the fake Planhat, with the state database on `--state`; each is
checked (Planhat holds every member true and every leaver false) and reported with its CPU time
and peak RSS, beside the floor: the best hand-written query's rows read and their keys inserted
into an indexed SQLite table. The events are then generated over the year before now.

    python benchmarks/bench_events.py --sync --users 1000000 --events 20000000 --state sqlite postgresql

The schema is dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audience_sync.events import (
    EventQuery,
    WarehouseLayout,
    compile_audience,
    compile_trait,
    parse_condition,
    parse_value,
)

POSTGRES = os.environ.get("AUDIENCE_SYNC_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
AS_OF = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

BUILD = """
SELECT setseed(0.19);
CREATE TABLE users (id text NOT NULL, email text, plan text);
INSERT INTO users
SELECT 'u' || i, 'user' || i || '@example.com', (ARRAY['free', 'pro', 'enterprise'])[1 + i % 3]
FROM generate_series(1, CAST(:users AS integer)) AS i;
CREATE TABLE order_completed (
    id text NOT NULL, user_id text, anonymous_id text, event text, event_text text,
    "timestamp" timestamptz, received_at timestamptz, revenue double precision, sku text
);
INSERT INTO order_completed
SELECT 'e' || i,
       CASE WHEN i % 100 = 0 THEN NULL
            ELSE 'u' || (1 + (hashint4(i) & 2147483647) % CAST(:active AS integer)) END,
       'anon' || (i % 100000), 'order_completed', 'Order Completed',
       ts, ts + interval '7 seconds',
       ((hashint4(i + 7) & 2147483647) % 40000) / 100.0,
       (ARRAY['a', 'b', 'c', 'd'])[1 + (hashint4(i + 13) & 2147483647) % 4]
FROM (
    SELECT i, CAST(:as_of AS timestamptz)
              - make_interval(secs => (hashint4(i + 3) & 2147483647) % (365 * 86400)) AS ts
    FROM generate_series(1, CAST(:events AS integer)) AS i
) AS generated;
INSERT INTO order_completed SELECT * FROM order_completed WHERE id LIKE '%00';
CREATE UNIQUE INDEX users_id ON users (id);
CREATE INDEX order_completed_timestamp ON order_completed ("timestamp");
"""


@dataclass
class Case:
    name: str
    compiled: EventQuery
    hand_written: dict[str, str]  # variant -> SQL with :since / :until


def cases(schema: str) -> list[Case]:
    layout = WarehouseLayout("segment", schema)
    buyers = compile_audience(
        parse_condition("event('Order Completed').within(30 days).count() >= 1"), layout, key="buyers"
    )
    revenue = compile_trait(
        parse_value("event('Order Completed').within(180 days).sum(property('revenue'))"), layout
    )
    window = 'o."timestamp" >= :since AND o."timestamp" < :until'
    head = f"SELECT u.id AS user_id, u.email, s.value FROM {schema}.users u JOIN"
    tail = "s ON s.user_id = u.id WHERE s.value IS NOT NULL"
    return [
        Case(
            "count within 30 days >= 1",
            buyers,
            {
                "exists": f"SELECT u.id AS user_id, u.email FROM {schema}.users u WHERE EXISTS "
                f"(SELECT 1 FROM {schema}.order_completed o WHERE o.user_id = u.id AND {window})",
                "join distinct": f"SELECT u.id AS user_id, u.email FROM {schema}.users u JOIN "
                f"(SELECT DISTINCT o.user_id FROM {schema}.order_completed o WHERE {window}) b "
                "ON b.user_id = u.id",
                "in": f"SELECT u.id AS user_id, u.email FROM {schema}.users u WHERE u.id IN "
                f"(SELECT o.user_id FROM {schema}.order_completed o WHERE {window})",
            },
        ),
        Case(
            "sum over 180 days",
            revenue,
            {
                "group by id, then user": f"{head} (SELECT d.user_id, sum(d.revenue) AS value FROM "
                f"(SELECT o.user_id, o.id, min(o.revenue) AS revenue FROM {schema}.order_completed o "
                f"WHERE {window} AND o.user_id IS NOT NULL GROUP BY o.user_id, o.id) d "
                f"GROUP BY d.user_id) {tail}",
                "distinct, then sum": f"{head} (SELECT d.user_id, sum(d.revenue) AS value FROM "
                f"(SELECT DISTINCT o.user_id, o.id, o.revenue FROM {schema}.order_completed o "
                f"WHERE {window}) d GROUP BY d.user_id) {tail}",
                "distinct on id": f"{head} (SELECT d.user_id, sum(d.revenue) AS value FROM "
                f"(SELECT DISTINCT ON (o.id) o.user_id, o.revenue FROM {schema}.order_completed o "
                f"WHERE {window} ORDER BY o.id) d GROUP BY d.user_id) {tail}",
            },
        ),
    ]


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def server_ms(connection: sa.Connection, statement: str, params: dict[str, Any]) -> float:
    plan = connection.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).scalar_one()
    return float((plan if isinstance(plan, list) else json.loads(plan))[0]["Execution Time"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--url", default=POSTGRES)
    parser.add_argument("--keep", action="store_true", help="keep the schema (its name is printed)")
    parser.add_argument("--sync", action="store_true", help="time full and incremental syncs through the CLI")
    parser.add_argument("--state", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"])
    args = parser.parse_args()
    as_of = datetime.now(UTC) if args.sync else AS_OF

    schema = f"bench_events_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(args.url)
    print(f"schema {schema}: {args.users:,} users, {args.events:,} order_completed rows (+1% duplicates)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
            connection.exec_driver_sql(f"SET LOCAL search_path = {schema}")
            seconds, _ = timed(
                lambda: [
                    connection.execute(
                        sa.text(statement),
                        {
                            "users": args.users,
                            "active": max(1, args.users * 6 // 10),
                            "events": args.events,
                            "as_of": as_of,
                        },
                    )
                    for statement in BUILD.split(";\n")
                    if statement.strip()
                ]
            )
            print(f"built in {seconds:.1f} s")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            seconds, _ = timed(
                lambda: [
                    connection.exec_driver_sql(f"VACUUM ANALYZE {schema}.{t}")
                    for t in ("users", "order_completed")
                ]
            )
            print(f"vacuum analyze in {seconds:.1f} s")
            settings = ", ".join(
                f"{name}={connection.exec_driver_sql(f'SHOW {name}').scalar()}"
                for name in ("work_mem", "shared_buffers", "max_parallel_workers_per_gather", "jit")
            )
            print(f"PostgreSQL {connection.exec_driver_sql('SHOW server_version').scalar()}: {settings}\n")
            if args.sync:
                for state in args.state:
                    sync_runs(args.url, schema, state, args.runs)
            else:
                for case in cases(schema):
                    report(connection, case, args.runs)
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            with engine.begin() as connection:
                connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


def rounded(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Rows in order, sums rounded: parallel workers add floats in no fixed order."""
    return sorted(tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows)


def report(connection: sa.Connection, case: Case, runs: int) -> None:
    params = case.compiled.params(AS_OF)
    compiled = case.compiled.select.compile(dialect=connection.dialect)
    compiled_sql, compiled_params = str(compiled), {**compiled.params, **params}
    (far,) = [value for name, value in params.items() if name != "as_of"]
    window = {"since": far, "until": params["as_of"]}

    def fetch_compiled() -> list[Any]:
        return list(connection.execute(case.compiled.select, params).all())

    def fetch(statement: str) -> Callable[[], list[Any]]:
        return lambda: list(connection.execute(sa.text(statement), window).all())

    variants: dict[str, Callable[[], list[Any]]] = {"compiled": fetch_compiled}
    statements = {"compiled": (compiled_sql, compiled_params)}
    for name, statement in case.hand_written.items():
        variants[name] = fetch(statement)
        bound = sa.text(statement).compile(dialect=connection.dialect)
        statements[name] = (str(bound), {**bound.params, **window})

    expected = rounded(fetch_compiled())  # a warm-up, and the rows all must return
    wall: dict[str, list[float]] = {name: [] for name in variants}
    server: dict[str, list[float]] = {name: [] for name in variants}
    for name, run in variants.items():
        rows = rounded(run())
        if rows != expected:
            raise SystemExit(
                f"{case.name}: {name} returns {len(rows)} rows, the compiled query {len(expected)}"
            )
    for _ in range(runs):
        for name, run in variants.items():
            wall[name].append(timed(run)[0])
    for name in variants:
        server[name].append(server_ms(connection, *statements[name]))
    print(f"{case.name}: {len(expected):,} rows")
    print(f"  {'query':<26} {'wall s (median)':>16} {'server ms':>10}")
    for name in variants:
        print(f"  {name:<26} {statistics.median(wall[name]):>16.3f} {statistics.median(server[name]):>10.0f}")
    best_wall = min(statistics.median(wall[name]) for name in case.hand_written)
    best_server = min(statistics.median(server[name]) for name in case.hand_written)
    print(
        f"  compiled / best hand-written: wall {statistics.median(wall['compiled']) / best_wall:.2f}, "
        f"server {statistics.median(server['compiled']) / best_server:.2f}\n"
    )


# --- --sync: an audience on events through the CLI ----------------------------------------------

CONDITION = "event('Order Completed').within(30 days).count() >= 1"
SYNC_KEY = "bench_buyers"


def seed_contacts(engine: sa.Engine, schema: str, planhat_url: str) -> None:
    """Every warehouse user as a Planhat contact under a company, before the timed syncs: an
    audience defined on events sends no company_id, and Planhat creates no contact without one."""
    import urllib.request

    from bench_sync import TOKEN

    def put(items: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(
            f"{planhat_url}/endusers", json.dumps(items).encode(), method="PUT",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()

    with engine.connect() as connection:
        rows = connection.execution_options(stream_results=True).execute(
            sa.text(f"SELECT id, email FROM {schema}.users")
        )
        while chunk := rows.fetchmany(5000):
            put([{"externalId": i, "email": e, "companyExternalId": "acme"} for i, e in chunk])


def sync_runs(url: str, schema: str, state: str, runs: int) -> None:
    """`runs` rounds of floor, full sync, churn, incremental sync; medians printed."""
    import tempfile

    from bench_sync import fake_planhat, last_run, planhat_state, run_cli, state_database

    rounds: list[tuple[float, tuple[float, float, float, int], tuple[float, float, float, int]]] = []
    for rep in range(runs):
        with tempfile.TemporaryDirectory(prefix="audience-sync-bench-events-") as scratch:
            workdir = Path(scratch)
            engine = sa.create_engine(url)
            floor = floor_seconds(engine, schema, workdir)
            reset_churn(engine, schema)
            with fake_planhat() as planhat_url, state_database(state, workdir) as state_url:
                seed_contacts(engine, schema, planhat_url)
                config = workdir / "events.toml"
                config.write_text(
                    f'[database]\nurl = "{state_url}"\n\n[planhat]\ntransport = "endusers"\n'
                    f'base_url = "{planhat_url}"\napi_token = "bench-api-token"\n'
                    "max_requests_per_second = 150\n\n"
                    f'[sources.warehouse]\nurl = "{url}"\nevents = "segment"\nschema = "{schema}"\n\n'
                    f'[[audiences]]\nname = "Bench Buyers"\nsource = "warehouse"\ncondition = "{CONDITION}"\n'
                )
                results = []
                for label in ("full", "incremental"):
                    if label == "incremental":
                        leavers = churn(engine, schema)
                    seconds, cpu, rss = run_cli(config, f"events-{state}-{label}-{rep}", None)
                    run = last_run(config)
                    # The run evaluated the window at its start: count the members as of then, or
                    # a user whose last order crossed the 30-day edge since would look extra.
                    members = count_members(engine, schema, run["started_at"])
                    held = planhat_state(planhat_url)
                    true, false = held["true"].get(SYNC_KEY, 0), held["false"].get(SYNC_KEY, 0)
                    if (true, false) != (members, leavers if label == "incremental" else 0):
                        raise SystemExit(
                            f"{label}: Planhat holds {true} true / {false} false; {members} members"
                        )
                    if run["status"] != "success" or run["pending"]:
                        raise SystemExit(
                            f"{label}: the run ended {run['status']} with {run['pending']} pending"
                        )
                    results.append((seconds, cpu, rss, int(run["sent"])))
            engine.dispose()
        full, incremental = results
        rounds.append((floor, full, incremental))
        print(
            f"  {state:<10} run {rep + 1}: floor {floor:6.2f}s | full {full[0]:7.2f}s (cpu {full[1]:6.2f}s) "
            f"{full[2]:4.0f} MB {full[3]:,} changes | incremental {incremental[0]:6.2f}s "
            f"({incremental[0] / floor:.1f}x floor, cpu {incremental[1]:5.2f}s) {incremental[2]:4.0f} MB "
            f"{incremental[3]:,} changes",
            flush=True,
        )
    median = statistics.median
    floors = median(r[0] for r in rounds)
    fulls = median(r[1][0] for r in rounds)
    incrementals = median(r[2][0] for r in rounds)
    print(
        f"{state}: medians of {runs}: floor {floors:.2f}s, full {fulls:.2f}s ({fulls / floors:.1f}x), "
        f"incremental {incrementals:.2f}s ({incrementals / floors:.1f}x)\n"
    )


CHURNED = "bench_churned"  # the users whose recent orders the churn deleted (restored before a round)


def members_sql(schema: str, as_of: str = "now()") -> str:
    return (
        f"SELECT u.id, u.email FROM {schema}.users u JOIN "
        f"(SELECT DISTINCT o.user_id FROM {schema}.order_completed o "
        f'WHERE o."timestamp" >= {as_of} - interval \'30 days\' AND o."timestamp" < {as_of}) b '
        "ON b.user_id = u.id"
    )


def count_members(engine: sa.Engine, schema: str, as_of: str | None = None) -> int:
    """Members now, or at `as_of` (an ISO time, e.g. a run's start)."""
    at = "now()"
    if as_of is not None:
        moment = datetime.fromisoformat(as_of)
        at = f"CAST('{(moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()}' AS timestamptz)"
    with engine.connect() as connection:
        count = connection.exec_driver_sql(f"SELECT count(*) FROM ({members_sql(schema, at)}) m")
        return int(count.scalar_one())


def floor_seconds(engine: sa.Engine, schema: str, workdir: Path) -> float:
    """The best hand-written query's rows read, their keys inserted into an indexed SQLite table."""
    import sqlite3

    started = time.perf_counter()
    target = sqlite3.connect(workdir / "floor.db")
    target.execute("CREATE TABLE floor (k TEXT PRIMARY KEY)")
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=10_000).exec_driver_sql(
            members_sql(schema)
        )
        for rows in result.partitions(10_000):
            target.executemany("INSERT INTO floor VALUES (?)", [(row[0],) for row in rows])
    target.commit()
    target.close()
    return time.perf_counter() - started


def reset_churn(engine: sa.Engine, schema: str) -> None:
    """Undo the last round's churn: its deleted orders back, its new ones gone."""
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {schema}.{CHURNED} (LIKE {schema}.order_completed)"
        )
        connection.exec_driver_sql(f"INSERT INTO {schema}.order_completed SELECT * FROM {schema}.{CHURNED}")
        connection.exec_driver_sql(f"DELETE FROM {schema}.{CHURNED}")
        connection.exec_driver_sql(f"DELETE FROM {schema}.order_completed WHERE id LIKE 'churn-%%'")


def churn(engine: sa.Engine, schema: str) -> int:
    """0.5% of the members lose their recent orders; as many other users order yesterday.
    Returns how many left."""
    members = count_members(engine, schema)
    k = max(1, members // 200)
    window = "\"timestamp\" >= now() - interval '30 days'"
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TEMPORARY TABLE leaving AS SELECT id FROM ({members_sql(schema)}) m "
            f"ORDER BY md5(id) LIMIT {k}"
        )
        connection.exec_driver_sql(
            f"WITH gone AS (DELETE FROM {schema}.order_completed o USING leaving l WHERE o.user_id = l.id "
            f"AND o.{window} RETURNING o.*) INSERT INTO {schema}.{CHURNED} SELECT * FROM gone"
        )
        connection.exec_driver_sql(
            f'INSERT INTO {schema}.order_completed (id, user_id, event, event_text, "timestamp", '
            "received_at, revenue) SELECT 'churn-' || u.id, u.id, 'order_completed', 'Order Completed', "
            f"now() - interval '1 day', "
            f"now(), 10 FROM {schema}.users u WHERE NOT EXISTS (SELECT 1 FROM {schema}.order_completed o "
            f"WHERE o.user_id = u.id AND o.{window}) AND u.id NOT IN (SELECT id FROM leaving) "
            f"ORDER BY md5(u.id) LIMIT {k}"
        )
    return k


if __name__ == "__main__":
    main()
