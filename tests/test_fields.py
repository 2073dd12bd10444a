"""`audience-sync fields [--create]` against the fake Planhat (which learns `POST /customfields`):
per audience and trait, on contacts or companies per its level, of the type it needs (declared
or inferred); --create makes the missing ones and never changes an existing one. No state
database is involved: SQLite only."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Cli, Project, run, users
from tests.test_accounts import ARR, ENTERPRISE, set_accounts

ORDERS = (
    '[[traits]]\nname = "Orders"\nsource = "app"\n'
    'query = "SELECT id AS user_id, orders AS value FROM users"\n'
)
PLAN = (
    '[[traits]]\nname = "Plan Name"\nsource = "app"\ntype = "text"\n'
    'query = "SELECT id AS user_id, plan AS value FROM users"\n'
)
pytestmark = pytest.mark.parametrize("state_url", ["sqlite"], indirect=True)


def configure(project: Project) -> None:
    project.write(
        [{"name": "Pro Plan", "query": "SELECT id AS user_id FROM users WHERE plan = 'pro'"}, ENTERPRISE],
        transport="endusers",
        extra=ORDERS + PLAN + ARR,
    )
    project.source.set_users(users(range(1, 4), plan="pro", orders=2))
    set_accounts(project, [("c1", "Acme", 250000.5)])


def test_fields_lists_what_is_missing_and_create_makes_it_typed_right(project: Project, cli: Cli) -> None:
    configure(project)
    fake = project.planhat
    fake.add_custom_field("pro_plan", type="checkbox", parent="EndUser")  # already there

    listed = run(cli, "fields", "--json")
    assert listed.code == 1  # fields are missing
    lines = {line["key"]: line for line in json.loads(listed.out)}
    assert lines["pro_plan"]["status"] == "ok"
    assert {k: (v["parent"], v["type"], v["status"]) for k, v in lines.items() if k != "pro_plan"} == {
        "enterprise_accounts": ("Company", "checkbox", "missing"),
        "orders": ("EndUser", "number", "missing"),
        "plan_name": ("EndUser", "text", "missing"),
        "arr": ("Company", "number", "missing"),
    }
    assert "inferred from 3 of its values" in lines["orders"]["how"]
    assert "declared" in lines["plan_name"]["how"]
    assert len(fake.custom_fields or []) == 1  # listing creates nothing

    created = run(cli, "fields", "--create")
    assert created.code == 0, created.out + created.err
    assert "orders: created a number field on EndUser (inferred from 3 of its values)" in created.out
    assert "arr: created a number field on Company" in created.out
    made = {(f["name"], f["parent"]): f for f in fake.custom_fields or []}
    assert made[("enterprise_accounts", "Company")]["type"] == "checkbox"
    assert made[("plan_name", "EndUser")] | {"_id": ""} == {
        "name": "plan_name", "type": "text", "parent": "EndUser", "isHidden": False, "_id": "",
    }  # fmt: skip
    posts = [r for r in fake.requests if r.method == "POST" and r.path == "/customfields"]
    assert len(posts) == 4  # one each, the existing field untouched

    again = run(cli, "fields")
    assert again.code == 0 and all(json.loads(run(cli, "fields", "--json").out)[i]["ok"] for i in range(5))
    assert len([r for r in fake.requests if r.method == "POST" and r.path == "/customfields"]) == 4


def test_a_field_of_the_wrong_type_is_reported_with_the_fix_and_left_alone(
    project: Project, cli: Cli
) -> None:
    configure(project)
    fake = project.planhat
    fake.add_custom_field("orders", type="text", parent="EndUser")
    result = run(cli, "fields", "--create")
    assert result.code == 1
    assert "'orders' is a 'text' field, not 'number'" in result.out and "declare type = 'text'" in result.out
    orders = [f for f in fake.custom_fields or [] if f["name"] == "orders"]
    assert orders == [{"_id": "cf0", "name": "orders", "type": "text", "parent": "EndUser"}]  # untouched


def test_check_suggests_fields_create(project: Project, cli: Cli) -> None:
    configure(project)
    line = next(li for li in run(cli, "check").out.splitlines() if "planhat fields" in li)
    assert line.startswith("FAIL") and "audience-sync fields --create" in line


def test_a_trait_type_outside_planhats_is_refused(project: Project, cli: Cli) -> None:
    project.write(extra=ORDERS.replace('source = "app"', 'source = "app"\ntype = "float"'))
    result = run(cli, "fields")
    assert result.code == 1 and "type" in result.err and "must be one of number, text" in result.err
