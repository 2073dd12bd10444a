"""A 200 that proves nothing is not a delivery (an HTML page, an empty body, JSON of another
shape, counters that fall short), and redirects are never followed with credentials."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import (
    API_TOKEN,
    TENANT_TOKEN,
    Cli,
    CliResult,
    Project,
    last_run,
    query,
    sync,
    users,
)
from tests.fake_planhat import FakePlanhat

BULK = "batch_size = 5\nmax_requests_per_second = 150"
SEGMENT = "max_requests_per_second = 150\nconcurrency = 2"


def assert_failed_and_nothing_recorded(project: Project, cli: Cli, result: CliResult, shown: str) -> None:
    assert result.code != 0
    lines = [line for line in result.err.splitlines() if line.startswith("pro_plan:")]
    assert len(lines) == 1 and "Traceback" not in result.err
    assert f"{project.planhat.url}/" in lines[0] and shown in lines[0]
    assert API_TOKEN not in result.err and TENANT_TOKEN not in result.err
    run = last_run(cli)
    assert (run["status"], run["sent"], run["pending"]) == ("failed", 0, 7)
    assert run["in_doubt"] >= 1 and shown in run["error"]
    assert query(project.state_url, "SELECT count(*) FROM baseline") == [(0,)]
    assert query(project.state_url, "SELECT count(*) FROM changes WHERE outcome = 'delivered'") == [(0,)]


def deliver_everything_next(project: Project, cli: Cli) -> None:
    project.planhat.clear_faults()
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert all(project.planhat.value(f"u{n}", "pro_plan") is True for n in range(1, 8))
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]


@pytest.mark.parametrize(
    ("fault", "shown"),
    [
        ("html", "(text/html) without the bulk upsert's JSON counters: '<html>"),
        ("empty", "(application/json) without the bulk upsert's JSON counters: '(empty)'"),
        ("not json", "without the bulk upsert's JSON counters: 'OK'"),
        ("no counters", "without the bulk upsert's JSON counters: '{\"ok\":true}'"),
    ],
)
def test_a_bulk_200_that_proves_nothing_fails_the_run_and_is_resent(
    project: Project,
    cli: Cli,
    fault: str,
    shown: str,
) -> None:
    fake = project.planhat
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 8), plan="pro"))
    if fault == "html":
        fake.html_next(5)
    elif fault == "empty":
        fake.empty_next(5)
    elif fault == "not json":
        fake.fail_next(5, 200, body=b"OK")
    else:
        fake.fail_next(5, 200, body={"ok": True})
    result = sync(cli, "--audience", "pro_plan")
    assert_failed_and_nothing_recorded(project, cli, result, shown)
    assert "200" in result.err
    assert len(fake.requests) == 1  # the run stopped at the first answer that proved nothing
    deliver_everything_next(project, cli)


@pytest.mark.parametrize(
    ("fault", "shown"),
    [
        ("html", "(text/html) without a JSON body: '<html>"),
        ("empty", "(application/json) without a JSON body: '(empty)'"),
    ],
)
def test_a_segment_2xx_without_json_fails_the_run_and_is_resent(
    project: Project, cli: Cli, fault: str, shown: str
) -> None:
    fake = project.planhat
    project.write(transport="segment", planhat=SEGMENT)
    project.source.set_users(users(range(1, 8), plan="pro"))
    fake.html_next(50) if fault == "html" else fake.empty_next(50)
    result = sync(cli, "--audience", "pro_plan")
    assert_failed_and_nothing_recorded(project, cli, result, shown)
    assert len(fake.requests) <= 2  # the workers in flight, nothing after
    deliver_everything_next(project, cli)


def test_counters_that_fall_short_leave_the_unaccounted_items_in_doubt(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 6), plan="pro"))
    fake.fail_next(1, 200, body={"created": 3, "updated": 0, "createdErrors": [], "updatedErrors": []})
    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0
    assert "Planhat accounted for 3 of 5 items (created 3, updated 0, errors 0)" in result.err
    run = last_run(cli)
    assert (run["sent"], run["failed"], run["in_doubt"]) == (0, 5, 5)
    deliver_everything_next_five = sync(cli, "--audience", "pro_plan")
    assert deliver_everything_next_five.code == 0
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 6))


class _Redirect(BaseHTTPRequestHandler):
    target = ""
    seen: list[str] = []

    def _redirect(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_POST = _redirect

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirecting(fake_planhat: FakePlanhat) -> Iterator[str]:
    handler = type("Handler", (_Redirect,), {"target": fake_planhat.url, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_redirects_are_never_followed_with_credentials(
    project: Project,
    cli: Cli,
    redirecting: str,
    transport: str,
) -> None:
    project.write(transport=transport, planhat=f'{BULK}\nbase_url = "{redirecting}"')
    project.source.set_users(users(range(1, 4), plan="pro"))
    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0 and "HTTP 307" in result.err
    assert project.planhat.requests == []  # the credentials never reached the redirect's target
    run = last_run(cli)
    assert (run["sent"], run["in_doubt"], run["pending"]) == (0, 0, 3)
