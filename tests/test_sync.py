"""`audience-sync sync` end to end: CLI -> source -> state database -> loopback Planhat."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import API_TOKEN, TENANT_TOKEN, Cli, Project, sync, users


def history(cli: Cli, *args: str) -> list[dict]:
    result = cli("--config", "audience_sync.toml", "history", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_first_run_sends_every_member_then_only_changes(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 11), plan="pro"))

    first = sync(cli)
    assert first.code == 0, first.err
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 11))
    assert len(fake.requests) == 10

    # u1, u2 leave; u11, u12 enter; the rest is unchanged.
    project.source.set_users(users(range(3, 13), plan="pro"))
    before = len(fake.requests)
    second = sync(cli)
    assert second.code == 0, second.err
    assert len(fake.requests) - before == 4
    assert fake.value("u1", "pro_plan") is False and fake.value("u2", "pro_plan") is False
    assert fake.value("u11", "pro_plan") is True and fake.value("u12", "pro_plan") is True

    runs = history(cli, "--audience", "pro_plan")
    assert [(r["kind"], r["status"], r["entered"], r["exited"], r["sent"]) for r in runs] == [
        ("incremental", "success", 2, 2, 4),
        ("full", "success", 10, 0, 10),
    ]
    third = sync(cli)
    assert third.code == 0 and len(fake.requests) - before == 4  # nothing changed, nothing sent


def test_identify_payload_is_engage_shaped(project: Project, cli: Cli) -> None:
    project.source.set_users([{"id": "u1", "email": "a@x.com", "name": "Ann", "title": "CTO",
                               "company_id": "c9", "plan": "pro"}])  # fmt: skip
    assert sync(cli).code == 0
    method, path, body, status = project.planhat.requests[0][:4]
    assert (method, path, status) == ("POST", "/dock/segment", 200)
    assert body["type"] == "identify" and body["userId"] == body["user_id"] == "u1"
    assert body["traits"] == {"pro_plan": True, "email": "a@x.com", "name": "Ann", "title": "CTO",
                              "companyId": "c9"}  # fmt: skip
    assert body["context"]["personas"]["computation_class"] == "audience"
    assert body["context"]["personas"]["computation_key"] == "pro_plan"
    assert body["source"] == "Segment" and body["messageId"] and body["timestamp"]


def test_history_json_has_the_documented_fields(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    assert sync(cli).code == 0
    runs = history(cli)
    assert len(runs) == 2  # one per audience per run
    for field in ("id", "audience", "kind", "status", "started_at", "finished_at", "members",
                  "entered", "exited", "sent", "failed", "skipped", "error"):  # fmt: skip
        assert field in runs[0]
    assert runs[0]["started_at"].endswith("+00:00") and runs[0]["finished_at"].endswith("+00:00")


def test_a_users_audiences_coalesce_into_one_identify(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=2))
    assert sync(cli).code == 0
    assert len(project.planhat.requests) == 3
    traits = project.planhat.requests[0][2]["traits"]
    assert traits["pro_plan"] is True and traits["buyers"] is True


def test_dry_run_changes_nothing(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 6), plan="pro"))
    result = sync(cli, "--dry-run")
    assert result.code == 0, result.err
    assert "pro_plan" in result.out and '"type": "identify"' in result.out
    assert project.planhat.requests == []
    assert history(cli) == []
    assert sync(cli).code == 0  # the real first run is still a full one
    assert history(cli, "--audience", "pro_plan")[0]["kind"] == "full"


def test_no_token_means_dry_run(project: Project, cli: Cli) -> None:
    project.write(tokens=False)
    project.source.set_users(users(range(1, 3), plan="pro"))
    result = sync(cli)
    assert result.code == 0
    assert "No Planhat token set" in result.err and "Dry run" in result.err
    assert project.planhat.requests == []


def test_full_flag_resends_everyone_and_false_for_leavers(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 6), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    project.source.set_users(users(range(2, 6), plan="pro"))
    fake.requests.clear()
    assert sync(cli, "--audience", "pro_plan", "--full").code == 0
    sent = {(b["userId"], b["traits"]["pro_plan"]) for _, _, b, *_ in fake.requests}
    assert sent == {("u1", False), ("u2", True), ("u3", True), ("u4", True), ("u5", True)}
    assert history(cli, "--audience", "pro_plan")[0]["kind"] == "full"


def test_undelivered_changes_stay_pending_and_go_next_run(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.source.set_users(users(range(1, 6), plan="pro"))
    fake.always(503)
    failed = sync(cli, "--audience", "pro_plan")
    assert failed.code != 0
    assert "pro_plan" in failed.err
    run = history(cli)[0]
    assert run["status"] == "failed" and run["sent"] == 0 and run["pending"] == 5

    fake.clear_faults()
    # Meanwhile u5 left. A 503 proves nothing about whether its `true` was written (a 5xx
    # can come after the change was applied): it was in doubt, so u5 is told `false`.
    project.source.set_users(users(range(1, 5), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 5))
    told = [
        r.body["traits"]["pro_plan"]
        for r in fake.requests
        if r.status == 200 and r.body.get("userId") == "u5"
    ]
    assert told == [False]
    # Planhat never had u5 (the 503s wrote nothing), and a `false` naming no company for a contact
    # it does not have is discarded: nothing holds `true`.
    assert fake.find("u5") is None and fake.unassigned == [{"type": "identify", "ref": "u5"}]
    assert history(cli)[0]["pending"] == 0


def test_a_wrong_token_stops_the_run_and_keeps_everything_pending(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 6), plan="pro"))
    project.path.write_text(project.path.read_text().replace(TENANT_TOKEN, "wrong-token"))
    project.planhat.delay_next(1, 0.3)  # the refusal takes a while: the other workers wait for it
    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0
    assert "planhat.tenant_token" in result.err and "401" in result.err
    assert "wrong-token" not in result.err + result.out
    assert "Traceback" not in result.err
    assert len(project.planhat.requests) == 1  # no retry storm
    assert history(cli)[0]["pending"] == 5


def test_a_failing_query_fails_its_audience_only(project: Project, cli: Cli) -> None:
    project.write([
        {"name": "Broken", "query": "SELECT id AS user_id FROM no_such_table"},
        {"name": "Pro Plan",
         "query": "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"},
    ])  # fmt: skip
    project.source.set_users(users(range(1, 4), plan="pro"))
    result = sync(cli)
    assert result.code != 0
    assert "broken" in result.err and "no_such_table" in result.err
    assert "Traceback" not in result.err
    assert all(project.planhat.value(f"u{n}", "pro_plan") for n in range(1, 4))
    statuses = {r["audience"]: r["status"] for r in history(cli)}
    assert statuses == {"broken": "failed", "pro_plan": "success"}


def test_a_query_without_identifiers_is_refused(project: Project, cli: Cli) -> None:
    project.write([{"name": "Names", "query": "SELECT name FROM users"}])
    project.source.set_users(users(range(1, 3)))
    result = sync(cli)
    assert result.code != 0
    assert "names" in result.err and "neither user_id nor email" in result.err


def test_bad_rows_are_skipped_and_counted(project: Project, cli: Cli) -> None:
    rows = [
        *users(range(1, 4), plan="pro"),
        {"id": None, "email": None, "plan": "pro"},  # no identifier
        {"id": "u1", "email": "dup@example.com", "plan": "pro"},  # duplicate user
        {"id": "x" * 300, "plan": "pro"},  # over-long identifier
        {"id": None, "email": "only-email@example.com", "plan": "pro"},  # email identifies
    ]
    project.source.set_users(rows)
    result = sync(cli, "--audience", "pro_plan")
    assert result.code == 0, result.err
    run = history(cli)[0]
    assert (run["members"], run["skipped"], run["sent"]) == (4, 3, 4)
    assert "skipped 2 unusable rows" in result.err and "unusable user_id 'xxx" in result.err
    assert project.planhat.value("only-email@example.com", "pro_plan") is True


def test_tokens_never_reach_the_state_database(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    project.planhat.fail_next(1, status=500)
    sync(cli)
    engine = sa.create_engine(project.state_url)
    with engine.connect() as connection:
        dump = ""
        for table in sa.inspect(connection).get_table_names():
            dump += str(connection.exec_driver_sql(f"SELECT * FROM {table}").all())
    engine.dispose()
    assert "u1" in dump
    assert TENANT_TOKEN not in dump and API_TOKEN not in dump


def test_status_reports_members_pending_and_last_run(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    project.planhat.always(503)
    sync(cli, "--audience", "pro_plan")
    result = cli("--config", "audience_sync.toml", "status", "--json")
    assert result.code == 0, result.err
    entries = {e["key"]: e for e in json.loads(result.out)}
    assert entries["pro_plan"]["members"] == 3 and entries["pro_plan"]["pending"] == 3
    assert entries["pro_plan"]["last_run"]["status"] == "failed"
    assert entries["buyers"]["last_run"] is None
    table = cli("--config", "audience_sync.toml", "status")
    assert "pro_plan" in table.out and "failed" in table.out


def test_an_unreachable_source_is_one_line_and_others_still_sync(project: Project, cli: Cli) -> None:
    text = project.path.read_text().replace(
        "[sources.app]",
        '[sources.down]\nurl = "postgresql://nobody:hunter2@127.0.0.1:1/app"\n\n[sources.app]',
    )
    text += '\n[[audiences]]\nname = "Lost"\nsource = "down"\nquery = "SELECT 1 AS user_id"\n'
    project.path.write_text(text)
    project.source.set_users(users(range(1, 3), plan="pro"))
    result = sync(cli)
    assert result.code != 0
    line = next(line for line in result.err.splitlines() if line.startswith("lost:"))
    assert "cannot connect" in line and "hunter2" not in result.err
    assert "Traceback" not in result.err
    assert project.planhat.value("u1", "pro_plan") is True


def test_an_unreachable_state_database_is_one_line(tmp_path: Path, cli: Cli) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[database]\nurl = "postgresql://nobody:hunter2@127.0.0.1:1/state"\n')
    result = cli("--config", str(config), "status")
    assert result.code != 0
    assert result.err.startswith("State database error:") and len(result.err.strip().splitlines()) == 1
    assert "hunter2" not in result.err and "***" in result.err


def test_resync_request_makes_the_next_run_full_and_is_marked_done(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    requested = cli("--config", "audience_sync.toml", "resync", "--audience", "pro_plan")
    assert requested.code == 0 and "requested" in requested.out
    status = json.loads(cli("--config", "audience_sync.toml", "status", "--json").out)
    assert next(e for e in status if e["key"] == "pro_plan")["resync_requested"] is True

    project.planhat.requests.clear()
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert len(project.planhat.requests) == 3  # everyone again
    run = history(cli, "--audience", "pro_plan")[0]
    assert run["kind"] == "full"
    engine = sa.create_engine(project.state_url)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT status, run_id FROM resync_requests").all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("done", run["id"])]


def test_resync_now_runs_a_full_sync_here(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    project.planhat.requests.clear()
    result = cli("--config", "audience_sync.toml", "resync", "--audience", "pro_plan", "--now")
    assert result.code == 0, result.err
    assert len(project.planhat.requests) == 3
    run = history(cli, "--audience", "pro_plan")[0]
    assert (run["kind"], run["status"]) == ("full", "success")


def test_sync_of_an_audience_another_process_runs_says_already_running(project: Project, cli: Cli) -> None:
    from audience_sync.state import database, leases

    project.source.set_users(users(range(1, 4), plan="pro"))
    engine = database.open_state(project.state_url)
    assert leases.try_acquire(engine, "pro_plan", "otherhost:1:abc", 60)
    try:
        result = sync(cli, "--audience", "pro_plan")
    finally:
        engine.dispose()
    assert result.code != 0
    assert "already running" in result.err and "otherhost:1:abc" in result.err
    assert project.planhat.requests == []


def test_a_resync_requested_during_a_full_run_gets_its_own_run(project: Project, cli: Cli) -> None:
    from audience_sync.config import load_settings
    from audience_sync.state import database, resyncs
    from audience_sync.sync.reports import SyncOptions
    from audience_sync.sync.run import sync as run_sync

    project.source.set_users(users(range(1, 4), plan="pro"))
    settings = load_settings(project.path)
    engine = database.open_state(project.state_url)
    requested: list[int] = []
    calls = []

    def request_mid_run() -> bool:
        # The engine asks before the run starts, then between delivery chunks: request then.
        calls.append(1)
        if len(calls) == 2:
            with engine.begin() as connection:
                requested.extend(resyncs.request(connection, ["pro_plan"], "test"))
        return False

    try:
        (report,) = run_sync(settings, engine, ["pro_plan"], SyncOptions(full=True),
                             should_stop=request_mid_run)  # fmt: skip
        assert report.status == "success" and requested
        with engine.connect() as connection:
            assert resyncs.pending_keys(connection) == ["pro_plan"]
    finally:
        engine.dispose()
