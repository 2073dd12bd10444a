"""`audience-sync pause` and `resume`: a paused audience is not run by `sync` or the daemon,
keeps its pending changes and baseline, and shows as paused (who, when, why) in `status`, on
the status page and in a metric; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time

from tests.conftest import Cli, Project, StartDaemon, query, run, schedule, status, sync, users, wait_for

FAST = "batch_size = 5\nmax_requests_per_second = 150"


def pending(project: Project, key: str) -> int:
    return int(query(project.state_url, f"SELECT count(*) FROM pending WHERE audience_key = '{key}'")[0][0])


def told(project: Project, key: str) -> int:
    return int(query(project.state_url, f"SELECT count(*) FROM baseline WHERE audience_key = '{key}'")[0][0])


def test_a_paused_audience_is_skipped_keeps_its_changes_and_runs_again_once_resumed(
    project: Project, cli: Cli
) -> None:
    project.write(transport="endusers", planhat=FAST)
    project.source.set_users(users(range(1, 6), plan="pro", orders=1))
    assert sync(cli).code == 0
    project.planhat.fail_next(100, status=400)  # a run that leaves pro_plan's changes pending
    project.source.set_users(users(range(3, 9), plan="pro", orders=1))
    assert sync(cli, "--audience", "pro_plan").code != 0
    project.planhat.clear_faults()
    before = (pending(project, "pro_plan"), told(project, "pro_plan"))
    assert before[0] > 0

    paused = run(cli, "pause", "pro_plan", "--reason", "schema change <b>today</b>")
    assert paused.code == 0, paused.err
    assert "pro_plan: paused" in paused.out and "schema change <b>today</b>" in paused.out

    result = sync(cli)  # every audience: pro_plan is skipped, saying why; buyers runs
    assert result.code == 0, result.err
    assert "pro_plan: skipped: paused" in result.out and "schema change" in result.out
    assert "audience-sync resume pro_plan" in result.out
    assert (pending(project, "pro_plan"), told(project, "pro_plan")) == before  # nothing touched
    assert told(project, "buyers") == 6

    named = sync(cli, "--audience", "pro_plan")  # asked for by name: refused with the way out
    assert named.code == 1 and "Traceback" not in named.err
    assert "pro_plan" in named.err and "audience-sync resume pro_plan" in named.err
    assert (pending(project, "pro_plan"), told(project, "pro_plan")) == before

    repair = run(cli, "reconcile", "--fix", "--audience", "pro_plan")  # a repair sends: not while paused
    assert repair.code == 1 and "not repaired (`audience-sync resume pro_plan` first)" in repair.err
    assert (pending(project, "pro_plan"), told(project, "pro_plan")) == before

    entry = status(cli)
    assert entry["paused"]["reason"] == "schema change <b>today</b>"
    assert "@" in entry["paused"]["paused_by"] and entry["paused"]["paused_at"]
    table = run(cli, "status").out
    line = next(row for row in table.splitlines() if row.startswith("pro_plan "))
    assert "paused" in line.split()
    assert "pro_plan is paused" in table and "audience-sync resume pro_plan" in table

    again = run(cli, "pause", "pro_plan", "--reason", "another")  # keeps the first pause
    assert "already paused" in again.out and "schema change" in again.out

    resumed = run(cli, "resume", "pro_plan")
    assert resumed.code == 0 and "pro_plan: resumed" in resumed.out
    assert status(cli)["paused"] is None
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert (pending(project, "pro_plan"), told(project, "pro_plan")) == (0, 6)


def test_pause_of_an_unknown_audience_is_refused_in_one_line(project: Project, cli: Cli) -> None:
    result = run(cli, "pause", "nope")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "unknown audience 'nope'" in result.err and "pro_plan" in result.err
    assert json.loads(run(cli, "status", "--json").out)[0]["paused"] is None


def test_the_daemon_skips_a_paused_audience_shows_the_metric_and_runs_it_after_resume(
    project: Project, cli: Cli, start_daemon: StartDaemon
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    project.write(extra=schedule("1s", "1s", '[daemon]\nresync_poll = "0.2s"\n'))
    assert run(cli, "pause", "pro_plan", "--reason", "migration").code == 0
    daemon = start_daemon()
    wait_for(lambda: told(project, "buyers") == 3, what="buyers synced")
    wait_for(lambda: 'audience_sync_paused{audience="pro_plan"} 1.0' in metrics(daemon), what="metric")
    assert 'audience_sync_paused{audience="buyers"} 0.0' in metrics(daemon)
    time.sleep(1.5)  # past a cadence of 1 s: it would have run
    assert query(project.state_url, "SELECT count(*) FROM runs WHERE audience_key = 'pro_plan'") == [(0,)]

    assert run(cli, "resume", "pro_plan").code == 0  # another process: the state database tells
    wait_for(lambda: told(project, "pro_plan") == 3, what="pro_plan synced after resume")
    wait_for(lambda: 'audience_sync_paused{audience="pro_plan"} 0.0' in metrics(daemon), what="metric")


def metrics(daemon: object) -> str:
    return daemon.runtime.metrics.exposition().decode()  # type: ignore[attr-defined]
