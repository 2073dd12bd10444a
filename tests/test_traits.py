"""Computed traits end to end: CLI and daemon -> source -> state database -> loopback Planhat.

A trait's query returns a user's identifier and a `value`; Planhat is told a value only when
it changed, `null` when the user left the query (or nothing, with on_exit = "keep").
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from audience_sync.snapshot.values import MAX_TEXT, UnusableValue, canonical
from tests.conftest import Cli, Project, StartDaemon, query, sync, users, wait_for

TRANSPORTS = ["segment", "endusers"]
REVENUE = "SELECT id AS user_id, email, 'acme' AS company_id, value FROM scores"
TRAIT = f'[[traits]]\nname = "Total Revenue 180 Days"\nsource = "app"\nquery = "{REVENUE}"\n'
KEY = "total_revenue_180_days"


def set_scores(project: Project, rows: list[tuple[str | None, Any]]) -> None:
    """The source's `scores` table: (user id, value) pairs; the email is derived from the id."""
    with sqlite3.connect(project.source.path) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS scores (id TEXT, email TEXT, value)")
        connection.execute("DELETE FROM scores")
        connection.executemany(
            "INSERT INTO scores VALUES (?, ?, ?)",
            [(u, f"{u}@example.com" if u else None, v) for u, v in rows],
        )
    connection.close()


def write(
    project: Project, transport: str = "segment", trait: str = TRAIT, audiences: Any = None, **kw: Any
) -> None:
    project.write(audiences if audiences is not None else [], transport=transport, extra=trait, **kw)


def runs(cli: Cli, key: str = KEY) -> list[dict[str, Any]]:
    return json.loads(cli("--config", "audience_sync.toml", "history", "--json", "--audience", key).out)


def sent_values(project: Project) -> dict[str, Any]:
    """ref -> value of the trait in every write the fake received (segment or bulk)."""
    sent: dict[str, Any] = {}
    for request in project.planhat.requests:
        body = request.body
        if request.path == "/dock/segment" and body.get("type") == "identify":
            sent[body.get("userId") or body["traits"]["email"]] = body["traits"].get(KEY, "absent")
        elif request.path == "/endusers" and request.method == "PUT":
            for item in body:
                sent[item.get("externalId") or item["email"]] = item["custom"].get(KEY, "absent")
    return sent


# --- normalisation ----------------------------------------------------------------------------


def test_values_are_normalised_so_equal_values_compare_equal() -> None:
    assert canonical(1) == canonical(1.0) == canonical(Decimal("1.00")) == "1"
    assert canonical(450.5) == canonical(Decimal("450.50")) == "450.5"
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 23, 11, 0, tzinfo=paris)
    assert canonical(moment) == canonical(moment.astimezone(UTC)) == '"2026-11-23T10:00:00Z"'
    assert canonical(datetime(2026, 11, 23, 10, 0)) == '"2026-11-23T10:00:00Z"'  # naive: UTC
    assert canonical(date(2026, 11, 23)) == '"2026-11-23"'
    assert canonical(True) == "true" and canonical("pro") == '"pro"'
    assert canonical(["a", "b"]) == canonical(("a", "b")) == '["a","b"]'
    assert canonical(None) is None


