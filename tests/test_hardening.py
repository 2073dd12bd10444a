"""Failure paths: secrets kept out of reprs, unusable state databases and missing source files
refused by name, lease renewal that stops a run rather than dying silently, a failed resync
check that is retried, and database errors in the read commands as one line."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from audience_sync.config import load_settings
from audience_sync.daemon.daemon import Daemon
from audience_sync.daemon.flights import RETRY_AFTER_ERROR
from audience_sync.errors import StateDatabaseError
from audience_sync.state import database, leases, resyncs
from audience_sync.support import clock, redaction
from audience_sync.sync import lease_keeper
from tests.conftest import Cli, CliResult, KeeperClock, Project, schedule, users, wait_for

PASSWORD = "hunter2-pw"
SSL_PASSWORD = "xyzzy-sslpw"
PLANHAT_PASSWORD = "pl4nhat-pw"


def one_line(result: CliResult, prefix: str) -> str:
    assert result.code == 1, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in result.err + result.out
    return lines[0]


def operational_error(message: str) -> sa.exc.OperationalError:
    return sa.exc.OperationalError("SELECT 1", {}, Exception(message))


# --- 1. secrets in repr ---------------------------------------------------------------------


def test_settings_reprs_mask_passwords_and_secret_parameters(tmp_path: Path) -> None:
    url = f"postgresql://u:${{PGPASS}}@h/db?sslpassword={SSL_PASSWORD}&application_name=sync"
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n\n'
        f'[planhat]\nbase_url = "http://user:{PLANHAT_PASSWORD}@127.0.0.1:1/"\n\n'
        f'[sources.app]\nurl = "{url}"\n'
        f'[sources.odbc]\nurl = "mssql+pyodbc://u@dsn?PWD={PASSWORD}&Token={PASSWORD}"\n'
    )
    settings = load_settings(path, {"PGPASS": PASSWORD})
    assert PASSWORD in settings.database_url and PASSWORD in settings.sources["app"].url  # still usable
    shown = [repr(settings), str(settings), repr(settings.sources), str(settings.sources["app"]),
             repr(settings.planhat)]  # fmt: skip
    for text in shown:
        for secret in (PASSWORD, SSL_PASSWORD, PLANHAT_PASSWORD):
            assert secret not in text, text
    assert "postgresql+psycopg://u:***@h/db?application_name=sync&sslpassword=***" in repr(settings)
    assert "PWD=***&Token=***" in repr(settings.sources["odbc"])
    assert "http://user:***@127.0.0.1:1/" in repr(settings.planhat)


@pytest.mark.parametrize("name", ["password", "PASSWD", "pwd", "token", "client_secret", "key",
                                  "apikey", "api_key", "sslpassword"])  # fmt: skip
def test_safe_url_masks_every_secret_looking_parameter(name: str) -> None:
    shown = redaction.safe_url(f"postgresql://u:{PASSWORD}@h/db?{name}=s3cr3t-value&sslmode=require")
    assert "s3cr3t-value" not in shown and PASSWORD not in shown
    assert f"{name}=***" in shown and "sslmode=require" in shown


def test_safe_url_never_shows_a_url_it_cannot_parse() -> None:
    assert PASSWORD not in redaction.safe_url(f"postgresql://u:{PASSWORD}@h:port/db")


# --- 2. unsupported state database drivers --------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg2://u:{PASSWORD}@127.0.0.1/db",
        f"mysql://u:{PASSWORD}@127.0.0.1/db",
        f"mssql+pyodbc://u:{PASSWORD}@dsn",
    ],
)
def test_an_unsupported_state_database_is_refused_when_the_config_loads(
    cli: Cli, tmp_path: Path, url: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{url}"\n')
    line = one_line(cli("--config", str(path), "status"), "Config error: ")
    assert f"{path}: database.url:" in line
    assert redaction.safe_url(url) in line and PASSWORD not in line
    assert "sqlite:///PATH" in line and "postgresql+psycopg://" in line


def test_supported_state_databases_and_any_source_url_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    for url in ("sqlite:///state.db", "sqlite+pysqlite:///state.db", "sqlite://", "postgres://u@h/db",
                "postgresql://u@h/db", "postgresql+psycopg://u@h/db"):  # fmt: skip
        path.write_text(f'[database]\nurl = "{url}"\n\n[sources.dw]\nurl = "mysql+pymysql://u@h/db"\n')
        assert load_settings(path, {}).sources["dw"].url == "mysql+pymysql://u@h/db"


# --- 3. a missing SQLite source file --------------------------------------------------------


def test_a_missing_sqlite_source_file_is_refused_by_name_and_not_created(
    project: Project, cli: Cli, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.db"
    project.source.url = f"sqlite:///{missing}"
    project.write()
    result = cli("--config", "audience_sync.toml", "sync")
    assert result.code != 0 and "Traceback" not in result.err
    assert f"source 'app': SQLite file {missing} does not exist" in result.err
    assert "no such table" not in result.err
    assert not missing.exists()
    assert project.planhat.requests == []


@pytest.mark.filterwarnings("ignore:Selection of the SingletonThreadPool")  # SQLAlchemy's, for mode=memory
@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_in_memory_sqlite_sources_still_work(project: Project, cli: Cli) -> None:
    query = "SELECT 'u1' AS user_id, 'u1@example.com' AS email, 'acme' AS company_id"
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:mem?mode=memory&uri=true"):
        project.source.url = url
        project.write([{"name": "Constant", "query": query}])
        result = cli("--config", "audience_sync.toml", "sync", "--full")
        assert result.code == 0, (url, result.err)
    assert project.planhat.value("u1", "constant") is True


# --- 4. lease renewal -----------------------------------------------------------------------


def test_an_unexpected_renewal_error_marks_every_lease_lost(
    state: Engine, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    assert leases.try_acquire(state, "a", "holder-1", 60)

    def broken(*_args: object) -> bool:
        raise RuntimeError("renewal bug\nsecond line")

    monkeypatch.setattr(leases, "renew", broken)
    clock = KeeperClock()
    with lease_keeper.LeaseKeeper(state, ["a", "b"], "holder-1", 60, timer=clock) as keeper:
        clock.advance(20, settle=False)  # the keeper's thread ends
        wait_for(lambda: keeper.lost == {"a", "b"}, what="leases marked lost")
    errors = [r.getMessage() for r in logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "RuntimeError: renewal bug" in errors[0], errors
    assert "second line" not in errors[0] and "'a'" in errors[0] and "'b'" in errors[0]


def test_renewals_failing_until_the_lease_expires_mark_it_lost(
    state: Engine, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    assert leases.try_acquire(state, "a", "holder-1", 60)
    failures: list[float] = []
    clock = KeeperClock()

    def down(*_args: object) -> bool:
        failures.append(clock.now)
        raise operational_error("server closed the connection unexpectedly")

    monkeypatch.setattr(leases, "renew", down)
    with lease_keeper.LeaseKeeper(state, ["a"], "holder-1", 60, timer=clock) as keeper:
        clock.advance(20)
        assert failures == [20] and not keeper.lost  # one failure is transient: tried again next tick
        clock.advance(20)
        assert failures == [20, 40] and not keeper.lost  # 40 s unrenewed: the lease still holds
        clock.advance(20)
        assert failures == [20, 40, 60] and keeper.lost == {"a"}  # 60 s: it may be taken now
    messages = logs.text
    assert "could not renew the lease on 'a': OperationalError" in messages
    assert "lost the lease on audience 'a': not renewed for 60.0s" in messages


def test_transient_renewal_failures_within_the_lease_keep_it(
    state: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert leases.try_acquire(state, "a", "holder-1", 60)
    real, calls = leases.renew, []

    def flaky(*args: object) -> bool:
        calls.append(1)
        if len(calls) % 3:  # two failures, then a renewal, again and again
            raise operational_error("could not connect")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(leases, "renew", flaky)
    clock = KeeperClock()
    with lease_keeper.LeaseKeeper(state, ["a"], "holder-1", 60, timer=clock) as keeper:
        for _ in range(12):  # four times the lease
            clock.advance(20)
            assert not keeper.lost
        assert len(calls) == 12


# --- 5. the resync check after a run --------------------------------------------------------


@pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)
def test_a_failed_resync_check_rearms_the_job_soon_and_says_why(
    project: Project, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    project.write(extra=schedule("1h", "2h"))
    settings = load_settings(project.path)
    engine = database.open_state(settings.database_url)
    daemon = Daemon(settings, engine)
    daemon.scheduler.start(paused=True)  # jobs are armed, never run
    try:
        drawn = clock.utcnow() + timedelta(hours=2)
        for key in ("pro_plan", "buyers"):
            daemon.cadence.plan(key, clock.utcnow(), "never synced", None)
        assert daemon.cadence.take_group() == ["pro_plan", "buyers"]

        def unreadable(_connection: object) -> list[str]:
            raise operational_error("database is locked")

        monkeypatch.setattr(resyncs, "pending_keys", unreadable)
        retry = clock.utcnow() + RETRY_AFTER_ERROR
        daemon.planner.after_group({"pro_plan": (drawn, "drawn"), "buyers": (drawn, "drawn")}, retry)
        assert daemon.next_run("pro_plan") == retry == daemon.next_run("buyers")
        warning = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
        assert any("resync" in w and "OperationalError" in w for w in warning), warning

        monkeypatch.setattr(resyncs, "pending_keys", lambda _connection: [])
        assert daemon.cadence.take_group(retry) == ["pro_plan", "buyers"]
        daemon.planner.after_group({"pro_plan": (drawn, "drawn"), "buyers": (drawn, "drawn")}, retry)
        assert daemon.next_run("pro_plan") == drawn  # the check works again: the drawn time stands
    finally:
        daemon.scheduler.shutdown(wait=False)
        engine.dispose()


# --- 6. database errors in the read commands ------------------------------------------------


def with_password(url: str) -> tuple[str, str | None]:
    """The URL with a password (trust authentication ignores it), and that password."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url, None
    password = parsed.password or PASSWORD
    return parsed.set(password=password).render_as_string(hide_password=False), password


