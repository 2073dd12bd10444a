"""Benchmark: the speeds the test suite used to assert, measured here instead.

Run by hand; it prints medians and asserts nothing about time (tests assert order and outcome:
a loaded machine must not fail them). Three figures:

1. `pages`: the fake Planhat answering 5000-contact pages of `GET /endusers` out of 100,000
   contacts (each page a slice, not a copy of all); the suite's paging test once said < 2 s.
2. `segment`: ten Segment messages, each held 0.2 s by the fake, through one client at the
   default concurrency (10): about 0.2 s when they are in flight together, 2 s one at a time.
3. `sigterm`: `audience-sync run` stopped by SIGTERM while a run delivers (40 identifies a
   chunk, each held 0.1 s): seconds from the signal to the exit, and the run's status.

    python benchmarks/bench_latency.py --repeat 5
    python benchmarks/bench_latency.py --only segment pages
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from audience_sync.config import PlanhatSettings, Secret  # noqa: E402
from audience_sync.planhat import AUDIENCES, Contact, PlanhatClient  # noqa: E402
from tests.fake_planhat import API_TOKEN, TENANT_TOKEN, FakePlanhat  # noqa: E402

CLI = [sys.executable, "-c", "from audience_sync.cli import entrypoint; entrypoint()"]


def pages() -> float:
    with FakePlanhat(keep_bodies=False) as fake:
        for n in range(100_000):
            fake.add_contact(f"u{n}", None, {"a": True})
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(base_url=fake.url, headers=headers, timeout=60) as client:
            started = time.perf_counter()
            for offset in range(0, 100_000, 5000):
                page = client.get("/endusers", params={"limit": 5000, "offset": offset}).json()
                assert len(page) == 5000
            return time.perf_counter() - started


def segment() -> float:
    with FakePlanhat() as fake:
        fake.delay_next(10, 0.2)
        settings = PlanhatSettings(
            transport="segment",
            tenant_token=Secret(TENANT_TOKEN),
            base_url=fake.url,
            max_requests_per_second=150,
        )
        contacts = [
            Contact(f"u{n}", f"u{n}", None, None, None, None, {"vip": True}, AUDIENCES) for n in range(10)
        ]
        with PlanhatClient(settings) as client:
            started = time.perf_counter()
            assert len(client.send(contacts).accepted) == 10
            return time.perf_counter() - started


def sigterm() -> float:
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as folder, FakePlanhat() as fake:
        work = Path(folder)
        source = work / "source.db"
        with sqlite3.connect(source) as connection:
            connection.execute("CREATE TABLE users (id TEXT)")
            connection.executemany("INSERT INTO users VALUES (?)", [(f"u{n}",) for n in range(200)])
        connection.close()
        config = work / "audience_sync.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{work / "state.db"}"\n\n[planhat]\nbase_url = "{fake.url}"\n'
            f'tenant_token = "{TENANT_TOKEN}"\n\n[sources.app]\nurl = "sqlite:///{source}"\n\n'
            '[schedule]\nmin_interval = "1h"\nmax_interval = "2h"\n\n[daemon]\ngrace = "4s"\n\n'
            '[[audiences]]\nname = "Pro Plan"\nsource = "app"\nquery = "SELECT id AS user_id FROM users"\n'
        )
        subprocess.run([*CLI, "--config", str(config), "db", "upgrade"], check=True, capture_output=True)
        fake.delay_next(200, 0.1)
        with (work / "daemon.log").open("wb") as log:
            daemon = subprocess.Popen([*CLI, "--config", str(config), "run"], stdout=log, stderr=log)
            while fake.applied_items < 40:
                time.sleep(0.02)
            sent = time.perf_counter()
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            took = time.perf_counter() - sent
        assert code == 0, (work / "daemon.log").read_text()
        return took


FIGURES: dict[str, Callable[[], float]] = {"pages": pages, "segment": segment, "sigterm": sigterm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), default=sorted(FIGURES))
    args = parser.parse_args()
    for name in args.only:
        times = [FIGURES[name]() for _ in range(args.repeat)]
        print(
            f"{name:8s} median {statistics.median(times):.3f}s  "
            f"min {min(times):.3f}s  max {max(times):.3f}s  ({args.repeat} runs)"
        )


if __name__ == "__main__":
    main()
