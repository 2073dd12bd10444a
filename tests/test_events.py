"""Audiences and computed traits sent as Segment track events (`send_as`), end to end."""

from __future__ import annotations

from tests.conftest import Cli, Project, sync, users

PRO = "SELECT id AS user_id, email, company_id FROM users WHERE plan = 'pro'"


def identifies(project: Project) -> list[dict]:
    return [r.body for r in project.planhat.requests if r.body and r.body.get("type") == "identify"]


def test_send_as_events_sends_entered_and_exited_and_no_property(project: Project, cli: Cli) -> None:
    fake = project.planhat
    project.write([{"name": "Pro Plan", "query": PRO, "send_as": "events"}])
    project.source.set_users(users([1, 2], plan="pro"))
    assert sync(cli).code == 0
    assert fake.events_of("u1") == [("Audience Entered", {"audience_key": "pro_plan", "pro_plan": True})]
    assert identifies(project) == [] and fake.value("u1", "pro_plan") is None

    project.source.set_users(users([2], plan="pro"))
    assert sync(cli).code == 0
    assert fake.events_of("u1")[-1] == ("Audience Exited", {"audience_key": "pro_plan", "pro_plan": False})
    assert len(fake.events_of("u2")) == 1  # unchanged: no event
    track = next(r.body for r in fake.requests if r.body["type"] == "track")
    assert track["userId"] == "u1" and track["messageId"] and track["timestamp"]


def test_send_as_both_sends_the_property_and_the_event(project: Project, cli: Cli) -> None:
    project.write([{"name": "Pro Plan", "query": PRO, "send_as": "both"}])
    project.source.set_users(users([1], plan="pro"))
    assert sync(cli).code == 0
    assert [r.body["type"] for r in project.planhat.requests] == ["identify", "track"]
    assert project.planhat.value("u1", "pro_plan") is True
    assert project.planhat.events_of("u1") == [
        ("Audience Entered", {"audience_key": "pro_plan", "pro_plan": True})
    ]


def test_a_trait_as_events_sends_trait_computed(project: Project, cli: Cli) -> None:
    trait = (
        '[[traits]]\nname = "Plan Tier"\nsource = "app"\nsend_as = "events"\n'
        'query = "SELECT id AS user_id, email, company_id, plan AS value FROM users"\n'
    )
    project.write([], extra=trait)
    project.source.set_users(users([1], plan="gold"))
    assert sync(cli).code == 0
    assert project.planhat.events_of("u1") == [
        ("Trait Computed", {"trait_key": "plan_tier", "plan_tier": "gold"})
    ]
    project.source.set_users([])
    assert sync(cli).code == 0
    assert project.planhat.events_of("u1")[-1] == (
        "Trait Computed",
        {"trait_key": "plan_tier", "plan_tier": None},
    )


def test_a_failed_event_is_sent_again(project: Project, cli: Cli) -> None:
    project.write([{"name": "Pro Plan", "query": PRO, "send_as": "both"}])
    project.source.set_users(users([1], plan="pro"))
    project.planhat.delay_next(1, 0)  # the identify goes through...
    project.planhat.fail_next(1, 429)  # ...its event is refused: the user stays pending
    with project.one_shot(timeout_seconds=2):
        assert sync(cli).code != 0
    assert project.planhat.events_of("u1") == []
    assert sync(cli).code == 0
    assert project.planhat.events_of("u1") == [
        ("Audience Entered", {"audience_key": "pro_plan", "pro_plan": True})
    ]


def test_events_on_the_bulk_transport_are_refused_with_one_line(project: Project, cli: Cli) -> None:
    project.write([{"name": "Pro Plan", "query": PRO, "send_as": "events"}], transport="endusers")
    result = sync(cli)
    assert result.code != 0
    assert "audiences[0].send_as" in result.err and "segment" in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
