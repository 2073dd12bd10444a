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
state database's size and rows per table. With both state databases, run k of each goes back to
back (SQLite, PostgreSQL, SQLite, ...), so both see the same spells of load on a shared
machine, and the summary adds the median of the paired PostgreSQL / SQLite ratios.

    python benchmarks/bench_sync.py --n 100000 1000000 --state sqlite postgresql --runs 3
    python benchmarks/bench_sync.py --n 1000000 --state sqlite postgresql --runs 0 --history 30

Transport `endusers` at `max_requests_per_second = 150` (Planhat's hard limit; the default of
3 a second alone would hold a 1M full sync for 67 s). PostgreSQL runs get a fresh schema on
$AUDIENCE_SYNC_BENCH_POSTGRES (default postgres@127.0.0.1:5432/test), dropped afterwards.
`--py-spy DIR` runs each sync under `py-spy record` (installed separately), writing collapsed
stacks there; times measured that way include the sampler's overhead. `--pg-stats` resets
`pg_stat_statements` before each PostgreSQL sync and prints its heaviest statements after
(server-wide: other clients of the server show up too). `--cli` runs another command in place
of `audience-sync`, for experiments (e.g. an older checkout). The source's query returns its
rows in key order, which lets staging skip its sort; `--order random` stores them shuffled.

