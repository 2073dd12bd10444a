"""Shared fixtures and helpers: a clean environment, state databases on SQLite and PostgreSQL, a
source database, a config file, the loopback fake Planhat, the CLI in-process and the daemon in a
process of its own, and readers of the state database."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
import sqlalchemy as sa

from audience_sync.cli import main
from audience_sync.config import load_settings
from audience_sync.state import database
from audience_sync.state import models as m
from audience_sync.sync import run as sync_run
from tests.fake_planhat import API_TOKEN, TENANT_TOKEN, FakePlanhat

POSTGRES_URL = os.environ.get(
    "AUDIENCE_SYNC_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# The outside tools a run requires, read once here, when pytest loads this file and before the
# autouse fixture below clears every AUDIENCE_SYNC_* variable. CI (.ci/run) requires all three:
# there a missing tool fails the run instead of skipping its tests.
TOOLS = ("postgres", "browser", "promtool")
REQUIRED_TOOLS = frozenset(
    tool for tool in TOOLS if os.environ.get(f"AUDIENCE_SYNC_REQUIRE_{tool.upper()}", "").strip() == "1"
)
REQUIRE_POSTGRES = "postgres" in REQUIRED_TOOLS


def skip_without(tool: str, problem: str | None) -> None:
    """Skip the test, saying why, when `problem` says `tool` cannot be used; fail it loudly
    instead when the run requires the tool (AUDIENCE_SYNC_REQUIRE_<TOOL>=1)."""
    assert tool in TOOLS, tool
    if problem is None:
        return
    if tool in REQUIRED_TOOLS:
        pytest.fail(f"{problem}, and AUDIENCE_SYNC_REQUIRE_{tool.upper()}=1 requires it", pytrace=False)
    pytest.skip(problem)


_postgres_error: str | bool | None = False  # False: not probed yet


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can. Probed once per session."""
    global _postgres_error
    if _postgres_error is False:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect():
                _postgres_error = None
        except sa.exc.SQLAlchemyError as exc:
            _postgres_error = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}"
        finally:
            engine.dispose()
    return _postgres_error  # type: ignore[return-value]


def require_postgres() -> None:
    skip_without("postgres", postgres_unavailable())


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the controller names the run (its workers draw the simulation's seed
    from that name, sim_walk.run_seed), so that it can print the seed they used."""
    if hasattr(config.option, "testrunuid") and not hasattr(config, "workerinput"):
        config.option.testrunuid = config.option.testrunuid or uuid.uuid4().hex


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The convergence simulation's seed, drawn afresh per run: a failure can be replayed.
    Printed only when the simulation ran (sim_walk is imported by it alone; under
    pytest-xdist, in the workers, and the controller finds the seed from the run's name)."""
    if "tests.sim_walk" in sys.modules:
        from tests.sim_walk import RUN_SEED as seed
    elif _simulation_ran(terminalreporter) and getattr(config.option, "testrunuid", None):
        from tests.sim_walk import run_seed

        seed = run_seed(config.option.testrunuid)
    else:
        return
    terminalreporter.write_line(
        f"simulation seed {seed} (replay its walks and examples: AUDIENCE_SYNC_SIM_SEED={seed} "
        "pytest tests/test_simulation.py)"
    )


def _simulation_ran(terminalreporter: Any) -> bool:
    return any(
        getattr(report, "nodeid", "").startswith("tests/test_simulation.py")
        for reports in terminalreporter.stats.values()
        for report in reports
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No machine setting leaks into a test; each test works in its own directory. (What the
    run requires was read at import: REQUIRED_TOOLS.) Nor does one test's logging leak into
    the next: a CLI run in-process sets the package's logger up (its own handler, no
    propagation), which would hide the next test's records from caplog."""
    for name in list(os.environ):
        if name.startswith(("PLANHAT_", "AUDIENCE_SYNC_")) and name != "AUDIENCE_SYNC_TEST_POSTGRES":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    package = logging.getLogger("audience_sync")
    saved = (package.handlers[:], package.level, package.propagate)
    yield
    package.handlers[:], package.level, package.propagate = saved


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema on the real PostgreSQL, dropped afterwards."""
    with postgres_schema() as url:
        yield url


@contextmanager
def postgres_schema() -> Iterator[str]:
    """The URL of a fresh schema on the real PostgreSQL, dropped on leaving."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The state database URL: a real SQLite file, then the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def fake_planhat() -> Iterator[FakePlanhat]:
    with FakePlanhat() as fake:
        yield fake


