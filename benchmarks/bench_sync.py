"""Benchmark: a full and an incremental sync of N members, through the CLI, against the fake Planhat.

Run by hand; it prints figures and asserts nothing about time. For each state database and each
N it repeats `--runs` times, on a fresh state database and a fresh fake Planhat:

1. the floor: read the N member rows from the source with the raw driver (sqlite3) and
   bulk-insert the N keys into an indexed table of the state database's kind with its raw
   driver (sqlite3 executemany / psycopg COPY);
2. a full sync: `audience-sync --config X sync` in a subprocess;
3. 1% churn in the source (0.5% of the members leave, as many new users enter);
4. an incremental sync, again through the CLI.

Each sync is timed on the wall clock; its CPU time and peak RSS are the child's own (`os.wait4`'s
rusage). After each, the run must have ended `success` with nothing pending, and the fake's
`/_state` must show every member `true` and every leaver `false`. `--history K` then runs, per
state database and N, one full sync and K incremental syncs (1% churn each) and reports the
state database's size and rows per table.

    python benchmarks/bench_sync.py --n 100000 1000000 --state sqlite postgresql --runs 3
    python benchmarks/bench_sync.py --n 1000000 --state sqlite postgresql --runs 0 --history 30

Transport `endusers` at `max_requests_per_second = 150` (Planhat's hard limit; the default of
3 a second alone would hold a 1M full sync for 67 s). PostgreSQL runs get a fresh schema on
$AUDIENCE_SYNC_BENCH_POSTGRES (default postgres@127.0.0.1:5432/test), dropped afterwards.
`--py-spy DIR` runs each sync under `py-spy record` (installed separately), writing collapsed
stacks there; times measured that way include the sampler's overhead. `--cli` runs another
command in place of `audience-sync`, for experiments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAKE = ROOT / "tests" / "fake_planhat.py"
KEY = "bench_members"
TOKEN = "bench-api-token"
QUERY = "SELECT id AS user_id, email, name, company_id FROM users WHERE member = 1"
POSTGRES = os.environ.get("AUDIENCE_SYNC_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CHURN = 0.005  # leave, and as many enter: 1% of the audience changes per incremental run
READ_CHUNK = 10_000


@dataclass
class Sync:
    seconds: float
    cpu_seconds: float  # user + system time of the CLI process: less sensitive to a busy machine
    peak_rss_mb: float
    delivered: int  # changes Planhat accepted (the run's `sent`), with /_state checked against the source

    def rows_per_second(self, n: int) -> float:
        return n / self.seconds


@dataclass
class Sample:
    floor: float
    full: Sync
    incremental: Sync


@dataclass
class Case:
    state: str
    n: int
    samples: list[Sample] = field(default_factory=list)


# --- the source database ------------------------------------------------------------------


def make_source(path: Path, n: int, spare: int) -> None:
    """N members (member = 1) and `spare` users who never were members (the churn's entrants)."""
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, company_id TEXT, "
        "member INTEGER NOT NULL, ever INTEGER NOT NULL)"
    )
    rows = (
        (f"u{i:08d}", f"user{i}@example.com", f"User {i}", f"c{i % 5000}", int(i < n), int(i < n))
        for i in range(n + spare)
    )
    connection.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", rows)
    connection.commit()
    connection.close()


def churn(path: Path, n: int) -> None:
    """0.5% of the members leave; as many users who never were members enter."""
    k = max(1, int(n * CHURN))
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(
            "UPDATE users SET member = 0 WHERE id IN "
            "(SELECT id FROM users WHERE member = 1 ORDER BY random() LIMIT ?)",
            (k,),
        )
        entered = connection.execute(
            "UPDATE users SET member = 1, ever = 1 WHERE id IN "
            "(SELECT id FROM users WHERE ever = 0 ORDER BY random() LIMIT ?)",
            (k,),
        ).rowcount
    connection.close()
    if entered < k:
        raise SystemExit("the source ran out of new users; raise the spare pool")


