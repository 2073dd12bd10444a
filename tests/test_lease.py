"""One run per audience at a time: the lease row, then real processes competing for it."""

from __future__ import annotations

import itertools
import re
import signal

import pytest
from freezegun import freeze_time
from sqlalchemy.engine import Engine

from audience_sync.state import leases
from audience_sync.state import models as m
from audience_sync.sync import lease_keeper
from tests.conftest import (
    POSTGRES,
    Cli,
    KeeperClock,
    Project,
    Spawn,
    finished,
    runs,
    schedule,
    users,
    wait_for,
)
from tests.test_daemon import SLOW_PRO_QUERY, count


def test_one_holder_at_a_time_until_released(state: Engine) -> None:
    assert leases.try_acquire(state, "a", "holder-1", 60)
    assert not leases.try_acquire(state, "a", "holder-2", 60)
    assert leases.current_holder(state, "a") == "holder-1"
    assert leases.try_acquire(state, "b", "holder-2", 60)  # other audiences are independent
    assert leases.try_acquire(state, "a", "holder-1", 60)  # our own: renewed
    leases.release(state, "a", "holder-2")  # not ours: nothing happens
    assert leases.current_holder(state, "a") == "holder-1"
    leases.release(state, "a", "holder-1")
    assert leases.current_holder(state, "a") is None
    assert leases.try_acquire(state, "a", "holder-2", 60)


def test_an_expired_lease_is_taken_over_and_the_old_holder_learns_it(state: Engine) -> None:
    with freeze_time("2026-12-01 10:00:00") as frozen:
        assert leases.try_acquire(state, "a", "holder-1", 60)
        frozen.tick(59)
        assert not leases.try_acquire(state, "a", "holder-2", 60)
        frozen.tick(2)
        assert leases.current_holder(state, "a") is None
        assert leases.try_acquire(state, "a", "holder-2", 60)
        assert not leases.renew(state, "a", "holder-1", 60)  # it lost the lease
        assert leases.renew(state, "a", "holder-2", 60)


def test_the_keeper_renews_a_lease_for_as_long_as_the_run_lives(state: Engine) -> None:
    with freeze_time("2026-12-01 10:00:00") as frozen:
        clock = KeeperClock(frozen)
        assert leases.try_acquire(state, "a", "holder-1", 60)
        with lease_keeper.LeaseKeeper(state, ["a"], "holder-1", 60, timer=clock) as keeper:
            for _ in range(9):  # three times the lease, renewed every third of it
                clock.advance(20)
                assert not leases.try_acquire(state, "a", "holder-2", 60)
                assert leases.current_holder(state, "a") == "holder-1"
            assert not keeper.lost
        frozen.tick(59)
        assert not leases.try_acquire(state, "a", "holder-2", 60)  # renewed at its last tick
        frozen.tick(2)
        assert leases.try_acquire(state, "a", "holder-2", 60)  # no longer renewed: it expired


# --- across processes ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("state_url", [POSTGRES], indirect=True)
def test_two_daemons_on_one_database_never_run_one_audience_at_once(project: Project, spawn: Spawn) -> None:
    slow = SLOW_PRO_QUERY.replace("4000000", "2000000")  # about 0.3 s
    project.write(
        [
            {"name": "Pro Plan", "query": slow},
            {"name": "Everyone", "query": slow.replace("plan = 'pro' AND ", "")},
        ],
        extra=schedule("0.5s", "0.8s"),
    )
    project.source.set_users(users(range(1, 31), plan="pro"))
    first, second = spawn(project), spawn(project)
    # A daemon runs its audiences as one group, their slow queries one after the other: allow
    # for a loaded machine (the check at start runs the queries too).
    wait_for(lambda: len(finished(project.state_url)) >= 6, timeout=60, what="six runs")
    for daemon in (first, second):
        code, _ = daemon.signal(signal.SIGTERM)
        assert code == 0, daemon.log()

    history = runs(project.state_url)
    assert all(run["finished_at"] is not None for run in history)
    for key in ("pro_plan", "everyone"):
        own = sorted((r for r in history if r["audience_key"] == key), key=lambda r: r["started_at"])
        assert len(own) >= 3
        for before, after in itertools.pairwise(own):
            assert after["started_at"] >= before["finished_at"], (key, before, after)
        assert own[0]["kind"] == "full" and all(r["kind"] == "incremental" for r in own[1:])
    # The daemons did compete: one found an audience leased by the other.
    logs = first.log() + second.log()
    assert re.search(r"skipped: audience '\w+' is already running \(lease held by ", logs), logs
    assert project.planhat.value("u1", "pro_plan") is True and project.planhat.value("u30", "everyone")


@pytest.mark.slow
@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_sync_while_the_daemon_runs_the_audience_says_already_running(
    project: Project, spawn: Spawn, cli: Cli
) -> None:
    project.write([{"name": "Pro Plan", "query": SLOW_PRO_QUERY.replace("4000000", "8000000")}],
                  extra=schedule("1h", "2h"))  # fmt: skip
    project.source.set_users(users(range(1, 4), plan="pro"))
    daemon = spawn(project)
    wait_for(lambda: count(project.state_url, m.runs, m.runs.c.status == "running"), what="a run in flight")

    for args in (["sync"], ["sync", "--audience", "pro_plan"], ["resync", "--now"]):
        result = cli("--config", "audience_sync.toml", *args)
        assert result.code == 1, (args, result.out, result.err)
        line = "pro_plan: audience 'pro_plan' is already running (lease held by "
        assert line in result.err and f":{daemon.pid}:" in result.err, result.err

    # Past its (slow) query before the SIGTERM: on a busy machine the query can outlast the
    # three commands above, and a run stopped while reading its source has nothing to count.
    wait_for(
        lambda: count(project.state_url, m.pending) or count(project.state_url, m.changes),
        timeout=60,
        what="the run's changes queued",
    )
    code, _ = daemon.signal(signal.SIGTERM)
    assert code == 0, daemon.log()
    [run] = runs(project.state_url)  # recorded: delivered, or stopped by the SIGTERM and pending
    assert run["finished_at"] is not None and run["sent"] + run["pending"] == 3
    assert count(project.state_url, m.leases) == 0
    # The --now resync could not run here; it stayed recorded, for the daemon (or a later run).
    requests = count(project.state_url, m.resync_requests, m.resync_requests.c.status == "pending")
    done = count(project.state_url, m.resync_requests, m.resync_requests.c.status == "done")
    assert requests + done == 1
