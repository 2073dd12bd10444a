"""`audience-sync reconcile`: read Planhat back, report drift, and repair it with --fix.

End to end through the CLI against the loopback fake, whose contacts a test edits directly
to play someone editing Planhat by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import (
    API_TOKEN,
    TENANT_TOKEN,
    Cli,
    Project,
    StartDaemon,
    finished,
    query,
    run,
    schedule,
    users,
    wait_for,
)

TRANSPORTS = ["segment", "endusers"]
FAST = "max_requests_per_second = 150\nbatch_size = 5"
FAST_READS = "\n[reconcile]\nmax_requests_per_second = 150\n"


def reconcile(cli: Cli, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = run(cli, "reconcile", "--json", *args)
    return result.code, {r["key"]: r for r in json.loads(result.out)}


def synced(project: Project, cli: Cli, transport: str) -> None:
    """u1..u6 are pro members, synced; u7 and u8 exist in the source but are not members."""
    project.write(transport=transport, planhat=FAST, extra=FAST_READS)
    project.source.set_users(users(range(1, 7), plan="pro") + users(range(7, 9), plan="free"))
    assert run(cli, "sync").code == 0


def drift(project: Project) -> None:
    fake = project.planhat
    fake.set_value("u1", "pro_plan", False)  # someone unticked it by hand
    fake.set_value("u2", "pro_plan", None)  # an import dropped the field
    fake.delete_contact("u3")  # the contact was deleted
    fake.add_contact("u7", "u7@example.com", {"pro_plan": True})  # a non-member ticked by hand


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reconcile_reports_drift_and_changes_nothing(project: Project, cli: Cli, transport: str) -> None:
    synced(project, cli, transport)
    code, reports = reconcile(cli)
    assert code == 0
    assert reports["pro_plan"]["status"] == "agree" and reports["pro_plan"]["agree"] == 6

    drift(project)
    before = query(project.state_url, "SELECT count(*) FROM runs"), project.planhat.state()["requests"]
    code, reports = reconcile(cli)
    assert code == 1
    pro = reports["pro_plan"]
    assert (pro["unexpected_true"], pro["missing_true"], pro["missing_contact"]) == (1, 2, 1)
    assert pro["samples"] == {
        "unexpected_true": ["u7"], "missing_true": ["u1", "u2"], "missing_contact": ["u3"],
    }  # fmt: skip
    assert (pro["status"], pro["members"], pro["contacts"], pro["agree"]) == ("drift", 6, 6, 3)
    assert reports["buyers"]["status"] == "agree"
    # Nothing changed: no run recorded, the baseline as it was, nothing written to Planhat.
    assert query(project.state_url, "SELECT count(*) FROM runs") == before[0]
    assert query(project.state_url, "SELECT count(*) FROM baseline WHERE audience_key = 'pro_plan'") == [(6,)]
    writes = [r for r in project.planhat.requests if r.method != "GET"]
    assert len(writes) == before[1] - sum(r.method == "GET" for r in project.planhat.requests[: before[1]])

    text = run(cli, "reconcile")
    assert text.code == 1
    assert "pro_plan: missing true, e.g. u1, u2" in text.out
    assert "reconcile --fix" in text.err


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reconcile_fix_repairs_planhat_and_records_the_run(
    project: Project, cli: Cli, transport: str
) -> None:
    fake = project.planhat
    synced(project, cli, transport)
    drift(project)
    code, reports = reconcile(cli, "--fix")
    assert code == 0, reports
    assert reports["pro_plan"]["status"] == "fixed"
    assert [fake.value(f"u{n}", "pro_plan") for n in range(1, 9)] == [True] * 6 + [False, None]

    runs = query(
        project.state_url,
        "SELECT kind, status, sent, drift FROM runs WHERE audience_key = 'pro_plan' ORDER BY id DESC LIMIT 1",
    )
    assert runs == [("reconcile", "success", 4, 4)]
    changes = query(
        project.state_url,
        "SELECT user_ref, value FROM changes WHERE audience_key = 'pro_plan' AND run_id = "
        "(SELECT max(id) FROM runs WHERE audience_key = 'pro_plan') ORDER BY user_ref",
    )
    assert [(ref, bool(value)) for ref, value in changes] == [
        ("u1", True), ("u2", True), ("u3", True), ("u7", False),
    ]  # fmt: skip
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]

    code, reports = reconcile(cli)  # Planhat holds the truth again
    assert code == 0 and all(r["status"] == "agree" for r in reports.values())


def test_reconcile_pages_until_an_empty_page(project: Project, cli: Cli) -> None:
    fake = project.planhat
    paging = "\n[reconcile]\npage_size = 10\nmax_requests_per_second = 150\n"
    project.write(transport="endusers", planhat=FAST, extra=paging)
    project.source.set_users(users(range(1, 24), plan="pro"))
    assert run(cli, "sync").code == 0
    fake.page_cap = 7  # Planhat answers fewer than asked: 7, 7, 7, 2, then an empty page
    fake.set_value("u23", "pro_plan", False)
    code, reports = reconcile(cli)
    assert code == 1 and reports["pro_plan"]["contacts"] == 23
    assert reports["pro_plan"]["samples"]["missing_true"] == ["u23"]
    reads = [r.query for r in fake.requests if r.method == "GET"]
    assert reads == [f"limit=10&offset={offset}" for offset in (0, 7, 14, 21, 23)]


def test_reconcile_resolves_in_doubt_changes_from_what_planhat_holds(project: Project, cli: Cli) -> None:
    fake = project.planhat
    synced(project, cli, "endusers")
    project.write(transport="endusers", planhat=FAST, extra=FAST_READS)
    project.source.set_users(users(range(1, 8), plan="pro"))  # u7 enters
    fake.timeout_next(1, applied=True, seconds=1.0)
    with project.one_shot():
        assert run(cli, "sync", "--audience", "pro_plan").code != 0
    assert fake.wait_idle()
    assert query(project.state_url, "SELECT user_ref FROM pending WHERE in_doubt") == [("u7",)]

    code, reports = reconcile(cli, "--audience", "pro_plan")
    assert reports["pro_plan"]["in_doubt"] == 1
    assert reports["pro_plan"]["unexpected_true"] == 1  # Planhat has it; the baseline did not know

    fake.requests.clear()
    code, reports = reconcile(cli, "--audience", "pro_plan", "--fix")
    assert code == 0 and reports["pro_plan"]["status"] == "fixed"
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    assert query(project.state_url, "SELECT count(*) FROM baseline WHERE user_ref = 'u7'") == [(1,)]
    assert [r.method for r in fake.requests] == ["GET", "GET"]  # read back; nothing left to send


def test_reconcile_without_the_api_token_says_so_in_one_line(project: Project, cli: Cli) -> None:
    project.write(transport="segment", tokens=False, planhat=f'tenant_token = "{TENANT_TOKEN}"')
    result = run(cli, "reconcile")
    assert result.code == 1
    assert result.err.strip() == (
        "Planhat error: reading Planhat's contacts needs the API token: "
        "set planhat.api_token (or PLANHAT_API_TOKEN)"
    )
    assert TENANT_TOKEN not in result.err


def test_reconcile_with_a_rejected_token_fails_in_one_line(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", tokens=False, planhat='api_token = "wrong-token-987"')
    result = run(cli, "reconcile")
    assert result.code == 1
    assert result.err.strip() == (
        "Planhat error: Planhat rejected the API token (401): check planhat.api_token (or PLANHAT_API_TOKEN)"
    )
    assert "wrong-token-987" not in result.err + result.out and API_TOKEN not in result.err


def test_the_daemon_reconciles_on_its_own_cadence(project: Project, start_daemon: StartDaemon) -> None:
    fake = project.planhat
    project.write(
        transport="endusers",
        planhat=FAST,
        extra=schedule("1h", "2h") + '\n[reconcile]\ninterval = "1s"\nmax_requests_per_second = 150\n',
    )
    project.source.set_users(users(range(1, 5), plan="pro"))
    start_daemon()
    wait_for(lambda: len(finished(project.state_url)) >= 2, what="initial syncs")
    assert fake.value("u4", "pro_plan") is True

    fake.set_value("u4", "pro_plan", False)  # drift, with no run due for an hour
    fake.set_value("u9", "pro_plan", True)
    wait_for(lambda: fake.value("u4", "pro_plan") is True and fake.value("u9", "pro_plan") is False,
             what="drift repaired")  # fmt: skip

    def repairs() -> list[dict[str, Any]]:
        return [r for r in finished(project.state_url, "pro_plan") if r["kind"] == "reconcile" and r["drift"]]

    repaired = wait_for(repairs, what="the reconcile run recorded")
    assert repaired[0]["trigger"] == "schedule" and repaired[0]["status"] == "success"


def test_the_daemon_with_a_reconcile_interval_needs_the_api_token(project: Project, cli: Cli) -> None:
    tenant_only = f'tenant_token = "{TENANT_TOKEN}"'
    project.write(tokens=False, planhat=tenant_only, extra='[reconcile]\ninterval = "1h"\n')
    result = run(cli, "run")
    assert result.code == 1
    assert result.err.strip() == (
        "Config error: reconcile.interval is set, and reading Planhat back needs the API token: "
        "set planhat.api_token (or PLANHAT_API_TOKEN)"
    )


def test_a_read_page_that_is_not_json_stops_the_reconcile_in_one_line(project: Project, cli: Cli) -> None:
    synced(project, cli, "endusers")
    project.planhat.html_next(1)
    result = run(cli, "reconcile")
    assert result.code == 1
    assert result.err.strip().startswith(
        f"Planhat error: {project.planhat.url}/endusers answered 200 (text/html)"
    )
    assert result.err.strip().endswith("nothing was compared or changed")