class SourceDB:
    """A SQLite source database with a `users` table the tests rewrite between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        with sqlite3.connect(path) as connection:
            connection.execute(
                "CREATE TABLE users (id TEXT, email TEXT, name TEXT, title TEXT, company_id TEXT, "
                "plan TEXT, orders INTEGER)"
            )
        connection.close()

    def set_users(self, rows: list[dict[str, Any]]) -> None:
        with sqlite3.connect(self.path) as connection:
            connection.execute("DELETE FROM users")
            connection.executemany(
                "INSERT INTO users VALUES (:id, :email, :name, :title, :company_id, :plan, :orders)",
                [_user_row(row) for row in rows],
            )
        connection.close()


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement on a database in its own transaction; its rows, if it returns any."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.exec_driver_sql(sql)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


class SenderAround:
    """A real PlanhatClient for `sender_factory`, with `after_send` called once each chunk
    reached Planhat: a test breaks something there (kills the run, drops a table)."""

    def __init__(self, settings: Any) -> None:
        from audience_sync.planhat import PlanhatClient

        self.client = PlanhatClient(settings)
        self.chunk_size = self.client.chunk_size
        self.sends = 0

    @property
    def exhausted(self) -> bool:
        return self.client.exhausted

    def send(self, contacts: Any) -> Any:
        outcome = self.client.send(contacts)
        self.sends += 1
        self.after_send()
        return outcome

    def after_send(self) -> None:
        pass

    def __enter__(self) -> SenderAround:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()


class Killed(BaseException):
    """Stands in for SIGKILL: no `except Exception` catches it, as nothing runs after a kill."""


def killing_sender(after_sends: int) -> Any:
    """A real client that dies right after its N-th chunk reached Planhat, before the ack."""

    class Sender(SenderAround):
        def after_send(self) -> None:
            if self.sends >= after_sends:
                raise Killed

    return Sender


def sync_killed(project: Project, after_sends: int, keys: list[str] | None = None) -> None:
    """A sync of `keys` (default: all) whose process is killed once its N-th chunk reached
    Planhat, before the acknowledgement."""
    settings = load_settings(project.path)
    engine = database.open_state(project.state_url)
    try:
        with pytest.raises(Killed):
            sync_run.sync(settings, engine, keys, sender_factory=killing_sender(after_sends))
    finally:
        engine.dispose()


def expire_leases(url: str) -> None:
    """The leases a killed process held run out."""
    query(url, "UPDATE leases SET expires_at = '2000-01-01 00:00:00'")


# Every test user belongs to a company unless the test says otherwise: Planhat discards an
# identify for a contact it does not have that names no company, and its bulk upsert creates
# no contact without one (the fake does the same).
COMPANY = "acme"


def _user_row(row: dict[str, Any]) -> dict[str, Any]:
    base = {"id": None, "email": None, "name": None, "title": None, "company_id": COMPANY,
            "plan": "pro", "orders": 0}  # fmt: skip
    return {**base, **row}


def users(ids: list[int] | range, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": f"u{n}", "email": f"u{n}@example.com", **extra} for n in ids]


@pytest.fixture
def source_db(tmp_path: Path) -> SourceDB:
    return SourceDB(tmp_path / "source.db")


PRO_QUERY = "SELECT id AS user_id, email, name, title, company_id FROM users WHERE plan = 'pro'"
BUYERS_QUERY = "SELECT id AS user_id, email, company_id FROM users WHERE orders > 0"


@dataclass
class Project:
    """A config file on disk wired to a state database, a source and the fake Planhat."""

    path: Path
    state_url: str
    source: SourceDB
    planhat: FakePlanhat
    written: dict[str, Any] = field(default_factory=dict)  # the last write's arguments

    def write(self, audiences: list[dict[str, str]] | None = None, transport: str = "segment",
              extra: str = "", tokens: bool = True, planhat: str = "", source: str = "") -> Path:  # fmt: skip
        self.written = {"audiences": audiences, "transport": transport, "extra": extra, "tokens": tokens,
                        "planhat": planhat, "source": source}  # fmt: skip
        audiences = audiences if audiences is not None else [
            {"name": "Pro Plan", "query": PRO_QUERY},
            {"name": "Buyers", "query": BUYERS_QUERY},
        ]  # fmt: skip
        defaults = [
            f'transport = "{transport}"', f'base_url = "{self.planhat.url}"',
            "backoff_base_seconds = 0.01", "backoff_max_seconds = 0.05", "retry_budget_seconds = 2",
            "timeout_seconds = 2",
        ]  # fmt: skip
        if tokens:
            defaults += [f'tenant_token = "{TENANT_TOKEN}"', f'api_token = "{API_TOKEN}"']
        overrides = planhat.splitlines()  # a key given in `planhat` replaces its default
        given = {line.split("=", 1)[0].strip() for line in overrides if "=" in line}
        lines = ["[database]", f'url = "{self.state_url}"', "", "[planhat]"]
        lines += [line for line in defaults if line.split("=", 1)[0].strip() not in given] + overrides
        lines += ["", "[sources.app]", f'url = "{self.source.url}"', *source.splitlines(), ""]
        for audience in audiences:
            lines.append("[[audiences]]")
            lines += [f"{key} = {_toml_string(value)}" for key, value in audience.items()]
            lines.append('source = "app"' if "source" not in audience else "")
            lines.append("")
        self.path.write_text("\n".join(lines) + "\n" + extra)
        return self.path

    @contextmanager
    def one_shot(self, timeout_seconds: float = 0.3) -> Iterator[None]:
        """The runs inside have one attempt and a short timeout, so that the fault the test
        scripts (an answer held past the timeout, a refusal) ends the run. Every other run
        keeps the retries it would have in production (as `write` sets them): a busy machine
        slows a run that must succeed, it does not fail it."""
        before = dict(self.written)
        shot = {"max_attempts": "1", "timeout_seconds": f"{timeout_seconds:g}"}
        kept = [line for line in before["planhat"].splitlines() if _setting(line) not in shot]
        self.write(**{**before, "planhat": "\n".join([*kept, *(f"{k} = {v}" for k, v in shot.items())])})
        try:
            yield
        finally:
            self.write(**before)


def _setting(line: str) -> str:
    return line.split("=", 1)[0].strip()


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def project(tmp_path: Path, state_url: str, source_db: SourceDB, fake_planhat: FakePlanhat) -> Project:
    project = Project(tmp_path / "audience_sync.toml", state_url, source_db, fake_planhat)
    project.write()
    return project


# How long the `start_daemon` fixture waits for a daemon's runs in flight when the test ends:
# a run the schedule had just started finishes its step first, and on a loaded machine (the
# suite in parallel, Chromium) that took over 5 s once, leaving the daemon on its schema while
# the schema was dropped. How promptly a stop takes is tested where it is the subject
# (test_scheduler, test_daemon).
STOP_SECONDS = 30


@pytest.fixture
def start_daemon(project: Project) -> Iterator[Callable[..., Any]]:
    """Start the daemon in-process on the project's config; stopped afterwards."""
    started: list[tuple[Any, Any]] = []

    def start(**kwargs: Any) -> Any:
        settings = load_settings(project.path)
        engine = database.open_state(settings.database_url)
        daemon = _daemon_class()(settings, engine, **kwargs)
        started.append((daemon, engine))
        daemon.start()
        return daemon

    yield start
    stuck = []
    for daemon, engine in started:
        if not daemon.stop(timeout=STOP_SECONDS):
            stuck.append(daemon.running())
        engine.dispose()
    assert not stuck, f"runs still in flight {STOP_SECONDS} s after stop: {stuck}"


