"""Benchmark: `explain` (state.explain, what `audience-sync explain` and /users/<id> run) on an
audience of N members.

Run by hand; it prints figures and asserts nothing about time. For each state database it
builds, in SQL, what a synced audience of N members leaves behind: N baseline rows, the full
sync's N delivered changes plus a 1% churn run's, 1% of the users with a change pending (a
tenth of those in doubt), and a trait over the same users with a value each. Then:

    plans    the query plan of each lookup (baseline, pending, changes, email) at N
    explain  `explain.explain` for `--lookups` random users (half by user_id, half by email),
             in-process, on one connection: median and p95 per user
    cli      `audience-sync explain USER --json` as a subprocess, `--runs` times: median wall
             time (mostly Python's and the imports' start-up)
    scan     for contrast, the same changes lookup without the audience (no index starts with
             user_ref, so it scans): median of 3

    python benchmarks/bench_explain.py --n 1000000 --state sqlite postgresql

PostgreSQL runs in a schema of its own (`wt_bench_explain_<random>`), dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from audience_sync.state import database, explain

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("AUDIENCE_SYNC_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CLI = [str(Path(sys.executable).with_name("audience-sync"))]
AUDIENCE, TRAIT = "bench_members", "bench_revenue"


def fill(engine: sa.Engine, n: int) -> None:
    """What a full sync and one 1% churn run of an audience and a trait of n users leave."""
    postgres = engine.dialect.name == "postgresql"
    series = (
        f"(SELECT i FROM generate_series(1, {n}) AS g(i)) AS s"
        if postgres
        else f"(WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) "
        "SELECT i FROM c) AS s"
    )
    now = "now() AT TIME ZONE 'utc'" if postgres else "datetime('now')"
    true = "true" if postgres else "1"
    false = "false" if postgres else "0"
    with engine.begin() as c:
        run = c.exec_driver_sql
        run(
            "INSERT INTO audiences (key, name, created_at, baseline_at, kind, level, baseline_count) VALUES "
            f"('{AUDIENCE}', 'Bench Members', {now}, {now}, 'audience', 'user', {n}), "
            f"('{TRAIT}', 'Bench Revenue', {now}, {now}, 'trait', 'user', {n})"
        )
        run(
            "INSERT INTO runs (id, audience_key, kind, trigger, status, started_at, finished_at, members) "
            "VALUES "
            f"(1, '{AUDIENCE}', 'full', 'cli', 'success', {now}, {now}, {n}), "
            f"(2, '{TRAIT}', 'full', 'cli', 'success', {now}, {now}, {n}), "
            f"(3, '{AUDIENCE}', 'incremental', 'cli', 'partial', {now}, {now}, {n}), "
            f"(4, '{TRAIT}', 'incremental', 'cli', 'success', {now}, {now}, {n})"
        )
        for key, value_json in ((AUDIENCE, "NULL"), (TRAIT, "CAST(i * 3 AS TEXT)")):
            full = 1 if key == AUDIENCE else 2
            run(
                "INSERT INTO baseline (audience_key, user_ref, user_id, email, run_id, told_at, value_json) "
                f"SELECT '{key}', 'u' || i, 'u' || i, 'u' || i || '@example.com', {full}, "
                f"{now}, {value_json} FROM {series}"
            )
            run(
                "INSERT INTO changes (run_id, audience_key, user_ref, value, value_json, outcome, at) "
                f"SELECT {full}, '{key}', 'u' || i, {true}, {value_json}, 'delivered', {now} "
                f"FROM {series}"
            )
        # The churn run: 1% of the users changed (audience: exited; trait: a new value), and as
        # many again are pending for the audience, a tenth of them in doubt.
        run(
            "INSERT INTO changes (run_id, audience_key, user_ref, value, value_json, outcome, at) "
            f"SELECT 3, '{AUDIENCE}', 'u' || i, {false}, NULL, 'delivered', {now} FROM {series} "
            "WHERE i - i / 100 * 100 = 7"
        )
        run(
            "INSERT INTO changes (run_id, audience_key, user_ref, value, value_json, outcome, at) "
            f"SELECT 4, '{TRAIT}', 'u' || i, {true}, CAST(i * 4 AS TEXT), 'delivered', {now} FROM {series} "
            "WHERE i - i / 100 * 100 = 7"
        )
        run(
            "INSERT INTO pending (audience_key, user_ref, value, user_id, email, run_id, queued_at, "
            "attempts, last_error, in_doubt) "
            f"SELECT '{AUDIENCE}', 'u' || i, {false}, 'u' || i, 'u' || i || '@example.com', 3, {now}, 1, "
            f"'503 from Planhat', CASE WHEN i - i / 1000 * 1000 = 3 THEN {true} ELSE {false} END "
            f"FROM {series} WHERE i - i / 100 * 100 = 3"
        )
        if postgres:
            run("SELECT setval(pg_get_serial_sequence('runs', 'id'), 4)")
    with engine.begin() as c:
        c.exec_driver_sql("ANALYZE")


def plans(engine: sa.Engine) -> dict[str, str]:
    found = {}
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as c:
        for table, statement in explain.statements([AUDIENCE, TRAIT], ["u4242"]).items():
            sql = str(statement.compile(c, compile_kwargs={"literal_binds": True}))
            rows = c.exec_driver_sql(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + sql).all()
            found[table] = " | ".join(str(row[0] if postgres else row[-1]) for row in rows)
    return found


def time_explain(engine: sa.Engine, n: int, lookups: int) -> tuple[float, float, int]:
    rng = random.Random(7)
    audiences = {AUDIENCE: ("Bench Members", "audience"), TRAIT: ("Bench Revenue", "trait")}
    took = []
    known = 0
    with engine.connect() as c:
        for index in range(lookups):
            i = rng.randint(1, n)
            user = f"u{i}" if index % 2 else f"u{i}@example.com"
            started = time.perf_counter()
            story = explain.explain(c, user, audiences)
            took.append(time.perf_counter() - started)
            known += story.known
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.95)], known


def time_scan(engine: sa.Engine) -> float:
    """The changes of one user read without an index (SQLite would skip-scan the audience index
    after ANALYZE: NOT INDEXED forbids it; PostgreSQL 15 has no skip scan)."""
    took = []
    hint = "NOT INDEXED " if engine.dialect.name == "sqlite" else ""
    with engine.connect() as c:
        for _ in range(3):
            started = time.perf_counter()
            c.exec_driver_sql(f"SELECT count(*) FROM changes {hint}WHERE user_ref = 'u4242'").all()
            took.append(time.perf_counter() - started)
    return statistics.median(took)


def time_cli(url: str, runs: int, directory: Path) -> float:
    config = directory / "bench_explain.toml"
    config.write_text(
        f'[database]\nurl = "{url}"\n\n[sources.app]\nurl = "sqlite:///{directory / "src.db"}"\n\n'
        '[[audiences]]\nname = "Bench Members"\nsource = "app"\nquery = "SELECT 1 AS user_id"\n\n'
        '[[traits]]\nname = "Bench Revenue"\nsource = "app"\nquery = "SELECT 1 AS user_id, 1 AS value"\n'
    )
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([*CLI, "--config", str(config), "explain", "u4243", "--json"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        took.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"explain failed: {done.stderr.strip()}")
    return statistics.median(took)


def bench(state: str, n: int, lookups: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_explain_") as tmp:
        directory = Path(tmp)
        schema = None
        if state == "sqlite":
            url = f"sqlite:///{directory / 'state.db'}"
        else:
            schema = f"wt_bench_explain_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(POSTGRES)
            with admin.begin() as c:
                c.exec_driver_sql(f"CREATE SCHEMA {schema}")
            url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
        try:
            engine = database.open_state(url)
            started = time.perf_counter()
            fill(engine, n)
            filled = time.perf_counter() - started
            print(f"{state}: filled {n:,} members (baseline, changes, pending) in {filled:.1f}s")
            for table, plan in plans(engine).items():
                print(f"{state}: plan {table}: {plan}")
            median, p95, known = time_explain(engine, n, lookups)
            print(f"{state}: explain, {lookups} random users ({known} known): median {median * 1000:.2f} ms, "
                  f"p95 {p95 * 1000:.2f} ms")  # fmt: skip
            scan = time_scan(engine)
            print(f"{state}: the same changes lookup without the audience (a scan): {scan * 1000:.1f} ms "
                  f"({scan / median:.0f}x explain's median)")  # fmt: skip
            cli = time_cli(url, runs, directory)
            print(f"{state}: `audience-sync explain USER --json`, median of {runs}: {cli:.2f}s")
            engine.dispose()
        finally:
            if schema is not None:
                with admin.begin() as c:
                    c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
                admin.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    parser.add_argument(
        "--state", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args: Any = parser.parse_args(argv)
    for n in args.n:
        for state in args.state:
            bench(state, n, args.lookups, args.runs)


if __name__ == "__main__":
    main()
