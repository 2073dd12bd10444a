"""Sources with `planner_schema`: the snapshot is kept and diffed in the warehouse, and only the
changes travel. Warehouses on PostgreSQL (a database of its own, not the state database's) and
DuckDB (a file); state on SQLite and PostgreSQL; Planhat the loopback fake."""

from __future__ import annotations

import gc
import hashlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa

from audience_sync.state import baseline
from tests.conftest import (
    POSTGRES_URL,
    Cli,
    FakePlanhat,
    Project,
    SourceDB,
    finished,
    last_run,
    query,
    require_postgres,
    run,
    schedule,
    sync,
    wait_for,
)

PLANNER = "audience_sync_planner"


class Warehouse:
    """A source database with a `users` table (in a schema of its own) the tests rewrite."""

    def __init__(self, url: str, schema: str | None) -> None:
        self.url = url
        self.schema = schema
        self.users = f"{schema}.users" if schema else "users"
        self.engine = sa.create_engine(url)
        with self.engine.begin() as connection:
            if schema:
                connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
            connection.exec_driver_sql(
                f"CREATE TABLE {self.users} (id VARCHAR, email VARCHAR, name VARCHAR, title VARCHAR, "
                "company_id VARCHAR, plan VARCHAR, orders INTEGER)"
            )
        self.engine.dispose()

    @property
    def pro_query(self) -> str:
        return f"SELECT id AS user_id, email, name, title, company_id FROM {self.users} WHERE plan = 'pro'"

    @property
    def orders_query(self) -> str:
        return f"SELECT id AS user_id, email, orders AS value FROM {self.users} WHERE orders > 0"

    def set_users(self, rows: list[dict[str, Any]]) -> None:
        base = {"id": None, "email": None, "name": None, "title": None, "company_id": None, "plan": "pro",
                "orders": 0}  # fmt: skip
        with self.engine.begin() as connection:
            connection.exec_driver_sql(f"DELETE FROM {self.users}")
            if rows:
                connection.execute(
                    sa.text(
                        f"INSERT INTO {self.users} VALUES "
                        "(:id, :email, :name, :title, :company_id, :plan, :orders)"
                    ),
                    [{**base, **row} for row in rows],
                )
        self.engine.dispose()

    def planner_tables(self, schema: str = PLANNER) -> list[str]:
        try:
            with self.engine.connect() as connection:
                return sorted(sa.inspect(connection).get_table_names(schema=schema))
        finally:
            self.engine.dispose()


@pytest.fixture(scope="module")
def warehouse_database() -> Iterator[str]:
    """A PostgreSQL database of its own for the warehouse tests, dropped afterwards."""
    require_postgres()
    name = f"audience_sync_wh_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(params=["postgresql", "duckdb"])
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    if request.param == "duckdb":
        pytest.importorskip("duckdb_engine")
        yield Warehouse(f"duckdb:///{tmp_path / 'warehouse.duckdb'}", None)
        return
    yield request.getfixturevalue("pg_warehouse")  # dropped by that fixture's teardown


@pytest.fixture
def pg_warehouse(warehouse_database: str) -> Iterator[Warehouse]:
    source_schema = f"src_{uuid.uuid4().hex[:8]}"
    house = Warehouse(warehouse_database, source_schema)
    yield house
    with house.engine.begin() as connection:
        connection.exec_driver_sql(f"DROP SCHEMA {source_schema} CASCADE")
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PLANNER} CASCADE")
    house.engine.dispose()


def planned_project(
    project: Project, house: Warehouse, *, planner: bool = True, traits: bool = False
) -> Project:
    """The project's config on the warehouse: `pro_plan` (and the `orders` trait)."""
    project.source = cast(SourceDB, house)
    audiences = [{"name": "Pro Plan", "query": house.pro_query}]
    extra = ""
    if traits:
        extra = f'\n[[traits]]\nname = "Orders"\nsource = "app"\nquery = "{house.orders_query}"\n'
    project.write(
        audiences,
        transport="endusers",
        planhat="max_requests_per_second = 150",
        source=f'planner_schema = "{PLANNER}"' if planner else "",
        extra=extra,
    )
    return project


def people(ids: range | list[int], **extra: Any) -> list[dict[str, Any]]:
    """Users under a company (Planhat creates a contact only under one)."""
    return [{"id": f"u{n}", "email": f"u{n}@example.com", "company_id": "c1", **extra} for n in ids]