The fleet case (`--audiences N`) runs N audiences over one table of `--users U` users, each
audience a deterministic subset of `--members M` of them (a fixed permutation of the users,
rotated by i*U/N for audience i, so every user is in about M*N/U audiences), and times their
initial sync to the end:

    --mode sync     one `audience-sync sync` of every audience
    --mode daemon   `audience-sync run`, timed until every audience has a successful run
                    (read from the state database's `runs`), then stopped with SIGTERM

with `--transport segment|endusers` at `--rate` requests/s, against a fake that answers 429 above
`--fake-rps` (default: the same rate). It prints the wall time, the requests and contact items
the fake received (and per user), 429s, the process's CPU time and peak RSS, and how long
`audience-sync status` and `history` take (once while the sync runs, once after; `--help`
alone shows the interpreter's and imports' share), and checks that the fake holds every member
of every audience `true`:

    python benchmarks/bench_sync.py --audiences 10 --users 2000 --members 2000 \
        --transport segment --mode sync daemon --state sqlite postgresql
    python benchmarks/bench_sync.py --audiences 200 --users 20000 --members 5000 \
        --mode daemon --state postgresql
    python benchmarks/bench_sync.py --audiences 1 --users 1000000 --members 1000000 \
        --mode daemon --state postgresql      # the one-audience reference for the line above
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
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
from datetime import UTC, datetime
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


def make_source(path: Path, n: int, spare: int, order: str = "key") -> None:
    """N members (member = 1) and `spare` users who never were members (the churn's entrants).
    The audience's query scans the table in rowid order: `order` "key" stores the rows in the
    order of their ids (the query returns them in key order), "random" shuffled."""
    connection = sqlite3.connect(path)
    columns = (
        "(id TEXT PRIMARY KEY, email TEXT, name TEXT, company_id TEXT, "
        "member INTEGER NOT NULL, ever INTEGER NOT NULL)"
    )
    connection.execute(f"CREATE {'TEMP ' if order == 'random' else ''}TABLE ordered {columns}")
    rows = (
        (f"u{i:08d}", f"user{i}@example.com", f"User {i}", f"c{i % 5000}", int(i < n), int(i < n))
        for i in range(n + spare)
    )
    connection.executemany("INSERT INTO ordered VALUES (?, ?, ?, ?, ?, ?)", rows)
    if order == "random":
        connection.execute(f"CREATE TABLE users {columns}")
        connection.execute("INSERT INTO users SELECT * FROM ordered ORDER BY random()")
    else:
        connection.execute("ALTER TABLE ordered RENAME TO users")
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
    quiesce()
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

        with psycopg.connect(_libpq(POSTGRES)) as server:
            server.execute("CREATE TEMP TABLE floor (k TEXT PRIMARY KEY)")
            with server.cursor().copy("COPY floor (k) FROM STDIN") as copy:
                while rows := cursor.fetchmany(READ_CHUNK):
                    for row in rows:
                        copy.write_row((row[0],))
            server.commit()
    reader.close()
    return time.perf_counter() - started


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def quiesce() -> None:
    """Before each timed step: the page cache's dirty pages written out and, on the benchmark's
    PostgreSQL server, a CHECKPOINT, so that neither lands inside the step. A 10M-row snapshot
    or full sync writes gigabytes of WAL, and the checkpoint it sets off otherwise hit whichever
    run came next."""
    os.sync()
    try:
        import psycopg

        with psycopg.connect(_libpq(POSTGRES), autocommit=True, connect_timeout=5) as admin:
            admin.execute("CHECKPOINT")
    except Exception as exc:  # no server, or no right to CHECKPOINT: the step runs anyway
        print(f"  (no CHECKPOINT before the step: {exc.__class__.__name__})", file=sys.stderr)


# --- the fake Planhat and the CLI ---------------------------------------------------------


@contextmanager
def fake_planhat(max_rps: float | None = None) -> Iterator[str]:
    cap = ["--max-rps", str(max_rps)] if max_rps else []
    process = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--api-token", TOKEN, "--tenant-token", TOKEN, *cap],
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


def planhat_state(url: str, applied: bool = False) -> dict[str, Any]:
    query = "?applied=1" if applied else ""
    with urllib.request.urlopen(f"{url}/_state{query}", timeout=60) as response:
        return json.loads(response.read())


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


def spied(command: list[str], out: Path) -> list[str]:
    """`command` under `py-spy record` (installed separately), collapsed stacks written to `out`.
    --idle --threads: waits (on the database, on Planhat) count too, per thread."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [spy, "record", "--rate", "200", "--subprocesses", "--idle", "--threads", "--format", "raw",
            "-o", str(out), "--", *command]  # fmt: skip


def run_cli(config: Path, label: str, py_spy: Path | None) -> tuple[float, float, float]:
    """Run one sync through the CLI; returns wall seconds, CPU seconds and peak RSS in MB of
    that process."""
    command = [*CLI, "--config", str(config), "sync"]
    if py_spy is not None:
        command = spied(command, py_spy / f"{label}.txt")
    quiesce()
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
    return json.loads(out.stdout)[0]


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
        with pg_statements(state, f"{state}-{n}-full-{rep}"):
            full = checked_sync(config, source, planhat_url, f"{state}-{n}-full-{rep}", py_spy)
        churn(source, n)
        with pg_statements(state, f"{state}-{n}-incremental-{rep}"):
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


# --- PostgreSQL's own account ---------------------------------------------------------------

PG_STATS = [False]  # --pg-stats
PG_STATS_TOP = 10


@contextmanager
def pg_statements(state: str, label: str) -> Iterator[None]:
    """With --pg-stats on PostgreSQL: reset pg_stat_statements, run the body, print the
    heaviest statements by total execution time, with their buffers and WAL."""
    if state != "postgresql" or not PG_STATS[0]:
        yield
        return
    import psycopg

    with psycopg.connect(_libpq(POSTGRES), autocommit=True) as admin:
        admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        admin.execute("SELECT pg_stat_statements_reset()")
    yield
    with psycopg.connect(_libpq(POSTGRES), autocommit=True) as admin:
        schema = admin.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_stat_statements'"
        ).fetchone()[0]  # type: ignore[index]
        rows = admin.execute(
            "SELECT calls, total_exec_time, rows, shared_blks_hit, shared_blks_read, "
            "shared_blks_dirtied, shared_blks_written, temp_blks_written, wal_bytes, query "
            f"FROM {schema}.pg_stat_statements WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC"
        ).fetchall()
    total = sum(row[1] for row in rows)
    print(
        f"\n#### pg_stat_statements, {label}: {len(rows)} statements, {sum(r[0] for r in rows):,} "
        f"calls, {total / 1000:.2f} s executing, {sum(float(r[8]) for r in rows) / 1e6:.0f} MB WAL\n\n"
        "| calls | total (s) | share | rows | blks hit / read / dirtied / written | temp written "
        "| WAL (MB) | statement |\n|---:|---:|---:|---:|---|---:|---:|---|"
    )
    for calls, ms, count, hit, read, dirtied, written, temp, wal, query in rows[:PG_STATS_TOP]:
        text = " ".join(query.split())
        text = text if len(text) <= 140 else text[:137] + "..."
        print(
            f"| {calls:,} | {ms / 1000:.2f} | {ms / total:.0%} | {count:,} | {hit:,} / {read:,} / "
            f"{dirtied:,} / {written:,} | {temp:,} | {float(wal) / 1e6:.0f} | `{text}` |"
        )
    print(flush=True)


# --- the fleet case: many audiences over one set of users -----------------------------------


@dataclass(frozen=True)
class Fleet:
    audiences: int
    users: int
    members: int

    def name(self, i: int) -> str:
        return f"Fleet {i:03d}"

    def key(self, i: int) -> str:
        return f"fleet_{i:03d}"

    def query(self, i: int) -> str:
        """Audience i: the users whose place in a fixed permutation (h), rotated by i*U/N, is
        below M. Exactly M members each; user h is in the audiences whose window covers it."""
        offset = i * self.users // self.audiences
        return (
            "SELECT id AS user_id, email, name, company_id FROM users "
            f"WHERE (h + {offset}) % {self.users} < {self.members}"
        )


@dataclass
class FleetRun:
    seconds: float  # start of the process to the end of the last audience's first successful run
    cpu_seconds: float
    peak_rss_mb: float
    requests: int  # received by the fake, 429s included
    items: int  # contact items the fake wrote (an identify is one, a bulk call up to 5,000)
    throttled: int  # answered 429 for going over --fake-rps
    runs: int  # run records written until every audience had succeeded once
    status_during: float | None  # `audience-sync status`, while the sync ran (None: it was over)
    history_during: float | None
    status_after: float = 0.0
    history_after: float = 0.0
    startup: float = 0.0  # `audience-sync --help`: the interpreter and imports every command pays


@dataclass
class FleetCase:
    state: str
    mode: str
    runs: list[FleetRun] = field(default_factory=list)


def make_fleet_source(path: Path, users: int) -> None:
    """One users table; `h` is a fixed random permutation of 0..U-1 the audiences select on."""
    order = list(range(users))
    random.Random(20261125).shuffle(order)
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, company_id TEXT, h INTEGER NOT NULL)"
    )
    connection.executemany(
        "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
        ((f"u{i:08d}", f"user{i}@example.com", f"User {i}", f"c{i % 5000}", order[i]) for i in range(users)),
    )
    connection.commit()
    connection.close()


def write_fleet_config(
    path: Path, state_url: str, source: Path, planhat_url: str, fleet: Fleet, transport: str, rate: float
) -> None:
    token = "tenant_token" if transport == "segment" else "api_token"
    audiences = "".join(
        f'\n[[audiences]]\nname = "{fleet.name(i)}"\nsource = "app"\nquery = "{fleet.query(i)}"\n'
        for i in range(fleet.audiences)
    )
    path.write_text(
        f'[database]\nurl = "{state_url}"\n\n'
        f'[planhat]\ntransport = "{transport}"\nbase_url = "{planhat_url}"\n{token} = "{TOKEN}"\n'
        f"max_requests_per_second = {rate:g}\n\n"
        # One initial run per audience and none after it within the benchmark.
        '[schedule]\nmin_interval = "1d"\nmax_interval = "1d"\n\n'
        '[daemon]\ngrace = "60s"\n\n'
        f'[sources.app]\nurl = "sqlite:///{source}"\n' + audiences
    )


class StateReader:
    """Polls the state database the way an operator's query would, without the package."""

    def __init__(self, state_url: str) -> None:
        if state_url.startswith("sqlite:///"):
            self._connection: Any = sqlite3.connect(state_url.removeprefix("sqlite:///"), timeout=30)
            self._sqlite = True
        else:
            import psycopg

            base, schema = state_url.split("?options=-csearch_path%3D")
            self._connection = psycopg.connect(
                _libpq(base), autocommit=True, options=f"-csearch_path={schema}"
            )
            self._sqlite = False

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return list(self._connection.execute(sql).fetchall())

    def first_successes(self) -> dict[str, datetime]:
        """Each audience's first successful run's end, as aware UTC."""
        found = {}
        for key, finished in self.rows(
            "SELECT audience_key, min(finished_at) FROM runs WHERE status = 'success' GROUP BY audience_key"
        ):
            if isinstance(finished, str):
                finished = datetime.fromisoformat(finished)
            found[key] = finished.replace(tzinfo=UTC)
        return found

    def close(self) -> None:
        self._connection.close()


def time_cli(config: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*CLI, "--config", str(config), *args], capture_output=True, check=True)
    return time.perf_counter() - started


