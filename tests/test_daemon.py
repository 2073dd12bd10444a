"""`audience-sync run` as a real process: resync pick-up, SIGTERM within the grace, nothing lost."""

from __future__ import annotations

import configparser
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audience_sync.config import DaemonSettings
from audience_sync.state import models as m
from audience_sync.support import clock
from tests.conftest import (
    POSTGRES,
    Cli,
    Project,
    Spawn,
    finished,
    next_runs,
    runs,
    schedule,
    users,
    wait_for,
)

PRO_ONLY = [
    {"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"}
]
PRO = PRO_ONLY[0]
BUYERS = {"name": "Buyers", "query": "SELECT id AS user_id, email, company_id FROM users WHERE orders > 0"}
# A source query that takes about half a second: SQLite counts to four million first.
SLOW_PRO_QUERY = (
    "WITH RECURSIVE slow(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM slow WHERE x < 4000000) "
    "SELECT id AS user_id, email, company_id FROM users "
    "WHERE plan = 'pro' AND (SELECT count(*) FROM slow) > 0"
)


def query(url: str, statement: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    finally:
        engine.dispose()


def count(url: str, table: sa.Table, *where: Any) -> int:
    return int(query(url, sa.select(sa.func.count()).select_from(table).where(*where))[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_resync_request_runs_at_once_not_at_the_plan(project: Project, spawn: Spawn, cli: Cli) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 6), plan="pro", orders=1))
    project.write(extra=schedule("1h", "2h"))  # the default resync poll: 5 s
    daemon = spawn(project)
    wait_for(lambda: len(finished(project.state_url)) == 2, what="initial full syncs")
    before = len(fake.requests)

    asked = time.monotonic()
    result = cli("--config", "audience_sync.toml", "resync", "--audience", "pro_plan")
    assert result.code == 0, result.err
    done = wait_for(
        lambda: query(
            project.state_url,
            sa.select(m.resync_requests).where(m.resync_requests.c.status == "done"),
        ),
        timeout=60,  # a liveness guard on a loaded machine; the pick-up latency is printed, not asserted
        what="resync request done",
    )[0]
    latency = time.monotonic() - asked

    run = next(r for r in runs(project.state_url) if r["id"] == done.run_id)
    assert (run["audience_key"], run["kind"], run["trigger"], run["status"]) == (
        "pro_plan", "full", "resync", "success",
    )  # fmt: skip
    resent = [r for r in fake.requests[before:] if r.method == "POST"]  # (the start's check reads)
    assert run["sent"] == 5 and len(resent) == 5  # every member again
    assert len(runs(project.state_url, "buyers")) == 1  # only the audience asked for
    code, _ = daemon.signal(signal.SIGINT)  # Ctrl-C stops it like SIGTERM
    assert code == 0 and "SIGINT: stopping" in daemon.log(), daemon.log()
    print(f"resync pick-up latency: {latency:.2f}s")


@pytest.mark.slow
@pytest.mark.parametrize("state_url", ["sqlite", POSTGRES], indirect=True)
def test_sigterm_lets_the_chunk_in_flight_finish_records_the_run_and_exits_0(
    project: Project, spawn: Spawn, cli: Cli
) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 201), plan="pro"))
    project.write(PRO_ONLY, extra=schedule("1h", "2h", '[daemon]\ngrace = "4s"\n'))
    fake.delay_next(200, 0.1)  # 40 identifies per chunk, 10 at a time: ~0.4 s a chunk
    daemon = spawn(project)
    wait_for(lambda: count(project.state_url, m.changes) >= 40, what="a first chunk delivered")

    code, took = daemon.signal(signal.SIGTERM)
    assert code == 0, daemon.log()
    # Within the grace: the chunk in flight finished and the run is recorded partial (past
    # the grace it would be recorded aborted, as the next test shows).
    [run] = runs(project.state_url)
    assert run["status"] == "partial" and run["finished_at"] is not None
    assert run["error"] == "stopped before every change was delivered"
    assert 40 <= run["sent"] < 200 and run["sent"] + run["pending"] == 200
    assert count(project.state_url, m.pending) == run["pending"]
    assert fake.state()["true"]["pro_plan"] == run["sent"]
    assert count(project.state_url, m.leases) == 0
    assert "SIGTERM" in daemon.log() and "stopped in" in daemon.log()

    # Nothing pending is lost: the next run sends exactly the rest.
    fake.requests.clear()
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    assert len(fake.requests) == run["pending"]
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 201))
    print(f"SIGTERM to exit: {took:.2f}s")


