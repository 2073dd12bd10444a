"""Acknowledging on PostgreSQL: a chunk applied while it is on the wire, and found by its span.

A chunk of PREPARE_FROM rows or more is applied (as if Planhat accepted all of it) in a
transaction left open while it is sent; the answer commits it, or rolls it back and applies
what really happened. The acknowledgement finds the chunk's outbox rows by their user range
and checks their count. These tests lower PREPARE_FROM so that small chunks take that path,
and check that nothing about the outcome changes: what Planhat refused stays pending, a kill
on the wire leaves the chunk in doubt and nothing applied, and an outbox row that is not the
chunk's is never acknowledged with it.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from audience_sync.config import PlanhatSettings, load_settings
from audience_sync.state import database, outbox
from audience_sync.sync import delivery
from audience_sync.sync import run as sync_run
from tests.conftest import (
    BUYERS_QUERY,
    POSTGRES,
    PRO_QUERY,
    Cli,
    CliResult,
    Project,
    SenderAround,
    expire_leases,
    query,
    run,
    sync,
    sync_killed,
    users,
)

BULK = "batch_size = 5\nmax_requests_per_second = 150"


def sync_pro_plan(cli: Cli, *args: str) -> CliResult:
    return sync(cli, "--audience", "pro_plan", *args)


@pytest.fixture(autouse=True)
def prepare_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "PREPARE_FROM", 1)


def counts(url: str) -> tuple[int, int, int, int]:
    """(baseline, pending, in_flight, delivered changes) of pro_plan."""
    (row,) = query(
        url,
        "SELECT (SELECT count(*) FROM baseline WHERE audience_key = 'pro_plan'), "
        "(SELECT count(*) FROM pending WHERE audience_key = 'pro_plan'), "
        "(SELECT count(*) FROM in_flight), "
        "(SELECT count(*) FROM changes WHERE audience_key = 'pro_plan' AND outcome = 'delivered')",
    )
    return row


@pytest.mark.parametrize("transport", ["endusers", "segment"])
def test_chunks_acknowledged_while_on_the_wire_add_up(project: Project, cli: Cli, transport: str) -> None:
    project.write(transport=transport, planhat=BULK)
    project.source.set_users(users(range(1, 24), plan="pro"))
    assert sync_pro_plan(cli).code == 0
    assert counts(project.state_url) == (23, 0, 0, 23)
    project.source.set_users(users(range(3, 30), plan="pro"))  # u1, u2 leave; u24..u29 enter
    assert sync_pro_plan(cli).code == 0
    assert counts(project.state_url) == (27, 0, 0, 23 + 8)
    assert all(project.planhat.value(f"u{n}", "pro_plan") is True for n in range(3, 30))
    assert project.planhat.value("u1", "pro_plan") is False
    runs = query(project.state_url, "SELECT sent, failed, pending, status FROM runs ORDER BY id")
    assert runs == [(23, 0, 0, "success"), (8, 0, 0, "success")]


def test_a_refused_item_rolls_the_prepared_chunk_back_and_stays_pending(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 13), plan="pro"))
    project.planhat.partial_fail(["u7"])
    assert sync_pro_plan(cli).code != 0
    assert counts(project.state_url) == (11, 1, 0, 11)
    assert query(project.state_url, "SELECT user_ref, in_doubt FROM pending") == [("u7", False)]
    project.planhat.clear_faults()
    assert sync_pro_plan(cli).code == 0
    assert counts(project.state_url) == (12, 0, 0, 12)


def test_a_kill_while_the_chunk_is_on_the_wire_applies_nothing_of_it(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 13), plan="pro"))
    sync_killed(project, 2, ["pro_plan"])
    # Planhat has ten; the state database acknowledged the first chunk only, and the second
    # chunk's prepared acknowledgement went with the process.
    assert sum(project.planhat.value(f"u{n}", "pro_plan") is True for n in range(1, 13)) == 10
    assert counts(project.state_url) == (5, 7, 1, 5)
    project.source.set_users(users(range(1, 7), plan="pro"))  # u7..u12 leave
    expire_leases(project.state_url)
    assert sync_pro_plan(cli).code == 0
    # Chunk 2 (u3..u7) was settled in doubt: u3..u6 true again, u7 false; u10..u12 exit.
    assert counts(project.state_url) == (6, 0, 0, 5 + 4 + 1 + 3)
    assert all(project.planhat.value(f"u{n}", "pro_plan") is True for n in range(1, 7))
    assert not any(project.planhat.value(f"u{n}", "pro_plan") for n in range(7, 13))


def test_an_outbox_row_slipped_into_a_chunks_range_is_not_acknowledged_with_it(
    project: Project,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The acknowledgement deletes the outbox rows of the chunk's user range: a row that is
    not the chunk's (which the lease should make impossible) must stay pending, unsent."""
    monkeypatch.setattr(delivery, "PREPARE_FROM", 10**9)  # acknowledged after the answer
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users([1, 3, 5, 7], plan="pro"))
    url = project.state_url

    class Intruder(SenderAround):
        def send(self, contacts: Any) -> Any:  # another writer, between the page and the ack
            query(
                url,
                "INSERT INTO pending (audience_key, user_ref, value, user_id, queued_at, attempts, in_doubt) "
                "VALUES ('pro_plan', 'u4', TRUE, 'u4', '2026-01-01 00:00:00', 0, FALSE)",
            )
            return super().send(contacts)

    def intruder(settings: PlanhatSettings) -> Intruder:
        return Intruder(settings)

    settings = load_settings(project.path)
    engine = database.open_state(url)
    try:
        (report,) = sync_run.sync(settings, engine, ["pro_plan"], sender_factory=intruder)
    finally:
        engine.dispose()
    assert report.sent == 4
    assert project.planhat.value("u4", "pro_plan") is None  # never sent
    assert query(url, "SELECT user_ref FROM pending") == [("u4",)]
    assert query(url, "SELECT user_ref FROM baseline ORDER BY user_ref") == [
        ("u1",),
        ("u3",),
        ("u5",),
        ("u7",),
    ]