def snapshot_refs(house: Warehouse, generation: int, key: str = "pro_plan") -> list[str]:
    """The identifiers of the rows of the audience's snapshot in the warehouse, sorted."""
    with house.engine.connect() as connection:
        rows = connection.exec_driver_sql(
            f"SELECT planner_ref FROM {PLANNER}.as_snap_{key}_{generation} ORDER BY planner_ref"
        ).all()
    house.engine.dispose()
    return [ref for (ref,) in rows]


def truth(fake: FakePlanhat, refs: range, key: str = "pro_plan") -> dict[str, Any]:
    return {f"u{n}": fake.value(f"u{n}", key) for n in refs}


def test_a_planner_source_sends_the_members_then_only_the_changes(
    project: Project, cli: Cli, warehouse: Warehouse
) -> None:
    planned_project(project, warehouse, traits=True)
    fake = project.planhat
    warehouse.set_users(people(range(1, 21), orders=1))
    result = sync(cli)
    assert result.code == 0, result.err
    assert all(fake.value(f"u{n}", "pro_plan") is True for n in range(1, 21))
    assert last_run(cli, "pro_plan")["members"] == 20

    # u1..u3 leave, u21..u22 enter, u5 changes title, u6's orders change
    rows = people(range(4, 23), orders=1)
    rows[1]["title"] = "CTO"
    rows[2]["orders"] = 7
    warehouse.set_users(rows)
    sent_before = len(fake.requests)
    assert sync(cli).code == 0
    record = last_run(cli, "pro_plan")
    assert (record["kind"], record["members"], record["entered"], record["exited"]) == (
        "incremental",
        19,
        2,
        3,
    )
    assert [fake.value(f"u{n}", "pro_plan") for n in (1, 2, 3, 21, 22)] == [False, False, False, True, True]
    assert fake.value("u6", "orders") == 7 and fake.value("u1", "orders") is None
    trait = last_run(cli, "orders")  # u1..u3 cleared; u6's value and u21..u22's sent
    assert (trait["members"], trait["entered"], trait["exited"]) == (19, 3, 3)
    assert len(fake.requests) > sent_before
    # only this generation's snapshot is left in the planner schema
    assert warehouse.planner_tables() == ["as_snap_orders_2", "as_snap_pro_plan_2"]

    assert sync(cli).code == 0  # nothing changed: nothing sent
    assert last_run(cli, "pro_plan")["entered"] == 0 and last_run(cli, "pro_plan")["exited"] == 0
    assert warehouse.planner_tables() == ["as_snap_orders_3", "as_snap_pro_plan_3"]


@pytest.mark.parametrize("probe_share", [0.0, 1.0], ids=["exits-hashed", "exits-probed"])
def test_the_planner_and_the_streaming_path_leave_planhat_the_same(
    project: Project,
    cli: Cli,
    warehouse: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    probe_share: float,
) -> None:
    """The same source changes, synced once through the planner and once streamed (a second
    state database and a second fake Planhat): Planhat ends up holding the same values. On
    PostgreSQL, with the exits found either way (`baseline.PROBE_SHARE`)."""
    monkeypatch.setattr(baseline, "PROBE_SHARE", probe_share)
    steps = [
        people(range(1, 31), orders=2),
        people(range(5, 36), orders=2)
        + [{"id": None, "email": "anon@example.com", "company_id": "c1", "orders": 1}],
        [{**row, "title": "VP"} for row in people(range(1, 11))] + people(range(20, 25), orders=3),
        [],
    ]
    streamed_state = f"sqlite:///{tmp_path / 'streamed.db'}"
    with FakePlanhat() as other:
        streaming = Project(tmp_path / "streamed.toml", streamed_state, cast(SourceDB, warehouse), other)
        planned_project(streaming, warehouse, planner=False, traits=True)
        planned_project(project, warehouse, traits=True)
        for rows in steps:
            warehouse.set_users(rows)
            assert sync(cli, "--force").code == 0
            gc.collect()  # DuckDB: the read-write handle is gone before a read-only one opens
            assert cli("--config", str(streaming.path), "sync", "--force").code == 0
            for key in ("pro_plan", "orders"):
                assert truth(project.planhat, range(1, 40), key) == truth(other, range(1, 40), key)


