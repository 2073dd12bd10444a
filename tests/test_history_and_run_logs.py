"""At 3 a.m.: `history --status/--since/--kind` finds the runs that matter, a failed run logs at
WARNING (not INFO), and every log line of a run carries its run id, so one search finds one
run's story; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re

from tests.conftest import Cli, Project, query, run, sync, users


def history(cli: Cli, *args: str) -> list[dict[str, object]]:
    result = run(cli, "history", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_history_filters_by_status_since_and_kind(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro", orders=1))
    assert sync(cli).code == 0  # runs 1, 2: full, success
    project.source.set_users(users(range(1, 6), plan="pro", orders=1))
    project.planhat.fail_next(100, status=400)
    assert sync(cli, "--audience", "pro_plan").code == 1  # run 3: incremental, failed
    project.planhat.clear_faults()
    assert sync(cli, "--full", "--audience", "buyers").code == 0  # run 4: full, success
    # Backdate pro_plan's full run: runs 1 and 2 start together, in either order.
    (old,) = [int(str(r["id"])) for r in history(cli, "--audience", "pro_plan", "--kind", "full")]
    other = 3 - old
    query(project.state_url, f"UPDATE runs SET started_at = '2026-01-01 00:00:00' WHERE id = {old}")

    assert [(r["id"], r["status"]) for r in history(cli, "--status", "failed")] == [(3, "failed")]
    assert [r["id"] for r in history(cli, "--status", "failed", "--status", "success")] == [4, 3, 2, 1]
    assert [r["id"] for r in history(cli, "--kind", "full")] == [4, 2, 1]
    assert [r["id"] for r in history(cli, "--kind", "full", "--since", "1d")] == [4, other]
    assert [r["id"] for r in history(cli, "--since", "2025-12-31")] == [4, 3, 2, 1]
    assert [r["id"] for r in history(cli, "--since", "2026-06-01 00:00", "--audience", "pro_plan")] == [3]
    table = run(cli, "history", "--status", "failed").out
    assert len(table.splitlines()) == 3 and "failed" in table.splitlines()[2]

    for args, said in (
        (("--status", "broken"), "'broken' is not one of running, success"),
        (("--kind", "weekly"), "'weekly' is not one of full, incremental"),
        (("--since", "yesterday"), "neither a duration"),
    ):
        wrong = run(cli, "history", *args)
        assert wrong.code == 2 and said in wrong.err and "Traceback" not in wrong.err


def test_a_failed_run_logs_at_warning_and_every_line_of_a_run_names_it(project: Project, cli: Cli) -> None:
    project.write(planhat="backoff_max_seconds = 0.01\nretry_budget_seconds = 0.5")
    project.source.set_users(users(range(1, 4), plan="pro", orders=0))
    project.planhat.fail_next(1000, status=503)  # retried, then the budget runs out
    failed = run(cli, "--log-level", "info", "sync", "--audience", "pro_plan")
    assert failed.code == 1
    run_id = history(cli)[0]["id"]
    lines = [line for line in failed.err.splitlines() if " audience_sync." in line]
    summary = [line for line in lines if "run audience=pro_plan" in line]
    assert len(summary) == 1 and " WARNING " in summary[0] and "status=failed" in summary[0], lines
    assert summary[0].endswith(f" run={run_id}")
    retries = [line for line in lines if "retry" in line]  # from the Planhat client's threads
    assert retries and all(line.endswith(f" run={run_id}") for line in retries), retries
    during = [line for line in lines if "audience_sync.sync" in line or "audience_sync.planhat" in line]
    assert during and all(re.search(rf" run={run_id}$", line) for line in during), during

    project.planhat.clear_faults()
    project.write(
        planhat="backoff_max_seconds = 0.01\nretry_budget_seconds = 0.5",
        extra='[daemon]\nlog_format = "json"\n',
    )
    ok = run(cli, "--log-level", "info", "sync", "--audience", "pro_plan")
    assert ok.code == 0, ok.err
    records = [json.loads(line) for line in ok.err.splitlines() if line.startswith("{")]
    done = [r for r in records if "run audience=pro_plan" in r["message"]]
    assert len(done) == 1 and done[0]["level"] == "info" and done[0]["run_id"] == history(cli)[0]["id"]