def _daemon_class() -> Any:
    from audience_sync.daemon.daemon import Daemon

    return Daemon


@dataclass
class CliResult:
    code: int
    out: str
    err: str


CONFIG = "audience_sync.toml"  # the `project` fixture's config, in the test's directory


def run(cli: Cli, *args: str) -> CliResult:
    """`audience-sync --config audience_sync.toml ARGS`."""
    return cli("--config", CONFIG, *args)


def sync(cli: Cli, *args: str) -> CliResult:
    """`audience-sync sync ARGS` on the project's config."""
    return run(cli, "sync", *args)


def last_run(cli: Cli, key: str | None = None) -> dict[str, Any]:
    """The newest run (of one audience), as `history --json` shows it."""
    audience = ("--audience", key) if key else ()
    return json.loads(run(cli, "history", "--json", *audience).out)[0]


class KeeperClock:
    """Time the test moves, for a LeaseKeeper (`timer=`): its clock and its waits between
    renewals. Given freezegun's `frozen`, moving it moves the wall clock leases expire by too.
    `advance` returns once the keeper has done what fell due and waits again, so a test asserts
    on renewals in order, whatever the machine's load."""

    def __init__(self, frozen: Any = None) -> None:
        self.now = 0.0
        self.frozen = frozen
        self._changed = threading.Condition()
        self._waits = 0
        self._parked = False
        self._due = float("inf")

    def monotonic(self) -> float:
        return self.now

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        with self._changed:
            self._due = self.now + seconds
            self._waits += 1
            self._parked = True
            self._changed.notify_all()
            while not stop.is_set() and self.now < self._due:
                self._changed.wait(0.01)  # a stop is an Event: look at it now and then
            self._parked = False
            return stop.is_set()

    def advance(self, seconds: float, *, settle: bool = True) -> None:
        """Move time on; with `settle`, return once the keeper waits again (a keeper that
        stopped for good never does: give settle=False)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._parked, timeout=30):
                raise AssertionError("the lease keeper never waited")
            before = self._waits
            self.now += seconds
            if self.frozen is not None:
                self.frozen.tick(seconds)
            self._changed.notify_all()
            if (
                settle
                and self.now >= self._due
                and not self._changed.wait_for(lambda: self._waits > before and self._parked, timeout=30)
            ):
                raise AssertionError("the lease keeper did not finish its renewals")


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll until `condition()` is truthy; returns its value. Fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


@pytest.fixture
def state(state_url: str) -> Iterator[sa.Engine]:
    """An engine on the state database, at this version's schema."""
    engine = database.open_state(state_url)
    yield engine
    engine.dispose()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """caplog, also after a CLI run has made the package's logger stop propagating."""
    monkeypatch.setattr(logging.getLogger("audience_sync"), "propagate", True)
    return caplog


