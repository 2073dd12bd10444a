"""The daemon's scheduling: the decision functions under freezegun, then the daemon in-process
against a real state database (SQLite and PostgreSQL) and the loopback Planhat."""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from audience_sync.config import ScheduleSettings
from audience_sync.daemon.cadence import draw_interval, first_run_at, next_run_at
from audience_sync.daemon.planner import WAKE_JOB
from audience_sync.daemon.turns import Turns, TurnTakingSender
from audience_sync.http.metrics import Metrics
from audience_sync.http.server import MetricsServer
from audience_sync.planhat import Outcome
from audience_sync.state import changes, database, resyncs
from audience_sync.state import models as m
from audience_sync.support import clock
from tests.conftest import (
    Cli,
    Project,
    StartDaemon,
    finished,
    next_runs,
    runs,
    schedule,
    users,
    wait_for,
)

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PRO_ONLY = [
    {"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"}
]
ENGAGE = ScheduleSettings(min_interval=timedelta(hours=2), max_interval=timedelta(hours=3))


# --- decisions (freezegun) ----------------------------------------------------------------


@freeze_time(NOW)
def test_an_audience_never_synced_runs_at_once() -> None:
    rng = random.Random(1)
    assert first_run_at(ENGAGE, rng, synced=False, last_finished=None) == NOW
    # A run that ended without a baseline (its query failed) is still "never synced".
    assert first_run_at(ENGAGE, rng, synced=False, last_finished=NOW - timedelta(minutes=5)) == NOW
    assert first_run_at(ENGAGE, rng, synced=True, last_finished=None) == NOW


@freeze_time(NOW)
def test_a_restart_schedules_from_the_last_run_in_the_database() -> None:
    last = NOW - timedelta(hours=1)
    times = [
        first_run_at(ENGAGE, random.Random(seed), synced=True, last_finished=last) for seed in range(300)
    ]
    assert all(last + timedelta(hours=2) <= at <= last + timedelta(hours=3) for at in times)
    assert min(times) - (last + timedelta(hours=2)) < timedelta(minutes=10)  # the draw spans
    assert (last + timedelta(hours=3)) - max(times) < timedelta(minutes=10)  # the whole range
    assert min(times) > NOW  # not at once: nothing is resent on restart


@freeze_time(NOW)
def test_an_overdue_audience_runs_at_once() -> None:
    rng = random.Random(2)
    assert first_run_at(ENGAGE, rng, synced=True, last_finished=NOW - timedelta(hours=3, seconds=1)) == NOW
    assert first_run_at(ENGAGE, rng, synced=True, last_finished=NOW - timedelta(days=9)) == NOW
    # Partly elapsed: the rest of a fresh draw, never less than now.
    at = first_run_at(ENGAGE, rng, synced=True, last_finished=NOW - timedelta(hours=2, minutes=30))
    assert NOW <= at <= NOW + timedelta(minutes=30)


def test_after_every_run_the_next_is_drawn_afresh_within_the_bounds() -> None:
    rng = random.Random(3)
    with freeze_time(NOW) as frozen:
        gaps = []
        for _ in range(200):
            at = next_run_at(ENGAGE, rng)
            gaps.append(at - clock.utcnow())
            frozen.tick(timedelta(hours=2, minutes=17))
    assert all(timedelta(hours=2) <= gap <= timedelta(hours=3) for gap in gaps)
    assert len({round(gap.total_seconds()) for gap in gaps}) > 150  # fresh, not one fixed interval


def test_equal_bounds_give_a_fixed_interval_and_seconds_work() -> None:
    seconds = ScheduleSettings(min_interval=timedelta(seconds=2), max_interval=timedelta(seconds=2))
    assert draw_interval(seconds, random.Random(4)) == timedelta(seconds=2)
    short = ScheduleSettings(min_interval=timedelta(seconds=1), max_interval=timedelta(seconds=3))
    draws = [draw_interval(short, random.Random(seed)) for seed in range(50)]
    assert all(timedelta(seconds=1) <= draw <= timedelta(seconds=3) for draw in draws)


