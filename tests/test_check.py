"""`audience-sync check`: each kind of misconfiguration is caught, on a fresh machine, without
sending anything, with a fix, within its time limit, and without printing a secret."""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from audience_sync import check
from audience_sync.config import load_settings
from audience_sync.state import database, migrations
from audience_sync.support import redaction
from tests.conftest import API_TOKEN, TENANT_TOKEN, Cli, Project, SourceDB, Spawn, query, users, wait_for
from tests.fake_planhat import FakePlanhat

ENDLESS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT 'u' || x AS user_id FROM n"


@pytest.fixture
def sqlite_project(tmp_path: Path, source_db: SourceDB, fake_planhat: FakePlanhat) -> Project:
    """A project on a SQLite state database, for checks where the state database is not the point."""
    project = Project(
        tmp_path / "audience_sync.toml", f"sqlite:///{tmp_path / 'state.db'}", source_db, fake_planhat
    )
    project.source.set_users(users(range(1, 6)))
    project.write(transport="endusers")
    return project


def lines(out: str) -> dict[str, str]:
    """item -> its line, for the item lines of the table (the summary line left out)."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("OK", "WARN", "FAIL", "SKIP"):
            item = rest.strip().split("  ")[0]
            found[item] = line
    return found


def status_of(out: str) -> dict[str, str]:
    return {item: line.split()[0] for item, line in lines(out).items()}


def define_fields(project: Project, *keys: str) -> None:
    for key in keys:
        project.planhat.add_custom_field(key)


def assert_nothing_sent(project: Project) -> None:
    assert {request.method for request in project.planhat.requests} <= {"GET"}
    assert project.planhat.state()["contacts"] == 0


# --- the happy path -------------------------------------------------------------------------


def test_a_working_setup_passes_every_check_and_changes_nothing(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 6)))
    project.write(transport="endusers")
    define_fields(project, "pro_plan", "buyers")

    result = cli("--config", str(project.path), "check")

    assert result.code == 0, result.out
    assert set(status_of(result.out).values()) == {"OK"}
    assert list(lines(result.out)) == [
        "config", "audience keys", "state database", "source app", "audience pro_plan",
        "audience buyers", "planhat token", "planhat fields",
    ]  # fmt: skip
    found = lines(result.out)
    assert "on first use" in found["state database"]
    assert (
        "columns user_id, email, name, title, company_id; 5 of the first 5 rows usable"
        in found["audience pro_plan"]
    )
    assert "/endusers?limit=1 answered 200" in found["planhat token"]
    assert result.out.rstrip().endswith("All 8 checks passed.")
    # Nothing written: no request but reads, and no state database created or migrated.
    assert_nothing_sent(project)
    assert [(r.method, r.path) for r in project.planhat.requests] == [
        ("GET", "/endusers"),
        ("GET", "/customfields"),
    ]
    if project.state_url.startswith("sqlite"):
        assert not Path(project.state_url.removeprefix("sqlite:///")).exists()
    else:
        assert not sa.inspect(sa.create_engine(project.state_url)).get_table_names()


def test_a_user_level_query_without_company_id_warns_and_still_passes(
    sqlite_project: Project, cli: Cli
) -> None:
    """Planhat discards a contact it does not have unless it is told its company: the check says
    so, names the column to add, and does not fail (contacts Planhat has are still updated)."""
    accounts = "SELECT DISTINCT company_id FROM users"
    sqlite_project.write([{"name": "Trials", "query": "SELECT id AS user_id, email FROM users"},
                          {"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users"},
                          {"name": "Accounts", "level": "account", "query": accounts}])  # fmt: skip

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 0, result.out
    found = lines(result.out)
    assert found["audience trials"].startswith("WARN")
    assert (
        "5 of the first 5 rows usable; no company_id column: contacts not yet in Planhat will be "
        "discarded by Planhat" in found["audience trials"]
    )
    assert "fix: return each user's company as a column named company_id" in found["audience trials"]
    assert status_of(result.out)["audience pro_plan"] == "OK"
    assert status_of(result.out)["audience accounts"] == "OK"  # account level: company_id is its key
    assert result.out.rstrip().endswith("All 9 checks passed (1 warning, 1 skipped).")
    report = json.loads(cli("--config", str(sqlite_project.path), "check", "--json").out)
    assert report["ok"] is True
    (warned,) = [c for c in report["checks"] if c["status"] == "WARN"]
    assert warned["item"] == "audience trials" and "company_id" in warned["fix"]


def test_a_state_database_at_head_is_ok(project: Project, cli: Cli) -> None:
    define_fields(project, "pro_plan", "buyers")
    project.write(transport="endusers")
    assert cli("--config", str(project.path), "db", "upgrade").code == 0

    result = cli("--config", str(project.path), "check")

    assert result.code == 0, result.out
    assert f"is at the schema head ({migrations.head_revision()})" in lines(result.out)["state database"]


def test_json_output_for_scripts(sqlite_project: Project, cli: Cli) -> None:
    define_fields(sqlite_project, "pro_plan")  # buyers is missing

    result = cli("--config", str(sqlite_project.path), "check", "--json")

    assert result.code == 1
    report = json.loads(result.out)
    assert report["ok"] is False
    by_item = {entry["item"]: entry for entry in report["checks"]}
    assert by_item["state database"]["status"] == "OK"
    assert by_item["planhat fields"]["status"] == "FAIL"
    assert "buyers" in by_item["planhat fields"]["detail"]
    assert "checkbox custom field" in by_item["planhat fields"]["fix"]
    assert set(by_item["config"]) == {"item", "status", "detail", "fix"}


# --- the config -----------------------------------------------------------------------------


def test_a_config_that_does_not_parse_is_the_one_fail(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[planhat\ntransport = 'segment'\n")

    result = cli("--config", str(path), "check")

    assert result.code == 1
    assert status_of(result.out) == {"config": "FAIL"}
    assert f"{path}: invalid TOML" in result.out
    assert "fix: correct the setting named in" in result.out
    assert "Traceback" not in result.out + result.err


def test_a_named_config_that_does_not_exist(tmp_path: Path, cli: Cli) -> None:
    result = cli("--config", str(tmp_path / "nowhere.toml"), "check")

    assert result.code == 1
    assert "config file not found; fix: pass --config PATH, or set AUDIENCE_SYNC_CONFIG" in result.out


def test_colliding_audience_keys_fail_with_the_fix(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(
        audiences=[
            {"name": "Pro Plan", "query": "SELECT id AS user_id FROM users"},
            {"name": "Pro-Plan", "query": "SELECT id AS user_id FROM users"},
        ]
    )

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    line = lines(result.out)["config"]
    assert line.startswith("FAIL")
    assert "'pro_plan' is already the key of audience 'Pro Plan'" in line
    assert 'fix: give one of the two audiences its own `key = "..."`' in line


def test_settings_built_in_code_get_the_key_check_too(sqlite_project: Project) -> None:
    settings = load_settings(sqlite_project.path)
    twice = (*settings.audiences, settings.audiences[0])
    settings = type(settings)(**{**settings.__dict__, "audiences": twice})

    results = {r.item: r for r in check.run_checks(settings, timeout=5)}

    assert results["audience keys"].status == "FAIL"
    assert "'pro_plan' is the key of several audiences" in results["audience keys"].detail


# --- the state database ---------------------------------------------------------------------


def test_a_state_database_behind_head_says_to_upgrade(project: Project, cli: Cli) -> None:
    engine = database.create_state_engine(project.state_url)
    try:
        migrations.upgrade(engine, "0001")
    finally:
        engine.dispose()

    result = cli("--config", str(project.path), "check")

    assert result.code == 1
    line = lines(result.out)["state database"]
    assert line.startswith("FAIL")
    assert f"is at revision 0001, this version needs {migrations.head_revision()}" in line
    assert "fix: run `audience-sync db upgrade`" in line


def test_an_unreachable_state_database(sqlite_project: Project, cli: Cli) -> None:
    password = "s3cret-db-passw0rd"
    closed = _closed_port()
    sqlite_project.state_url = f"postgresql://postgres:{password}@127.0.0.1:{closed}/test"
    sqlite_project.write()

    result = cli("--config", str(sqlite_project.path), "check", "--timeout", "5")

    assert result.code == 1
    line = lines(result.out)["state database"]
    assert line.startswith("FAIL")
    assert f"cannot open postgresql+psycopg://postgres:***@127.0.0.1:{closed}/test" in line
    assert "fix: check database.url (or AUDIENCE_SYNC_DATABASE_URL)" in line
    assert password not in result.out + result.err
    assert status_of(result.out)["source app"] == "OK"  # the other checks still run


def test_a_sqlite_state_database_in_a_missing_folder(
    sqlite_project: Project, cli: Cli, tmp_path: Path
) -> None:
    sqlite_project.state_url = f"sqlite:///{tmp_path / 'missing' / 'state.db'}"
    sqlite_project.write()

    result = cli("--config", str(sqlite_project.path), "check")

    line = lines(result.out)["state database"]
    assert line.startswith("FAIL")
    assert f"the folder {tmp_path / 'missing'} does not exist" in line
    assert not (tmp_path / "missing").exists()


# --- sources and queries --------------------------------------------------------------------


def test_an_unreachable_source_skips_its_audiences(sqlite_project: Project, cli: Cli, tmp_path: Path) -> None:
    sqlite_project.source.path.unlink()

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    found = lines(result.out)
    assert found["source app"].startswith("FAIL")
    assert f"the SQLite file {tmp_path / 'source.db'} does not exist" in found["source app"]
    assert "fix: correct sources.app.url" in found["source app"]
    assert found["audience pro_plan"].startswith("SKIP")
    assert "source 'app' is not reachable" in found["audience pro_plan"]
    assert not sqlite_project.source.path.exists()  # not created empty


def test_an_unreachable_source_server(sqlite_project: Project, cli: Cli) -> None:
    closed = _closed_port()
    text = sqlite_project.path.read_text()
    sqlite_project.path.write_text(
        text.replace(sqlite_project.source.url, f"postgresql://u@127.0.0.1:{closed}/x")
    )

    result = cli("--config", str(sqlite_project.path), "check", "--timeout", "5")

    line = lines(result.out)["source app"]
    assert line.startswith("FAIL")
    assert f"cannot connect to postgresql+psycopg://u@127.0.0.1:{closed}/x" in line
    assert "fix: check sources.app.url" in line


def test_a_failing_query(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(audiences=[{"name": "Pro Plan", "query": "SELECT id AS user_id, nope FROM users"}])

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    line = lines(result.out)["audience pro_plan"]
    assert line.startswith("FAIL")
    assert "audience 'pro_plan' (source 'app'): the query failed: no such column: nope" in line
    assert "fix: run audiences[0].query by hand on source 'app'" in line


def test_a_query_without_the_contract_columns(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(audiences=[{"name": "Pro Plan", "query": "SELECT id, email AS mail FROM users"}])

    result = cli("--config", str(sqlite_project.path), "check")

    line = lines(result.out)["audience pro_plan"]
    assert line.startswith("FAIL")
    assert "the query returns neither user_id nor email (columns: id, mail)" in line
    assert "fix: return a column named user_id or email" in line


def test_unusable_rows_are_counted_from_the_sample(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.source.set_users([*users(range(1, 4)), {"id": " ", "email": None}])
    sqlite_project.write(audiences=[{"name": "Pro Plan", "query": "SELECT id AS user_id, email FROM users"}])

    result = cli("--config", str(sqlite_project.path), "check")

    assert "3 of the first 4 rows usable (1 skipped, e.g. unusable user_id ' ')" in result.out


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def source_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        SourceDB(tmp_path / "big.db")
        return f"sqlite:///{tmp_path / 'big.db'}"
    return request.getfixturevalue("postgres_url")


def test_the_query_is_row_limited(sqlite_project: Project, source_url: str, cli: Cli) -> None:
    """An endless query: read in full it never ends; the check reads 100 rows and stops."""
    _use_source(sqlite_project, source_url, ENDLESS)

    result = cli("--config", str(sqlite_project.path), "check", "--timeout", "10")

    assert "columns user_id; 100 of the first 100 rows usable" in lines(result.out)["audience endless"]


def test_a_slow_query_is_stopped_at_the_time_limit(
    sqlite_project: Project, source_url: str, cli: Cli
) -> None:
    """A query that must read everything before its first row (sorting an endless one, sleeping)
    is stopped in the database at --timeout, and the line says so."""
    slow = f"{ENDLESS} ORDER BY x DESC" if source_url.startswith("sqlite") else (
        "SELECT 'u1' AS user_id FROM pg_sleep(60)"
    )  # fmt: skip
    _use_source(sqlite_project, source_url, slow)

    result = cli("--config", str(sqlite_project.path), "check", "--timeout", "1")

    line = lines(result.out)["audience endless"]
    assert line.startswith("FAIL")
    assert "no rows within 1s (limit 100 rows; stopped)" in line
    assert "fix: a sync runs the query in full: check its plan" in line
    if not source_url.startswith("sqlite"):  # stopped inside PostgreSQL, not only given up on
        sleeping = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() "
        running = query(source_url, sleeping + "AND position('pg_sleep(60)' in query) > 0")
        assert running == [(0,)]


def test_a_driver_that_never_answers_is_given_up_on(sqlite_project: Project, cli: Cli) -> None:
    """A server that accepts the connection and never answers, with no driver timeout in reach:
    the time box gives up on it and the other checks still run."""
    with _silent_server() as port:
        text = sqlite_project.path.read_text()
        url = f"postgresql://u@127.0.0.1:{port}/x?connect_timeout=120"  # set: check does not shorten it
        sqlite_project.path.write_text(text.replace(sqlite_project.source.url, url))

        result = cli("--config", str(sqlite_project.path), "check", "--timeout", "1")

    found = lines(result.out)
    assert found["source app"].startswith("FAIL")
    assert "no answer within 1s" in found["source app"]
    assert status_of(result.out)["planhat token"] == "OK"


def _use_source(project: Project, url: str, sql: str) -> None:
    project.write(audiences=[{"name": "Endless", "query": sql}])
    text = project.path.read_text()
    project.path.write_text(text.replace(project.source.url, url))


# --- Planhat --------------------------------------------------------------------------------


def test_a_rejected_api_token(sqlite_project: Project, cli: Cli) -> None:
    wrong = "wrong-api-token-0123456789"
    sqlite_project.write(transport="endusers", planhat=f'api_token = "{wrong}"')

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    found = lines(result.out)
    assert found["planhat token"].startswith("FAIL")
    assert "Planhat rejected the API token (401)" in found["planhat token"]
    assert "fix: set planhat.api_token (or PLANHAT_API_TOKEN) to a valid API token" in found["planhat token"]
    assert found["planhat fields"].startswith("SKIP")
    assert wrong not in result.out + result.err
    assert_nothing_sent(sqlite_project)


def test_an_unreachable_planhat(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(transport="endusers", planhat=f'base_url = "http://127.0.0.1:{_closed_port()}"')

    result = cli("--config", str(sqlite_project.path), "check")

    line = lines(result.out)["planhat token"]
    assert line.startswith("FAIL")
    assert "connection error" in line
    assert "fix: check planhat.subdomain (or base_url)" in line


def test_missing_and_mistyped_custom_fields(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.planhat.add_custom_field("pro_plan", type="text")
    sqlite_project.planhat.add_custom_field("buyers", parent="Company")  # not on contacts

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    line = lines(result.out)["planhat fields"]
    assert line.startswith("FAIL")
    assert "no custom field on contacts named buyers; pro_plan is a 'text' field, not a checkbox" in line
    assert (
        "fix: run `audience-sync fields --create`" in line
        and "create a checkbox custom field on contacts" in line
    )


def test_custom_fields_planhat_does_not_list_are_a_skip(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.planhat.custom_fields = None  # GET /customfields answers 404

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 0, result.out
    line = lines(result.out)["planhat fields"]
    assert line.startswith("SKIP")
    assert "/customfields answered 404" in line


def test_the_segment_tenant_token_is_not_claimed_as_proven(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(transport="segment")

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 0, result.out
    found = lines(result.out)
    assert found["planhat token"].startswith("SKIP")
    assert "not verifiable without sending: POST /dock/segment" in found["planhat token"]
    assert found["planhat api token"].startswith("OK")  # the API token, for reconcile, is read-checked
    assert "planhat fields" not in found
    assert [(r.method, r.path) for r in sqlite_project.planhat.requests] == [("GET", "/endusers")]


def test_no_token_fails(sqlite_project: Project, cli: Cli) -> None:
    sqlite_project.write(transport="segment", tokens=False)

    result = cli("--config", str(sqlite_project.path), "check")

    assert result.code == 1
    assert (
        "no tenant token set: nothing can be sent; fix: set planhat.tenant_token (or PLANHAT_TENANT_TOKEN)"
        in (lines(result.out)["planhat token"])
    )
    assert sqlite_project.planhat.requests == []


# --- secrets --------------------------------------------------------------------------------


def test_no_secret_is_printed(sqlite_project: Project, cli: Cli) -> None:
    basic = base64.b64encode(f"{TENANT_TOKEN}:".encode()).decode()
    # A working run, a rejected token and Planhat echoing the request's header back.
    sqlite_project.planhat.fail_next(2, status=400, body={"error": f"bad auth Bearer {API_TOKEN} {basic}"})
    outputs = [cli("--config", str(sqlite_project.path), "check", *flags) for flags in ((), ("--json",))]
    # A config that fails to load with a token in its error message.
    sqlite_project.write(planhat=f"tenant_token = {int('9' * 24)}")
    outputs.append(cli("--config", str(sqlite_project.path), "check"))

    assert "token: expected a string, got ********" in outputs[-1].out
    for output in outputs:
        text = output.out + output.err
        for secret in (TENANT_TOKEN, API_TOKEN, basic, basic.rstrip("="), "9" * 24):
            assert secret not in text


# --- the daemon's start -----------------------------------------------------------------------


def test_the_daemon_logs_the_same_checks(project: Project, caplog: pytest.LogCaptureFixture) -> None:
    project.write(transport="endusers")
    define_fields(project, "pro_plan")
    settings = load_settings(project.path)
    engine = database.open_state(settings.database_url)
    try:
        with caplog.at_level(logging.INFO, logger="audience_sync.check"):
            results = check.log_checks(settings, engine, timeout=5)
    finally:
        engine.dispose()

    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "audience_sync.check"]
    assert ("INFO", f"check: OK state database: {redaction.safe_url(settings.database_url)} is at the schema "
                    f"head ({migrations.head_revision()})") in messages  # fmt: skip
    assert any(level == "WARNING" and m.startswith("check: FAIL planhat fields") and "buyers" in m
               for level, m in messages)  # fmt: skip
    assert messages[-1] == ("WARNING", f"check: 1 of {len(results)} checks failed: fix them before syncing.")
    assert "config" not in {r.item for r in results}  # the daemon's settings are already loaded
    assert API_TOKEN not in caplog.text


@pytest.mark.slow
def test_the_daemon_warns_at_start_about_a_query_without_company_id(project: Project, spawn: Spawn) -> None:
    """`audience-sync run` logs the same check at start: the WARN is a warning in its log."""
    project.write([{"name": "Trials", "query": "SELECT id AS user_id, email FROM users"}],
                  extra='[schedule]\nmin_interval = "1h"\nmax_interval = "2h"\n')  # fmt: skip
    project.source.set_users(users(range(1, 3)))
    daemon = spawn(project)
    wait_for(lambda: "check: WARN audience trials" in daemon.log(), what="the start-up check")
    (line,) = [line for line in daemon.log().splitlines() if "check: WARN audience trials" in line]
    assert "WARNING" in line and "contacts not yet in Planhat will be discarded by Planhat" in line
    assert "fix: return each user's company as a column named company_id" in line
    assert daemon.signal(signal.SIGTERM)[0] == 0


def test_the_embedded_demo_on_a_fresh_machine(cli: Cli) -> None:
    result = cli("check")

    found = status_of(result.out)
    assert result.code == 1  # no token: nothing could be sent
    assert found["config"] == "OK"
    assert found["planhat token"] == "FAIL"
    assert {found[item] for item in found if item.startswith(("source", "state"))} == {"OK"}
    # Its SQL audience returns company_id; the two defined on events select users' ids and
    # emails only, so Planhat would discard the contacts it does not have: a warning each.
    assert found["audience enterprise_plan"] == "OK"
    assert found["audience order_completed_last_30days"] == found["audience total_revenue_180_days"] == "WARN"


# --- helpers ----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        for connection in held:
            connection.close()
        server.close()
