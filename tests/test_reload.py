"""A reload (SIGHUP, `systemctl reload`; the real signal is tested in test_daemon.py): a valid
new config takes effect without a restart, an invalid one is refused and the running config
stays in force; runs in flight finish undisturbed."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from audience_sync.support import clock
from tests.conftest import Project, StartDaemon, finished, next_runs, runs, schedule, users, wait_for

PRO = {"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"}
BUYERS = {"name": "Buyers", "query": "SELECT id AS user_id, email, company_id FROM users WHERE orders > 0"}


def test_a_removed_audience_stops_and_a_run_in_flight_finishes_undisturbed(
    project: Project, start_daemon: StartDaemon
) -> None:
    project.source.set_users(users(range(1, 21), plan="pro", orders=1))
    project.write([PRO, BUYERS], extra=schedule("1h", "2h"))
    project.planhat.delay_next(20, 0.05)  # the initial group run takes about a second
    daemon = start_daemon()
    wait_for(lambda: any(r["status"] == "running" for r in runs(project.state_url)), what="run in flight")

    project.write([PRO], extra=schedule("1h", "2h"))
    assert daemon.reload() is True
    assert daemon.keys == ["pro_plan"] and daemon.next_run("buyers") is None
    done = wait_for(lambda: len(finished(project.state_url)) == 2 and finished(project.state_url),
                    what="the runs in flight")  # fmt: skip
    assert {(r["audience_key"], r["status"], r["sent"]) for r in done} == {
        ("pro_plan", "success", 20), ("buyers", "success", 20),
    }  # fmt: skip
    wait_for(
        lambda: (at := next_runs(project.state_url)["pro_plan"]) and at > clock.utcnow(),
        what="pro_plan's next run, drawn after its run",
    )
    assert next_runs(project.state_url)["buyers"] is None  # not run again, shown as unscheduled
    assert daemon.next_run("buyers") is None


def test_a_new_schedule_rearms_the_plan_and_an_invalid_config_changes_nothing(
    project: Project, start_daemon: StartDaemon, logs: pytest.LogCaptureFixture
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    project.write([PRO], extra=schedule("1h", "2h"))
    daemon = start_daemon()
    wait_for(lambda: finished(project.state_url), what="the initial sync")
    wait_for(lambda: daemon.next_run("pro_plan"), what="the drawn plan")
    assert daemon.next_run("pro_plan") > clock.utcnow() + timedelta(minutes=50)

    config = project.path.read_text()
    project.path.write_text(config.replace(project.state_url, "sqlite:///elsewhere.db"))
    assert daemon.reload() is False  # a restart-only change is refused, not half-applied
    project.path.write_text("[planhat\n" + config)
    assert daemon.reload() is False  # not TOML
    assert daemon.next_run("pro_plan") > clock.utcnow() + timedelta(minutes=50)  # nothing changed
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "database.url changed" in errors[0], errors

    project.write([PRO], extra=schedule("0.3s", "0.5s"))
    assert daemon.reload() is True
    assert daemon.next_run("pro_plan") <= clock.utcnow() + timedelta(seconds=0.5)
    wait_for(lambda: len(finished(project.state_url)) >= 2, timeout=5, what="a run on the new schedule")
