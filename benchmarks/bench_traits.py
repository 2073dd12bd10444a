"""Benchmark: a computed trait next to an audience of the same size, through the CLI.

Run by hand; it prints figures and asserts nothing about time. For each state database and N,
`--runs` times, each case on a fresh state database and a fresh fake Planhat (its own process):

    audience   `[[audiences]]` of N members: a full sync, then 1% churn (0.5% leave, as many
               enter) and an incremental sync, as in bench_sync.py
    trait      `[[traits]]` of N users whose value is a decimal revenue: a full sync, then 1%
               of the values change and an incremental sync

Each sync is `audience-sync --config X sync` in a subprocess, timed on the wall clock, with its
CPU time and peak RSS from `os.wait4`. After each, the run must have ended `success` with
nothing pending, have sent what changed, and the fake's `/_state` must hold N values (or N
`true`s and the leavers' `false`s).

    python benchmarks/bench_traits.py --n 100000 1000000 --state sqlite postgresql --runs 3

Transport `endusers` at `max_requests_per_second = 150`, as in bench_sync.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_planhat.py"
TOKEN = "bench-api-token"
POSTGRES = os.environ.get("AUDIENCE_SYNC_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CHANGE = 0.01  # of the audience or of the trait's values, per incremental sync
CLI = [str(Path(sys.executable).with_name("audience-sync"))]

CASES = {
    "audience": (
        "audiences",
        "bench_members",
        "SELECT id AS user_id, email, name, 'acme' AS company_id FROM users WHERE member = 1",
    ),
    "trait": (
        "traits",
        "bench_revenue",
        "SELECT id AS user_id, email, name, 'acme' AS company_id, revenue AS value "
        "FROM users WHERE member = 1",
    ),
}


@dataclass
class Sync:
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    sent: int


def make_source(path: Path, n: int) -> None:
    """N members with a revenue, and N/100 + 10 users who never were members."""
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, member INTEGER, ever INTEGER, "
        "revenue REAL)"
    )
    spare = n // 100 + 10
    rows = (
        (f"u{i:08d}", f"user{i}@example.com", f"User {i}", int(i < n), int(i < n), round(i * 1.25, 2))
        for i in range(n + spare)
    )
    connection.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", rows)
    connection.commit()
    connection.close()


def change(path: Path, case: str, n: int) -> int:
    """1% of the audience (half leave, as many enter) or 1% of the trait's values; returns how
    many changes Planhat must be sent."""
    k = max(1, int(n * CHANGE))
    connection = sqlite3.connect(path)
    with connection:
        if case == "trait":
            connection.execute(
                "UPDATE users SET revenue = revenue + 0.5 WHERE id IN "
                "(SELECT id FROM users WHERE member = 1 ORDER BY random() LIMIT ?)",
                (k,),
            )
        else:
            k //= 2
            connection.execute(
                "UPDATE users SET member = 0 WHERE id IN "
                "(SELECT id FROM users WHERE member = 1 ORDER BY random() LIMIT ?)",
                (k,),
            )
            connection.execute(
                "UPDATE users SET member = 1, ever = 1 WHERE id IN "
                "(SELECT id FROM users WHERE ever = 0 ORDER BY random() LIMIT ?)",
                (k,),
            )
            k *= 2
    connection.close()
    return k


@contextmanager
def fake_planhat() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--api-token", TOKEN], stdout=subprocess.PIPE, text=True
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

    libpq = POSTGRES.replace("postgresql+psycopg://", "postgresql://", 1)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(libpq, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def write_config(path: Path, case: str, state_url: str, source: Path, planhat_url: str) -> None:
    section, key, query = CASES[case]
    path.write_text(
        f'[database]\nurl = "{state_url}"\n\n'
        f'[planhat]\ntransport = "endusers"\nbase_url = "{planhat_url}"\napi_token = "{TOKEN}"\n'
        "max_requests_per_second = 150\n\n"
        f'[sources.app]\nurl = "sqlite:///{source}"\n\n'
        f'[[{section}]]\nname = "{key}"\nsource = "app"\nquery = "{query}"\n'
    )


def run_cli(config: Path, label: str) -> tuple[float, float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [*CLI, "--config", str(config), "sync"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    err = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label}: audience-sync failed\n{err}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def checked_sync(config: Path, case: str, planhat_url: str, label: str, n: int, expect_sent: int) -> Sync:
    seconds, cpu, rss = run_cli(config, label)
    out = subprocess.run([*CLI, "--config", str(config), "history", "--json", "--limit", "1"],
                         capture_output=True, check=True)  # fmt: skip
    last = json.loads(out.stdout)[0]
    if last["status"] != "success" or last["pending"] or last["sent"] != expect_sent:
        raise SystemExit(f"{label}: {last['status']}, sent {last['sent']} (expected {expect_sent}), "
                         f"{last['pending']} pending")  # fmt: skip
    with urllib.request.urlopen(f"{planhat_url}/_state", timeout=60) as response:
        state: dict[str, Any] = json.loads(response.read())
    key = CASES[case][1]
    held = state.get("values", {}).get(key, 0) if case == "trait" else state["true"].get(key, 0)
    if held != n:
        raise SystemExit(f"{label}: Planhat holds {held} values of {key}, expected {n}")
    return Sync(seconds, cpu, rss, int(last["sent"]))


def one_sample(state: str, case: str, n: int, template: Path, workdir: Path, rep: int) -> tuple[Sync, Sync]:
    source = workdir / "source.db"
    shutil.copyfile(template, source)
    config = workdir / "bench.toml"
    with fake_planhat() as planhat_url, state_database(state, workdir) as state_url:
        write_config(config, case, state_url, source, planhat_url)
        label = f"{state}-{case}-{n}"
        full = checked_sync(config, case, planhat_url, f"{label}-full-{rep}", n, n)
        changed = change(source, case, n)
        incremental = checked_sync(config, case, planhat_url, f"{label}-incremental-{rep}", n, changed)
    print(
        f"  {state:10} {case:8} n={n:>9,} full {full.seconds:6.2f}s cpu {full.cpu_seconds:6.2f}s "
        f"rss {full.peak_rss_mb:5.0f}MB | incremental {incremental.seconds:6.2f}s cpu "
        f"{incremental.cpu_seconds:6.2f}s rss {incremental.peak_rss_mb:5.0f}MB sent {incremental.sent:,}",
        flush=True,
    )
    return full, incremental


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000])
    parser.add_argument("--state", nargs="+", default=["sqlite"], choices=["sqlite", "postgresql"])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--cli", help="a command to run in place of audience-sync (e.g. older code)")
    args = parser.parse_args(argv)
    if args.cli:
        CLI[:] = shlex.split(args.cli)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-traits-") as tmp:
        workdir = Path(tmp)
        for n in args.n:
            template = workdir / f"template-{n}.db"
            make_source(template, n)
            for state in args.state:
                medians = {}
                for case in args.cases:
                    samples = [one_sample(state, case, n, template, workdir, rep) for rep in range(args.runs)]
                    medians[case] = [
                        statistics.median(getattr(s[i], f) for s in samples)
                        for i in (0, 1)
                        for f in ("seconds", "cpu_seconds", "peak_rss_mb")
                    ]
                rows.append((state, n, medians))
    print("\n| state database | N | case | full (s) | CPU full (s) | incremental (s) | CPU incr. (s) "
          "| peak RSS full / incr. (MB) |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for state, n, medians in rows:
        for case, (fs, fc, fr, is_, ic, ir) in medians.items():
            times = f"{fs:.2f} | {fc:.2f} | {is_:.2f} | {ic:.2f}"
            print(f"| {state} | {n:,} | {case} | {times} | {fr:.0f} / {ir:.0f} |")
        if len(medians) == 2:
            ratio = medians["trait"][3] / medians["audience"][3]
            print(f"| {state} | {n:,} | trait / audience, incremental | | | {ratio:.2f}x | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