def test_a_snapshot_advanced_in_place_holds_what_writing_it_whole_would(
    project: Project, cli: Cli, warehouse: Warehouse
) -> None:
    """After each incremental run, the snapshot (changed in place from the per-run table) holds
    the query's rows as a snapshot written whole would: entries, exits, changed columns, and a
    user listed on two rows of whom one changes (the other row is kept, not lost)."""
    planned_project(project, warehouse)
    twice = [{"id": "u7", "email": "u7@example.com", "company_id": "c1", "name": "first"},
             {"id": "u7", "email": "u7@example.com", "company_id": "c1", "name": "second"}]  # fmt: skip
    steps = [
        people(range(1, 11)) + twice,
        people(range(3, 14)) + twice[:1] + [{**twice[1], "name": "changed"}],
        [{**row, "title": "VP"} for row in people(range(3, 8))] + people(range(9, 15)) + twice[1:],
        people(range(9, 12)),
    ]
    for number, rows in enumerate(steps, start=1):
        warehouse.set_users(rows)
        assert sync(cli, "--force").code == 0
        gc.collect()  # DuckDB: the read-write handle is gone before the next one opens
        assert last_run(cli, "pro_plan")["kind"] == ("full" if number == 1 else "incremental")
        assert warehouse.planner_tables() == [f"as_snap_pro_plan_{number}"]
        columns = "planner_ref, user_id, email, name, title, company_id"
        with warehouse.engine.connect() as connection:
            kept = connection.exec_driver_sql(
                f"SELECT {columns} FROM {PLANNER}.as_snap_pro_plan_{number}"
            ).all()
            fresh = connection.exec_driver_sql(
                f"SELECT trim(user_id), user_id, email, name, title, company_id "
                f"FROM ({warehouse.pro_query}) AS q"
            ).all()
        warehouse.engine.dispose()
        assert sorted(kept, key=repr) == sorted(fresh, key=repr)


def test_a_full_resync_rebuilds_the_planner_snapshot(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 11)))
    assert sync(cli).code == 0
    project.planhat.set_value("u3", "pro_plan", False)  # behind our back
    assert sync(cli, "--full").code == 0
    assert last_run(cli, "pro_plan")["kind"] == "full"
    assert project.planhat.value("u3", "pro_plan") is True
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_2"]
    pg_warehouse.set_users(people(range(2, 11)))
    assert sync(cli).code == 0
    assert project.planhat.value("u1", "pro_plan") is False
    assert last_run(cli, "pro_plan")["exited"] == 1


def test_reconcile_fix_repairs_a_planner_audience(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 11)))
    assert sync(cli).code == 0
    project.planhat.set_value("u4", "pro_plan", False)
    assert run(cli, "reconcile", "--fix").code == 0
    assert project.planhat.value("u4", "pro_plan") is True
    pg_warehouse.set_users(people(range(1, 10)))
    assert sync(cli).code == 0  # the repairing run's generation is the one diffed against
    assert project.planhat.value("u10", "pro_plan") is False
    assert last_run(cli, "pro_plan")["exited"] == 1


def test_an_email_only_user_who_gains_a_user_id_is_resent_and_never_told_false(
    project: Project, cli: Cli, warehouse: Warehouse
) -> None:
    """The planner run keeps its exits aside when it counts them; a re-identified user's old
    identity, counted as an exit first, must leave that set too, or it is told `false`."""
    planned_project(project, warehouse)
    fake = project.planhat
    ann = {"id": None, "email": "ann@example.com", "company_id": "c1"}
    bob = {"id": "u2", "email": "bob@example.com", "company_id": "c1"}
    warehouse.set_users([ann, bob])
    assert sync(cli).code == 0
    assert fake.value("ann@example.com", "pro_plan") is True

    warehouse.set_users([{**ann, "id": "u1"}, bob])  # Ann gains u1
    fake.requests.clear()
    result = sync(cli)
    assert result.code == 0, result.err
    written = [
        (item.get("externalId"), item["custom"].get("pro_plan")) for r in fake.requests for item in r.body
    ]
    assert written == [("u1", True)]  # resent under the new id; no `false` to the old identity
    assert fake.value("u1", "pro_plan") is True and len(fake.contacts) == 2
    record = last_run(cli, "pro_plan")
    assert (record["entered"], record["exited"]) == (0, 0)


