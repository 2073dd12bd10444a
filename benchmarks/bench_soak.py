"""Benchmark: the daemon over a long soak, at a short cadence, with a changing source: does it grow?

Run by hand; it prints figures and asserts nothing about memory (it does check correctness).
It runs the real daemon (`audience-sync run`, a subprocess) against the fake Planhat (another
subprocess) for `--minutes`:

- the source is a SQLite file of `--users` users in three audiences (about 50%, 30% and 70% of
  them); every `--change-every` seconds `--changes` random users move into or out of one
  audience each;
- the daemon runs every audience every `--cadence` seconds (`schedule.min_interval` to
  `max_interval`, default 1-2 s);
- every `--sample-every` seconds it reads the daemon's resident memory (VmRSS), threads and
  open file descriptors from /proc/<pid>, and the runs recorded so far from the state database.

At the end the source stops changing, every audience gets one more successful run, and the fake
must hold exactly the source: each audience's members `true`, nobody else `true`, and `false`
only on former members (read back contact by contact through `GET /endusers`). It prints
a table per minute, the figures at minute 1, minute 5 and the end, the slope of RSS over runs
(KB per run, a least-squares line over the samples after the first minute), the last five
minutes' highest RSS against minute 5's, and the spread of threads and open files.

    python benchmarks/bench_soak.py --minutes 15 --state sqlite --transport bulk
    python benchmarks/bench_soak.py --minutes 15 --state postgresql --transport bulk
    python benchmarks/bench_soak.py --minutes 8 --state sqlite --transport segment --users 5000

`bulk` is the `endusers` transport (up to 5,000 contacts a call), `segment` one identify per
request; both at 150 requests a second, the fake uncapped. PostgreSQL runs get a fresh schema on
$AUDIENCE_SYNC_BENCH_POSTGRES (default postgres@127.0.0.1:5432/test), dropped afterwards.
`--cli` runs another command in place of `audience-sync` (e.g. an older checkout's).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_sync import CLI, TOKEN, StateReader, fake_planhat, state_database  # noqa: E402

# key -> (share of the users who start as members, audience name); the key is the name's snake case
AUDIENCES = {"soak_a": 0.5, "soak_b": 0.3, "soak_c": 0.7}
TRANSPORTS = {"bulk": "endusers", "endusers": "endusers", "segment": "segment"}
SEED = 20261206


@dataclass
class Point:
    seconds: float  # since the daemon started
    rss_kb: int
    threads: int
    open_files: int
    runs: int  # run records in the state database (every audience's, any status)


# --- the source -----------------------------------------------------------------------------


def make_source(path: Path, users: int) -> None:
    """`users` users; per audience a membership flag and whether the user ever was a member."""
    rng = random.Random(SEED)
    flags = ", ".join(f"{k} INTEGER NOT NULL, ever_{k} INTEGER NOT NULL" for k in AUDIENCES)
    connection = sqlite3.connect(path)
    connection.execute(
        f"CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, company_id TEXT, {flags})"
    )
    rows = []
    for i in range(users):
        member = [int(rng.random() < share) for share in AUDIENCES.values()]
        rows.append(
            (
                f"u{i:08d}",
                f"user{i}@example.com",
                f"User {i}",
                f"c{i % 500}",
                *(x for m in member for x in (m, m)),
            )
        )
    marks = ", ".join("?" * (4 + 2 * len(AUDIENCES)))
    connection.executemany(f"INSERT INTO users VALUES ({marks})", rows)
    connection.commit()
    connection.close()


def change_source(path: Path, users: int, changes: int, rng: random.Random) -> None:
    """`changes` random users each enter or leave one random audience, in one transaction."""
    connection = sqlite3.connect(path, timeout=30)
    with connection:
        for _ in range(changes):
            key = rng.choice(list(AUDIENCES))
            connection.execute(
                f"UPDATE users SET {key} = 1 - {key}, ever_{key} = 1 WHERE id = ?",
                (f"u{rng.randrange(users):08d}",),
            )
    connection.close()


def memberships(path: Path) -> dict[str, tuple[set[str], set[str]]]:
    """Per audience: (members, users who ever were members) by user id."""
    connection = sqlite3.connect(path)
    found = {}
    for key in AUDIENCES:
        rows = connection.execute(f"SELECT id, {key} FROM users WHERE ever_{key} = 1").fetchall()
        found[key] = ({user for user, member in rows if member}, {user for user, _ in rows})
    connection.close()
    return found


def planhat_contacts(url: str) -> list[dict[str, Any]]:
    """Every contact the fake holds, read page by page the way reconcile reads them."""
    contacts: list[dict[str, Any]] = []
    while True:
        request = urllib.request.Request(
            f"{url}/endusers?limit=5000&offset={len(contacts)}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            page = json.loads(response.read())
        if not page:
            return contacts
        contacts.extend(page)


def check_planhat(url: str, source: Path) -> int:
    """Each audience's members hold `true`, and nobody else; `false` only users who were members
    once and are no longer (one who entered and left between two runs was never told). Returns
    the contacts."""
    contacts = planhat_contacts(url)
    for key, (members, ever) in memberships(source).items():
        true = {c["externalId"] for c in contacts if c["custom"].get(key) is True}
        false = {c["externalId"] for c in contacts if c["custom"].get(key) is False}
        if true != members or not false <= ever - members:
            raise SystemExit(
                f"{key}: Planhat holds {len(true)} true ({len(true - members)} not members, "
                f"{len(members - true)} members missing), {len(false)} false "
                f"({len(false - (ever - members))} not leavers)"
            )
    return len(contacts)


def write_config(
    path: Path, state_url: str, source: Path, planhat_url: str, transport: str, cadence: list[str]
) -> None:
    token = "tenant_token" if transport == "segment" else "api_token"
    audiences = "".join(
        f'\n[[audiences]]\nname = "{key}"\nsource = "app"\n'
        f'query = "SELECT id AS user_id, email, name, company_id FROM users WHERE {key} = 1"\n'
        for key in AUDIENCES
    )
    path.write_text(
        f'[database]\nurl = "{state_url}"\n\n'
        f'[planhat]\ntransport = "{transport}"\nbase_url = "{planhat_url}"\n{token} = "{TOKEN}"\n'
        "max_requests_per_second = 150\n\n"
        f'[schedule]\nmin_interval = "{cadence[0]}"\nmax_interval = "{cadence[-1]}"\n\n'
        '[daemon]\ngrace = "30s"\n\n'
        f'[sources.app]\nurl = "sqlite:///{source}"\n' + audiences
    )


# --- the daemon, seen from outside ------------------------------------------------------------


def sample(pid: int, started: float, reader: StateReader) -> Point:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Point(
        seconds=time.monotonic() - started,
        rss_kb=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        open_files=len(os.listdir(f"/proc/{pid}/fd")),
        runs=int(reader.rows("SELECT count(*) FROM runs")[0][0]),
    )


def failed_run(reader: StateReader) -> tuple[Any, ...] | None:
    rows = reader.rows(
        "SELECT id, audience_key, status, error FROM runs WHERE status NOT IN ('running', 'success') "
        "ORDER BY id LIMIT 1"
    )
    return rows[0] if rows else None


def settle(reader: StateReader, planhat_url: str, source: Path, timeout: float) -> None:
    """The source no longer changes: wait for a successful run of every audience that began
    after that (a run id above the last one now), then the fake must hold exactly the source."""
    last = int(reader.rows("SELECT coalesce(max(id), 0) FROM runs")[0][0])
    deadline = time.monotonic() + timeout
    while True:
        done = {
            row[0]
            for row in reader.rows(
                f"SELECT DISTINCT audience_key FROM runs WHERE id > {last} AND status = 'success'"
            )
        }
        if done >= set(AUDIENCES):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"no successful run of {sorted(set(AUDIENCES) - done)} within {timeout:.0f}s")
        time.sleep(0.5)
    contacts = check_planhat(planhat_url, source)
    print(f"\nconverged: the fake holds exactly the source ({contacts:,} contacts)", flush=True)


def soak(args: argparse.Namespace, workdir: Path) -> None:
    source = workdir / "soak-source.db"
    make_source(source, args.users)
    config = workdir / "soak.toml"
    log = workdir / "daemon.log"
    rng = random.Random(SEED + 1)
    with fake_planhat() as planhat_url, state_database(args.state, workdir) as state_url:
        write_config(config, state_url, source, planhat_url, TRANSPORTS[args.transport], args.cadence)
        subprocess.run([*CLI, "--config", str(config), "db", "upgrade"], capture_output=True, check=True)
        reader = StateReader(state_url)
        with log.open("wb") as output:
            process = subprocess.Popen(
                [*CLI, "--config", str(config), "run"], stdout=output, stderr=subprocess.STDOUT
            )
        started = time.monotonic()
        points: list[Point] = []
        try:
            next_change = next_sample = started + min(args.change_every, args.sample_every)
            end = started + args.minutes * 60
            while time.monotonic() < end:
                if process.poll() is not None:
                    raise SystemExit(f"the daemon exited {process.returncode}; see {log}")
                now = time.monotonic()
                if now >= next_change:
                    change_source(source, args.users, args.changes, rng)
                    next_change += args.change_every
                if now >= next_sample:
                    points.append(sample(process.pid, started, reader))
                    report_progress(points, args.sample_every)
                    if (failed := failed_run(reader)) is not None:
                        raise SystemExit(f"a run ended {failed[2]}: {failed}; see {log}")
                    next_sample += args.sample_every
                time.sleep(max(0.0, min(next_change, next_sample, end) - time.monotonic()))
            summary(args, points)
            settle(reader, planhat_url, source, timeout=120 + 0.05 * args.users)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            reader.close()
        if process.returncode != 0:
            raise SystemExit(f"the daemon exited {process.returncode} on SIGTERM; see {log}")
        print(f"daemon stopped cleanly; CPU {usage.ru_utime + usage.ru_stime:.0f} s, peak RSS "
              f"{usage.ru_maxrss / 1024:.0f} MB", flush=True)  # fmt: skip


# --- reporting ------------------------------------------------------------------------------


def report_progress(points: list[Point], every: float) -> None:
    """A row at each whole minute (and the first sample)."""
    last = points[-1]
    if len(points) > 1 and int(last.seconds // 60) == int(points[-2].seconds // 60):
        return
    if len(points) == 1:
        print("\n| minute | runs | RSS (MB) | threads | open files |\n|---:|---:|---:|---:|---:|")
    print(
        f"| {last.seconds / 60:.1f} | {last.runs:,} | {last.rss_kb / 1024:.1f} | {last.threads} "
        f"| {last.open_files} |",
        flush=True,
    )


def at_minute(points: list[Point], minute: float) -> Point:
    return min(points, key=lambda p: abs(p.seconds - minute * 60))


def slope_kb_per_run(points: list[Point]) -> float:
    """Least squares of RSS (KB) over runs."""
    if len(points) < 2 or points[-1].runs == points[0].runs:
        return float("nan")
    return statistics.linear_regression([p.runs for p in points], [p.rss_kb for p in points]).slope


def summary(args: argparse.Namespace, points: list[Point]) -> None:
    if not points:
        return
    settled = [p for p in points if p.seconds >= 60] or points
    first, fifth, end = at_minute(points, 1), at_minute(points, 5), points[-1]
    tail = [p for p in points if p.seconds >= end.seconds - 300]
    tail_rss = max(p.rss_kb for p in tail)
    minutes = end.seconds / 60
    print(
        f"\n### Soak: {args.state}, {args.transport}, {args.users:,} users in {len(AUDIENCES)} audiences, "
        f"cadence {'-'.join(args.cadence)}, {args.changes} changes every {args.change_every:g}s\n\n"
        f"{end.runs:,} runs in {minutes:.1f} min ({end.runs / max(end.seconds, 1):.2f} runs/s)\n\n"
        "| | minute | runs | RSS (MB) | threads | open files |\n|---|---:|---:|---:|---:|---:|"
    )
    for label, p in (("start", first), ("minute 5", fifth), ("end", end)):
        print(
            f"| {label} | {p.seconds / 60:.1f} | {p.runs:,} | {p.rss_kb / 1024:.1f} | {p.threads} "
            f"| {p.open_files} |"
        )
    print(
        f"\nslope after minute 1: {slope_kb_per_run(settled):.2f} KB per run "
        f"({len(settled)} samples)\n"
        f"last {min(5.0, minutes):.0f} minutes' highest RSS {tail_rss / 1024:.1f} MB = "
        f"{tail_rss / fifth.rss_kb:.1%} of minute {fifth.seconds / 60:.0f}'s {fifth.rss_kb / 1024:.1f} MB\n"
        f"after minute 1: threads {min(p.threads for p in settled)}-{max(p.threads for p in settled)}, "
        f"open files {min(p.open_files for p in settled)}-{max(p.open_files for p in settled)}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="how long the daemon runs")
    parser.add_argument("--state", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="bulk")
    parser.add_argument("--users", type=int, default=20_000, help="users in the source")
    parser.add_argument("--changes", type=int, default=200, help="source changes per --change-every")
    parser.add_argument("--change-every", type=float, default=10.0, help="seconds between source changes")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--cadence", nargs="+", default=["1s", "2s"], help="schedule.min_interval [max_interval]"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--cli", default=None, help="command to run instead of audience-sync (experiments)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemon and the fake on the way out
    if args.cli:
        CLI[:] = args.cli.split()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="audience-sync-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak(args, workdir)
    if args.workdir is None:  # kept after a failure, with the daemon's log
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