def expected(path: Path) -> tuple[int, int]:
    """(members, leavers): what Planhat must hold as true and as false."""
    connection = sqlite3.connect(path)
    members, leavers = connection.execute(
        "SELECT sum(member = 1), sum(member = 0 AND ever = 1) FROM users"
    ).fetchone()
    connection.close()
    return int(members or 0), int(leavers or 0)


# --- the floor ----------------------------------------------------------------------------


def floor_seconds(source: Path, state: str, workdir: Path) -> float:
    """Read the members with sqlite3, bulk-insert their keys into an indexed table."""
    started = time.perf_counter()
    reader = sqlite3.connect(source)
    cursor = reader.execute(QUERY)
    if state == "sqlite":
        target = sqlite3.connect(workdir / "floor.db")
        target.execute("PRAGMA journal_mode=WAL")
        target.execute("PRAGMA synchronous=NORMAL")
        target.execute("CREATE TEMP TABLE floor (k TEXT PRIMARY KEY)")
        while rows := cursor.fetchmany(READ_CHUNK):
            target.executemany("INSERT INTO floor VALUES (?)", [(row[0],) for row in rows])
        target.commit()
        target.close()
        (workdir / "floor.db").unlink(missing_ok=True)
    else:
        import psycopg

        with psycopg.connect(_libpq(POSTGRES)) as target:
            target.execute("CREATE TEMP TABLE floor (k TEXT PRIMARY KEY)")
            with target.cursor().copy("COPY floor (k) FROM STDIN") as copy:
                while rows := cursor.fetchmany(READ_CHUNK):
                    for row in rows:
                        copy.write_row((row[0],))
            target.commit()
    reader.close()
    return time.perf_counter() - started


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- the fake Planhat and the CLI ---------------------------------------------------------


