"""New identifiers on a known user: the value is resent, and the old identity is never told
the opposite (Planhat holds one contact for both)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Cli, Project, query, sync, wait_for

TRANSPORTS = ["segment", "endusers"]
KEY = "pro_plan"
PRO = "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"
SCORE = (
    '[[traits]]\nname = "Score"\nsource = "app"\n'
    'query = "SELECT id AS user_id, email, company_id, orders AS value FROM users"\n'
)


def sent(project: Project, key: str = KEY) -> list[tuple[Any, Any, Any]]:
    """(userId, email, value) of every write, in the order the fake received them."""
    out = []
    for request in project.planhat.requests:
        if request.path == "/dock/segment":
            traits = request.body["traits"]
            out.append((request.body.get("userId"), traits.get("email"), traits.get(key, "-")))
        else:
            out += [(i.get("externalId"), i.get("email"), i["custom"].get(key, "-")) for i in request.body]
    return out


def set_users(
    project: Project, rows: list[tuple[str | None, str | None]], plan: str = "pro", orders: int = 3
) -> None:
    project.source.set_users([{"id": u, "email": e, "plan": plan, "orders": orders} for u, e in rows])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_email_only_user_who_gains_a_user_id_is_resent_and_never_told_false(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    fake = project.planhat
    project.write([{"name": "Pro Plan", "query": PRO}], transport=transport)
    set_users(project, [(None, "ann@example.com"), ("u2", "bob@example.com")])
    assert sync(cli).code == 0
    assert fake.value("ann@example.com", KEY) is True

    set_users(project, [("u1", "ann@example.com"), ("u2", "bob@example.com")])  # Ann gains u1
    fake.requests.clear()
    result = sync(cli)
    assert result.code == 0, result.err
    assert sent(project) == [("u1", "ann@example.com", True)]  # resent; no `false` anywhere
    assert fake.value("u1", KEY) is True and len(fake.contacts) == 2  # Ann's contact, now with u1
    assert query(project.state_url, "SELECT user_ref, user_id FROM baseline ORDER BY user_ref") == [
        ("u1", "u1"),
        ("u2", "u2"),
    ]
    run = cli("--config", "audience_sync.toml", "history", "--json").out
    assert '"entered": 0' in run and '"exited": 0' in run

    set_users(project, [("u2", "bob@example.com")])  # Ann leaves: her contact is told `false`
    assert sync(cli).code == 0
    assert fake.value("u1", KEY) is False


def test_a_changed_email_resends_the_value_under_the_same_user_id(project: Project, cli: Cli) -> None:
    project.write([{"name": "Pro Plan", "query": PRO}], extra=SCORE)
    set_users(project, [("u1", "ann@old.example")])
    assert sync(cli).code == 0
    set_users(project, [("u1", "ann@new.example")])
    project.planhat.requests.clear()
    assert sync(cli).code == 0
    (request,) = project.planhat.requests  # the audience and the trait, together, once
    assert request.body["traits"] == {KEY: True, "score": 3, "email": "ann@new.example", "companyId": "acme"}
    assert project.planhat.contact("u1")["email"] == "ann@new.example"
    project.planhat.requests.clear()
    assert sync(cli).code == 0 and project.planhat.requests == []  # told once


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_changed_user_id_with_the_same_email_moves_the_value(
    project: Project,
    cli: Cli,
    transport: str,
) -> None:
    project.write([{"name": "Pro Plan", "query": PRO}], transport=transport, extra=SCORE)
    set_users(project, [("old-1", "ann@example.com"), ("u2", "bob@example.com")])
    assert sync(cli).code == 0
    set_users(project, [("new-1", "ann@example.com"), ("u2", "bob@example.com")])
    project.planhat.requests.clear()
    assert sync(cli).code == 0
    assert sent(project) == [("new-1", "ann@example.com", True)]
    assert sent(project, "score") == [("new-1", "ann@example.com", 3)]  # no null for old-1


def test_an_old_identity_in_doubt_passes_its_doubt_to_the_new_one(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([{"name": "Pro Plan", "query": PRO}], planhat="max_requests_per_second = 150")
    set_users(project, [(None, "ann@example.com"), ("u2", "bob@example.com")])
    assert sync(cli).code == 0
    set_users(project, [("u2", "bob@example.com")], plan="pro")  # Ann leaves...
    fake.delay_next(1, 1.0)  # ...her `false` may or may not have landed
    with project.one_shot():
        assert sync(cli).code != 0
    wait_for(lambda: fake.value("ann@example.com", KEY) is False, what="her `false` landing")
    set_users(project, [("u1", "ann@example.com"), ("u2", "bob@example.com")])  # back, with u1
    assert sync(cli).code == 0
    assert fake.value("u1", KEY) is True and len(fake.contacts) == 2  # the `true` went to her contact
    assert query(project.state_url, "SELECT count(*) FROM pending") == [(0,)]
