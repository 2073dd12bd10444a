"""The status page (`audience_sync.http.status_page`), on SQLite and PostgreSQL: what it shows, that
untrusted text stays text, the access token, `audience-sync serve`, and a real headless
Chromium (Playwright) for what a browser renders.

The data comes from real syncs against the fake Planhat: an audience named like a script, a
query that fails with markup in its error, and Planhat answering a 400 whose text is markup.
The browser tests skip without Playwright or Chromium, unless AUDIENCE_SYNC_REQUIRE_BROWSER=1
(CI) makes that a failure. Their screenshot is kept in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from audience_sync.cli import main
from audience_sync.config import load_settings
from audience_sync.errors import ConfigError
from audience_sync.http import charts
from audience_sync.http.metrics import Metrics
from audience_sync.http.server import MetricsServer
from audience_sync.http.status_page import StatusPage
from audience_sync.state import database, history, migrations, runs
from audience_sync.state import models as m
from tests.conftest import (
    API_TOKEN,
    BUYERS_QUERY,
    PRO_QUERY,
    TENANT_TOKEN,
    Project,
    SourceDB,
    postgres_schema,
    skip_without,
    users,
)
from tests.fake_planhat import FakePlanhat

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("AUDIENCE_SYNC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

SCRIPT_NAME = "<script>alert(1)</script> Pro"
BROKEN_NAME = "Churn <b>risk</b>"
BROKEN_QUERY = 'SELECT id AS user_id FROM "<i>nowhere</i>"'  # fails: no such table
PLANHAT_ERROR = '<img src=x onerror="alert(2)">'  # Planhat's (fake's) answer to a 400
TOKEN = "status-page-token-0123456789"


# --- data: real syncs, spread over the past days ------------------------------------------


def populate(project: Project, cli: Callable[..., Any]) -> dict[str, str]:
    """Six syncs of three audiences, one refused in part by Planhat, spread over 15 days.
    Returns the audience keys by name."""
    project.write(
        audiences=[
            {"name": SCRIPT_NAME, "query": PRO_QUERY},
            {"name": "Buyers", "query": BUYERS_QUERY},
            {"name": BROKEN_NAME, "query": BROKEN_QUERY},
        ]
    )
    settings = load_settings(project.path)
    keys = {a.name: a.key for a in settings.audiences}
    batches: list[int] = []
    plans = [range(1, 9), range(1, 13), range(3, 16), range(3, 21), range(5, 19), range(5, 24)]
    for number, ids in enumerate(plans):
        project.source.set_users(users(ids, orders=0) + users(range(100, 100 + number * 2), orders=3))
        if number == 3:  # Planhat refuses every identify of this run, with markup in its answer
            project.planhat.fail_next(500, status=400, body=PLANHAT_ERROR)
        cli("--config", str(project.path), "sync")
        project.planhat.clear_faults()
        batches.append(_max_run_id(project.state_url))
    _spread(project.state_url, batches, days=15)
    return keys


def _max_run_id(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.max(m.runs.c.id))).scalar_one())
    finally:
        engine.dispose()


def _spread(url: str, batches: list[int], days: float) -> None:
    """Move each sync's runs back in time, evenly over `days`, the last sync an hour ago, so
    the charts have a time axis to show (a test cannot wait days between syncs)."""
    engine = sa.create_engine(url)
    now = datetime.now(UTC)
    step = timedelta(days=days) / max(1, len(batches) - 1)
    try:
        with engine.begin() as connection:
            runs = connection.execute(sa.select(m.runs.c.id, m.runs.c.started_at, m.runs.c.finished_at)).all()
            for run_id, started, finished in runs:
                batch = next(i for i, last in enumerate(batches) if run_id <= last)
                shift = now - timedelta(hours=1) - step * (len(batches) - 1 - batch) - started
                connection.execute(
                    m.runs.update()
                    .where(m.runs.c.id == run_id)
                    .values(started_at=started + shift, finished_at=finished + shift if finished else None)
                )
                for change_id, at in connection.execute(
                    sa.select(m.changes.c.id, m.changes.c.at).where(m.changes.c.run_id == run_id)
                ).all():
                    connection.execute(
                        m.changes.update().where(m.changes.c.id == change_id).values(at=at + shift)
                    )
    finally:
        engine.dispose()


@dataclass
class Shared:
    project: Project
    keys: dict[str, str]  # audience keys by name


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One populated state database per backend, for the tests that only read it (populating
    takes seconds: six real syncs)."""
    directory = tmp_path_factory.mktemp(f"status-page-{request.param}")
    with pytest.MonkeyPatch.context() as env, ExitStack() as stack:
        for name in list(os.environ):  # as the autouse clean_environment does for each test
            if name.startswith(("PLANHAT_", "AUDIENCE_SYNC_")) and name != "AUDIENCE_SYNC_TEST_POSTGRES":
                env.delenv(name)
        if request.param == "sqlite":
            url = f"sqlite:///{directory / 'state.db'}"
        else:
            url = stack.enter_context(postgres_schema())
        fake = stack.enter_context(FakePlanhat(tenant_token=TENANT_TOKEN, api_token=API_TOKEN))
        project = Project(directory / "audience_sync.toml", url, SourceDB(directory / "source.db"), fake)
        keys = populate(project, lambda *args: main(list(args)))
        yield Shared(project, keys)


