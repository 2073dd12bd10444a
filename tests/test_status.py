"""`audience-sync status`: what it shows and how it answers at hundreds of audiences.

"in Planhat" is the audience's baseline, the users Planhat was told are members. Counting a
million-row baseline per audience on every call made `status` slow, so each audience keeps its
count (`audiences.baseline_count`): a delivery clears it before its first acknowledgement and
recounts when it ends, and a count cleared is counted live. These tests hold that the number
shown is the baseline's, whatever happened to the delivery, on both state databases.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from tests.conftest import Cli, Project, expire_leases, query, status, sync_killed, users
from tests.test_in_doubt import sync

FAST = "batch_size = 5\nmax_requests_per_second = 150"


def kept_count(project: Project, key: str = "pro_plan") -> int | None:
    return query(project.state_url, f"SELECT baseline_count FROM audiences WHERE key = '{key}'")[0][0]


def in_planhat(cli: Cli) -> int:
    return int(status(cli)["baseline"])


def test_in_planhat_follows_every_delivery_and_is_kept(project: Project, cli: Cli) -> None:
    project.write(transport="endusers", planhat=FAST)
    project.source.set_users(users(range(1, 13), plan="pro"))
    assert sync(cli).code == 0
    assert (in_planhat(cli), kept_count(project)) == (12, 12)

    project.source.set_users(users(range(4, 15), plan="pro"))  # u1..u3 leave, u13 and u14 enter
    assert sync(cli).code == 0
    assert (in_planhat(cli), kept_count(project)) == (11, 11)
    assert query(project.state_url, "SELECT count(*) FROM baseline WHERE audience_key = 'pro_plan'") == [
        (11,)
    ]


def test_status_answers_from_the_kept_count_without_counting_the_baseline(project: Project, cli: Cli) -> None:
    """The count is what `status` shows: it does not walk the baseline (200 ms at a million
    rows on PostgreSQL, per call). Set by hand here to tell the two apart."""
    project.write(transport="endusers", planhat=FAST)
    project.source.set_users(users(range(1, 7), plan="pro"))
    assert sync(cli).code == 0
    engine = sa.create_engine(project.state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE audiences SET baseline_count = 1000000 WHERE key = 'pro_plan'")
    engine.dispose()
    assert in_planhat(cli) == 1_000_000
    assert "1000000" in cli("--config", "audience_sync.toml", "status").out


def test_a_killed_delivery_leaves_the_count_to_be_counted_live(project: Project, cli: Cli) -> None:
    """Killed after its first chunk was acknowledged and while the second was on the wire:
    `status` shows the users Planhat accepted, not the count from before the run."""
    project.write(transport="endusers", planhat=FAST)
    project.source.set_users(users(range(1, 4), plan="pro"))
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert kept_count(project) == 3

    project.source.set_users(users(range(1, 14), plan="pro"))  # ten enter: two chunks of five
    sync_killed(project, 2, ["pro_plan"])
    assert kept_count(project) is None
    assert in_planhat(cli) == 8  # 3 + the first chunk; the second is in doubt
    assert status(cli)["in_doubt"] == 5

    expire_leases(project.state_url)
    assert sync(cli, "--audience", "pro_plan").code == 0
    assert (in_planhat(cli), kept_count(project)) == (13, 13)


def test_status_prints_one_line_per_audience_that_greps(project: Project, cli: Cli) -> None:
    """Plain columns, one line per audience, however long its error: `status | grep KEY` works."""
    project.write(transport="endusers", planhat=FAST)
    project.source.set_users(users(range(1, 7), plan="pro"))
    assert sync(cli).code == 0
    engine = sa.create_engine(project.state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE runs SET error = 'first line\nsecond line of a long error' "
            "WHERE audience_key = 'pro_plan'"
        )
    engine.dispose()
    lines = cli("--config", "audience_sync.toml", "status").out.splitlines()
    header, rule, *rows = lines
    assert header.split()[:3] == ["audience", "members", "in"] and set(rule) == {"-", " "}
    pro = [row for row in rows if row.startswith("pro_plan ")]
    assert len(pro) == 1 and pro[0].endswith("first line second line of a long error")
    cells: list[Any] = pro[0].split()
    assert cells[1:5] == ["6", "6", "0", "0"]  # members, in Planhat, pending, in doubt
    assert len(rows) == len(query(project.state_url, "SELECT key FROM audiences"))


def test_a_reconcile_fix_with_nothing_to_send_shows_the_repaired_count(project: Project, cli: Cli) -> None:
    """u1 left the source and someone unticked it in Planhat by hand before the next run: the
    repair takes u1 out of the baseline and there is nothing left to send."""
    project.write(transport="endusers", planhat=FAST, extra="\n[reconcile]\nmax_requests_per_second = 150\n")
    project.source.set_users(users(range(1, 7), plan="pro"))
    assert sync(cli).code == 0
    project.source.set_users(users(range(2, 7), plan="pro"))
    project.planhat.set_value("u1", "pro_plan", False)
    writes = len(project.planhat.requests)
    assert cli("--config", "audience_sync.toml", "reconcile", "--fix", "--audience", "pro_plan").code == 0
    assert all(r.method == "GET" for r in project.planhat.requests[writes:])  # nothing sent
    assert (in_planhat(cli), kept_count(project)) == (5, 5)