@pytest.mark.slow
@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_past_the_grace_the_run_is_recorded_aborted_and_the_daemon_still_exits_0(
    project: Project, spawn: Spawn, cli: Cli
) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 21), plan="pro"))
    project.write(PRO_ONLY, extra=schedule("1h", "2h", '[daemon]\ngrace = "2s"\n'))
    fake.delay_next(1000, 30)  # Planhat hangs: every request times out (after 2 s) and is retried
    daemon = spawn(project)
    # The chunk's trace is committed just before its request leaves (the start's check reads
    # Planhat too, so a request in flight alone does not say the run's is).
    wait_for(lambda: count(project.state_url, m.in_flight) > 0, what="the run's chunk on the wire")
    time.sleep(0.5)

    code, _ = daemon.signal(signal.SIGTERM)  # Planhat hangs 30 s a request: only the grace ends it
    assert code == 0, daemon.log()
    [run] = runs(project.state_url)
    assert run["status"] == "aborted" and run["finished_at"] is not None
    assert "grace" in run["error"] and run["pending"] == 20
    assert count(project.state_url, m.pending) == 20
    assert count(project.state_url, m.leases) == 0  # released: the next process need not wait
    assert "recorded pro_plan as aborted" in daemon.log()

    fake.clear_faults()
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 21))


@pytest.mark.slow
@pytest.mark.parametrize("state_url", ["sqlite", POSTGRES], indirect=True)
def test_sighup_picks_up_a_changed_config_at_once_and_refuses_an_invalid_one(
    project: Project, spawn: Spawn
) -> None:
    project.source.set_users(users(range(1, 6), plan="pro", orders=1))
    project.write([PRO], extra=schedule("1h", "2h"))
    daemon = spawn(project)
    wait_for(lambda: finished(project.state_url, "pro_plan"), what="the initial sync")
    planned = wait_for(
        lambda: (at := next_runs(project.state_url)["pro_plan"]) and at > clock.utcnow() and at,
        what="the drawn plan",
    )

    project.write([PRO, BUYERS], extra=schedule("1h", "2h"))
    daemon.process.send_signal(signal.SIGHUP)
    # At once, not at the next planned run (an hour away at least): the added audience runs
    # while pro_plan keeps its plan.
    wait_for(lambda: "config reloaded" in daemon.log(), what="the reload")
    added = wait_for(lambda: finished(project.state_url, "buyers"), what="the added audience's run")
    assert (added[0]["kind"], added[0]["status"], added[0]["sent"]) == ("full", "success", 5)
    assert project.planhat.value("u1", "buyers") is True
    assert len(runs(project.state_url, "pro_plan")) == 1  # the others keep their plan
    assert next_runs(project.state_url)["pro_plan"] == planned

    project.path.write_text(project.path.read_text() + "\n[schedule]\nmin_interval = 'soon'\n")
    daemon.process.send_signal(signal.SIGHUP)
    refused = wait_for(
        lambda: [line for line in daemon.log().splitlines() if "reload refused" in line],
        timeout=5,
        what="the refusal",
    )
    assert len(refused) == 1 and "running config stays in force" in refused[0], refused
    assert "Traceback" not in daemon.log()
    assert daemon.process.poll() is None  # still running, on the old config
    code, _ = daemon.signal(signal.SIGTERM)
    assert code == 0, daemon.log()


def test_the_systemd_unit_runs_the_daemon_and_outlasts_its_grace() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(__file__).parent.parent / "deploy" / "audience-sync.service")
    service = unit["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["EnvironmentFile"]
    assert service["ExecStart"].endswith(" run")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP reloads the config
    grace = DaemonSettings().grace_seconds
    assert grace < float(service["TimeoutStopSec"]) <= grace + 10
