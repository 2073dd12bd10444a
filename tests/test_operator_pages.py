"""The status page's operator views in a real headless Chromium, on SQLite and PostgreSQL: a
paused audience (who, when, why, escaped) and a user's story (`/users/<id>`, from the search
box, escaped, behind the access token)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Cli, Project, run, sync, users
from tests.test_status_page import browser_page, local, page_server  # noqa: F401 - a fixture

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
