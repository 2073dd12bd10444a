"""In-doubt deliveries: a change whose outcome is unknown is never forgotten.

The reproduction from the issue, end to end through the CLI against the loopback fake, on
both transports and both state databases: u4 enters, Planhat writes it but answers after the
client's timeout; u4 leaves before the next run. Planhat must end with u4 not `true`.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    Cli,
    Project,
    expire_leases,
    last_run,
    query,
    status,
    sync,
    sync_killed,
    users,
    wait_for,
)

TRANSPORTS = ["segment", "endusers"]
# The runs a test means to fail are `project.one_shot()`: one attempt, a short timeout, so
# that the fake's delayed answer arrives after the client gave up. The others retry.
PLANHAT = "batch_size = 5\nmax_requests_per_second = 150"


def first_sync_of_three(project: Project, cli: Cli, transport: str) -> None:
    project.write(transport=transport, planhat=PLANHAT)
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_change_applied_after_the_timeout_is_taken_back_when_the_user_leaves(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    first_sync_of_three(project, cli, transport)

    project.source.set_users(users(range(1, 5), plan="pro"))  # u4 enters
    fake.delay_next(1, 1.0)  # Planhat writes u4 = true, but only after the client's timeout
    with project.one_shot():
        assert sync(cli, "--audience", "pro_plan").code != 0
    run = last_run(cli, "pro_plan")
    assert (run["status"], run["sent"], run["failed"], run["in_doubt"]) == ("failed", 0, 1, 1)
    assert status(cli)["in_doubt"] == 1
    wait_for(lambda: fake.value("u4", "pro_plan") is True)  # it did land
    assert query(project.state_url, "SELECT outcome FROM changes WHERE user_ref = 'u4'") == [("in_doubt",)]

    project.source.set_users(users(range(1, 4), plan="pro"))  # u4 leaves before the next run
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert fake.value("u4", "pro_plan") is False
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    assert status(cli)["in_doubt"] == 0
    assert [fake.value(f"u{n}", "pro_plan") for n in range(1, 4)] == [True, True, True]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_in_doubt_value_is_resent_when_the_truth_comes_back_to_it(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    first_sync_of_three(project, cli, transport)
    project.source.set_users(users(range(1, 3), plan="pro"))  # u3 leaves
    fake.delay_next(1, 1.0)
    with project.one_shot():
        assert sync(cli, "--audience", "pro_plan").code != 0  # its `false` is in doubt
    wait_for(lambda: fake.value("u3", "pro_plan") is False)

    project.source.set_users(users(range(1, 4), plan="pro"))  # u3 is back: still in the baseline
    fake.requests.clear()
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert fake.value("u3", "pro_plan") is True  # resent although the baseline already said so
    assert len(fake.requests) == 1


def test_a_refused_change_is_not_in_doubt_and_is_dropped_when_the_user_leaves(
    project: Project,
    cli: Cli,
) -> None:
    fake = project.planhat
    first_sync_of_three(project, cli, "endusers")
    project.source.set_users(users(range(1, 5), plan="pro"))
    fake.fail_next(1, 429)  # a 429 is a definite refusal: Planhat wrote nothing
    with project.one_shot():
        assert sync(cli, "--audience", "pro_plan").code != 0
    assert last_run(cli, "pro_plan")["in_doubt"] == 0

    project.source.set_users(users(range(1, 4), plan="pro"))
    fake.requests.clear()
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert fake.value("u4", "pro_plan") is None  # never told anything: no `false` to send
    assert fake.requests == []


def test_a_full_resync_sends_false_to_every_user_planhat_may_have_as_true(
    project: Project,
    cli: Cli,
) -> None:
    fake = project.planhat
    first_sync_of_three(project, cli, "endusers")
    project.source.set_users(users(range(1, 6), plan="pro"))
    fake.delay_next(1, 1.0)  # u4 and u5 (one bulk call) land after the timeout
    with project.one_shot():
        assert sync(cli, "--audience", "pro_plan").code != 0
    wait_for(lambda: fake.value("u5", "pro_plan") is True)

    project.source.set_users(users(range(1, 4), plan="pro"))
    assert cli("--config", "audience_sync.toml", "resync", "--now", "--audience", "pro_plan").code == 0
    assert last_run(cli, "pro_plan")["kind"] == "full"
    assert [fake.value(f"u{n}", "pro_plan") for n in range(1, 6)] == [True, True, True, False, False]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_kill_between_planhat_accepting_and_the_ack_leaves_the_chunk_in_doubt(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    first_sync_of_three(project, cli, transport)
    project.source.set_users(users(range(1, 5), plan="pro"))
    sync_killed(project, 1, ["pro_plan"])
    assert fake.value("u4", "pro_plan") is True  # Planhat has it; the state database never heard
    assert query(project.state_url, "SELECT audience_key, last_ref FROM in_flight") == [("pro_plan", "u4")]
    assert status(cli)["in_doubt"] == 1  # shown before any run settles it

    project.source.set_users(users(range(1, 4), plan="pro"))  # u4 leaves
    expire_leases(project.state_url)
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert fake.value("u4", "pro_plan") is False
    assert query(project.state_url, "SELECT count(*) FROM in_flight") == [(0,)]
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    statuses = [row["status"] for row in json.loads(cli("history", "--json").out)]
    assert "running" not in statuses and "aborted" in statuses


def test_a_401_mid_run_keeps_the_counts_of_what_was_delivered(
    project: Project,
    cli: Cli,
) -> None:
    fake = project.planhat
    project.write(transport="endusers", planhat="batch_size = 5\nmax_requests_per_second = 150")
    project.source.set_users(users(range(1, 13), plan="pro"))
    fake.delay_next(2, 0)  # two bulk calls are served normally...
    fake.fail_next(5, 401)  # ...then the token is refused
    result = sync(cli, "--audience", "pro_plan")
    assert result.code != 0
    assert "check planhat.api_token" in result.err and "Traceback" not in result.err
    run = last_run(cli, "pro_plan")
    assert (run["status"], run["sent"], run["pending"]) == ("partial", 10, 2)
    delivered = query(project.state_url, "SELECT count(*) FROM changes WHERE outcome = 'delivered'")
    assert delivered == [(10,)]
    assert query(project.state_url, "SELECT count(*) FROM baseline") == [(10,)]
