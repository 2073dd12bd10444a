"""State database errors during delivery, the run's finish and a dry run: one line naming the
database (password hidden), the run recorded with its final status, nothing pending lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from audience_sync.config import PlanhatSettings, load_settings
from audience_sync.errors import StateDatabaseError
from audience_sync.state import database
from audience_sync.support import redaction
from audience_sync.sync import reports
from audience_sync.sync import run as sync_run
from tests.conftest import Cli, Project, SenderAround, query, users


def sabotaging_sender(state_url: str, sql: str) -> Callable[[PlanhatSettings], Any]:
    """A real client that, once its first chunk reached Planhat, breaks the state database."""

    class Sender(SenderAround):
        def after_send(self) -> None:
            query(state_url, sql)

    return Sender


def run_sabotaged(project: Project, sql: str) -> list[reports.RunReport]:
    project.write(transport="endusers", planhat="batch_size = 5\nmax_requests_per_second = 150")
    project.source.set_users(users(range(1, 13), plan="pro"))
    settings = load_settings(project.path)
    engine = database.open_state(project.state_url)
    try:
        return sync_run.sync(
            settings, engine, ["pro_plan"], sender_factory=sabotaging_sender(project.state_url, sql)
        )
    finally:
        engine.dispose()


def test_a_database_error_during_delivery_is_recorded_with_the_run(project: Project) -> None:
    # The acknowledgement of the first chunk cannot log its changes.
    [report] = run_sabotaged(project, "DROP TABLE changes")
    assert report.status == "failed"
    assert report.error is not None and report.error.startswith("state database ")
    assert "changes" in report.error and "\n" not in report.error
    rows = query(project.state_url, "SELECT status, error, pending FROM runs")
    assert rows == [("failed", report.error, 12)]  # recorded, not left `running`
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(12,)]  # nothing lost
    assert query(project.state_url, "SELECT count(*) FROM leases") == [(0,)]


def test_a_database_error_at_the_run_s_end_is_one_line_naming_the_database(project: Project) -> None:
    with pytest.raises(StateDatabaseError) as raised:
        run_sabotaged(project, "DROP TABLE runs")
    message = str(raised.value)
    where = redaction.safe_url(project.state_url)
    assert message.startswith(f"state database {where}: ") and "\n" not in message
    assert query(project.state_url, "SELECT count(*) FROM leases") == [(0,)]  # released all the same


def test_a_database_error_in_a_dry_run_is_one_line(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    query(project.state_url, "DROP TABLE pending")
    result = cli("--config", "audience_sync.toml", "sync", "--dry-run")
    assert result.code == 1 and "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("pro_plan:")]
    assert len(lines) == 1 and "state database" in lines[0] and "pending" in lines[0]