@pytest.mark.parametrize(
    "value", [b"\x00blob", {"nested": 1}, "x" * (MAX_TEXT + 1), [1, 2], float("nan"), Decimal("Infinity")]
)
def test_values_a_trait_cannot_carry_are_refused(value: Any) -> None:
    with pytest.raises(UnusableValue):
        canonical(value)


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_trait_sends_its_values_then_only_changes_and_null_on_exit(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    write(project, transport)
    set_scores(project, [("u1", 450.0), ("u2", 10), ("u3", "gold"), ("u4", 1)])
    first = sync(cli)
    assert first.code == 0, first.err
    assert [fake.value(f"u{n}", KEY) for n in range(1, 5)] == [450, 10, "gold", 1]

    # u1 changes, u2 leaves, u3 is unchanged, u4's 1 comes back as 1.0 (another driver's
    # spelling of the same number): only u1 and u2 go out.
    set_scores(project, [("u1", 500.25), ("u3", "gold"), ("u4", 1.0)])
    fake.requests.clear()
    second = sync(cli)
    assert second.code == 0, second.err
    assert sent_values(project) == {"u1": 500.25, "u2": None}
    assert fake.value("u1", KEY) == 500.25
    assert fake.value("u2", KEY) is None and KEY not in fake.contact("u2")["custom"]  # cleared
    assert [(r["kind"], r["entered"], r["exited"], r["sent"]) for r in runs(cli)] == [
        ("incremental", 1, 1, 2),
        ("full", 4, 0, 4),
    ]
    history = query(
        project.state_url,
        f"SELECT user_ref, value_json, outcome FROM changes WHERE audience_key = '{KEY}' "
        "ORDER BY id DESC LIMIT 2",
    )
    assert sorted(history) == [("u1", "500.25", "delivered"), ("u2", "null", "delivered")]

    fake.requests.clear()
    assert sync(cli).code == 0
    assert fake.requests == []  # nothing changed, nothing sent


def test_the_identify_is_engage_shaped_and_carries_audiences_and_traits_together(
    project: Project,
    cli: Cli,
) -> None:
    write(
        project,
        audiences=[{"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users"}],
    )
    project.source.set_users(users([1]))
    set_scores(project, [("u1", 450.0)])
    assert sync(cli).code == 0
    (request,) = project.planhat.requests
    assert request.body["traits"] == {
        KEY: 450,
        "pro_plan": True,
        "email": "u1@example.com",
        "companyId": "acme",
    }
    assert request.body["context"]["personas"]["computation_class"] == "audience"

    set_scores(project, [("u1", 451.5)])
    project.planhat.requests.clear()
    assert sync(cli).code == 0
    (request,) = project.planhat.requests
    assert request.body["traits"] == {KEY: 451.5, "email": "u1@example.com", "companyId": "acme"}
    personas = request.body["context"]["personas"]
    assert personas["computation_class"] == "trait" and personas["computation_key"] == KEY


def test_a_users_trait_and_audience_are_one_bulk_item(project: Project, cli: Cli) -> None:
    write(
        project,
        "endusers",
        audiences=[{"name": "Pro Plan", "query": "SELECT id AS user_id, email, company_id FROM users"}],
    )
    project.source.set_users(users([1, 2]))
    set_scores(project, [("u1", "gold"), ("u2", "silver")])
    assert sync(cli).code == 0
    (request,) = project.planhat.requests
    assert sorted((i["externalId"], i["custom"][KEY], i["custom"]["pro_plan"]) for i in request.body) == [
        ("u1", "gold", True),
        ("u2", "silver", True),
    ]


def test_unusable_values_are_skipped_and_counted_with_samples(project: Project, cli: Cli) -> None:
    write(project)
    set_scores(project, [("u1", 5), ("u2", b"\x00\x01"), ("u3", "x" * (MAX_TEXT + 5)), ("u4", None)])
    result = sync(cli)
    assert result.code == 0, result.err
    run = runs(cli)[0]
    assert (run["members"], run["skipped"], run["sent"]) == (1, 2, 1)  # u4: no value, not skipped
    assert "unusable value for 'u2': binary data" in result.err
    assert "unusable value for 'u3': text of 1029 characters (at most 1024)" in result.err
    assert project.planhat.find("u2") is None and project.planhat.find("u4") is None


def test_a_query_without_a_value_column_is_one_line(project: Project, cli: Cli) -> None:
    write(project, trait=TRAIT.replace(", value FROM", " FROM"))
    set_scores(project, [("u1", 5)])
    result = sync(cli)
    assert result.code != 0
    assert "must return a value column" in result.err and "Traceback" not in result.err


def test_on_exit_keep_leaves_the_last_value(project: Project, cli: Cli) -> None:
    write(project, trait=TRAIT + 'on_exit = "keep"\n')
    set_scores(project, [("u1", 5), ("u2", 6)])
    assert sync(cli).code == 0
    set_scores(project, [("u1", 5)])  # u2 leaves: Planhat keeps 6
    project.planhat.requests.clear()
    assert sync(cli).code == 0
    assert project.planhat.requests == [] and project.planhat.value("u2", KEY) == 6
    set_scores(project, [("u1", 5), ("u2", 6)])  # back with the value Planhat holds: nothing
    assert sync(cli).code == 0 and project.planhat.requests == []
    set_scores(project, [("u1", 5), ("u2", 7)])
    assert sync(cli).code == 0 and sent_values(project) == {"u2": 7}


def test_the_mass_exit_guard_covers_traits(project: Project, cli: Cli) -> None:
    write(project, trait=TRAIT + "\n[safety]\nmin_members = 2\n")
    set_scores(project, [(f"u{n}", n) for n in range(1, 5)])
    assert sync(cli).code == 0
    set_scores(project, [])  # a broken query: would null every contact
    project.planhat.requests.clear()
    blocked = sync(cli)
    assert blocked.code != 0 and "mass-exit guard" in blocked.err
    assert project.planhat.requests == [] and project.planhat.value("u1", KEY) == 1
    assert sync(cli, "--force").code == 0
    assert all(project.planhat.value(f"u{n}", KEY) is None for n in range(1, 5))


def test_dry_run_resync_and_status_cover_traits(project: Project, cli: Cli) -> None:
    write(project)
    set_scores(project, [("u1", 5), ("u2", 6)])
    dry = sync(cli, "--dry-run")
    assert dry.code == 0, dry.err
    assert f'"{KEY}": 5' in dry.out and '"computation_class": "trait"' in dry.out
    assert project.planhat.requests == [] and runs(cli) == []

    assert sync(cli).code == 0
    set_scores(project, [("u1", 5)])
    resync = cli("--config", "audience_sync.toml", "resync", "--audience", KEY, "--now")
    assert resync.code == 0, resync.err
    assert sent_values(project) == {"u1": 5, "u2": None}
    assert runs(cli)[0]["kind"] == "full"
    assert len(project.planhat.requests) == 4  # two full runs of two users

    status = json.loads(cli("--config", "audience_sync.toml", "status", "--json").out)
    (entry,) = [e for e in status if e["key"] == KEY]
    assert entry["pending"] == 0 and entry["last_run"]["status"] == "success"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_value_in_doubt_is_resent_when_the_truth_comes_back_to_the_baseline(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    write(project, transport, planhat="max_requests_per_second = 150")
    set_scores(project, [("u1", 5)])
    assert sync(cli).code == 0
    set_scores(project, [("u1", 6)])
    fake.delay_next(1, 1.0)  # Planhat writes 6 after the client gave up: in doubt
    with project.one_shot():
        assert sync(cli).code != 0
    assert runs(cli)[0]["in_doubt"] == 1
    wait_for(lambda: fake.value("u1", KEY) == 6, what="6 landing")
    set_scores(project, [("u1", 5)])  # back to what the baseline says: still sent
    assert sync(cli).code == 0
    assert fake.value("u1", KEY) == 5
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
    assert query(project.state_url, f"SELECT value_json FROM baseline WHERE audience_key = '{KEY}'") == [
        ("5",)
    ]


def test_keys_are_unique_across_audiences_and_traits(project: Project, cli: Cli) -> None:
    write(
        project,
        audiences=[
            {"name": "Total Revenue 180 Days", "query": "SELECT id AS user_id, company_id FROM users"}
        ],
    )
    result = sync(cli)
    assert result.code != 0
    assert "traits[0].key" in result.err and "already the key of audience" in result.err


def test_the_daemon_syncs_a_trait(project: Project, start_daemon: StartDaemon) -> None:
    write(project, trait=TRAIT + '\n[schedule]\nmin_interval = "1s"\nmax_interval = "1s"\n')
    set_scores(project, [("u1", 5)])
    start_daemon()
    deadline = time.monotonic() + 10
    while project.planhat.value("u1", KEY) != 5:
        assert time.monotonic() < deadline, "the daemon did not send the trait"
        time.sleep(0.05)
    set_scores(project, [("u1", 7)])
    while project.planhat.value("u1", KEY) != 7:
        assert time.monotonic() < deadline + 10, "the daemon did not send the change"
        time.sleep(0.05)


def test_reconcile_finds_and_repairs_a_traits_drift(project: Project, cli: Cli) -> None:
    fake = project.planhat
    write(project, "endusers", trait=TRAIT + "\n[reconcile]\nmax_requests_per_second = 150\n",
          planhat="max_requests_per_second = 150")  # fmt: skip
    set_scores(project, [("u1", 5), ("u2", 6.5), ("u3", "gold")])
    assert sync(cli).code == 0
    reconciled = cli("--config", "audience_sync.toml", "reconcile", "--json")
    assert reconciled.code == 0, reconciled.out + reconciled.err
    assert json.loads(reconciled.out)[0]["agree"] == 3

    fake.set_value("u1", KEY, 50)  # edited by hand
    fake.set_value("u2", KEY, None)  # dropped by an import
    fake.add_contact("u9", "u9@example.com", {KEY: 1})  # a value Planhat was never told
    reconciled = cli("--config", "audience_sync.toml", "reconcile", "--json")
    assert reconciled.code == 1
    (report,) = json.loads(reconciled.out)
    counts = (report["unexpected_true"], report["missing_true"], report["missing_contact"])
    assert counts == (1, 2, 0) and report["samples"]["missing_true"] == ["u1", "u2"]

    fixed = cli("--config", "audience_sync.toml", "reconcile", "--fix", "--json")
    assert fixed.code == 0, fixed.out + fixed.err
    assert [fake.value(u, KEY) for u in ("u1", "u2", "u3", "u9")] == [5, 6.5, "gold", None]
    assert (
        json.loads(cli("--config", "audience_sync.toml", "reconcile", "--json").out)[0]["status"] == "agree"
    )


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ('on_exit = "forget"', "traits[0].on_exit"),
        ('level = "team"', "traits[0].level"),
        ('level = "account"\nsend_as = "events"', "traits[0].send_as"),
    ],
)
def test_a_bad_trait_setting_is_one_line_naming_it(
    project: Project, cli: Cli, entry: str, where: str
) -> None:
    write(project, trait=TRAIT + entry + "\n")
    result = sync(cli)
    assert result.code != 0
    assert where in result.err and len(result.err.strip().splitlines()) == 1


def test_the_example_config_documents_traits_and_account_level() -> None:
    from pathlib import Path

    from audience_sync.config import load_settings

    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    settings = load_settings(example, {"PLANHAT_API_TOKEN": "api-token"})
    kinds = {(a.key, a.kind, a.level) for a in settings.audiences}
    assert ("total_revenue_180_days", "trait", "user") in kinds
    assert ("enterprise_accounts", "audience", "account") in kinds
