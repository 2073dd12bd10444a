"""Benchmark: an incremental run with `planner_schema` against the streaming path, same data.

Run by hand; it prints figures and checks every run's result in the fake Planhat (every member
true, every leaver false), asserting nothing about time. It builds a PostgreSQL warehouse, a
database of its own (`bench_planner_<id>`, dropped at the end), with `users`: --n members
(id, email, name, company_id) and spare rows to churn in. Two configs read the same table:
one with `planner_schema` on its source, one without (the streaming path), each with its own
PostgreSQL state schema and its own fake Planhat (bulk transport, 150 calls/s).

Both take a full sync (timed too); then, --runs times: 1% churn in the warehouse (0.5% of the
members leave, as many users enter), and an incremental sync of each path, in turn, each in a
process of its own. Printed: the medians of the full and incremental syncs per path, their
ratio, peak RSS, and what each incremental run read out of the warehouse: rows (the streaming
path: the audience; the planner: the changed users' rows of the previous and the new
snapshot, from the run's log) and bytes (those rows times the average width of the
contract's columns, measured with pg_column_size).

    flock /work/bench.lock python benchmarks/bench_planner.py                 # 1M members
    flock /work/bench.lock python benchmarks/bench_planner.py --n 100000 --runs 3
    flock /work/bench.lock python benchmarks/bench_planner.py --n 10000000 --warehouse duckdb

`--py-spy DIR` runs each incremental sync under `py-spy record` (installed separately), writing
its collapsed stacks and its log there; times measured that way include the sampler's overhead.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import CLI, POSTGRES, TOKEN, fake_planhat, planhat_state, quiesce, spied, state_database

KEY = "bench_members"
QUERY = "SELECT id AS user_id, email, name, company_id FROM users WHERE member"
CHURN = 0.005  # leave, and as many enter: 1% of the audience changes per incremental run
PLANNER = "audience_sync_planner"
READ_OUT = re.compile(r"read (\d+) rows out of the planner schema")
# the planner's SQL in the warehouse: finding the changed rows (before the commit), then the
# snapshot's advance in place (after it, beside the delivery)
IN_WAREHOUSE = re.compile(r"changed rows of generation \d+ found in ([\d.]+)s")
ADVANCED = re.compile(r"advanced in place to generation \d+ in ([\d.]+)s")


@dataclass
class Path_:
    label: str
    config: Path
    planhat: str
    full: float = 0.0
    full_rss: float = 0.0
    incremental: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    rows_out: list[int] = field(default_factory=list)
    warehouse: list[float] = field(default_factory=list)  # the planner's diff in the warehouse
    advance: list[float] = field(default_factory=list)  # its advance, beside the delivery


USERS = "CREATE TABLE users (id text NOT NULL, email text, name text, company_id text, member boolean)"
# the members and the spare rows, in both warehouses' SQL
FILL = (
    "INSERT INTO users SELECT 'u' || i, 'user' || i || '@example.com', 'User ' || i, "
    "'c' || mod(i, 1000), i <= {n} FROM generate_series(1, {total}) AS t(i)"
)
# 0.5% of the members leave, as many non-members enter (a different slice each time)
CHURN_SQL = (
    "UPDATE users SET member = NOT member WHERE id IN ("
    "SELECT id FROM users WHERE member ORDER BY {hash}(id || '{r}') LIMIT {m}) "
    "OR id IN (SELECT id FROM users WHERE NOT member ORDER BY {hash}(id || '{r}') LIMIT {m})"
)
COUNTS = "SELECT count(*), avg({w}(id) + {w}(email) + {w}(name) + {w}(company_id)) FROM users WHERE member"


@contextmanager
def postgres_warehouse(n: int, spare: int, workdir: Path) -> Iterator[str]:
    name = f"bench_planner_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    url = sa.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    try:
        with _execute(url, isolation_level="AUTOCOMMIT") as connection:  # VACUUM: no transaction
            connection.exec_driver_sql(USERS)
            connection.exec_driver_sql(FILL.format(n=n, total=n + spare))
            connection.exec_driver_sql("CREATE UNIQUE INDEX ON users (id)")
            connection.exec_driver_sql("VACUUM ANALYZE users")
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


@contextmanager
def duckdb_warehouse(n: int, spare: int, workdir: Path) -> Iterator[str]:
    url = f"duckdb:///{workdir / 'warehouse.duckdb'}"
    with _execute(url) as connection:
        connection.exec_driver_sql(USERS)
        connection.exec_driver_sql(FILL.format(n=n, total=n + spare))
    yield url


WAREHOUSES = {"postgresql": postgres_warehouse, "duckdb": duckdb_warehouse}


@contextmanager
def _execute(url: str, **options: Any) -> Iterator[sa.Connection]:
    """A connection that is closed (and its engine disposed) afterwards: a DuckDB file is held
    by one writing process at a time, and the syncs run in their own."""
    engine = sa.create_engine(url, **options)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def churn(url: str, n: int, rep: int) -> None:
    """0.5% of the members leave, as many non-members enter (a different slice each time)."""
    with _execute(url) as connection:
        hash_ = "hashtext" if connection.dialect.name == "postgresql" else "hash"
        connection.exec_driver_sql(CHURN_SQL.format(hash=hash_, r=rep, m=max(1, int(n * CHURN))))


def counts(url: str) -> tuple[int, float]:
    """Members, and the average width in bytes of the contract columns of a member's row
    (PostgreSQL: as stored, pg_column_size; DuckDB: the strings' lengths)."""
    with _execute(url) as connection:
        width = "pg_column_size" if connection.dialect.name == "postgresql" else "strlen"
        members, average = connection.exec_driver_sql(COUNTS.format(w=width)).one()
    return int(members), float(average)


def write_config(path: Path, state_url: str, source_url: str, planhat_url: str, planner: bool) -> None:
    schema = f'planner_schema = "{PLANNER}"\n' if planner else ""
    path.write_text(
        f'[database]\nurl = "{state_url}"\n\n'
        f'[planhat]\ntransport = "endusers"\nbase_url = "{planhat_url}"\napi_token = "{TOKEN}"\n'
        "max_requests_per_second = 150\n\n"
        f'[sources.app]\nurl = "{source_url}"\n{schema}\n'
        f'[[audiences]]\nname = "Bench Members"\nsource = "app"\nquery = "{QUERY}"\n'
    )


def run_sync(path: Path, *args: str, py_spy: Path | None = None) -> tuple[float, float, str]:
    """One sync in its own process: wall seconds, peak RSS in MB, its log; with `py_spy`, under
    the sampler, its stacks written to that file."""
    command = [*CLI, "--config", str(path), "--log-level", "info", "sync", *args]
    if py_spy is not None:
        command = spied(command, py_spy)
    quiesce()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    err = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{path.name}: audience-sync failed\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, err


def check(path_: Path_, members: int, leavers: int) -> None:
    state = planhat_state(path_.planhat)
    true, false = state["true"].get(KEY, 0), state["false"].get(KEY, 0)
    if (true, false) != (members, leavers):
        raise SystemExit(
            f"{path_.label}: Planhat holds {true} true / {false} false, expected {members} / {leavers}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="members")
    parser.add_argument("--runs", type=int, default=3, help="incremental runs per path")
    parser.add_argument("--py-spy", type=Path, default=None, help="profile the incremental runs here")
    parser.add_argument("--warehouse", choices=sorted(WAREHOUSES), default="postgresql")
    parser.add_argument("--duckdb-memory-limit", default=None, help="e.g. 512MB (DuckDB's memory_limit)")
    args = parser.parse_args()
    n, moved = args.n, max(1, int(args.n * CHURN))
    spare = moved * args.runs * 2 + 100
    if args.duckdb_memory_limit and args.warehouse != "duckdb":
        parser.error("--duckdb-memory-limit is for --warehouse duckdb")
    with tempfile.TemporaryDirectory() as tmp, WAREHOUSES[args.warehouse](n, spare, Path(tmp)) as url:
        workdir = Path(tmp)
        # DuckDB takes its settings from the URL's query (the syncs' connections and ours)
        source_url = f"{url}?memory_limit={args.duckdb_memory_limit}" if args.duckdb_memory_limit else url
        with (
            state_database("postgresql", workdir) as planned_state,
            state_database("postgresql", workdir) as streamed_state,
            fake_planhat(150) as planned_planhat,
            fake_planhat(150) as streamed_planhat,
        ):
            paths = [
                Path_("planner", workdir / "planned.toml", planned_planhat),
                Path_("streaming", workdir / "streamed.toml", streamed_planhat),
            ]
            write_config(paths[0].config, planned_state, source_url, planned_planhat, planner=True)
            write_config(paths[1].config, streamed_state, source_url, streamed_planhat, planner=False)
            for path_ in paths:
                subprocess.run(
                    [*CLI, "--config", str(path_.config), "db", "upgrade"], check=True, capture_output=True
                )
                path_.full, path_.full_rss, _ = run_sync(path_.config)
                check(path_, n, 0)
            members, width = counts(source_url)
            leavers = 0
            for rep in range(args.runs):
                churn(source_url, n, rep)
                leavers += moved
                members, _ = counts(source_url)
                for path_ in paths:
                    profile = args.py_spy / f"{path_.label}-{rep}.txt" if args.py_spy else None
                    seconds, rss, log = run_sync(path_.config, py_spy=profile)
                    if profile is not None:
                        profile.with_suffix(".log").write_text(log)
                    path_.incremental.append(seconds)
                    path_.rss.append(rss)
                    found = READ_OUT.search(log)
                    path_.rows_out.append(int(found.group(1)) if found else members)
                    spent, advanced = IN_WAREHOUSE.search(log), ADVANCED.search(log)
                    if spent and advanced:
                        path_.warehouse.append(float(spent.group(1)))
                        path_.advance.append(float(advanced.group(1)))
                    check(path_, members, _leavers(path_, leavers))
        report(n, moved, width, paths, args.warehouse)


def _leavers(path_: Path_, leavers: int) -> int:
    """Users Planhat holds `false`: every leaver so far (an enterer who left again counts once)."""
    return planhat_state(path_.planhat)["false"].get(KEY, 0) if leavers else 0


def report(n: int, moved: int, width: float, paths: list[Path_], warehouse: str) -> None:
    print(
        f"\n{n:,} members, {2 * moved:,} changes per incremental run (1% churn); "
        f"{warehouse} warehouse, PostgreSQL state"
    )
    print(f"{'path':<10} {'full s':>8} {'incr s (median)':>16} {'incr runs':>26} {'peak RSS MB':>12} "
          f"{'rows out':>10} {'MB out':>8}")  # fmt: skip
    for p in paths:
        rows = statistics.median(p.rows_out)
        print(
            f"{p.label:<10} {p.full:>8.2f} {statistics.median(p.incremental):>16.2f} "
            f"{', '.join(f'{s:.2f}' for s in p.incremental):>26} {max(p.rss):>12.0f} "
            f"{rows:>10,.0f} {rows * width / 1e6:>8.2f}"
        )
    planned, streamed = (statistics.median(p.incremental) for p in paths)
    print(
        f"incremental: streaming / planner = {streamed / planned:.2f}x; average row width {width:.0f} bytes"
    )
    if paths[0].warehouse:
        spent, advanced = statistics.median(paths[0].warehouse), statistics.median(paths[0].advance)
        print(
            f"planner: {spent:.2f}s of its incremental run finding the changed rows in the warehouse "
            f"(median), {planned - spent:.2f}s the rest (read-out, queueing, delivery); the snapshot's "
            f"advance in place {advanced:.2f}s, beside the delivery"
        )


if __name__ == "__main__":
    main()
