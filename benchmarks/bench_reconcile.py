"""Benchmark: reconcile N contacts through the CLI, at the documented read rate.

Run by hand; it prints figures and asserts nothing about time (it does check correctness).
For each state database:

1. a full sync of N members through the CLI (bulk transport at 150 requests a second);
2. drift injected straight into the fake Planhat: D members' field unticked, D contacts
   deleted, D contacts that are no member ticked by hand (3 x D disagreements);
3. `audience-sync reconcile --json`: it must find exactly the injected drift;
4. `audience-sync reconcile --fix --json`: afterwards Planhat must hold exactly the truth.

Reads run at `reconcile.max_requests_per_second` (default 3, Planhat's 200 calls a minute) and
`reconcile.page_size` (5000): 1M contacts are 200 pages plus the empty one, about 67 s of
rate limit alone. The fake runs inside this process (drift is injected by calling it) and the
CLI in a subprocess, whose wall time, CPU time and peak RSS are reported.

    python benchmarks/bench_reconcile.py --n 1000000 --state sqlite postgresql
    python benchmarks/bench_reconcile.py --n 100000 --drift 500 --rate 150   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_sync import CLI, KEY, TOKEN, make_source, state_database, write_config  # noqa: E402

from tests.fake_planhat import FakePlanhat  # noqa: E402


def run(config: Path, *args: str) -> tuple[Any, float, float, float]:
    """`audience-sync --config CONFIG ARGS --json`: (parsed output, wall s, CPU s, peak RSS MB)
    of that process. Its output is a few KB of JSON: read once the process has ended.

    Peak RSS is the child's VmHWM, polled: rusage's ru_maxrss would count this parent's memory
    (the fake's million contacts), which the child had until its exec.
    """
    started = time.perf_counter()
    process = subprocess.Popen([*CLI, "--config", str(config), *args, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    peak_kb = 0
    status_file = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            text = status_file.read_text()
        except OSError:
            break
        marks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")]
        peak_kb = max([peak_kb, *marks])  # none once the process has exited
        time.sleep(0.05)
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode not in (0, 1):  # 1: drift found
        raise SystemExit(f"{' '.join(args)}: exited {process.returncode}\n{err.decode()}")
    return json.loads(out), seconds, _child_cpu(cpu.ru_utime + cpu.ru_stime), peak_kb / 1024


_children_cpu = [0.0]


def _child_cpu(total: float) -> float:
    """CPU seconds of the child that just ended: the growth of RUSAGE_CHILDREN since the last."""
    spent, _children_cpu[0] = total - _children_cpu[0], total
    return spent


def inject_drift(fake: FakePlanhat, n: int, d: int, rng: random.Random) -> set[str]:
    """Untick d members, delete d members' contacts, tick d new contacts; returns the new ones."""
    chosen = rng.sample(range(n), 2 * d)
    for i in chosen[:d]:
        fake.set_value(f"u{i:08d}", KEY, False)
    for i in chosen[d:]:
        fake.delete_contact(f"u{i:08d}")
    extras = {f"x{i:08d}" for i in range(d)}
    for ref in extras:
        fake.add_contact(ref, f"{ref}@example.com", {KEY: True})
    return extras


def one_state(state: str, n: int, d: int, rate: float, workdir: Path) -> dict[str, Any]:
    source = workdir / "source.db"
    source.unlink(missing_ok=True)
    make_source(source, n, 0)
    config = workdir / "bench.toml"
    with FakePlanhat(api_token=TOKEN, keep_bodies=False) as fake, state_database(state, workdir) as url:
        write_config(config, url, source, fake.url)
        with config.open("a") as extra:
            extra.write(f"\n[reconcile]\nmax_requests_per_second = {rate}\n")
        runs, sync_s, _, _ = run(config, "sync")
        assert runs[0]["status"] == "success", runs
        extras = inject_drift(fake, n, d, random.Random(7))
        gc.collect()
        fake.requests.clear()

        report, report_s, report_cpu, report_rss = run(config, "reconcile")
        reads = sum(r.method == "GET" for r in fake.requests)
        found = report[0]
        wanted = {"unexpected_true": d, "missing_true": d, "missing_contact": d}
        got = {k: found[k] for k in wanted}
        if got != wanted or found["contacts"] != n:
            raise SystemExit(
                f"{state}: reconcile found {got} in {found['contacts']} contacts, injected {wanted}"
            )

        fake.requests.clear()
        fixed, fix_s, fix_cpu, fix_rss = run(config, "reconcile", "--fix")
        if fixed[0]["status"] != "fixed":
            raise SystemExit(f"{state}: reconcile --fix ended {fixed[0]['status']}: {fixed[0]['error']}")
        true = fake.state()["true"].get(KEY, 0)
        if true != n or any(fake.value(ref, KEY) is not False for ref in extras):
            raise SystemExit(f"{state}: after --fix Planhat holds {true} true of {n} members")
        writes = sum(r.method == "PUT" for r in fake.requests)
        return {
            "state": state, "sync_s": sync_s, "reads": reads,
            "report_s": report_s, "report_cpu_s": report_cpu, "report_rss_mb": report_rss,
            "fix_s": fix_s, "fix_cpu_s": fix_cpu, "fix_rss_mb": fix_rss,
            "fix_sent": fixed[0]["run"]["sent"], "fix_writes": writes,
        }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="contacts (all members)")
    parser.add_argument("--drift", type=int, default=1000, help="disagreements injected of each kind")
    parser.add_argument("--rate", type=float, default=3.0, help="reconcile.max_requests_per_second")
    parser.add_argument("--state", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        results = [one_state(state, args.n, args.drift, args.rate, Path(tmp)) for state in args.state]
    print(f"\nreconcile of {args.n:,} contacts, {3 * args.drift:,} disagreements, {args.rate:g} reads/s")
    print(f"{'state':<11}{'reads':>7}{'report s':>10}{'CPU s':>8}{'RSS MB':>8}"
          f"{'fix s':>8}{'CPU s':>8}{'RSS MB':>8}{'sent':>7}{'PUTs':>6}")  # fmt: skip
    for r in results:
        print(f"{r['state']:<11}{r['reads']:>7}{r['report_s']:>10.1f}{r['report_cpu_s']:>8.1f}"
              f"{r['report_rss_mb']:>8.0f}{r['fix_s']:>8.1f}{r['fix_cpu_s']:>8.1f}{r['fix_rss_mb']:>8.0f}"
              f"{r['fix_sent']:>7}{r['fix_writes']:>6}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
