"""The status page's operator views in a real headless Chromium, on SQLite and PostgreSQL: a
paused audience (who, when, why, escaped) and a user's story (`/users/<id>`, from the search
box, escaped, behind the access token)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from tests.conftest import Cli, Project, run, sync, users
from tests.test_explain import story
from tests.test_status_page import ARTIFACTS, TOKEN, browser_page, local, page_server  # noqa: F401 - a fixture

REASON = '<img src=x onerror="alert(3)"> dbt schema change'


def test_in_a_browser_a_paused_audience_shows_paused_with_who_when_and_why(
    browser_page: Any,  # noqa: F811 - the fixture
    project: Project,
    cli: Cli,
) -> None:
    page = browser_page
    dialogs: list[str] = []

    def refuse(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", refuse)
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    assert sync(cli).code == 0
    assert run(cli, "pause", "pro_plan", "--reason", REASON).code == 0
    with page_server(project.path) as server:
        assert page.goto(local(server) + "/").status == 200
        row = page.locator("#row-pro_plan")
        assert row.locator(".badge.paused").inner_text() == "paused"
        note = row.locator(".pause-note").inner_text()
        assert REASON in note and " by " in note and "UTC" in note
        assert page.locator("img").count() == 0 and dialogs == []
        assert page.locator("#row-buyers .badge.paused").count() == 0
        assert run(cli, "resume", "pro_plan").code == 0
        page.reload()
        assert page.locator("#row-pro_plan .badge.paused").count() == 0


def test_in_a_browser_a_users_story_is_found_from_the_search_box_behind_the_token(
    browser_page: Any,  # noqa: F811 - the fixture
    project: Project,
    cli: Cli,
) -> None:
    page = browser_page
    dialogs: list[str] = []

    def refuse(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", refuse)
    story(project, cli)  # u3: entered, exited, back in while Planhat refuses
    project.path.write_text(project.path.read_text() + f'\n[metrics]\ntoken = "{TOKEN}"\n')
    with page_server(project.path) as server:
        url = local(server)
        assert httpx.get(url + "/users/u3").status_code == 401  # loopback too: the token gates it
        assert page.goto(url + "/users/u3").status == 401
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#user-audiences")
        assert page.url.endswith("/users/u3")
        pro = page.locator("#user-pro_plan")
        assert pro.locator("td.now").inner_text() == "member"
        assert (
            "false" in pro.locator("td.told").inner_text()
            and "(incremental)" in pro.locator("td.told").inner_text()
        )
        assert "contact locked" in pro.locator("td.pending").inner_text()
        rows = page.locator("#changes-pro_plan tbody tr")
        assert [rows.nth(i).locator("td").nth(3).inner_text() for i in range(3)] == [
            "entered",
            "exited",
            "entered",
        ]
        assert page.locator("#user-orders td.now").inner_text() == "5"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(
            path=str(ARTIFACTS / f"user-page-{project.state_url.split(':', 1)[0]}.png"), full_page=True
        )

        # The search box on the main page, by email; then markup typed into it stays text.
        page.goto(url + "/")
        page.fill("#user-search", "u3@example.com")
        page.click("form.search button")
        page.wait_for_selector("#user-audiences")
        assert page.url.endswith("/users/" + quote("u3@example.com", safe=""))
        assert page.locator("#user-buyers td.now").inner_text() == "member"
        page.goto(url + "/")
        page.fill("#user-search", '<img src=x onerror="alert(5)">')
        page.click("form.search button")
        page.wait_for_selector("#unknown-user")
        assert page.locator("code.user").inner_text() == '<img src=x onerror="alert(5)">'
        assert page.locator("img").count() == 0
        assert httpx.get(page.url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert dialogs == []