@contextmanager
def fake_planhat() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--api-token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit(f"the fake Planhat did not start: {url!r}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def planhat_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_state", timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@contextmanager
def state_database(state: str, workdir: Path) -> Iterator[str]:
    if state == "sqlite":
        path = workdir / f"state-{uuid.uuid4().hex[:8]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(POSTGRES), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(POSTGRES), autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def write_config(path: Path, state_url: str, source: Path, planhat_url: str) -> None:
    path.write_text(
        "[database]\n"
        f'url = "{state_url}"\n\n'
        "[planhat]\n"
        'transport = "endusers"\n'
        f'base_url = "{planhat_url}"\n'
        f'api_token = "{TOKEN}"\n'
        "max_requests_per_second = 150\n\n"
        "[sources.app]\n"
        f'url = "sqlite:///{source}"\n\n'
        "[[audiences]]\n"
        'name = "Bench Members"\n'
        'source = "app"\n'
        f'query = "{QUERY}"\n'
    )


CLI = [str(Path(sys.executable).with_name("audience-sync"))]


def run_cli(config: Path, label: str, py_spy: Path | None) -> tuple[float, float, float]:
    """Run one sync through the CLI; returns wall seconds, CPU seconds and peak RSS in MB of
    that process."""
    command = [*CLI, "--config", str(config), "sync"]
    if py_spy is not None:
        py_spy.mkdir(parents=True, exist_ok=True)
        command = ["py-spy", "record", "--rate", "200", "--subprocesses", "--format", "raw",
                   "-o", str(py_spy / f"{label}.txt"), "--", *command]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out = process.stdout.read().decode() if process.stdout else ""
    err = process.stderr.read().decode() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{label}: audience-sync exited {process.returncode}\n{out}\n{err}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def checked_sync(config: Path, source: Path, planhat_url: str, label: str, py_spy: Path | None) -> Sync:
    seconds, cpu, rss = run_cli(config, label, py_spy)
    state = planhat_state(planhat_url)
    members, leavers = expected(source)
    true, false = state["true"].get(KEY, 0), state["false"].get(KEY, 0)
    if (true, false) != (members, leavers):
        raise SystemExit(
            f"{label}: Planhat holds {true} true / {false} false, the source has "
            f"{members} members / {leavers} leavers"
        )
    last = last_run(config)
    if last["status"] != "success" or last["pending"]:
        raise SystemExit(f"{label}: the run ended {last['status']} with {last['pending']} pending")
    return Sync(seconds, cpu, rss, int(last["sent"]))


def last_run(config: Path) -> dict[str, Any]:
    command = [*CLI, "--config", str(config)]
    out = subprocess.run([*command, "history", "--json", "--limit", "1"], capture_output=True, check=True)
    return json.loads(out.stdout)[0]  # type: ignore[no-any-return]


# --- the measurements ---------------------------------------------------------------------


def spare_for(n: int, incrementals: int) -> int:
    return int(n * CHURN * incrementals) + n // 20 + 10


def one_sample(state: str, n: int, template: Path, workdir: Path, rep: int, py_spy: Path | None) -> Sample:
    source = workdir / "source.db"
    shutil.copyfile(template, source)
    floor = floor_seconds(source, state, workdir)
    config = workdir / "bench.toml"
    with fake_planhat() as planhat_url, state_database(state, workdir) as state_url:
        write_config(config, state_url, source, planhat_url)
        full = checked_sync(config, source, planhat_url, f"{state}-{n}-full-{rep}", py_spy)
        churn(source, n)
        incremental = checked_sync(config, source, planhat_url, f"{state}-{n}-incremental-{rep}", py_spy)
    sample = Sample(floor, full, incremental)
    print(
        f"  {state:10} n={n:<8} run {rep + 1}: floor {floor:6.2f}s | "
        f"full {full.seconds:6.2f}s ({full.seconds / floor:4.1f}x, cpu {full.cpu_seconds:5.2f}s) "
        f"{full.peak_rss_mb:4.0f} MB {full.delivered} changes | incremental {incremental.seconds:5.2f}s "
        f"({incremental.seconds / floor:3.1f}x, cpu {incremental.cpu_seconds:5.2f}s) "
        f"{incremental.peak_rss_mb:4.0f} MB {incremental.delivered} changes",
        flush=True,
    )
    return sample


def history_size(state: str, n: int, runs: int, template: Path, workdir: Path) -> None:
    source = workdir / "source.db"
    shutil.copyfile(template, source)
    config = workdir / "bench.toml"
    with fake_planhat() as planhat_url, state_database(state, workdir) as state_url:
        write_config(config, state_url, source, planhat_url)
        full = checked_sync(config, source, planhat_url, f"{state}-{n}-history-full", None)
        times = []
        for run in range(runs):
            churn(source, n)
            times.append(checked_sync(config, source, planhat_url, f"{state}-{n}-history-{run}", None))
        print(
            f"\n### State database after 1 full + {runs} incremental runs ({state}, n={n:,})\n\n"
            f"full {full.seconds:.2f}s; "
            f"incremental median {statistics.median(t.seconds for t in times):.2f}s "
            f"(first {times[0].seconds:.2f}s, last {times[-1].seconds:.2f}s), "
            f"peak RSS max {max(t.peak_rss_mb for t in times):.0f} MB\n"
        )
        report = _sqlite_size(state_url) if state == "sqlite" else _postgres_size(state_url)
        print("| table | rows | size (MB) |\n|---|---:|---:|")
        for table, rows, size in report["tables"]:
            print(f"| {table} | {rows:,} | {size / 1e6:.1f} |")
        print(f"| **total** | | **{report['total'] / 1e6:.1f}** |")
        print(f"\nleft-over staging tables: {report['stage'] or 'none'}\n", flush=True)


TABLES = ("audiences", "baseline", "pending", "runs", "changes", "leases", "resync_requests")


def _sqlite_size(url: str) -> dict[str, Any]:
    path = url.removeprefix("sqlite:///")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sizes: dict[str, int] = {}
    try:
        for _name, table, size in connection.execute(
            "SELECT d.name, coalesce(m.tbl_name, d.name), sum(d.pgsize) FROM dbstat d "
            "LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY d.name"
        ):
            sizes[table] = sizes.get(table, 0) + size
    except sqlite3.OperationalError:  # no dbstat in this build
        pass
    tables = [
        (t, connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0], sizes.get(t, 0)) for t in TABLES
    ]
    stage = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE name LIKE 'stage%'")]
    connection.close()
    total = sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    return {"tables": tables, "total": total, "stage": stage}