def fleet_sample(
    state: str, mode: str, fleet: Fleet, args: argparse.Namespace, template: Path, workdir: Path, rep: int
) -> FleetRun:
    source = workdir / "fleet-source.db"
    shutil.copyfile(template, source)
    config = workdir / "fleet.toml"
    fake_rps = args.rate if args.fake_rps is None else args.fake_rps
    label = f"{state}-{mode}-{fleet.audiences}x{fleet.members}of{fleet.users}-{rep}"
    with fake_planhat(fake_rps or None) as planhat_url, state_database(state, workdir) as state_url:
        write_fleet_config(config, state_url, source, planhat_url, fleet, args.transport, args.rate)
        # The schema first (not timed), so that polling finds the tables from the start.
        subprocess.run([*CLI, "--config", str(config), "db", "upgrade"], capture_output=True, check=True)
        reader = StateReader(state_url)
        try:
            with pg_statements(state, label):
                result = _run_fleet(config, mode, fleet, reader, workdir / f"{label}.log", args.timeout)
        finally:
            reader.close()
        planhat = planhat_state(planhat_url, applied=True)
    for i in range(fleet.audiences):
        true = planhat["true"].get(fleet.key(i), 0)
        if true != fleet.members:
            raise SystemExit(f"{label}: Planhat holds {true} true for {fleet.key(i)}, not {fleet.members}")
    result.requests, result.items = planhat["requests"], planhat["applied_items"]
    result.throttled = planhat.get("throttled", 0)
    during = (
        f"status {result.status_during:.2f}s history {result.history_during:.2f}s"
        if result.status_during is not None and result.history_during is not None
        else "over before 1 s"
    )
    print(
        f"  {state:10} {mode:6} run {rep + 1}: {result.seconds:7.2f}s cpu {result.cpu_seconds:6.2f}s "
        f"{result.peak_rss_mb:4.0f} MB | {result.requests:,} requests "
        f"({result.requests / fleet.users:.2f}/user), {result.items:,} items "
        f"({result.items / fleet.users:.2f}/user), {result.throttled} throttled, "
        f"{result.runs} runs | during: {during} | after: status {result.status_after:.2f}s "
        f"history {result.history_after:.2f}s (--help {result.startup:.2f}s)",
        flush=True,
    )
    return result