@contextmanager
def page_server(
    config: Path, *, host: str = "127.0.0.1", metrics: Metrics | None = None
) -> Iterator[MetricsServer]:
    """The HTTP server the daemon runs (`metrics` given) or `serve` runs (None), on a free port."""
    settings = load_settings(config)
    engine = database.create_state_engine(settings.database_url)
    server = MetricsServer(metrics, host, 0, page=StatusPage(engine, lambda: settings))
    try:
        yield server.start()
    finally:
        server.stop()
        engine.dispose()


def with_token(shared: Shared, directory: Path) -> Path:
    """A copy of the shared config with an access token set."""
    config = directory / "with_token.toml"
    config.write_text(shared.project.path.read_text() + f'\n[metrics]\ntoken = "{TOKEN}"\n')
    return config


def local(server: MetricsServer) -> str:
    """The server's URL through loopback (it may be bound to every interface)."""
    return "http://127.0.0.1:" + server.url.rsplit(":", 1)[1]


def run_ids(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<details class="run" id="run-(\d+)"', html)]


# --- what the page shows ------------------------------------------------------------------


def test_the_page_shows_every_audience_its_charts_and_the_recent_runs(
    shared: Shared,
) -> None:
    engine = sa.create_engine(shared.project.state_url)
    with engine.connect() as connection:
        entries = {e.key: e for e in history.status(connection, {})}
        newest = connection.execute(sa.select(sa.func.max(m.runs.c.id))).scalar_one()
        buyers_last = connection.execute(
            sa.select(sa.func.max(m.runs.c.id)).where(m.runs.c.audience_key == shared.keys["Buyers"])
        ).scalar_one()
    engine.dispose()
    with page_server(shared.project.path) as server:
        answer = httpx.get(local(server) + "/")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "script-src" not in answer.headers["content-security-policy"]  # default-src 'none': no script
    html = answer.text
    buyers = shared.keys["Buyers"]
    row = html[html.index(f'id="row-{buyers}"') :].split("</tr>", 1)[0]
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    status, members, in_planhat, pending, in_doubt = cells[:5]
    assert status == "success"
    assert members == str(entries[buyers].members) == "10"
    assert in_planhat == str(entries[buyers].baseline) and pending == "0" and in_doubt == "0"
    assert re.fullmatch(r"run \d+\s+1 h ago", cells[5]) and cells[6] == ""  # no daemon planned a next run
    broken = shared.keys[BROKEN_NAME]
    broken_row = html[html.index(f'id="row-{broken}"') :].split("</tr>", 1)[0]
    assert "failed" in broken_row and "no such table" in broken_row
    # One section of charts per audience: members, entered and exited, durations.
    for key in shared.keys.values():
        section = html[html.index(f'id="audience-{key}"') :].split("</section>", 1)[0]
        assert "6 runs" in section
        figures = re.findall(r"<figure class=\"chart\">.*?</figure>", section, re.S)
        assert [re.search(r"<figcaption>(\w[\w ]*)", f).group(1).strip() for f in figures] == [  # type: ignore[union-attr]
            "Members",
            "Entered and exited",
            "Run duration",
        ]
    # The recent runs, newest first, each with its details and a sample of its changes.
    ids = run_ids(html)
    assert ids == sorted(ids, reverse=True) and ids[0] == newest and len(ids) == 18
    details = html[html.index(f'id="run-{buyers_last}"') :].split("</details>", 1)[0]
    assert "<summary>" in details and "of its changes" in details
    assert re.search(r"<code>u1\d\d</code>", details)  # the buyers the sync sent


def test_one_audience_and_a_shorter_window(shared: Shared) -> None:
    buyers = shared.keys["Buyers"]
    with page_server(shared.project.path) as server:
        one = httpx.get(local(server) + f"/?audience={buyers}&days=7")
        unknown = httpx.get(local(server) + "/?audience=nobody")
        bad = httpx.get(local(server) + "/?days=many")
    assert one.status_code == 200
    assert f'id="row-{buyers}"' in one.text and f'id="row-{shared.keys["Buyers"]}x' not in one.text
    assert one.text.count('<tr id="row-') == 1
    assert "Runs over the last 7 days" in one.text
    assert "3 runs" in one.text  # 15 days spread over 6 syncs: three in the last week
    assert all(f"<code>{buyers}</code>" in d for d in one.text.split("<details")[1:])
    assert unknown.status_code == 404 and "No audience <code>nobody</code>" in unknown.text
    assert bad.status_code == 400 and "days must be a whole number" in bad.text


def test_untrusted_text_is_escaped(shared: Shared) -> None:
    """Audience names, query errors and Planhat's answers are shown as text, never markup."""
    with page_server(shared.project.path) as server:
        html = httpx.get(local(server) + "/").text
        details = httpx.get(local(server) + f"/?audience={shared.keys[SCRIPT_NAME]}").text
    assert "<script" not in html.lower() and "<script" not in details.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Pro" in html
    assert "Churn &lt;b&gt;risk&lt;/b&gt;" in html and "<b>risk" not in html
    assert "&lt;i&gt;nowhere&lt;/i&gt;" in html and "<i>nowhere" not in html
    # Planhat's 400 answer reached the run's error and its changes' errors: text again.
    assert "<img" not in html and "<img" not in details
    assert "&lt;img src=x onerror=" in details


# --- banners ------------------------------------------------------------------------------


def test_an_unhealthy_daemon_shows_what_healthz_says(shared: Shared) -> None:
    late = [datetime.now(UTC)]
    keys = list(shared.keys.values())
    metrics = Metrics(keys, timedelta(hours=3), timedelta(minutes=30), clock=lambda: late[0])
    for key in keys:
        metrics.mark_cycled(key)
        metrics.set_last_success(key, datetime.now(UTC) - timedelta(minutes=10))
    with page_server(shared.project.path, metrics=metrics) as server:
        healthy = httpx.get(local(server) + "/").text
        late[0] += timedelta(hours=5)  # no success since: past max_interval + health_margin
        health = httpx.get(local(server) + "/healthz")
        unhealthy = httpx.get(local(server) + "/").text
    assert 'class="banner ok" id="health-banner"' in healthy and "answers 200" in healthy
    assert health.status_code == 503
    banner = " ".join(unhealthy[unhealthy.index('id="health-banner"') :].split("</p>", 1)[0].split())
    assert "The daemon is unhealthy" in banner and "answers 503" in banner
    assert "3 audiences did not sync successfully within 3.5 h" in banner
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Pro" in banner and "<script" not in banner


def test_a_schema_that_is_behind_shows_a_banner(project: Project, cli: Callable[..., Any]) -> None:
    from alembic import command

    project.source.set_users(users(range(1, 4)))
    assert cli("--config", str(project.path), "sync").code == 0
    engine = sa.create_engine(project.state_url)
    with engine.begin() as connection:
        command.downgrade(migrations.alembic_config(connection), "-1")
        behind = migrations.current_revision(connection)
    engine.dispose()
    with page_server(project.path) as server:
        answer = httpx.get(local(server) + "/")
    assert answer.status_code == 200
    banner = " ".join(answer.text[answer.text.index('id="schema-banner"') :].split("</p>", 1)[0].split())
    assert "The schema is behind" in banner and "audience-sync db upgrade" in banner
    assert f"at revision {behind}" in banner and migrations.head_revision() in banner
    assert 'id="audiences"' in answer.text and "<table" not in answer.text


def test_an_empty_state_database_says_to_upgrade(tmp_path: Path) -> None:
    config = tmp_path / "audience_sync.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "empty.db"}"\n')
    settings = load_settings(config)
    engine = database.create_state_engine(settings.database_url)
    server = MetricsServer(None, "127.0.0.1", 0, page=StatusPage(engine, lambda: settings)).start()
    try:
        html = httpx.get(local(server) + "/").text
    finally:
        server.stop()
        engine.dispose()
    assert "The state database is empty" in html and "audience-sync db upgrade" in html
    check = sa.create_engine(settings.database_url)
    assert sa.inspect(check).get_table_names() == []  # the page only reads: it creates nothing
    check.dispose()


# --- the daemon ---------------------------------------------------------------------------


def test_the_daemon_serves_the_page_next_to_metrics_and_health(
    project: Project, start_daemon: Callable[..., Any]
) -> None:
    project.write(audiences=[{"name": SCRIPT_NAME, "query": PRO_QUERY}], extra="\n[metrics]\nport = 0\n")
    project.source.set_users(users(range(1, 6)))
    daemon = start_daemon()
    engine = sa.create_engine(project.state_url)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                if [r for r in runs.recent(connection) if r["status"] == "success"]:
                    break
            time.sleep(0.1)
    finally:
        engine.dispose()
    html = httpx.get(daemon.server.url + "/").text
    assert "served by the daemon" in html and "answers 200" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Pro" in html and "<script" not in html
    row = html[html.index('<tr id="row-') :].split("</tr>", 1)[0]
    assert ">5</td>" in row  # members, and `true` in Planhat
    assert httpx.get(daemon.server.url + "/healthz").status_code == 200


def test_the_daemon_refuses_to_serve_the_page_off_loopback_without_a_token(
    project: Project, start_daemon: Callable[..., Any]
) -> None:
    project.write(extra='\n[metrics]\nport = 0\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"metrics\.host is 0\.0\.0\.0, not loopback.*metrics\.token"):
        start_daemon()


# --- access -------------------------------------------------------------------------------


def test_off_loopback_without_a_token_is_refused(project: Project, cli: Callable[..., Any]) -> None:
    result = cli("--config", str(project.path), "serve", "--host", "0.0.0.0", "--port", "0")
    assert result.code == 1
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert "--host is 0.0.0.0, not loopback" in result.err and "metrics.token" in result.err
    settings = load_settings(project.path)
    engine = database.create_state_engine(settings.database_url)
    try:
        with pytest.raises(ConfigError, match="not loopback"):
            MetricsServer(None, "0.0.0.0", 0, page=StatusPage(engine, lambda: settings)).start()
    finally:
        engine.dispose()


def test_the_token_gates_the_page_not_metrics_or_health(
    shared: Shared, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    metrics = Metrics(list(shared.keys.values()), timedelta(hours=3), timedelta(minutes=30))
    with page_server(with_token(shared, tmp_path), host="0.0.0.0", metrics=metrics) as server:
        url = local(server)
        anonymous = httpx.get(url + "/")
        wrong = httpx.get(url + "/", headers={"Authorization": "Bearer not-the-token-at-all"})
        bearer = httpx.get(url + "/", headers={"Authorization": f"Bearer {TOKEN}"})
        scraped = httpx.get(url + "/metrics")
        probed = httpx.get(url + "/healthz")
        bad_login = httpx.post(url + "/login", data={"token": "guess-guess-guess-guess"})
        login = httpx.post(url + "/login", data={"token": TOKEN, "next": "/?days=7"})
        cookie = login.headers.get("set-cookie", "")
        session = cookie.split(";", 1)[0]
        browsed = httpx.get(url + "/?days=7", headers={"Cookie": session})
        forged = httpx.get(url + "/", headers={"Cookie": session[:-4] + "0000"})
        evil = httpx.post(url + "/login", data={"token": TOKEN, "next": "//evil.example/"})
        split = httpx.post(url + "/login", data={"token": TOKEN, "next": "/\r\nSet-Cookie: planted=1"})
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert 'name="token"' in anonymous.text and "Buyers" not in anonymous.text
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert bearer.status_code == 200 and "Buyers" in bearer.text
    assert scraped.status_code == 200 and "audience_sync_runs_total" in scraped.text
    assert probed.status_code == 200
    assert bad_login.status_code == 401 and "not the access token" in bad_login.text
    assert login.status_code == 303 and login.headers["location"] == "/?days=7"
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert browsed.status_code == 200 and "Runs over the last 7 days" in browsed.text
    assert forged.status_code == 401
    assert evil.headers["location"] == "/"
    assert split.headers["location"] == "/" and "planted" not in split.headers.get("set-cookie", "")
    for answer in (anonymous, bearer, login, browsed, bad_login):
        assert TOKEN not in answer.text
    assert TOKEN not in caplog.text


def test_the_access_token_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "audience_sync.toml"
    config.write_text('[metrics]\ntoken = "short"\n')
    with pytest.raises(ConfigError, match=r"metrics\.token: must be at least 16 characters"):
        load_settings(config)
    monkeypatch.setenv("AUDIENCE_SYNC_STATUS_TOKEN", f"  {TOKEN}\n")
    settings = load_settings(config)  # the environment wins, stripped
    assert settings.metrics.token is not None and settings.metrics.token.reveal() == TOKEN
    assert TOKEN not in repr(settings)


# --- audience-sync serve ------------------------------------------------------------------


def test_serve_shows_the_page_without_a_daemon(shared: Shared) -> None:
    command = [sys.executable, "-c", "from audience_sync.cli import entrypoint; entrypoint()"]
    process = subprocess.Popen(
        [*command, "--config", str(shared.project.path), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/ \(Ctrl-C to stop\)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")  # type: ignore[union-attr]
        assert "password" not in line
        html = httpx.get(match.group(1) + "/").text
        health = httpx.get(match.group(1) + "/healthz")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    assert code == 0
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Pro" in html and 'id="run-' in html
    assert "no daemon runs here" in html and "The daemon is unhealthy" not in html
    assert health.status_code == 404


# --- charts -------------------------------------------------------------------------------


def test_a_long_history_is_thinned_to_the_plot_width() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    points = [charts.Point(start + timedelta(minutes=n), n % 97, "") for n in range(50_000)]
    chart = charts.line_chart(
        "Members", start, start + timedelta(minutes=50_000), [charts.Series("m", "m", points)]
    )
    drawn = chart.lines[0].points.split()
    assert len(drawn) <= 2 * (charts.WIDTH - charts.LEFT - charts.RIGHT + 1)  # two per pixel column
    ys = [float(p.split(",")[1]) for p in drawn]
    # The extremes survive: 96 (the axis goes to 100) and 0.
    assert min(ys) == round(chart.bottom - 0.96 * (chart.bottom - chart.top), 1) and max(ys) == chart.bottom
    assert chart.dots == ()  # too many points for a dot each


# --- in a real browser --------------------------------------------------------------------

_browser_problem: str | bool | None = False  # False: not probed yet


def browser_unavailable() -> str | None:
    """Why no headless Chromium can be driven here, or None. Probed once per session."""
    global _browser_problem
    if _browser_problem is False:
        try:
            from playwright.sync_api import Error, sync_playwright
        except ImportError:
            _browser_problem = "Playwright is not installed (pip install -e '.[test]')"
            return _browser_problem
        if not Path(CHROMIUM).exists():
            _browser_problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
            return _browser_problem
        try:
            with sync_playwright() as playwright:
                playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS).close()
            _browser_problem = None
        except Error as exc:
            _browser_problem = f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}"
    return _browser_problem  # type: ignore[return-value]


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A fresh page of a headless Chromium from the machine's packages."""
    skip_without("browser", browser_unavailable())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1360, "height": 900})
        finally:
            browser.close()


def test_in_a_browser_the_page_loads_charts_render_and_a_run_opens(
    browser_page: Any, shared: Shared, request: pytest.FixtureRequest
) -> None:
    page = browser_page
    dialogs: list[str] = []
    problems: list[str] = []
    requested: list[str] = []

    def refuse(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", refuse)
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda req: requested.append(req.url))
    with page_server(shared.project.path) as server:
        url = local(server)
        answer = page.goto(url + "/")
        assert answer is not None and answer.status == 200
        assert page.title() == "audience-sync status"
        # The audience named like a script shows as that text, and ran nothing.
        name = page.locator(f"#row-{shared.keys[SCRIPT_NAME]} a.name")
        assert name.inner_text() == SCRIPT_NAME
        assert page.locator(f"#row-{shared.keys[BROKEN_NAME]} a.name").inner_text() == BROKEN_NAME
        assert page.locator("script").count() == 0 and page.locator("b, i, img").count() == 0
        # The stylesheet applied: it ships in the package and is served by the page's server.
        assert page.locator("header.top").evaluate("e => getComputedStyle(e).display") == "flex"
        # Charts render: each audience has three drawn SVG charts with visible lines.
        for key in shared.keys.values():
            svgs = page.locator(f"#audience-{key} figure.chart svg")
            assert svgs.count() == 3
            for index in range(3):
                box = svgs.nth(index).bounding_box()
                assert box is not None and box["width"] > 200 and box["height"] > 80
            durations = page.locator(f"#audience-{key} polyline.duration")
            assert durations.evaluate("e => e.getTotalLength()") > 50  # runs spread over 15 days
        line = page.locator(f"#audience-{shared.keys['Buyers']} polyline.members")
        assert line.evaluate("e => e.getTotalLength()") > 50
        assert line.evaluate("e => getComputedStyle(e).stroke") == "rgb(59, 111, 216)"  # styled
        # The audience whose query always fails: no members to draw, and its failed runs marked.
        broken = page.locator(f"#audience-{shared.keys[BROKEN_NAME]}")
        assert broken.locator("text.empty").first.text_content() == "no data"
        assert broken.locator("circle.failed").count() == 6
        # A run's details open on a click (no script: <details>) and show its changes.
        run = page.locator("details.run").filter(has_text="Planhat did not accept").first
        assert run.get_attribute("open") is None and not run.locator("pre.error").is_visible()
        run.locator("summary").click()
        assert run.get_attribute("open") is not None
        error = run.locator("pre.error")
        assert error.is_visible() and PLANHAT_ERROR in error.inner_text()
        assert run.locator("table.changes tbody tr").count() > 0
        ARTIFACTS.mkdir(exist_ok=True)
        backend = request.node.callspec.params["shared"]
        shot = ARTIFACTS / f"status-page-{backend}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert dialogs == [] and problems == []
    assert requested and all(u.startswith(url) for u in requested), requested  # nothing from elsewhere


def test_in_a_browser_the_token_login_leads_to_the_page(
    browser_page: Any, shared: Shared, tmp_path: Path
) -> None:
    page = browser_page
    with page_server(with_token(shared, tmp_path), host="0.0.0.0") as server:
        page.goto(local(server) + "/?days=7")
        assert page.locator("input[name=token]").is_visible()
        assert page.locator("#audiences").count() == 0
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#audiences")
        assert page.url.endswith("/?days=7")
        assert "Runs over the last 7 days" in page.inner_text("#charts h2")
