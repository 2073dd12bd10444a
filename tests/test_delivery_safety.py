"""Issue 3 end to end: nothing lost and nothing flooded, under faults, bad data and crashes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Cli, Project, last_run, query, sync, users, wait_for

BULK = "batch_size = 5\nmax_requests_per_second = 150"


def test_endusers_partial_206_keeps_only_the_named_items_pending(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    fake = project.planhat
    project.source.set_users(users(range(1, 13), plan="pro"))
    fake.partial_fail({"u3", "u8"})

    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0
    run = last_run(cli, "pro_plan")
    assert (run["sent"], run["failed"], run["pending"], run["status"]) == (10, 2, 2, "partial")
    assert fake.value("u3", "pro_plan") is None and fake.value("u4", "pro_plan") is True
    failures = query(project.state_url, "SELECT user_ref, error FROM changes WHERE outcome = 'failed'")
    assert sorted(ref for ref, _ in failures) == ["u3", "u8"]
    assert all(error for _, error in failures)

    fake.clear_faults()
    fake.requests.clear()
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 13))
    resent = [item["externalId"] for _, _, body, *_ in fake.requests for item in body]
    assert sorted(resent) == ["u3", "u8"]  # only what was not written goes again


def test_endusers_bad_item_is_isolated_by_splitting(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 11), plan="pro"))
    project.planhat.bad_items({"u4"})
    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0
    run = last_run(cli, "pro_plan")
    assert (run["sent"], run["failed"], run["pending"]) == (9, 1, 1)
    assert project.planhat.value("u4", "pro_plan") is None
    assert all(project.planhat.value(f"u{n}", "pro_plan") for n in range(1, 11) if n != 4)


def test_endusers_payload_carries_custom_boolean_and_coalesces(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users([{"id": "u1", "email": "a@x.com", "name": "Ann", "plan": "pro",
                               "orders": 3}])  # fmt: skip
    assert sync(cli).code == 0
    method, path, body, status = project.planhat.requests[0][:4]
    assert (method, path, status) == ("PUT", "/endusers", 200)
    assert body == [{"externalId": "u1", "email": "a@x.com", "name": "Ann", "companyExternalId": "acme",
                     "custom": {"buyers": True, "pro_plan": True}}]  # fmt: skip


def test_429_with_retry_after_is_honoured_and_everything_arrives(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 6), plan="pro"))
    project.planhat.fail_next(3, status=429, retry_after="0")
    project.planhat.fail_next(2, status=502)
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert all(project.planhat.value(f"u{n}", "pro_plan") for n in range(1, 6))
    assert last_run(cli, "pro_plan")["sent"] == 5


# --- the mass-exit guard ------------------------------------------------------------------


def test_a_source_that_suddenly_returns_nothing_is_blocked(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat="batch_size = 500\nmax_requests_per_second = 150")
    fake = project.planhat
    project.source.set_users(users(range(1, 151), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    sent_before = len(fake.requests)

    project.source.set_users([])  # a dropped table, a broken view, an empty replica
    blocked = sync(cli, "--audience", "pro_plan")
    assert blocked.code != 0
    assert "mass-exit guard" in blocked.err and "--force" in blocked.err
    run = last_run(cli, "pro_plan")
    assert run["status"] == "blocked" and "150 of 150" in run["error"]
    assert len(fake.requests) == sent_before  # nothing told to Planhat
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 151))
    status = json.loads(cli("--config", "audience_sync.toml", "status", "--json").out)
    assert next(e for e in status if e["key"] == "pro_plan")["baseline"] == 150  # unchanged

    # A real mass exit goes through with --force.
    assert sync(cli, "--audience", "pro_plan", "--force").code == 0
    assert all(fake.value(f"u{n}", "pro_plan") is False for n in range(1, 151))


def test_the_guard_lets_normal_churn_and_small_audiences_through(project: Project, cli: Cli) -> None:
    project.write(extra="[safety]\nmax_exit_fraction = 0.5\nmin_members = 20\n")
    project.source.set_users(users(range(1, 11), plan="pro"))  # 10 members, below min_members
    assert sync(cli, "--audience", "pro_plan").code == 0
    project.source.set_users([])
    assert sync(cli, "--audience", "pro_plan").code == 0  # small audience: not guarded
    assert project.planhat.value("u1", "pro_plan") is False

    project.source.set_users(users(range(1, 41), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    project.source.set_users(users(range(1, 22), plan="pro"))  # 19 of 40 leave: under half
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert project.planhat.value("u40", "pro_plan") is False


# --- crash safety: a real process killed with SIGKILL -------------------------------------


def _spawn_sync(config: Path) -> subprocess.Popen[bytes]:
    code = "from audience_sync.cli import entrypoint; entrypoint()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(config), "sync", "--audience", "pro_plan"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_requests", [0, 1, 6])
def test_sigkill_at_any_moment_loses_nothing(project: Project, cli: Cli, kill_after_requests: int) -> None:
    project.write(transport="endusers", planhat=BULK)
    fake = project.planhat
    members = 60
    project.source.set_users(users(range(1, members + 1), plan="pro"))
    fake.delay_next(1000, 0.1)  # every bulk call is slow, so the kill lands mid-run
    assert cli("--config", str(project.path), "db", "upgrade").code == 0

    process = _spawn_sync(project.path)
    if kill_after_requests == 0:  # during staging / diff, before anything is sent
        wait_for(lambda: query(project.state_url, "SELECT count(*) FROM runs")[0][0] > 0)
    else:
        wait_for(lambda: len(fake.requests) >= kill_after_requests)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    delivered_before = len(fake.requests)
    assert delivered_before < members / 5  # it really died mid-run

    fake.clear_faults()
    result = sync(cli, "--audience", "pro_plan")
    assert result.code == 0, result.err
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, members + 1))
    sent = Counter(item["externalId"] for _, _, body, status, *_ in fake.requests
                   if status == 200 for item in body)  # fmt: skip
    duplicates = [ref for ref, count in sent.items() if count > 1]
    assert len(duplicates) <= 5  # at most the batch that was in flight
    runs = query(project.state_url, "SELECT status FROM runs ORDER BY id")
    assert runs == [("aborted",), ("success",)]