def test_a_snapshot_of_an_earlier_shape_is_read_anew_not_diffed_against(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    """A snapshot an earlier version wrote (the query's columns, no stored identifier, the
    fingerprint of the query alone) is not joined against: the run reads its new snapshot whole
    and Planhat still gets every change."""
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 11)))
    assert sync(cli).code == 0
    with pg_warehouse.engine.begin() as connection:
        connection.exec_driver_sql(f"ALTER TABLE {PLANNER}.as_snap_pro_plan_1 DROP COLUMN planner_ref")
    pg_warehouse.engine.dispose()
    text = "\0".join(("audience", "user", pg_warehouse.pro_query, ""))
    query(
        project.state_url,
        f"UPDATE planner_snapshots SET fingerprint = '{hashlib.sha256(text.encode()).hexdigest()}'",
    )

    pg_warehouse.set_users(people(range(2, 12)))
    result = sync(cli)
    assert result.code == 0, result.err
    assert [project.planhat.value(f"u{n}", "pro_plan") for n in (1, 11)] == [False, True]
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_2"]


def test_retire_drops_the_planner_tables(project: Project, cli: Cli, pg_warehouse: Warehouse) -> None:
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 6)))
    assert sync(cli).code == 0
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_1"]
    project.write([], transport="endusers", source=f'planner_schema = "{PLANNER}"')
    result = run(cli, "retire", "pro_plan", "--yes")
    assert result.code == 0, result.err
    assert pg_warehouse.planner_tables() == []
    assert project.planhat.value("u1", "pro_plan") is False
    assert query(project.state_url, "SELECT count(*) FROM planner_snapshots") == [(0,)]


# --- the hand-off, killed at each step ------------------------------------------------------

KILL_POINTS = {
    # after the warehouse diff: the per-run table exists, nothing queued
    "after_diff": "diff_in_warehouse",
    # after the outbox commit, before anything of the advance
    "after_commit": "advance",
    # mid-advance: the snapshot changed in place, not yet renamed (the next run applies again)
    "after_apply": "rename_snapshot",
    # mid-advance: the snapshot renamed, the per-run table not yet dropped
    "after_rename": "drop_changes",
}
# what each kill leaves in the planner schema
LEFT_BY_KILL = {
    "after_diff": ["as_chg_pro_plan_2", "as_snap_pro_plan_1"],
    "after_commit": ["as_chg_pro_plan_2", "as_snap_pro_plan_1"],
    "after_apply": ["as_chg_pro_plan_2", "as_snap_pro_plan_1"],
    "after_rename": ["as_chg_pro_plan_2", "as_snap_pro_plan_2"],
}

_KILLER = """
import os, signal, sys
from audience_sync.sync import planned
step = sys.argv.pop(1)
original = getattr(planned, step)
def killed(*args, **kwargs):
    if step == "diff_in_warehouse":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(planned, step, killed)
from audience_sync.cli import entrypoint
entrypoint()
"""