# --- helpers ------------------------------------------------------------------------------


def execute(url: str, statement: Any) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(statement)
    finally:
        engine.dispose()


def cli_json(cli: Cli, *args: str) -> Any:
    result = cli("--config", "audience_sync.toml", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


# --- the daemon in-process ----------------------------------------------------------------


def test_initial_full_sync_then_incremental_runs_on_the_drawn_cadence(
    project: Project, start_daemon: StartDaemon, cli: Cli
) -> None:
    project.write(PRO_ONLY,
                  extra=schedule("0.5s", "0.8s") + "[metrics]\nport = 0\n")  # fmt: skip
    project.source.set_users(users(range(1, 6), plan="pro"))
    daemon = start_daemon()
    first = wait_for(lambda: finished(project.state_url), what="first run")[0]
    assert (first["kind"], first["trigger"], first["status"]) == ("full", "schedule", "success")
    assert first["sent"] == 5
    assert all(project.planhat.value(f"u{n}", "pro_plan") is True for n in range(1, 6))

    project.source.set_users(users(range(2, 7), plan="pro"))  # u1 leaves, u6 enters
    done = wait_for(lambda: finished(project.state_url)[2:], what="three runs")
    history = finished(project.state_url)
    second = history[1]
    assert (second["kind"], second["trigger"], second["entered"], second["exited"]) == (
        "incremental", "schedule", 1, 1,
    )  # fmt: skip
    assert project.planhat.value("u1", "pro_plan") is False and project.planhat.value("u6", "pro_plan")
    for before, after in itertools.pairwise(history):
        gap = (after["started_at"] - before["finished_at"]).total_seconds()
        assert gap >= 0.45, gap  # drawn in [0.5 s, 0.8 s]: never sooner (later on a busy machine)
    assert done

    # Metrics from the daemon's own registry.
    assert daemon.server is not None
    text = urllib.request.urlopen(daemon.server.url + "/metrics", timeout=5).read().decode()
    assert 'audience_sync_runs_total{audience="pro_plan",status="success"}' in text
    assert 'audience_sync_changes_sent_total{audience="pro_plan"} 7.0' in text
    assert 'audience_sync_pending_changes{audience="pro_plan"} 0.0' in text
    assert 'audience_sync_last_success_timestamp_seconds{audience="pro_plan"}' in text
    with urllib.request.urlopen(daemon.server.url + "/healthz", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read())["healthy"] is True

    # The next run is published in the state database and shown by `status`.
    assert daemon.stop(timeout=5)
    stopped = clock.utcnow()
    planned = next_runs(project.state_url)["pro_plan"]
    assert planned is not None
    # The run the plan was drawn after. A run may have started at `planned` just before the
    # stop: it finishes, and a stopping daemon draws nothing after it. The draw (0.5 to 0.8 s)
    # came after that run finished and before the daemon stopped: bounds by order, not by how
    # fast a busy machine got there.
    last = [run for run in finished(project.state_url) if run["finished_at"] <= planned][-1]
    assert last["finished_at"] + timedelta(seconds=0.5) <= planned <= stopped + timedelta(seconds=0.8)
    status = cli_json(cli, "status")[0]
    assert status["next_run_at"] == planned.isoformat()
    table = cli("--config", "audience_sync.toml", "status")
    assert planned.strftime("%Y-%m-%d %H:%M:%S UTC") in table.out


def test_a_restart_does_not_resend_and_waits_for_the_drawn_time(
    project: Project, start_daemon: StartDaemon, cli: Cli
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    sent = len(project.planhat.requests)
    finished = {r["audience_key"]: r["finished_at"] for r in runs(project.state_url)}
    project.write(extra=schedule("1h", "2h"))

    daemon = start_daemon()
    time.sleep(0.5)
    assert len(runs(project.state_url)) == 2 and len(project.planhat.requests) == sent  # nothing ran
    planned = {key: at for key, at in next_runs(project.state_url).items() if at is not None}
    for key in ("pro_plan", "buyers"):
        assert daemon.next_run(key) == planned[key]
        assert finished[key] + timedelta(hours=1) <= planned[key] <= finished[key] + timedelta(hours=2)
    assert daemon.scheduler.get_job(WAKE_JOB).next_run_time == min(planned.values())


def test_an_overdue_audience_runs_at_once_incrementally(
    project: Project, start_daemon: StartDaemon, cli: Cli
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert cli("--config", "audience_sync.toml", "sync", "--audience", "pro_plan").code == 0
    long_ago = clock.utcnow() - timedelta(hours=5)
    execute(project.state_url, m.runs.update().values(started_at=long_ago, finished_at=long_ago))
    project.write(PRO_ONLY,
                  extra=schedule("2h", "3h"))  # fmt: skip
    sent = len(project.planhat.requests)

    start_daemon()
    second = wait_for(lambda: finished(project.state_url)[1:], what="overdue run")[0]
    assert (second["kind"], second["trigger"], second["status"], second["sent"]) == (
        "incremental", "schedule", "success", 0,
    )  # fmt: skip
    assert len(project.planhat.requests) == sent  # nothing changed: nothing resent
    # The plan written at start said "now"; wait for the draw written after the run.
    planned = wait_for(
        lambda: (p := next_runs(project.state_url)["pro_plan"]) and p > second["finished_at"] and p,
        what="next run drawn after the overdue run",
    )
    drawn = planned - second["finished_at"]
    assert timedelta(hours=2) <= drawn <= timedelta(hours=3, seconds=1)


def test_an_added_audience_gets_its_initial_sync_and_a_removed_one_keeps_its_history(
    project: Project, start_daemon: StartDaemon, cli: Cli
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    assert cli("--config", "audience_sync.toml", "sync").code == 0  # pro_plan and buyers
    project.write([
        {"name": "Pro Plan",
         "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"},
        {"name": "Everyone", "query": "SELECT id AS user_id, company_id FROM users"},
    ], extra=schedule("1h", "2h"))  # fmt: skip
    execute(project.state_url, m.audiences.update().values(next_run_at=clock.utcnow() + timedelta(hours=1)))

    start_daemon()
    added = wait_for(lambda: finished(project.state_url, "everyone"), what="added audience's run")
    assert (added[0]["kind"], added[0]["status"], added[0]["sent"]) == ("full", "success", 3)
    time.sleep(0.3)
    assert len(runs(project.state_url, "pro_plan")) == 1  # synced recently: waits its turn
    assert len(runs(project.state_url, "buyers")) == 1  # removed: not run again ...
    assert next_runs(project.state_url)["buyers"] is None  # ... and no next run shown
    history = cli_json(cli, "history", "--audience", "buyers")
    assert len(history) == 1 and history[0]["status"] == "success"  # its history stays
    entries = {e["key"]: e for e in cli_json(cli, "status")}
    assert entries["buyers"]["configured"] is False and entries["buyers"]["baseline"] == 3


def test_a_resync_requested_mid_run_runs_right_after_it(
    project: Project, start_daemon: StartDaemon, cli: Cli
) -> None:
    fake = project.planhat
    project.write(PRO_ONLY)
    project.source.set_users(users(range(1, 4), plan="pro"))
    engine = database.open_state(project.state_url)
    try:
        assert cli("--config", "audience_sync.toml", "sync").code == 0
        long_ago = clock.utcnow() - timedelta(hours=5)
        execute(project.state_url, m.runs.update().values(started_at=long_ago, finished_at=long_ago))
        project.source.set_users(users(range(1, 34), plan="pro"))  # 30 enter: a run of ~1 s
        fake.delay_next(30, 0.3)
        project.write(PRO_ONLY,
                      extra=schedule("1h", "2h", '[daemon]\nresync_poll = "0.2s"\n'))  # fmt: skip
        start_daemon()
        wait_for(lambda: any(r["status"] == "running" for r in runs(project.state_url)), what="run in flight")
        with engine.begin() as connection:
            [request_id] = resyncs.request(connection, ["pro_plan"], requested_by="test")
        resync = wait_for(
            lambda: [r for r in runs(project.state_url) if r["trigger"] == "resync" and r["finished_at"]],
            what="resync run",
        )[0]
    finally:
        engine.dispose()
    history = runs(project.state_url)
    incremental = history[1]
    assert (incremental["kind"], incremental["status"], incremental["sent"]) == ("incremental", "success", 30)
    assert (resync["kind"], resync["status"], resync["sent"]) == ("full", "success", 33)
    # Right after, never overlapping: not at the next planned run, an hour away at least.
    assert resync["started_at"] >= incremental["finished_at"]
    assert resync["started_at"] < incremental["finished_at"] + timedelta(minutes=30)
    request = runs_request(project.state_url, request_id)
    assert (request["status"], request["run_id"]) == ("done", resync["id"])


def runs_request(url: str, request_id: int) -> dict[str, Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                sa.select(m.resync_requests).where(m.resync_requests.c.id == request_id)
            ).one()
            return dict(row._mapping)
    finally:
        engine.dispose()


def test_history_older_than_the_retention_is_pruned_and_runs_are_kept(
    project: Project, start_daemon: StartDaemon
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    project.write(extra=schedule("1h", "2h", "[history]\nretention_days = 7\n"))
    database.open_state(project.state_url).dispose()  # the schema
    now = clock.utcnow()
    old = [{"run_id": 1, "audience_key": "pro_plan", "user_ref": f"old{n}", "value": True,
            "outcome": "delivered", "at": now - timedelta(days=8, minutes=n)} for n in range(5)]  # fmt: skip
    young = [{"run_id": 1, "audience_key": "pro_plan", "user_ref": "young", "value": True,
              "outcome": "delivered", "at": now - timedelta(days=6)}]  # fmt: skip
    execute(project.state_url, m.changes.insert().values(old + young))
    execute(project.state_url, m.runs.insert().values(
        audience_key="pro_plan", kind="full", trigger="cli", status="success",
        started_at=now - timedelta(days=30), finished_at=now - timedelta(days=30)))  # fmt: skip

    start_daemon()

    def refs() -> set[str]:
        engine = sa.create_engine(project.state_url)
        with engine.connect() as connection:
            found = set(connection.execute(sa.select(m.changes.c.user_ref)).scalars())
        engine.dispose()
        return found

    wait_for(lambda: not any(ref.startswith("old") for ref in refs()), what="pruning")
    assert "young" in refs()
    assert runs(project.state_url)[0]["started_at"] < now - timedelta(days=29)  # run records stay


def test_prune_changes_deletes_in_batches(state_url: str) -> None:
    engine = database.open_state(state_url)
    try:
        now = clock.utcnow()
        rows = [{"run_id": 1, "audience_key": "a", "user_ref": f"u{n}", "value": True,
                 "outcome": "delivered", "at": now - timedelta(days=n)} for n in range(10)]  # fmt: skip
        with engine.begin() as connection:
            connection.execute(m.changes.insert(), rows)
        cutoff = now - timedelta(days=4, hours=12)  # u5..u9 are older
        with engine.begin() as connection:
            assert changes.prune(connection, cutoff, limit=3) == 3
        with engine.begin() as connection:
            assert changes.prune(connection, cutoff, limit=3) == 2
            assert changes.prune(connection, cutoff) == 0
            left = sorted(connection.execute(sa.select(m.changes.c.user_ref)).scalars())
        assert left == ["u0", "u1", "u2", "u3", "u4"]
    finally:
        engine.dispose()


# --- refusing to start --------------------------------------------------------------------


def test_the_daemon_refuses_to_start_without_a_token(project: Project, cli: Cli) -> None:
    project.write(tokens=False)
    result = cli("--config", "audience_sync.toml", "run")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "planhat.tenant_token" in lines[0] and "PLANHAT_TENANT_TOKEN" in lines[0]
    assert project.planhat.requests == []
    engine = sa.create_engine(project.state_url)
    with engine.connect() as connection:
        assert sa.inspect(connection).get_table_names() == []  # the state database is untouched
    engine.dispose()


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_the_daemon_refuses_a_schema_that_is_behind(project: Project, cli: Cli) -> None:
    engine = database.open_state(project.state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0000_older'")
    engine.dispose()
    result = cli("--config", "audience_sync.toml", "run")
    assert result.code == 1
    assert "audience-sync db upgrade" in result.err and "Traceback" not in result.err


# --- metrics and health -------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_health_turns_503_when_an_audience_has_not_synced_for_too_long() -> None:
    clock = Clock(NOW)
    metrics = Metrics(["a", "b"], timedelta(hours=3), timedelta(minutes=30), clock=clock)
    server = MetricsServer(metrics, "127.0.0.1", 0).start()
    try:

        def health() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        # "a" last succeeded long ago, but its first run since start is still going: healthy.
        metrics.set_last_success("a", NOW - timedelta(days=2))
        clock.now = NOW + timedelta(hours=5)
        assert health()[0] == 200
        metrics.mark_cycled("a")  # that run failed: it has not synced for 2 days
        status, body = health()
        assert status == 503 and body["audiences"]["a"]["healthy"] is False
        assert body["audiences"]["b"]["healthy"] is True  # still in its first run
        metrics.set_last_success("a", clock.now - timedelta(hours=3, minutes=29))
        assert health()[0] == 200  # within max_interval + health_margin
        clock.now += timedelta(minutes=2)
        assert health()[0] == 503
        # "b" never succeeded: counted from the daemon's start once its first run ended.
        metrics.set_last_success("a", clock.now)
        metrics.mark_cycled("b")
        assert health()[0] == 503  # started 5 h 32 min ago, never a success
        clock.now = NOW + timedelta(hours=1)
        assert health()[0] == 200
        text = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
        assert "audience_sync_healthy 1.0" in text
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.url + "/other", timeout=5)
        assert missing.value.code == 404
    finally:
        server.stop()


def test_each_daemon_has_its_own_registry() -> None:
    one = Metrics(["a"], timedelta(hours=3), timedelta(minutes=30))
    two = Metrics(["a"], timedelta(hours=3), timedelta(minutes=30))
    one.record_run("a", "success", sent=4, failed=1, duration=2.0)
    assert one.registry.get_sample_value("audience_sync_changes_sent_total", {"audience": "a"}) == 4
    assert two.registry.get_sample_value("audience_sync_changes_sent_total", {"audience": "a"}) == 0
    labels = {"audience": "a", "status": "success"}
    assert one.registry.get_sample_value("audience_sync_runs_total", labels) == 1


def test_delivery_chunks_of_parallel_runs_take_turns() -> None:
    turns = Turns()
    active: list[int] = []
    overlaps: list[int] = []

    class SlowSender:
        chunk_size = 10
        exhausted = False

        def send(self, contacts: Any) -> Outcome:
            active.append(1)
            overlaps.append(len(active))
            time.sleep(0.01)
            active.pop()
            return Outcome()

        def __exit__(self, *exc: object) -> None:
            pass

    def run() -> None:
        with TurnTakingSender(SlowSender(), turns) as sender:
            for _ in range(10):
                sender.send([])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 40 and max(overlaps) == 1


def test_a_metrics_port_in_use_stops_the_start_with_one_line(project: Project, cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        project.write(extra=f"[metrics]\nport = {port}\n")
        result = cli("--config", "audience_sync.toml", "run")
    assert result.code == 1
    assert f"Config error: metrics.port: cannot listen on 127.0.0.1:{port}" in result.err
    assert "Traceback" not in result.err and runs(project.state_url) == []
