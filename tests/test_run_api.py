"""The run API (`POST /api/runs`, `GET /api/runs/<id>`) on the daemon's server, on SQLite and
PostgreSQL: a pipeline's request is run by the daemon within its poll and answers with its
runs; the token is required always; every bad input is refused with a 4xx naming it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from audience_sync.config import load_settings
from audience_sync.http.api import RunApi
from audience_sync.http.server import MetricsServer
from audience_sync.http.status_page import StatusPage
from audience_sync.state import database, leases
from tests.conftest import Cli, Project, StartDaemon, query, run, schedule, users, wait_for
from tests.test_status_page import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def with_api(project: Project, extra: str = "") -> None:
    project.write(extra=f'[metrics]\nport = 0\ntoken = "{TOKEN}"\n' + extra)


@contextmanager
def api_server(project: Project) -> Iterator[str]:
    """The server `audience-sync serve` runs (page and API, no daemon), on a free port."""
    settings = load_settings(project.path)
    engine = database.open_state(settings.database_url)
    server = MetricsServer(
        None, "127.0.0.1", 0, page=StatusPage(engine, lambda: settings), api=RunApi(engine, lambda: settings)
    ).start()
    try:
        yield server.url
    finally:
        server.stop()
        engine.dispose()


def test_a_pipeline_requests_a_run_and_the_daemon_runs_it_within_its_poll(
    project: Project, cli: Cli, start_daemon: StartDaemon
) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    with_api(project, schedule("1h", "2h", '[daemon]\nresync_poll = "0.2s"\n'))
    daemon = start_daemon()
    wait_for(lambda: len(query(project.state_url, "SELECT id FROM runs WHERE finished_at IS NOT NULL")) == 2)
    project.source.set_users(users(range(1, 6), plan="pro", orders=1))  # dbt just rebuilt the table
    url = daemon.server.url

    answer = httpx.post(url + "/api/runs", json={"audiences": ["pro_plan"]}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "pending" and answer.headers["Location"] == body["url"]

    def finished() -> dict[str, Any] | None:
        state = httpx.get(url + body["url"], headers=AUTH).json()
        return state if state["status"] in ("done", "failed") else None

    state = wait_for(finished, what="the request run")
    assert state["status"] == "done" and state["error"] is None and state["full"] is False
    [ran] = state["runs"]
    assert (ran["audience"], ran["kind"], ran["status"], ran["sent"]) == (
        "pro_plan",
        "incremental",
        "success",
        2,
    )
    assert project.planhat.value("u5", "pro_plan") is True
    assert query(project.state_url, f"SELECT trigger FROM runs WHERE id = {ran['id']}") == [("api",)]
    assert len(query(project.state_url, "SELECT id FROM runs WHERE audience_key = 'buyers'")) == 1

    # A run of pro_plan in flight elsewhere (its lease held): the request waits for it to end,
    # rather than failing as "already running" or being answered by a run that read too early.
    engine = database.open_state(project.state_url)
    assert leases.try_acquire(engine, "pro_plan", "elsewhere:1:x", 60)
    waiting = httpx.post(url + "/api/runs", json={"audiences": ["pro_plan"]}, headers=AUTH).json()
    time.sleep(1.0)  # five polls
    assert httpx.get(url + waiting["url"], headers=AUTH).json()["status"] == "pending"
    leases.release(engine, "pro_plan", "elsewhere:1:x")
    engine.dispose()
    assert wait_for(lambda: httpx.get(url + waiting["url"], headers=AUTH).json()["status"] == "done")

    full = httpx.post(url + "/api/runs", json={"full": True}, headers=AUTH).json()  # every audience
    state = wait_for(
        lambda: (s := httpx.get(url + full["url"], headers=AUTH).json())["status"] == "done" and s
    )
    assert sorted((r["audience"], r["kind"]) for r in state["runs"]) == [
        ("buyers", "full"),
        ("pro_plan", "full"),
    ]
    assert run(cli, "history", "--json").code == 0


def test_every_bad_input_is_refused_with_a_4xx_naming_it(project: Project, cli: Cli) -> None:
    with_api(project)
    assert run(cli, "pause", "buyers", "--reason", "schema change").code == 0
    with api_server(project) as url:
        post = f"{url}/api/runs"
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({}, 401, "Authorization: Bearer"),
            ({"headers": {"Authorization": "Bearer wrong-token-0000000"}}, 401, "not the API token"),
            ({"headers": {"Cookie": "audience_sync_session=1.abc"}}, 401, "Bearer"),
            ({"headers": AUTH, "content": b"{not json"}, 400, "not JSON"),
            ({"headers": AUTH, "json": ["pro_plan"]}, 400, "JSON object"),
            ({"headers": AUTH, "json": {"audience": ["pro_plan"]}}, 400, "unknown field 'audience'"),
            ({"headers": AUTH, "json": {"full": "yes"}}, 400, "full must be true or false"),
            ({"headers": AUTH, "json": {"audiences": "pro_plan"}}, 400, "non-empty list"),
            ({"headers": AUTH, "json": {"audiences": ["nope"]}}, 422, "unknown audience 'nope'"),
            ({"headers": AUTH, "json": {"audiences": ["buyers"]}}, 409, "audience-sync resume buyers"),
            ({"headers": {**AUTH, "Content-Type": "text/plain"}, "content": b"{}"}, 415, "must be JSON"),
        ]
        for kwargs, status, said in cases:
            answer = httpx.post(post, **kwargs)
            assert (answer.status_code, answer.headers["Content-Type"]) == (status, "application/json"), (
                kwargs
            )
            assert said in answer.json()["error"], (kwargs, answer.text)
        assert httpx.post(post, content=b"x" * 5000, headers=AUTH).status_code == 413
        assert httpx.get(post, headers=AUTH).status_code == 405
        assert "whole number" in httpx.get(post + "/abc", headers=AUTH).json()["error"]
        assert httpx.get(post + "/999", headers=AUTH).status_code == 404
        assert query(project.state_url, "SELECT count(*) FROM run_requests") == [(0,)]  # none recorded

        accepted = httpx.post(post, json={"audiences": ["pro_plan"]}, headers=AUTH)  # no daemon here:
        assert accepted.status_code == 202  # it waits for one
        shown = httpx.get(url + accepted.json()["url"], headers=AUTH).json()
        assert (shown["status"], shown["runs"]) == ("pending", [])


def test_without_a_token_the_api_is_off_and_says_how_to_turn_it_on(project: Project) -> None:
    with api_server(project) as url:
        answer = httpx.post(url + "/api/runs", json={})
        assert answer.status_code == 404 and "metrics.token" in answer.json()["error"]
        assert httpx.get(url + "/").status_code == 200  # the page on loopback needs none
