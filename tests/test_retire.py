"""`audience-sync retire KEY`: an audience removed from the config leaves Planhat with no `true`.

End to end through the CLI against the loopback fake, on both state databases.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from audience_sync.state import database, migrations
from audience_sync.state import models as m
from audience_sync.support import clock
from tests.conftest import (
    BUYERS_QUERY,
    PRO_QUERY,
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

PRO = {"name": "Pro Plan", "query": PRO_QUERY}
BUYERS = {"name": "Buyers", "query": BUYERS_QUERY}
# Chunks of two. A run meant to meet a fault is `project.one_shot()` (one attempt, a short
# timeout: the fault ends the delivery of its chunk at once); the others retry.
BATCHES = "batch_size = 2\nmax_requests_per_second = 150"


def status_of(cli: Cli, key: str) -> dict[str, Any]:
    result = run(cli, "status", "--json")
    assert result.code == 0, result.err
    return next(entry for entry in json.loads(result.out) if entry["key"] == key)


def true_for(project: Project, key: str) -> int:
    return project.planhat.state()["true"].get(key, 0)


def synced_then_removed(project: Project, cli: Cli, planhat: str = "", transport: str = "segment",
                        extra: str = "") -> None:  # fmt: skip
    """u1..u5 are `pro_plan` members in Planhat; u1, u2 also buyers. Then Pro Plan leaves the config."""
    project.write([PRO, BUYERS], transport=transport, planhat=planhat, extra=extra)
    project.source.set_users(users(range(1, 3), plan="pro", orders=1) + users(range(3, 6), plan="pro"))
    assert run(cli, "sync").code == 0
    assert true_for(project, "pro_plan") == 5 and true_for(project, "buyers") == 2
    project.write([BUYERS], transport=transport, planhat=planhat, extra=extra)


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_a_retired_audience_leaves_planhat_with_no_true_for_it(
    project: Project, cli: Cli, transport: str
) -> None:
    fake = project.planhat
    synced_then_removed(project, cli, transport=transport)

    shown = run(cli, "status")
    assert shown.code == 0
    assert "pro_plan (not configured)" in shown.out
    assert "audience-sync retire pro_plan" in shown.out
    assert status_of(cli, "pro_plan")["hint"] == "audience-sync retire pro_plan"
    assert status_of(cli, "buyers")["hint"] is None

    requests = len(fake.requests)
    dry = run(cli, "retire", "pro_plan")
    assert dry.code == 0, dry.err
    assert "would tell 5 users `false`" in dry.out and "--yes" in dry.out
    assert '"pro_plan": false' in dry.out  # a sample payload
    assert len(fake.requests) == requests and true_for(project, "pro_plan") == 5  # nothing sent
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    assert [r["kind"] for r in finished(project.state_url, "pro_plan")] == ["full"]  # nothing recorded

    done = run(cli, "retire", "pro_plan", "--yes")
    assert done.code == 0, done.err
    assert "told 5 users `false` in Planhat" in done.out and "Retired pro_plan" in done.out
    assert true_for(project, "pro_plan") == 0
    assert [fake.value(f"u{n}", "pro_plan") for n in range(1, 6)] == [False] * 5
    assert true_for(project, "buyers") == 2  # another audience's field is left alone

    history = json.loads(run(cli, "history", "--json", "--audience", "pro_plan").out)
    assert [(r["kind"], r["status"], r["exited"], r["sent"]) for r in history] == [
        ("retire", "success", 5, 5),
        ("full", "success", 0, 5),
    ]
    outcomes = query(
        project.state_url,
        "SELECT value, outcome, count(*) FROM changes WHERE audience_key = 'pro_plan' "
        "GROUP BY value, outcome ORDER BY value",
    )
    assert [(bool(v), o, n) for v, o, n in outcomes] == [(False, "delivered", 5), (True, "delivered", 5)]
    assert query(project.state_url, "SELECT count(*) FROM baseline WHERE audience_key = 'pro_plan'") == [(0,)]
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]

    entry = status_of(cli, "pro_plan")
    assert entry["retired_at"] is not None and entry["hint"] is None and entry["next_run_at"] is None
    shown = run(cli, "status")
    assert "pro_plan (retired)" in shown.out and "audience-sync retire" not in shown.out

    requests = len(fake.requests)
    again = run(cli, "retire", "pro_plan", "--yes")
    assert again.code == 0 and "already retired" in again.out
    assert len(fake.requests) == requests
    assert len(finished(project.state_url, "pro_plan")) == 2


def test_a_configured_audience_is_not_retired(project: Project, cli: Cli) -> None:
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert run(cli, "sync").code == 0
    requests = len(project.planhat.requests)
    for args in (("retire", "pro_plan"), ("retire", "pro_plan", "--yes")):
        refused = run(cli, *args)
        assert refused.code == 1
        assert refused.err.count("\n") == 1 and "Traceback" not in refused.err
        assert "'pro_plan' is still in the config" in refused.err
        assert "remove it from the config first, or it is synced again" in refused.err
    assert len(project.planhat.requests) == requests and true_for(project, "pro_plan") == 3


def test_a_removed_trait_or_account_level_audience_is_refused_not_told_false(
    project: Project, cli: Cli
) -> None:
    from tests.test_traits import TRAIT, set_scores

    project.source.set_users(users(range(1, 4), plan="pro", company_id="acme"))
    set_scores(project, [("u1", 10), ("u2", 20)])
    accounts = {"name": "Pro Accounts", "level": "account",
                "query": "SELECT DISTINCT company_id FROM users WHERE plan = 'pro'"}  # fmt: skip
    project.write([accounts], extra=TRAIT)
    assert run(cli, "sync").code == 0
    project.write([{"name": "Buyers", "query": BUYERS_QUERY}])  # both gone from the config
    requests = len(project.planhat.requests)
    for key, what in (("total_revenue_180_days", "a computed trait"), ("pro_accounts", "account-level")):
        for args in (("retire", key), ("retire", key, "--yes")):
            refused = run(cli, *args)
            assert refused.code == 1 and refused.err.count("\n") == 1, refused.err
            assert f"'{key}' is {what}; retire clears user-level audiences only" in refused.err
    assert len(project.planhat.requests) == requests  # nothing sent: no wrong `false`


def test_an_unknown_key_is_named_with_the_keys_that_can_be_retired(project: Project, cli: Cli) -> None:
    synced_then_removed(project, cli)
    result = run(cli, "retire", "pro_plna", "--yes")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "no audience 'pro_plna' in the state database" in result.err and "pro_plan" in result.err


def test_sending_needs_the_token_the_dry_run_does_not(project: Project, cli: Cli) -> None:
    synced_then_removed(project, cli)
    project.write([BUYERS], tokens=False)
    dry = run(cli, "retire", "pro_plan")
    assert dry.code == 0 and "would tell 5 users" in dry.out
    refused = run(cli, "retire", "pro_plan", "--yes")
    assert refused.code == 1 and refused.err.count("\n") == 1
    assert "no Planhat token set: set planhat.tenant_token (or PLANHAT_TENANT_TOKEN)" in refused.err
    assert true_for(project, "pro_plan") == 5
    assert status_of(cli, "pro_plan")["retired_at"] is None


def test_a_fault_mid_retire_leaves_it_not_retired_and_a_rerun_finishes(project: Project, cli: Cli) -> None:
    fake = project.planhat
    synced_then_removed(project, cli, planhat=BATCHES, transport="endusers")
    # Chunks of two: u1-u2 time out after Planhat applied them (in doubt), u3-u4 are refused
    # (503: in doubt too), u5 goes through.
    fake.timeout_next(1, applied=True, seconds=0.8)
    fake.fail_next(1, 503)
    with project.one_shot():
        result = run(cli, "retire", "pro_plan", "--yes")
    fake.wait_idle()
    assert result.code == 1
    assert "not retired" in result.out and "retire pro_plan --yes` again" in result.err
    entry = status_of(cli, "pro_plan")
    assert entry["retired_at"] is None and entry["hint"] == "audience-sync retire pro_plan"
    assert (entry["pending"], entry["in_doubt"]) == (4, 4)
    run_ = json.loads(run(cli, "history", "--json", "--audience", "pro_plan").out)[0]
    assert (run_["kind"], run_["status"], run_["sent"], run_["failed"], run_["in_doubt"]) == (
        "retire", "partial", 1, 4, 4,
    )  # fmt: skip
    assert [fake.value(f"u{n}", "pro_plan") for n in (3, 4)] == [True, True]

    dry = run(cli, "retire", "pro_plan")
    assert "would tell 4 users `false` in Planhat (4 of them in doubt)" in dry.out

    rerun = run(cli, "retire", "pro_plan", "--yes")
    assert rerun.code == 0, rerun.err
    assert true_for(project, "pro_plan") == 0
    assert status_of(cli, "pro_plan")["retired_at"] is not None


def test_a_refused_change_keeps_the_user_until_planhat_takes_the_false(project: Project, cli: Cli) -> None:
    """A definite refusal is not in doubt, but the user is still `true` in Planhat."""
    synced_then_removed(project, cli, transport="endusers")
    project.planhat.partial_fail(["u2"])
    assert run(cli, "retire", "pro_plan", "--yes").code == 1
    assert project.planhat.value("u2", "pro_plan") is True
    assert (status_of(cli, "pro_plan")["pending"], status_of(cli, "pro_plan")["in_doubt"]) == (1, 0)
    project.planhat.clear_faults()
    assert run(cli, "retire", "pro_plan", "--yes").code == 0
    assert true_for(project, "pro_plan") == 0


def test_the_mass_exit_guard_does_not_block_a_confirmed_retire(project: Project, cli: Cli) -> None:
    guard = "[safety]\nmax_exit_fraction = 0.1\nmin_members = 1\n"
    synced_then_removed(project, cli, extra=guard)
    project.write([PRO, BUYERS], extra=guard)
    project.source.set_users([])
    blocked = run(cli, "sync", "--audience", "pro_plan")
    assert blocked.code == 1 and "mass-exit guard" in blocked.err  # the guard is armed
    project.write([BUYERS], extra=guard)

    result = run(cli, "retire", "pro_plan", "--yes")
    assert result.code == 0, result.err
    assert true_for(project, "pro_plan") == 0


def test_users_planhat_may_have_as_true_are_told_false(project: Project, cli: Cli) -> None:
    """Beyond the baseline: a change in doubt (written by Planhat after the client gave up),
    and a chunk a killed run left on the wire. A change refused outright is not sent."""
    fake = project.planhat
    project.write([PRO], transport="endusers", planhat=BATCHES.replace("batch_size = 2", "batch_size = 1"))
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert run(cli, "sync").code == 0
    project.source.set_users(users(range(1, 6), plan="pro"))  # u4 and u5 enter
    fake.timeout_next(1, applied=True, seconds=0.8)  # u4: written, answered too late
    fake.fail_next(1, 429)  # u5: refused, never written
    with project.one_shot():
        assert run(cli, "sync").code == 1
    fake.wait_idle()
    assert (fake.value("u4", "pro_plan"), fake.value("u5", "pro_plan")) == (True, None)
    # A run killed with u6's `true` on the wire (and Planhat having written it).
    fake.set_value("u6", "pro_plan", True)
    query(
        project.state_url,
        "INSERT INTO pending (audience_key, user_ref, value, user_id, queued_at, attempts) "
        "VALUES ('pro_plan', 'u6', TRUE, 'u6', '2026-11-01 00:00:00', 0)",
    )
    query(
        project.state_url,
        "INSERT INTO in_flight (audience_key, after_ref, last_ref, sent_at) "
        "VALUES ('pro_plan', 'u5', 'u6', '2026-11-01 00:00:00')",
    )
    project.write([], transport="endusers")

    dry = run(cli, "retire", "pro_plan")
    assert "would tell 5 users `false` in Planhat (2 of them in doubt)" in dry.out  # u1-u3, u4, u6
    assert query(project.state_url, "SELECT count(*) FROM in_flight") == [(1,)]  # rolled back

    assert run(cli, "retire", "pro_plan", "--yes").code == 0
    assert true_for(project, "pro_plan") == 0
    assert [fake.value(f"u{n}", "pro_plan") for n in range(1, 7)] == [False] * 4 + [None, False]
    retired = finished(project.state_url, "pro_plan")[-1]
    assert (retired["kind"], retired["exited"], retired["sent"]) == ("retire", 5, 5)  # as the dry run said


def test_a_retired_audience_back_in_the_config_gets_an_initial_full_sync(project: Project, cli: Cli) -> None:
    synced_then_removed(project, cli)
    assert run(cli, "retire", "pro_plan", "--yes").code == 0
    project.write([PRO, BUYERS])
    result = run(cli, "sync", "--audience", "pro_plan")
    assert result.code == 0, result.err
    assert true_for(project, "pro_plan") == 5
    last = finished(project.state_url, "pro_plan")[-1]
    assert (last["kind"], last["sent"]) == ("full", 5)
    entry = status_of(cli, "pro_plan")
    assert entry["retired_at"] is None and entry["configured"] is True and entry["hint"] is None


def test_the_daemon_syncs_a_retired_audience_back_in_its_config(
    project: Project, cli: Cli, start_daemon: StartDaemon
) -> None:
    synced_then_removed(project, cli)
    assert run(cli, "retire", "pro_plan", "--yes").code == 0
    project.write([PRO, BUYERS], extra=schedule("1h", "2h"))
    start_daemon()
    wait_for(lambda: finished(project.state_url, "pro_plan")[2:], what="pro_plan synced again")
    assert true_for(project, "pro_plan") == 5
    runs = [(r["kind"], r["trigger"]) for r in finished(project.state_url, "pro_plan")]
    assert runs == [("full", "cli"), ("retire", "cli"), ("full", "schedule")]


def test_a_daemon_that_may_still_sync_the_audience_is_warned_about(project: Project, cli: Cli) -> None:
    synced_then_removed(project, cli)
    planned = "UPDATE audiences SET next_run_at = '2030-01-01 00:00:00' WHERE key = 'pro_plan'"
    query(project.state_url, planned)
    result = run(cli, "retire", "pro_plan")
    assert result.code == 0
    assert "Warning: a daemon planned a run of 'pro_plan' for 2030-01-01 00:00:00 UTC" in result.err
    assert "restart that daemon first" in result.err
    assert run(cli, "retire", "pro_plan", "--yes").code == 0
    assert status_of(cli, "pro_plan")["next_run_at"] is None


def test_a_retire_waits_for_the_audience_s_lease(project: Project, cli: Cli) -> None:
    synced_then_removed(project, cli)
    query(
        project.state_url,
        "INSERT INTO leases (audience_key, holder, acquired_at, expires_at) "
        "VALUES ('pro_plan', 'elsewhere:1:abc', '2026-01-01 00:00:00', '2999-01-01 00:00:00')",
    )
    result = run(cli, "retire", "pro_plan", "--yes")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "already running (lease held by elsewhere:1:abc)" in result.err
    assert true_for(project, "pro_plan") == 5


def test_the_migrated_schema_matches_the_models(state_url: str) -> None:
    engine = database.create_state_engine(state_url)
    try:
        migrations.upgrade(engine, "0002")
        with engine.begin() as connection:
            connection.execute(m.audiences.insert().values(key="vip", name="VIP", created_at=clock.utcnow()))
        migrations.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, m.metadata) == []
            assert connection.execute(
                m.audiences.select().with_only_columns(m.audiences.c.retired_at)
            ).all() == [(None,)]
    finally:
        engine.dispose()
