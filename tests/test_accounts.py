"""Account-level audiences and traits: Planhat companies, by group calls or PUT /companies."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest

from tests.conftest import (
    Cli,
    Project,
    StartDaemon,
    expire_leases,
    query,
    sync,
    sync_killed,
)

ENTERPRISE = {"name": "Enterprise Accounts", "level": "account",
              "query": "SELECT company_id, name FROM accounts WHERE arr >= 100000"}  # fmt: skip
ARR = (
    '[[traits]]\nname = "ARR"\nlevel = "account"\nsource = "app"\n'
    'query = "SELECT company_id, name, arr AS value FROM accounts"\n'
)


def set_accounts(project: Project, rows: list[tuple[Any, str, Any]]) -> None:
    with sqlite3.connect(project.source.path) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS accounts (company_id, name TEXT, arr)")
        connection.execute("DELETE FROM accounts")
        connection.executemany("INSERT INTO accounts VALUES (?, ?, ?)", rows)
    connection.close()


def writes(project: Project) -> list[tuple[str, Any]]:
    return [(r.path, r.body) for r in project.planhat.requests]


def test_an_account_audience_goes_out_as_group_calls(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([ENTERPRISE])
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 120000), ("c3", "Small", 10)])
    assert sync(cli).code == 0
    groups = sorted((b["groupId"], b["traits"]["enterprise_accounts"]) for _, b in writes(project))
    assert groups == [("c1", True), ("c2", True)]
    body = writes(project)[0][1]
    assert body["type"] == "group" and body["context"]["personas"]["computation_class"] == "audience"
    assert fake.company_value("c1", "enterprise_accounts") is True
    assert fake.companies["c1"]["name"] == "Acme" and fake.contacts == {}

    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 90000)])
    fake.requests.clear()
    assert sync(cli).code == 0
    assert [(b["groupId"], b["traits"]["enterprise_accounts"]) for _, b in writes(project)] == [("c2", False)]
    assert fake.company_value("c2", "enterprise_accounts") is False


def test_an_account_trait_goes_to_the_companies_bulk_upsert(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([ENTERPRISE], transport="endusers", extra=ARR)
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 1000.0)])
    assert sync(cli).code == 0
    ((path, items),) = writes(project)  # the company's audience and trait in one item
    assert path == "/companies"
    assert sorted(
        (i["externalId"], i["custom"].get("enterprise_accounts"), i["custom"]["arr"]) for i in items
    ) == [
        ("c1", True, 250000),
        ("c2", None, 1000),
    ]
    assert fake.company_value("c2", "arr") == 1000

    set_accounts(project, [("c1", "Acme", 250000)])
    fake.requests.clear()
    assert sync(cli).code == 0
    assert writes(project) == [("/companies", [{"externalId": "c2", "custom": {"arr": None}}])]
    assert fake.company_value("c2", "arr") is None


def test_a_company_refused_in_a_partial_answer_stays_pending(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([ENTERPRISE], transport="endusers")
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 250000)])
    fake.partial_fail(["c2"])
    assert sync(cli).code != 0
    assert fake.company_value("c1", "enterprise_accounts") is True and "c2" not in fake.companies
    assert query(project.state_url, "SELECT user_ref FROM pending") == [("c2",)]
    fake.clear_faults()
    assert sync(cli).code == 0
    assert fake.company_value("c2", "enterprise_accounts") is True


def test_users_and_companies_in_one_run_never_mix(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([ENTERPRISE, {"name": "Pro Plan", "query": "SELECT id AS user_id, email FROM users"}])
    project.source.set_users([{"id": "c1", "email": "c1@example.com"}])  # a user whose id is "c1"
    set_accounts(project, [("c1", "Acme", 250000)])
    assert sync(cli).code == 0
    kinds = sorted(b["type"] for _, b in writes(project))
    assert kinds == ["group", "identify"]
    assert fake.value("c1", "pro_plan") is True and fake.value("c1", "enterprise_accounts") is None
    assert (
        fake.company_value("c1", "enterprise_accounts") is True
        and fake.company_value("c1", "pro_plan") is None
    )


def test_account_level_history_status_dry_run_and_guard(project: Project, cli: Cli) -> None:
    project.write([ENTERPRISE], extra="[safety]\nmin_members = 2\n")
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 250000), (None, "No id", 250000)])
    dry = sync(cli, "--dry-run")
    assert dry.code == 0 and '"type": "group"' in dry.out and project.planhat.requests == []
    assert sync(cli).code == 0
    run = json.loads(cli("--config", "audience_sync.toml", "history", "--json").out)[0]
    assert (run["audience"], run["members"], run["skipped"], run["sent"]) == ("enterprise_accounts", 2, 1, 2)
    set_accounts(project, [])
    blocked = sync(cli)
    assert blocked.code != 0 and "mass-exit guard" in blocked.err
    status = json.loads(cli("--config", "audience_sync.toml", "status", "--json").out)
    assert status[0]["key"] == "enterprise_accounts" and status[0]["baseline"] == 2


def test_an_account_query_without_company_id_is_one_line(project: Project, cli: Cli) -> None:
    project.write([{**ENTERPRISE, "query": "SELECT name FROM accounts"}])
    set_accounts(project, [("c1", "Acme", 1)])
    result = sync(cli)
    assert result.code != 0 and "must return company_id" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_a_company_change_in_doubt_is_resent(project: Project, cli: Cli, transport: str) -> None:
    fake = project.planhat
    project.write([ENTERPRISE], transport=transport, planhat="max_requests_per_second = 150")
    set_accounts(project, [("c1", "Acme", 250000)])
    fake.timeout_next(1, applied=True)
    with project.one_shot():
        assert sync(cli).code != 0
    assert query(project.state_url, "SELECT in_doubt FROM pending") in ([(True,)], [(1,)])
    set_accounts(project, [])  # c1 leaves while Planhat may hold `true`: `false` must go out
    assert sync(cli).code == 0
    assert fake.company_value("c1", "enterprise_accounts") is False


def test_the_daemon_runs_account_level_keys_events_and_traits(
    project: Project, start_daemon: StartDaemon
) -> None:
    fake = project.planhat
    events = {"name": "Pro Plan", "send_as": "events", "query": "SELECT id AS user_id, email FROM users"}
    schedule = '\n[schedule]\nmin_interval = "1s"\nmax_interval = "1s"\n'
    project.write([ENTERPRISE, events], extra=ARR + schedule)
    project.source.set_users([{"id": "u1", "email": "u1@example.com"}])
    set_accounts(project, [("c1", "Acme", 250000)])
    start_daemon()
    deadline = time.monotonic() + 15
    while not (
        fake.company_value("c1", "enterprise_accounts") is True
        and fake.company_value("c1", "arr") == 250000
        and fake.events_of("u1")
    ):
        assert time.monotonic() < deadline, "the daemon did not deliver every kind of key"
        time.sleep(0.05)
    set_accounts(project, [("c1", "Acme", 260000.5)])
    while fake.company_value("c1", "arr") != 260000.5:
        assert time.monotonic() < deadline + 10, "the daemon did not send the changed value"
        time.sleep(0.05)
    assert fake.events_of("u1") == [("Audience Entered", {"audience_key": "pro_plan", "pro_plan": True})]


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_a_kill_after_planhat_took_a_companies_chunk_leaves_it_in_doubt(
    project: Project, cli: Cli, transport: str
) -> None:
    fake = project.planhat
    project.write([ENTERPRISE], transport=transport, extra=ARR)
    set_accounts(project, [("c1", "Acme", 250000)])
    sync_killed(project, 1)
    assert fake.company_value("c1", "arr") == 250000  # Planhat has it; the state database never heard
    assert sorted(query(project.state_url, "SELECT audience_key FROM in_flight")) == [
        ("arr",),
        ("enterprise_accounts",),
    ]

    set_accounts(project, [])  # c1 leaves both before the next run: Planhat must not keep them
    expire_leases(project.state_url)
    assert sync(cli).code == 0
    assert (
        fake.company_value("c1", "enterprise_accounts") is False and fake.company_value("c1", "arr") is None
    )
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    assert query(project.state_url, "SELECT count(*) FROM in_flight") == [(0,)]