@pytest.mark.parametrize("transport", ["endusers", "segment"])
def test_trait_values_acknowledged_on_the_wire_keep_their_value(
    project: Project, cli: Cli, transport: str
) -> None:
    """The baseline of a computed trait holds the value Planhat accepted, whichever path
    acknowledged it, so an unchanged value is not sent again and a changed one is."""
    from tests.test_traits import KEY, TRAIT, set_scores

    project.write([], transport=transport, extra=TRAIT, planhat=BULK)
    set_scores(project, [(f"u{n}", n * 10) for n in range(1, 13)])
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    baseline = query(
        project.state_url, f"SELECT user_ref, value_json FROM baseline WHERE audience_key = '{KEY}'"
    )
    assert sorted(baseline) == sorted((f"u{n}", str(n * 10)) for n in range(1, 13))
    changes = query(project.state_url, "SELECT count(*) FROM changes WHERE value_json IS NOT NULL")
    assert changes == [(12,)]

    set_scores(project, [(f"u{n}", n * 10 + (n == 3)) for n in range(1, 12)])  # u3 changes, u12 leaves
    writes = len(project.planhat.requests)
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    sent = [r for r in project.planhat.requests[writes:] if r.method != "GET"]
    items = [i for r in sent for i in (r.body if isinstance(r.body, list) else [r.body])]
    assert len(items) == 2  # only u3's new value and u12's null
    assert project.planhat.contact("u3")["custom"][KEY] == 31