def _run_fleet(
    config: Path, mode: str, fleet: Fleet, reader: StateReader, log: Path, timeout: float
) -> FleetRun:
    """Start `sync` or `run`, poll the state database until every audience succeeded once; the
    daemon is then stopped with SIGTERM. CPU time and peak RSS are the process's own (wait4)."""
    command = [*CLI, "--config", str(config), "sync" if mode == "sync" else "run"]
    began = datetime.now(UTC)
    started = time.perf_counter()
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    during: tuple[float, float] | None = None
    exit_code: int | None = None
    usage: Any = None
    done = False
    try:
        while True:
            successes = reader.first_successes()
            if len(successes) == fleet.audiences:
                break
            failed = reader.rows(
                "SELECT audience_key, status, error FROM runs "
                "WHERE status NOT IN ('running', 'success') ORDER BY id LIMIT 1"
            )
            if failed:
                raise SystemExit(f"{mode}: a run ended {failed[0][1]}: {failed[0]}; see {log}")
            if exit_code is not None:
                raise SystemExit(f"{mode}: audience-sync exited {exit_code} before the end; see {log}")
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:  # read the runs once more before judging
                exit_code = os.waitstatus_to_exitcode(status)
                continue
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"{mode}: not done after {timeout:.0f}s; see {log}")
            if during is None and time.perf_counter() - started > 1.0:
                during = (time_cli(config, "status"), time_cli(config, "history"))
            time.sleep(0.1)
        seconds = (max(successes.values()) - began).total_seconds()
        after = (time_cli(config, "status"), time_cli(config, "history"))
        startup = time_cli(config, "--help")
        runs = len(reader.rows("SELECT id FROM runs"))
        done = True
    finally:
        if exit_code is None:
            if mode == "daemon" or not done:
                process.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(process.pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
        process.returncode = exit_code
    if exit_code != 0:
        raise SystemExit(f"{mode}: audience-sync exited {exit_code}; see {log}")
    return FleetRun(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        requests=0,
        items=0,
        throttled=0,
        runs=runs,
        status_during=during[0] if during else None,
        history_during=during[1] if during else None,
        status_after=after[0],
        history_after=after[1],
        startup=startup,
    )


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
    for sqlite in (c for c in cases if c.state == "sqlite" and c.samples):
        for pg in (c for c in cases if c.state == "postgresql" and c.n == sqlite.n and c.samples):
            pairs = list(zip(sqlite.samples, pg.samples, strict=False))  # run k of each ran back to back
            full = statistics.median(p.full.seconds / s.full.seconds for s, p in pairs)
            inc = statistics.median(p.incremental.seconds / s.incremental.seconds for s, p in pairs)
            print(f"PostgreSQL / SQLite at N={sqlite.n:,} (median of paired runs): full {full:.2f}x, "
                  f"incremental {inc:.2f}x", flush=True)  # fmt: skip


def fleet_summary(fleet: Fleet, args: argparse.Namespace, cases: list[FleetCase]) -> None:
    fake_rps = args.rate if args.fake_rps is None else args.fake_rps
    print(
        f"\n{fleet.audiences} audiences of {fleet.members:,} members over {fleet.users:,} users, "
        f"{args.transport} at {args.rate:g} requests/s (the fake's cap: {fake_rps or 'none'})\n\n"
        "| state | mode | time (s) | requests | requests / user | items | items / user | 429s "
        "| runs | CPU (s) | peak RSS (MB) | status / history during (s) | status / history after (s) "
        "| `--help` (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )

    def med(values: Any) -> float:
        return statistics.median(list(values))

    for case in cases:
        r = case.runs
        if not r:
            continue
        during = [x for x in r if x.status_during is not None and x.history_during is not None]
        during_text = (
            f"{med(x.status_during for x in during):.2f} / {med(x.history_during for x in during):.2f}"
            if during
            else "-"
        )
        requests, items = med(x.requests for x in r), med(x.items for x in r)
        print(
            f"| {case.state} | {case.mode} | {med(x.seconds for x in r):.2f} | {requests:,.0f} "
            f"| {requests / fleet.users:.2f} | {items:,.0f} | {items / fleet.users:.2f} "
            f"| {med(x.throttled for x in r):,.0f} | {med(x.runs for x in r):.0f} "
            f"| {med(x.cpu_seconds for x in r):.1f} | {med(x.peak_rss_mb for x in r):.0f} | {during_text} "
            f"| {med(x.status_after for x in r):.2f} / {med(x.history_after for x in r):.2f} "
            f"| {med(x.startup for x in r):.2f} |"
        )
    print(f"\nmedians of {max(len(c.runs) for c in cases)} runs per row", flush=True)


def run_fleet(args: argparse.Namespace, workdir: Path) -> None:
    fleet = Fleet(args.audiences, args.users or args.members, args.members or args.users)
    if not fleet.members or fleet.members > fleet.users:
        raise SystemExit("the fleet case needs --members M and/or --users U, with M <= U")
    template = workdir / f"template-fleet-{fleet.users}.db"
    if not template.exists():
        started = time.perf_counter()
        make_fleet_source(template, fleet.users)
        print(f"source with {fleet.users:,} users built in {time.perf_counter() - started:.1f}s", flush=True)
    cases = []
    for state in args.state:
        for mode in args.mode:
            case = FleetCase(state, mode)
            for rep in range(max(args.runs, 1)):
                case.runs.append(fleet_sample(state, mode, fleet, args, template, workdir, rep))
            cases.append(case)
    fleet_summary(fleet, args, cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="audience sizes")
    parser.add_argument("--state", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of full + incremental")
    parser.add_argument("--history", type=int, default=0, help="incremental runs for the size report")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument(
        "--order",
        choices=["key", "random"],
        default="key",
        help="the order the source returns its rows in: its users' ids (default) or shuffled",
    )
    parser.add_argument("--py-spy", type=Path, default=None, help="write py-spy profiles (raw) here")
    parser.add_argument("--cli", default=None, help="command to run instead of audience-sync (experiments)")
    parser.add_argument(
        "--pg-stats", action="store_true", help="print pg_stat_statements per PostgreSQL sync"
    )
    fleet = parser.add_argument_group(
        "the fleet case (runs instead of the --n case when --audiences is given)"
    )
    fleet.add_argument("--audiences", type=int, default=None, help="how many audiences")
    fleet.add_argument("--users", type=int, default=None, help="users in the source (default: --members)")
    fleet.add_argument(
        "--members", type=int, default=None, help="members of each audience (default: --users)"
    )
    fleet.add_argument("--mode", nargs="+", choices=("sync", "daemon"), default=["sync"])
    fleet.add_argument("--transport", choices=("segment", "endusers"), default="endusers")
    fleet.add_argument("--rate", type=float, default=150.0, help="planhat.max_requests_per_second")
    fleet.add_argument(
        "--fake-rps", type=float, default=None, help="the fake's 429 cap (default --rate; 0: none)"
    )
    fleet.add_argument(
        "--timeout", type=float, default=3600.0, help="give up on a run after this many seconds"
    )
    args = parser.parse_args(argv)
    if args.cli:
        CLI[:] = args.cli.split()
    PG_STATS[0] = args.pg_stats
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="audience-sync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    try:
        if args.audiences is not None:
            run_fleet(args, workdir)
            return 0
        for n in args.n:
            template = workdir / f"template-{n}-{args.order}.db"
            if not template.exists():
                started = time.perf_counter()
                make_source(template, n, spare_for(n, max(args.history, 1)), args.order)
                print(f"source with {n:,} members built in {time.perf_counter() - started:.1f}s", flush=True)
            # Interleaved (SQLite, PostgreSQL, SQLite, ...): on a shared machine, both see the
            # same spells of load, so their ratio holds better than their absolute times.
            by_state = {state: Case(state, n) for state in args.state}
            for rep in range(args.runs):
                for state, case in by_state.items():
                    case.samples.append(one_sample(state, n, template, workdir, rep, args.py_spy))
            cases.extend(by_state.values())
            for state in args.state:
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
