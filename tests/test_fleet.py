"""The daemon at fleet scale: audiences due together run together, so a user's changes across
them travel as one identify / one contact item; one audience's trouble holds back no other."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from audience_sync.config import ScheduleSettings, load_settings
from audience_sync.daemon.cadence import Cadence
from audience_sync.daemon.daemon import Daemon
from audience_sync.state import audiences, database, leases
from audience_sync.sync import run as sync_run
from tests.conftest import Project, StartDaemon, finished, next_runs, schedule, wait_for

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
ENGAGE = ScheduleSettings(min_interval=timedelta(hours=2), max_interval=timedelta(hours=3))
FOUR = [
    {"name": "Everyone", "query": "SELECT id AS user_id, email, company_id FROM users"},
    {"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"},
    {"name": "Buyers", "query": "SELECT id AS user_id, email, company_id FROM users WHERE orders > 0"},
    {"name": "Odd", "query": "SELECT id AS user_id, email, company_id FROM users WHERE orders % 2 = 1"},
]
KEYS = ["everyone", "pro_plan", "buyers", "odd"]


def thirty_users() -> list[dict[str, Any]]:
    return [
        {"id": f"u{n}", "email": f"u{n}@example.com", "plan": "pro" if n % 3 else "free", "orders": n % 4}
        for n in range(1, 31)
    ]


def sent_items(project: Project) -> int:
    """Contact items that reached the fake: one per identify, or per bulk item."""
    total = 0
    for request in project.planhat.requests:
        if request.method != "GET" and request.status < 300:
            total += len(request.body) if isinstance(request.body, list) else 1
    return total


# --- the plan (freezegun) -------------------------------------------------------------------


@freeze_time(NOW)
def test_audiences_due_or_eligible_run_together_and_share_one_draw() -> None:
    cadence = Cadence(ENGAGE, random.Random(7))
    cadence.plan("new", NOW, "never synced", None)
    cadence.plan("eligible", NOW + timedelta(minutes=30), "drawn", NOW - timedelta(hours=2, minutes=5))
    cadence.plan("recent", NOW + timedelta(hours=1), "drawn", NOW - timedelta(hours=1))
    assert cadence.take_group() == ["new", "eligible"]  # "recent" ran 1 h ago: < min_interval
    assert cadence.running("new") and cadence.next_wake() == NOW + timedelta(hours=1)
    assert cadence.take_group() == []  # nothing else due: nobody runs early on its own

    drawn = NOW + timedelta(hours=2, minutes=17)
    published = cadence.finish({"new": (drawn, "drawn"), "eligible": (drawn, "drawn")}, {"new": NOW})
    assert published == {"new": drawn, "eligible": drawn}
    assert cadence.due("new") == cadence.due("eligible") == drawn  # one group from now on


@freeze_time(NOW)
def test_a_group_never_shortens_an_interval_below_the_minimum() -> None:
    cadence = Cadence(ENGAGE, random.Random(1))
    last = NOW - timedelta(hours=1, minutes=59)
    cadence.plan("due", NOW, "due", NOW - timedelta(hours=3))
    cadence.plan("almost", NOW + timedelta(minutes=40), "drawn", last)
    assert cadence.take_group() == ["due"]
    with freeze_time(NOW + timedelta(minutes=1)):  # now 2 h since "almost" ran: it may join
        cadence.plan("other", NOW, "due", None)
        assert cadence.take_group() == ["almost", "other"]


@freeze_time(NOW)
def test_a_resync_asked_for_mid_run_runs_right_after_and_a_removed_audience_is_not_replanned() -> None:
    cadence = Cadence(ENGAGE, random.Random(2))
    for key in ("a", "b", "c"):
        cadence.plan(key, NOW, "never synced", None)
    assert cadence.take_group() == ["a", "b", "c"]
    assert cadence.request_now("a", "full resync requested") is True
    assert cadence.request_now("a", "full resync requested") is False  # already so
    cadence.remove("c")
    drawn = NOW + timedelta(hours=2, minutes=30)
    published = cadence.finish({k: (drawn, "drawn") for k in ("a", "b", "c")}, {})
    assert published == {"a": NOW, "b": drawn}  # "c" is gone; "a" runs again at once
    assert cadence.reason("a") == "full resync requested"


@freeze_time(NOW)
def test_a_new_schedule_redraws_the_plan_from_each_last_run() -> None:
    cadence = Cadence(ENGAGE, random.Random(3))
    cadence.plan("a", NOW + timedelta(hours=2), "drawn", NOW - timedelta(minutes=30))
    cadence.plan("due", NOW, "never synced", None)
    faster = ScheduleSettings(min_interval=timedelta(minutes=40), max_interval=timedelta(minutes=50))
    assert cadence.reschedule(faster) == ["a"]
    due = cadence.due("a")
    assert due is not None and NOW + timedelta(minutes=10) <= due <= NOW + timedelta(minutes=20)
    assert cadence.due("due") == NOW


# --- the daemon -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_the_daemon_sends_one_item_per_user_across_its_audiences(
    project: Project, start_daemon: StartDaemon, transport: str
) -> None:
    project.write(FOUR, transport=transport, extra=schedule("0.6s", "0.9s"))
    project.source.set_users(thirty_users())
    start_daemon()
    first = wait_for(lambda: len(finished(project.state_url)) >= 4 and finished(project.state_url)[:4],
                     what="the initial syncs")  # fmt: skip
    assert sorted(run["audience_key"] for run in first) == sorted(KEYS)
    assert {(run["kind"], run["status"]) for run in first} == {("full", "success")}
    assert len({run["holder"] for run in first}) == 1  # one group run
    assert sent_items(project) == 30  # one item per user, not one per user per audience
    if transport == "segment":
        assert len([r for r in project.planhat.requests if r.method == "POST"]) == 30
    contact = project.planhat.contact("u3")
    assert contact is not None and contact["custom"] == {"everyone": True, "buyers": True, "odd": True}
    planned = next_runs(project.state_url)
    assert len({planned[key] for key in KEYS}) == 1  # one draw: they stay together

    before = sent_items(project)
    changed = thirty_users()
    changed[3]["orders"], changed[3]["plan"] = 5, "free"  # u4: buyers +, odd +, pro_plan -
    changed[1]["orders"] = 0  # u2: buyers -
    project.source.set_users(changed)
    wait_for(lambda: len(finished(project.state_url)) >= 8, what="the second group run")
    second = finished(project.state_url)[4:8]
    assert {run["kind"] for run in second} == {"incremental"}
    assert len({run["holder"] for run in second}) == 1
    assert sent_items(project) - before == 2  # u4 once with its three changes, u2 once
    assert project.planhat.contact("u4")["custom"] == {
        "everyone": True,
        "pro_plan": False,
        "buyers": True,
        "odd": True,
    }
    assert project.planhat.value("u2", "buyers") is False


def test_one_failing_audience_does_not_hold_back_its_group(
    project: Project, start_daemon: StartDaemon
) -> None:
    broken = {"name": "Broken", "query": "SELECT id AS user_id FROM no_such_table"}
    project.write([FOUR[1], broken, FOUR[2]], extra=schedule("1h", "2h"))
    project.source.set_users(thirty_users())
    start_daemon()
    runs = wait_for(lambda: len(finished(project.state_url)) >= 3 and finished(project.state_url),
                    what="the group run")  # fmt: skip
    status = {run["audience_key"]: (run["status"], run["sent"]) for run in runs}
    assert status["broken"][0] == "failed"
    assert status["pro_plan"] == ("success", 20) and status["buyers"][0] == "success"
    assert project.planhat.value("u1", "pro_plan") is True
    planned = next_runs(project.state_url)
    assert planned["broken"] is not None and planned["broken"] == planned["pro_plan"]  # tried again


def test_an_audience_whose_lease_is_held_elsewhere_does_not_hold_back_the_others(
    project: Project, start_daemon: StartDaemon
) -> None:
    project.write([FOUR[1], FOUR[2]], extra=schedule("1h", "2h"))
    project.source.set_users(thirty_users())
    engine = database.open_state(project.state_url)
    try:
        with engine.begin() as connection:
            audiences.register(connection, load_settings(project.path).select(["buyers"]))
        assert leases.try_acquire(engine, "buyers", "another-host:1:x", 600)
        start_daemon()
        wait_for(lambda: finished(project.state_url, "pro_plan"), what="pro_plan's run")
        assert project.planhat.value("u1", "pro_plan") is True
        assert finished(project.state_url, "buyers") == []  # skipped: its lease is elsewhere
        assert project.planhat.value("u1", "buyers") is None
    finally:
        engine.dispose()


def test_planning_many_audiences_costs_no_more_queries_than_planning_few(project: Project) -> None:
    """One scheduler tick reads each table once, whatever the number of audiences."""
    statements = {}
    executed: list[str] = []
    for count in (5, 60):
        project.write([{"name": f"Audience {n}", "query": FOUR[0]["query"]} for n in range(count)],
                      extra=schedule("1h", "2h"))  # fmt: skip
        settings = load_settings(project.path)
        engine = database.open_state(settings.database_url)
        executed.clear()
        sa.event.listen(engine, "before_cursor_execute", lambda *args: executed.append(args[2]))
        try:
            daemon = Daemon(settings, engine)
            daemon.planner.plan(daemon.keys, initial=True)
            daemon.runtime.refresh_metrics(daemon.keys)
        finally:
            engine.dispose()
        statements[count] = len(executed)
        assert all(daemon.next_run(key) is not None for key in daemon.keys)
    assert statements[60] == statements[5], statements


def test_a_stop_during_a_groups_snapshots_starts_no_more_and_loses_nothing(project: Project) -> None:
    """The group's audiences are snapshotted a few at a time: a stop asked for meanwhile lets
    the snapshots under way finish and starts no other; the next run sends everything."""
    project.write(FOUR, transport="endusers")
    project.source.set_users(thirty_users())
    settings = load_settings(project.path)
    checks = iter(range(10**6))
    engine = database.open_state(project.state_url)
    try:
        # The stop comes after two audiences have started (each asks before it starts).
        stopped = sync_run.sync(settings, engine, should_stop=lambda: next(checks) >= 2)
        assert [r.key for r in stopped] == KEYS[:2]
        assert all(r.status == "partial" and r.sent == 0 for r in stopped)
        assert not project.planhat.requests
        again = sync_run.sync(settings, engine)
    finally:
        engine.dispose()
    assert [(r.key, r.status) for r in again] == [(key, "success") for key in KEYS]
    assert project.planhat.value("u3", "everyone") is True and project.planhat.value("u3", "odd") is True
    assert project.planhat.value("u2", "pro_plan") is True
    assert project.planhat.value("u3", "pro_plan") is None  # never a member: never told


def test_a_bulk_request_carries_a_full_batch_of_users_whatever_their_audiences(project: Project) -> None:
    """A chunk is batch_size users, not batch_size outbox rows: 30 users in up to four
    audiences each go out in 6 requests of 5 contacts (rows would have made 16 of about 2)."""
    project.write(FOUR, transport="endusers", planhat="batch_size = 5\nmax_requests_per_second = 150")
    project.source.set_users(thirty_users())
    engine = database.open_state(project.state_url)
    try:
        reports = sync_run.sync(load_settings(project.path), engine)
    finally:
        engine.dispose()
    assert {r.status for r in reports} == {"success"}
    bodies = [r.body for r in project.planhat.requests if r.method == "PUT"]
    assert [len(body) for body in bodies] == [5] * 6
    assert sorted(item["externalId"] for body in bodies for item in body) == sorted(
        f"u{n}" for n in range(1, 31)
    )
    assert project.planhat.contact("u3")["custom"] == {"everyone": True, "buyers": True, "odd": True}