@pytest.mark.parametrize("prepare_from", [1, 10**9], ids=["on-the-wire", "after-the-answer"])
def test_a_chunk_across_audiences_counts_each_change_in_its_own_run(
    project: Project, cli: Cli, monkeypatch: pytest.MonkeyPatch, prepare_from: int
) -> None:
    """A group run's chunks carry many audiences' rows: each change is logged under its own
    audience's run, and each run counts what it sent, whichever path acknowledged the chunk."""
    monkeypatch.setattr(delivery, "PREPARE_FROM", prepare_from)
    audiences = [
        {"name": "Pro Plan", "query": PRO_QUERY},
        {"name": "Buyers", "query": BUYERS_QUERY},
        {"name": "Everyone", "query": "SELECT id AS user_id, email, company_id FROM users"},
    ]
    project.write(audiences, transport="endusers", planhat=BULK)
    project.source.set_users([*users(range(1, 9), plan="pro", orders=1), *users(range(9, 14), plan="free")])
    assert cli("--config", "audience_sync.toml", "sync").code == 0
    runs = query(project.state_url, "SELECT audience_key, sent, status FROM runs ORDER BY audience_key")
    assert runs == [("buyers", 8, "success"), ("everyone", 13, "success"), ("pro_plan", 8, "success")]
    logged = query(
        project.state_url,
        "SELECT c.audience_key, r.audience_key, count(*) FROM changes c JOIN runs r ON r.id = c.run_id "
        "GROUP BY c.audience_key, r.audience_key ORDER BY c.audience_key",
    )
    assert logged == [("buyers", "buyers", 8), ("everyone", "everyone", 13), ("pro_plan", "pro_plan", 8)]


# --- after a large delivery, PostgreSQL's outbox gives back the deleted rows' space -----------


@pytest.fixture
def reclaim_small_deliveries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "RECLAIM_FROM", 10)


def sync_logged(cli: Cli) -> CliResult:
    return run(cli, "--log-level", "info", "sync", "--audience", "pro_plan")


@pytest.mark.parametrize("state_url", [POSTGRES], indirect=True)
@pytest.mark.usefixtures("reclaim_small_deliveries")
def test_an_outbox_emptied_by_a_large_delivery_is_truncated(project: Project, cli: Cli) -> None:
    """The deleted rows of a full sync are gone before the next run walks them (autovacuum is
    off on the test server, as it may be on a user's); the next runs deliver as before."""
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 24), plan="pro"))
    result = sync_logged(cli)
    assert result.code == 0
    assert "outbox truncated after the delivery" in result.err
    assert query(project.state_url, "SELECT pg_relation_size('pending')") == [(0,)]
    project.source.set_users(users(range(3, 30), plan="pro"))
    assert "outbox" not in sync_logged(cli).err  # 8 changes: below the threshold
    assert counts(project.state_url) == (27, 0, 0, 23 + 8)
    assert project.planhat.value("u1", "pro_plan") is False


@pytest.mark.parametrize("state_url", [POSTGRES], indirect=True)
@pytest.mark.usefixtures("reclaim_small_deliveries")
def test_an_outbox_still_holding_rows_is_vacuumed_not_truncated(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 24), plan="pro"))
    project.planhat.partial_fail(["u7"])
    result = sync_logged(cli)
    assert result.code != 0
    assert "outbox vacuumed after the delivery" in result.err
    assert query(project.state_url, "SELECT user_ref, in_doubt FROM pending") == [("u7", False)]
    project.planhat.clear_faults()
    assert sync_pro_plan(cli).code == 0
    assert counts(project.state_url) == (23, 0, 0, 23)


@pytest.mark.parametrize("state_url", [POSTGRES], indirect=True)
@pytest.mark.usefixtures("reclaim_small_deliveries")
def test_a_reader_of_the_outbox_never_holds_up_the_end_of_a_delivery(project: Project, cli: Cli) -> None:
    """Truncating needs the outbox to itself: a reader in an open transaction (the status
    page, psql) makes the delivery vacuum instead, without waiting for it."""
    project.write(transport="endusers", planhat=BULK)
    project.source.set_users(users(range(1, 24), plan="pro"))
    database.open_state(project.state_url).dispose()  # the schema, as `db upgrade` makes it
    reader = sa.create_engine(project.state_url)
    try:
        with reader.connect() as connection:
            connection.exec_driver_sql("SELECT count(*) FROM pending").scalar_one()  # transaction open
            result = sync_logged(cli)
            assert connection.exec_driver_sql("SELECT count(*) FROM pending").scalar_one() == 0
    finally:
        reader.dispose()
    assert result.code == 0
    assert "outbox vacuumed after the delivery" in result.err
    assert counts(project.state_url) == (23, 0, 0, 23)