def _postgres_size(url: str) -> dict[str, Any]:
    import psycopg

    schema = url.rsplit("%3D", 1)[1]
    with psycopg.connect(_libpq(POSTGRES), autocommit=True) as connection:
        connection.execute(f"SET search_path TO {schema}")
        connection.execute("VACUUM ANALYZE")
        tables = []
        for table in TABLES:
            rows = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            size = connection.execute("SELECT pg_total_relation_size(%s)", (f"{schema}.{table}",)).fetchone()[
                0
            ]  # type: ignore[index]
            tables.append((table, rows, size))
        stage = [
            r[0]
            for r in connection.execute(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                "WHERE table_name LIKE 'stage%%'"
            )
        ]
    return {"tables": tables, "total": sum(size for *_, size in tables), "stage": stage}


# --- reporting ----------------------------------------------------------------------------


def summary(cases: list[Case]) -> None:
    print(
        "\n| state | N | full (s) | incremental (s) | floor (s) | full / floor | incr. / floor "
        "| peak RSS full / incr. (MB) | rows/s full / incr. | CPU s full / incr. |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for case in cases:
        s = case.samples
        if not s:
            continue

        def med(values: Any) -> float:
            return statistics.median(list(values))

        full, inc = med(x.full.seconds for x in s), med(x.incremental.seconds for x in s)
        print(
            f"| {case.state} | {case.n:,} | {full:.2f} | {inc:.2f} | {med(x.floor for x in s):.2f} "
            f"| {med(x.full.seconds / x.floor for x in s):.1f}x "
            f"| {med(x.incremental.seconds / x.floor for x in s):.1f}x "
            f"| {med(x.full.peak_rss_mb for x in s):.0f} / {med(x.incremental.peak_rss_mb for x in s):.0f} "
            f"| {case.n / full:,.0f} / {case.n / inc:,.0f} "
            f"| {med(x.full.cpu_seconds for x in s):.1f} / {med(x.incremental.cpu_seconds for x in s):.1f} |"
        )
    print(f"\nmedians of {max(len(c.samples) for c in cases)} runs per row", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="audience sizes")
    parser.add_argument("--state", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of full + incremental")
    parser.add_argument("--history", type=int, default=0, help="incremental runs for the size report")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--py-spy", type=Path, default=None, help="write py-spy profiles (raw) here")
    parser.add_argument("--cli", default=None, help="command to run instead of audience-sync (experiments)")
    args = parser.parse_args(argv)
    if args.cli:
        CLI[:] = args.cli.split()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="audience-sync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    try:
        for n in args.n:
            template = workdir / f"template-{n}.db"
            if not template.exists():
                started = time.perf_counter()
                make_source(template, n, spare_for(n, max(args.history, 1)))
                print(f"source with {n:,} members built in {time.perf_counter() - started:.1f}s", flush=True)
            for state in args.state:
                case = Case(state, n)
                for rep in range(args.runs):
                    case.samples.append(one_sample(state, n, template, workdir, rep, args.py_spy))
                cases.append(case)
                if args.history:
                    history_size(state, n, args.history, template, workdir)
        if any(c.samples for c in cases):
            summary(cases)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