def drop(url: str, table: str) -> None:
    engine = sa.create_engine(url)
    cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {table}{cascade}")
    engine.dispose()


@pytest.mark.parametrize("command", ["status", "history"])
def test_a_broken_state_database_is_one_line_naming_it(project: Project, cli: Cli, command: str) -> None:
    url, password = with_password(project.state_url)
    project.state_url = url
    project.write()
    project.source.set_users(users(range(1, 3), plan="pro"))
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    drop(url, "runs")
    line = one_line(cli("--config", "audience_sync.toml", command), "State database error: ")
    assert redaction.safe_url(url) in line and "runs" in line
    assert password is None or password not in line


@pytest.mark.parametrize("command", ["status", "history"])
@pytest.mark.parametrize("broken", ["garbage", "down"])
def test_an_unreadable_or_unreachable_state_database_is_one_line(
    cli: Cli, tmp_path: Path, command: str, broken: str
) -> None:
    if broken == "garbage":
        (tmp_path / "state.db").write_bytes(b"this is not a database\n" * 200)
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:  # nothing listens on port 1
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test?sslpassword={SSL_PASSWORD}"
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{url}"\n')
    line = one_line(cli("--config", str(path), command), "State database error: ")
    assert redaction.safe_url(url.replace("postgresql://", "postgresql+psycopg://")) in line
    assert PASSWORD not in line and SSL_PASSWORD not in line


def test_a_database_error_no_command_translated_is_still_one_line(project: Project, cli: Cli) -> None:
    database.open_state(project.state_url).dispose()
    drop(project.state_url, "resync_requests")
    line = one_line(cli("--config", "audience_sync.toml", "resync"), "State database error: ")
    assert "resync_requests" in line
    assert line.split(": ")[1] in ("OperationalError", "ProgrammingError"), line


def test_translate_errors_turns_any_sqlalchemy_error_into_one_masked_line() -> None:
    url = f"postgresql://u:{PASSWORD}@h/db?sslpassword={SSL_PASSWORD}"
    with pytest.raises(StateDatabaseError) as raised, database.translate_errors("cannot read", url):
        raise sa.exc.NoSuchTableError("runs")
    assert str(raised.value) == "cannot read postgresql://u:***@h/db?sslpassword=***: runs"