class Cli(Protocol):
    """The `cli` fixture: `audience-sync ARGS` run in-process."""

    def __call__(self, *args: str) -> CliResult: ...


StartDaemon = Callable[..., Any]  # the `start_daemon` fixture: a started Daemon


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `audience-sync ARGS` in-process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# --- reading the state database, writing a schedule ------------------------------------------


def runs(url: str, key: str | None = None) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            query = sa.select(m.runs).order_by(m.runs.c.id)
            if key:
                query = query.where(m.runs.c.audience_key == key)
            return [dict(row._mapping) for row in connection.execute(query)]
    finally:
        engine.dispose()


def finished(url: str, key: str | None = None) -> list[dict[str, Any]]:
    return [run for run in runs(url, key) if run["finished_at"]]


def next_runs(url: str) -> dict[str, datetime | None]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(m.audiences.c.key, m.audiences.c.next_run_at))
            return dict(rows.all())
    finally:
        engine.dispose()


def schedule(low: str, high: str, extra: str = "") -> str:
    return f'[schedule]\nmin_interval = "{low}"\nmax_interval = "{high}"\n{extra}'


_SCRIPT = Path(sys.executable).with_name("audience-sync")


# The installed console script when there is one, else the same entry point through -c.
CLI = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from audience_sync.cli import entrypoint; entrypoint()"]
)


POSTGRES = pytest.param("postgresql", marks=pytest.mark.postgres)


class DaemonProcess:
    """`audience-sync --config CONFIG run` in its own process, its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [*CLI, "--config", str(config), "run"], stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> tuple[int, float]:
        """Send `signum`; returns the exit code and the seconds the process took to exit."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


Spawn = Callable[[Project], "DaemonProcess"]  # the `spawn` fixture


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start daemons on a project (its schema created first, as `db upgrade` would); any still
    running at the end of the test is killed."""
    started: list[DaemonProcess] = []

    def start(project: Project) -> DaemonProcess:
        if not started:
            database.open_state(project.state_url).dispose()
        daemon = DaemonProcess(project.path, tmp_path / f"daemon{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def status(cli: Cli, key: str = "pro_plan") -> dict[str, Any]:
    """One audience's entry of `status --json`."""
    result = run(cli, "status", "--json")
    return next(entry for entry in json.loads(result.out) if entry["key"] == key)
