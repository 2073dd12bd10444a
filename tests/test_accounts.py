"""Account-level audiences and traits: Planhat companies, through PUT /companies (the API token)
on both transports. Planhat ignores group calls on /dock/segment (planhat/docs, "User
Tracking" > "3. Segment" > "Ignored Events"), so none is ever sent."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import httpx
import pytest

from tests.conftest import (
    TENANT_TOKEN,
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


def test_on_the_segment_transport_an_account_audience_lands_on_companies_through_put_companies(
    project: Project, cli: Cli
) -> None:
    fake = project.planhat
    project.write([ENTERPRISE])  # transport segment, with the API token
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 120000), ("c3", "Small", 10)])
    assert sync(cli).code == 0
    ((method, path, items),) = [(r.method, r.path, r.body) for r in fake.requests]
    assert (method, path) == ("PUT", "/companies")  # no group call, nothing on /dock/segment
    assert sorted((i["externalId"], i["custom"]["enterprise_accounts"]) for i in items) == [
        ("c1", True),
        ("c2", True),
    ]
    assert fake.company_value("c1", "enterprise_accounts") is True
    assert fake.companies["c1"]["name"] == "Acme" and fake.contacts == {} and fake.ignored == []

    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 90000)])
    fake.requests.clear()
    assert sync(cli).code == 0
    assert writes(project) == [
        ("/companies", [{"externalId": "c2", "custom": {"enterprise_accounts": False}}])
    ]
    assert fake.company_value("c2", "enterprise_accounts") is False


def test_a_group_call_would_have_been_ignored_by_planhat(project: Project) -> None:
    """What the old code sent: Planhat answers 200 and writes nothing (the fake does as
    documented), so a 200 there was never a delivery."""
    answer = httpx.post(
        f"{project.planhat.url}/dock/segment",
        auth=(TENANT_TOKEN, ""),
        json={"type": "group", "groupId": "c1", "traits": {"enterprise_accounts": True}},
    )
    assert answer.status_code == 200
    assert project.planhat.companies == {} and project.planhat.ignored == [
        {"type": "group", "reason": "not of type identify or track"}
    ]


@pytest.mark.parametrize("kind", ["audiences", "traits"])
def test_an_account_level_key_on_segment_without_the_api_token_is_refused_in_one_line(
    project: Project, cli: Cli, kind: str
) -> None:
    body = (
        ENTERPRISE
        if kind == "audiences"
        else {**ENTERPRISE, "query": "SELECT company_id, arr AS value FROM accounts"}
    )
    project.write([], planhat="api_token = \"\"", extra=f"[[{kind}]]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in {**body, "source": "app"}.items()
    ))  # fmt: skip
    set_accounts(project, [("c1", "Acme", 250000)])
    for args in (("sync",), ("check",), ("run",)):
        result = cli("--config", "audience_sync.toml", *args)
        lines = result.err.strip().splitlines()
        assert result.code == 1 and "Traceback" not in result.err, args
        message = lines[-1] if args != ("check",) else result.out
        assert f"{kind}[0].level" in message and "planhat.api_token (or PLANHAT_API_TOKEN)" in message
        assert "Planhat ignores group calls on /dock/segment" in message and "PUT /companies" in message
    assert project.planhat.requests == []
    # With the token (here from the environment) the same config loads.
    from audience_sync.config import load_settings

    settings = load_settings(project.path, {"PLANHAT_API_TOKEN": "x"})
    assert settings.audiences[0].level == "account"


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
    fake.add_contact("c1", "c1@example.com")  # a contact Planhat has: the query sends no company
    assert sync(cli).code == 0
    sent = sorted((path, b["type"] if path == "/dock/segment" else len(b)) for path, b in writes(project))
    assert sent == [("/companies", 1), ("/dock/segment", "identify")]
    assert fake.value("c1", "pro_plan") is True and fake.value("c1", "enterprise_accounts") is None
    assert (
        fake.company_value("c1", "enterprise_accounts") is True
        and fake.company_value("c1", "pro_plan") is None
    )


def test_account_level_history_status_dry_run_and_guard(project: Project, cli: Cli) -> None:
    project.write([ENTERPRISE], extra="[safety]\nmin_members = 2\n")
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 250000), (None, "No id", 250000)])
    dry = sync(cli, "--dry-run")
    assert dry.code == 0 and '"externalId": "c1"' in dry.out and '"type"' not in dry.out
    assert project.planhat.requests == []
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
    # Planhat writes the held `true` before c1 leaves (a write still held when the next run's
    # `false` lands would overwrite it: reconcile's case, not this test's).
    assert fake.wait_idle()
    assert query(project.state_url, "SELECT in_doubt FROM pending") in ([(True,)], [(1,)])
    set_accounts(project, [])  # c1 leaves while Planhat may hold `true`: `false` must go out
    assert sync(cli).code == 0
    assert fake.company_value("c1", "enterprise_accounts") is False


def test_the_daemon_runs_account_level_keys_events_and_traits(
    project: Project, start_daemon: StartDaemon
) -> None:
    fake = project.planhat
    events = {
        "name": "Pro Plan",
        "send_as": "events",
        "query": "SELECT id AS user_id, email, company_id FROM users",
    }
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
    # The companies went through PUT /companies with the API token; no group call was sent.
    assert {(r.method, r.path) for r in fake.requests} == {("PUT", "/companies"), ("POST", "/dock/segment")}
    assert {r.body["type"] for r in fake.requests if r.path == "/dock/segment"} == {"track"}
    assert fake.ignored == [] and fake.unassigned == []


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


@pytest.mark.parametrize("transport", ["segment", "endusers"])
def test_reconcile_reads_companies_back_and_repairs_them(project: Project, cli: Cli, transport: str) -> None:
    fake = project.planhat
    reads = "\n[reconcile]\nmax_requests_per_second = 150\n"
    project.write([ENTERPRISE], transport=transport, extra=ARR + reads)
    set_accounts(project, [("c1", "Acme", 250000), ("c2", "Globex", 300000), ("c3", "Small", 10)])
    assert sync(cli).code == 0
    result = cli("--config", "audience_sync.toml", "reconcile", "--json")
    assert result.code == 0, result.out
    reports = {r["key"]: r for r in json.loads(result.out)}
    assert reports["enterprise_accounts"]["status"] == "agree" and reports["arr"]["status"] == "agree"
    assert (
        reports["enterprise_accounts"]["contacts"] == 3
        and reports["enterprise_accounts"]["level"] == "account"
    )

    fake.companies["c1"]["custom"]["enterprise_accounts"] = False  # unticked by hand
    fake.companies["c3"]["custom"]["enterprise_accounts"] = True  # ticked by hand
    fake.companies["c2"]["custom"]["arr"] = 1  # overwritten by an import
    fake.companies.pop("c2")  # ... then the company was deleted
    plain = cli("--config", "audience_sync.toml", "reconcile")
    assert plain.code == 1 and "Planhat read back: 2 companies" in plain.out
    assert "enterprise_accounts: missing company, e.g. c2" in plain.out and "likely cause" not in plain.out
    reports = {
        r["key"]: r for r in json.loads(cli("--config", "audience_sync.toml", "reconcile", "--json").out)
    }
    drift = reports["enterprise_accounts"]
    assert (drift["missing_true"], drift["unexpected_true"], drift["missing_contact"]) == (1, 1, 1)
    assert reports["arr"]["missing_contact"] == 1

    fixed = cli("--config", "audience_sync.toml", "reconcile", "--fix")
    assert fixed.code == 0, fixed.out + fixed.err
    assert [fake.company_value(c, "enterprise_accounts") for c in ("c1", "c2", "c3")] == [True, True, False]
    assert fake.company_value("c2", "arr") == 300000
    assert cli("--config", "audience_sync.toml", "reconcile").code == 0