def _sync_killed_at(step: str, config: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-c", _KILLER, step, "--config", str(config), "sync", "--audience", "pro_plan"],
        capture_output=True,
        timeout=60,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_at_each_step_of_the_hand_off_loses_nothing_and_sends_nothing_twice(
    project: Project, cli: Cli, pg_warehouse: Warehouse, point: str
) -> None:
    planned_project(project, pg_warehouse)
    fake = project.planhat
    assert run(cli, "db", "upgrade").code == 0
    pg_warehouse.set_users(people(range(1, 21)))
    assert sync(cli).code == 0
    pg_warehouse.set_users(people(range(5, 26)))  # u1..u4 leave, u21..u25 enter
    requests_before = len(fake.requests)

    _sync_killed_at(KILL_POINTS[point], project.path)
    requests_killed = len(fake.requests)
    if point == "after_diff":  # before the commit: nothing was sent (the others kill the
        assert requests_killed == requests_before  # advance, which runs beside the delivery)
    # where the kill landed: what the warehouse and the state database hold
    committed = query(project.state_url, "SELECT generation FROM planner_snapshots")
    assert committed == [(1,)] if point == "after_diff" else [(2,)]
    assert pg_warehouse.planner_tables() == LEFT_BY_KILL[point]
    query(project.state_url, "UPDATE leases SET expires_at = '2000-01-01 00:00:00'")

    assert sync(cli).code == 0
    assert truth(fake, range(1, 26)) == {f"u{n}": n >= 5 for n in range(1, 26)}

    # each change went out with one value, once by each process at most (a chunk the kill left
    # in doubt is sent again by the rerun, the same), and nothing else went out
    def accepted(requests: list[Any]) -> list[tuple[str, bool]]:
        return [
            (item["externalId"], item["custom"]["pro_plan"])
            for _, _, body, status, *_ in requests
            if status == 200
            for item in body
        ]

    by_killed = accepted(fake.requests[requests_before:requests_killed])
    by_rerun = accepted(fake.requests[requests_killed:])
    assert len(set(by_killed)) == len(by_killed) and len(set(by_rerun)) == len(by_rerun)
    sent = set(by_killed) | set(by_rerun)
    assert sent == {(f"u{n}", False) for n in range(1, 5)} | {(f"u{n}", True) for n in range(21, 26)}
    generation = 2 if point == "after_diff" else 3  # the rerun's: a killed uncommitted one is redone
    assert pg_warehouse.planner_tables() == [f"as_snap_pro_plan_{generation}"]
    # the snapshot holds each member's row once, however often its advance was applied
    assert snapshot_refs(pg_warehouse, generation) == [f"u{n}" for n in sorted(range(5, 26), key=str)]

    pg_warehouse.set_users(people(range(6, 26)))  # and the next run diffs against the right snapshot
    assert sync(cli).code == 0
    assert fake.value("u5", "pro_plan") is False
    assert last_run(cli, "pro_plan")["exited"] == 1


def test_an_advance_the_warehouse_refuses_fails_no_run_and_the_next_run_finishes_it(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    """The advance runs after the commit, beside the delivery: a warehouse error there (a
    trigger refusing the delete) is a warning, the run's changes still go out, and the next
    run finishes the advance before it diffs."""
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 11)))
    assert sync(cli).code == 0
    refuse = f"""
        CREATE FUNCTION {PLANNER}.refuse() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN RAISE EXCEPTION 'the snapshot is read-only today'; END $$;
        CREATE TRIGGER refuse BEFORE DELETE ON {PLANNER}.as_snap_pro_plan_1
          FOR EACH STATEMENT EXECUTE FUNCTION {PLANNER}.refuse();
    """
    with pg_warehouse.engine.begin() as connection:
        connection.exec_driver_sql(refuse)
    pg_warehouse.set_users(people(range(3, 13)))  # u1, u2 leave; u11, u12 enter

    result = sync(cli)
    assert result.code == 0, result.err
    assert (
        "the snapshot is read-only today" in result.err and "the next run finishes the advance" in result.err
    )
    assert truth(project.planhat, range(1, 13)) == {f"u{n}": n >= 3 for n in range(1, 13)}
    assert pg_warehouse.planner_tables() == ["as_chg_pro_plan_2", "as_snap_pro_plan_1"]

    with pg_warehouse.engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TRIGGER refuse ON {PLANNER}.as_snap_pro_plan_1")
    pg_warehouse.set_users(people(range(4, 13)))
    assert sync(cli).code == 0
    assert project.planhat.value("u3", "pro_plan") is False
    assert (last_run(cli, "pro_plan")["entered"], last_run(cli, "pro_plan")["exited"]) == (0, 1)
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_3"]
    assert snapshot_refs(pg_warehouse, 3) == [f"u{n}" for n in sorted(range(4, 13), key=str)]


# --- check: the CREATE rights -------------------------------------------------------------


def test_check_proves_create_rights_and_names_the_grant(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    role = f"wt_limited_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_warehouse.url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {PLANNER}")
        connection.exec_driver_sql(f"GRANT USAGE ON SCHEMA {pg_warehouse.schema} TO {role}")
        connection.exec_driver_sql(f"GRANT SELECT ON {pg_warehouse.users} TO {role}")
    try:
        limited = sa.make_url(pg_warehouse.url).set(username=role).render_as_string(hide_password=False)
        project.source = cast(SourceDB, SimpleNamespace(url=limited))  # the warehouse, as that user
        project.write(
            [{"name": "Pro Plan", "query": pg_warehouse.pro_query}],
            transport="endusers",
            source=f'planner_schema = "{PLANNER}"',
        )
        result = run(cli, "check")
        assert result.code == 1
        line = next(line for line in result.out.splitlines() if "planner app" in line)
        assert line.startswith("FAIL")
        assert f"GRANT USAGE, CREATE ON SCHEMA {PLANNER} TO {role}" in result.out

        with admin.begin() as connection:
            connection.exec_driver_sql(f"GRANT USAGE, CREATE ON SCHEMA {PLANNER} TO {role}")
        result = run(cli, "check")
        line = next(line for line in result.out.splitlines() if "planner app" in line)
        assert line.startswith("OK"), result.out
        assert pg_warehouse.planner_tables() == []  # the probe left nothing
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PLANNER} CASCADE")
            connection.exec_driver_sql(f"REVOKE ALL ON SCHEMA {pg_warehouse.schema} FROM {role}")
            connection.exec_driver_sql(f"REVOKE ALL ON {pg_warehouse.users} FROM {role}")
            connection.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def test_an_audience_defined_on_events_is_diffed_in_the_warehouse(
    project: Project, cli: Cli, warehouse: Warehouse
) -> None:
    orders = f"{warehouse.schema}.order_completed" if warehouse.schema else "order_completed"
    with warehouse.engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE {orders} (id VARCHAR, user_id VARCHAR, anonymous_id VARCHAR, event VARCHAR, "
            "event_text VARCHAR, timestamp TIMESTAMP, received_at TIMESTAMP, revenue DOUBLE PRECISION)"
        )
    warehouse.engine.dispose()

    def set_orders(buyers: range) -> None:
        with warehouse.engine.begin() as connection:
            connection.exec_driver_sql(f"DELETE FROM {orders}")
            for n in buyers:
                connection.exec_driver_sql(
                    f"INSERT INTO {orders} VALUES ('o{n}', 'u{n}', 'a', 'order_completed', "
                    "'Order Completed', "
                    "CURRENT_TIMESTAMP - INTERVAL '2 days', CURRENT_TIMESTAMP - INTERVAL '2 days', 10)"
                )
        warehouse.engine.dispose()

    project.source = cast(SourceDB, warehouse)
    schema = f'\nschema = "{warehouse.schema}"' if warehouse.schema else ""
    project.write(
        [{"name": "Buyers 30", "condition": "event('Order Completed').within(30 days).count() >= 1"}],
        transport="endusers",
        planhat="max_requests_per_second = 150",
        source=f'planner_schema = "{PLANNER}"\nevents = "segment"{schema}',
    )
    warehouse.set_users(people(range(1, 11)))
    for n in range(1, 11):  # the contacts exist (the definition's rows carry no company)
        project.planhat.add_contact(f"u{n}", f"u{n}@example.com")
    set_orders(range(1, 6))
    result = sync(cli)
    assert result.code == 0, result.err
    set_orders(range(3, 9))
    assert sync(cli).code == 0
    record = last_run(cli, "buyers_30")
    assert (record["kind"], record["members"], record["entered"], record["exited"]) == (
        "incremental",
        6,
        3,
        2,
    )
    assert truth(project.planhat, range(1, 11), "buyers_30") == {
        f"u{n}": (True if 3 <= n <= 8 else False if n <= 2 else None) for n in range(1, 11)
    }
    assert warehouse.planner_tables() == ["as_snap_buyers_30_2"]


def test_a_blocked_run_drops_its_own_tables_and_keeps_the_committed_snapshot(
    project: Project, cli: Cli, pg_warehouse: Warehouse
) -> None:
    planned_project(project, pg_warehouse)
    pg_warehouse.set_users(people(range(1, 201)))
    assert sync(cli).code == 0
    pg_warehouse.set_users(people(range(1, 21)))  # 180 of 200 leave: the guard holds it
    assert sync(cli).code == 1
    assert last_run(cli, "pro_plan")["status"] == "blocked"
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_1"]
    assert project.planhat.value("u30", "pro_plan") is True
    assert sync(cli, "--force").code == 0  # diffed against the committed snapshot still
    assert project.planhat.value("u30", "pro_plan") is False
    assert last_run(cli, "pro_plan")["exited"] == 180
    assert pg_warehouse.planner_tables() == ["as_snap_pro_plan_2"]  # the blocked one was never committed


def test_the_daemon_runs_a_planner_source(
    project: Project, pg_warehouse: Warehouse, start_daemon: Any
) -> None:
    planned_project(project, pg_warehouse)
    project.write(
        [{"name": "Pro Plan", "query": pg_warehouse.pro_query}],
        transport="endusers",
        planhat="max_requests_per_second = 150",
        source=f'planner_schema = "{PLANNER}"',
        extra=schedule("0.6s", "0.9s"),
    )
    pg_warehouse.set_users(people(range(1, 11)))
    start_daemon()
    wait_for(lambda: finished(project.state_url), what="the first run")
    pg_warehouse.set_users(people(range(3, 13)))
    second = wait_for(
        lambda: [r for r in finished(project.state_url) if r["kind"] == "incremental" and r["entered"]],
        what="an incremental run that found the change",
    )
    assert (second[0]["entered"], second[0]["exited"]) == (2, 2)
    assert project.planhat.value("u12", "pro_plan") is True
    assert project.planhat.value("u1", "pro_plan") is False
