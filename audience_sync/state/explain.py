"""Why a user has a value: one user's story across audiences, read-only (`audience-sync explain`,
the status page's /users/<id>).

Every statement is an index lookup on (audience_key, user_ref) or (audience_key, email), whatever
the size of the audiences: the baseline's primary key, the outbox's uq_pending_audience_user,
ix_changes_audience_user and ix_baseline_email (tests/test_explain.py shows the plans, and
benchmarks/bench_explain.py times them at a million members). The audiences are few, so each
statement names them all (`audience_key IN (...)`).

A user is given as a user_id or an email. A user_ref is the user_id, or the email of a user
without one; an email also finds, through the baseline, the users Planhat was told it under.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import models as m

RECENT_CHANGES = 20  # per audience, newest first


@dataclass
class Told:
    """What Planhat was last told (and accepted) for the user."""

    value: Any  # True/False for an audience; the value (None: cleared) for a trait
    at: datetime | None
    run_id: int | None
    kind: str | None  # the run's kind: full, incremental, reconcile, retire


@dataclass
class Pending:
    value: Any
    queued_at: datetime
    in_doubt: bool
    attempts: int
    last_error: str | None
    run_id: int | None


@dataclass
class Change:
    at: datetime
    run_id: int | None
    kind: str | None
    change: str  # entered | exited (an audience); a value or `cleared` (a trait)
    value: Any
    outcome: str  # delivered | failed | in_doubt
    error: str | None


@dataclass
class AudienceStory:
    key: str
    name: str
    kind: str  # audience | trait
    user_ref: str | None  # the user_ref the state database knows the user by here
    member: bool  # by the last snapshot: in the audience (a trait: has a value)
    value: Any  # a trait's current value by the last snapshot; an audience: member
    told: Told | None
    pending: Pending | None
    changes: list[Change] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.told is not None or self.pending is not None or bool(self.changes)


@dataclass
class UserStory:
    user: str
    refs: list[str]
    email: str | None
    audiences: list[AudienceStory]

    @property
    def known(self) -> bool:
        return any(a.known for a in self.audiences)


def explain(
    connection: Connection, user: str, audiences: dict[str, tuple[str, str]], limit: int = RECENT_CHANGES
) -> UserStory:
    """The user's story in each of `audiences` (key -> (name, kind: audience | trait))."""
    keys = list(audiences)
    refs = resolve(connection, user, keys)
    lookups = statements(keys, refs)
    told = {(row.audience_key, row.user_ref): row for row in connection.execute(lookups["baseline"])}
    queued = {(row.audience_key, row.user_ref): row for row in connection.execute(lookups["pending"])}
    history: dict[str, list[Any]] = {}
    for row in connection.execute(lookups["changes"]):
        history.setdefault(row.audience_key, []).append(row)
    kinds = _run_kinds(
        connection,
        [row.run_id for rows in history.values() for row in rows] + [row.run_id for row in told.values()],
    )
    email = next((row.email for row in [*told.values(), *queued.values()] if row.email), None)
    stories = []
    for key in keys:
        name, kind = audiences[key]
        trait = kind == "trait"
        ref = next((r for r in refs if (key, r) in told or (key, r) in queued), None)
        ref = ref or next((row.user_ref for row in history.get(key, [])), None)
        base = told.get((key, ref)) if ref else None
        pend = queued.get((key, ref)) if ref else None
        newest = sorted(history.get(key, []), key=lambda r: (r.at, r.id), reverse=True)
        rows = newest[:limit]
        delivered = next((r for r in newest if r.outcome == "delivered"), None)
        last: Told | None = None
        if delivered is not None:
            value = _value(delivered.value, delivered.value_json, trait)
            last = Told(value, delivered.at, delivered.run_id, kinds.get(delivered.run_id or -1))
        elif base is not None:  # the change itself was pruned (history.retention_days)
            last = Told(
                _value(True, base.value_json, trait), base.told_at, base.run_id, kinds.get(base.run_id or -1)
            )
        if pend is not None:
            current = _value(pend.value, pend.value_json, trait)
            member = bool(pend.value)
        else:
            current = _value(True, base.value_json, trait) if base is not None else (None if trait else False)
            member = base is not None
        stories.append(
            AudienceStory(
                key=key,
                name=name,
                kind=kind,
                user_ref=ref,
                member=member,
                value=current,
                told=last,
                pending=None
                if pend is None
                else Pending(
                    _value(pend.value, pend.value_json, trait),
                    pend.queued_at,
                    bool(pend.in_doubt),
                    pend.attempts,
                    pend.last_error,
                    pend.run_id,
                ),
                changes=[
                    Change(
                        r.at,
                        r.run_id,
                        kinds.get(r.run_id or -1),
                        _change(r.value, r.value_json, trait),
                        _value(r.value, r.value_json, trait),
                        r.outcome,
                        r.error,
                    )
                    for r in rows
                ],
            )
        )
    return UserStory(user=user, refs=refs, email=email, audiences=stories)


def audiences(connection: Connection, configured: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The audiences to explain (key -> (name, kind)): the configured ones, then those only the
    state database knows (removed from the config, retired)."""
    a = m.audiences.c
    found = dict(configured)
    for row in connection.execute(sa.select(a.key, a.name, a.kind).order_by(a.key)):
        found.setdefault(row.key, (row.name, row.kind or "audience"))
    return found


def resolve(connection: Connection, user: str, keys: list[str]) -> list[str]:
    """The user_refs `user` may be known by: itself, and for an email the refs the baseline
    holds under it (ix_baseline_email)."""
    refs = [user]
    if "@" in user and keys:
        found = connection.execute(statements(keys, refs)["email"]).scalars()
        refs += sorted({ref for ref in found if ref != user})
    return refs


def statements(keys: list[str], refs: list[str]) -> dict[str, sa.Select[Any]]:
    """The lookups `explain` runs, by table (the tests show their query plans)."""
    b, p, c = m.baseline.c, m.pending.c, m.changes.c
    return {
        "baseline": sa.select(b.audience_key, b.user_ref, b.email, b.run_id, b.told_at, b.value_json).where(
            b.audience_key.in_(keys), b.user_ref.in_(refs)
        ),
        "pending": sa.select(
            p.audience_key,
            p.user_ref,
            p.email,
            p.value,
            p.value_json,
            p.queued_at,
            p.in_doubt,
            p.attempts,
            p.last_error,
            p.run_id,
        ).where(p.audience_key.in_(keys), p.user_ref.in_(refs)),
        "changes": sa.select(
            c.id, c.audience_key, c.user_ref, c.run_id, c.value, c.value_json, c.outcome, c.error, c.at
        ).where(c.audience_key.in_(keys), c.user_ref.in_(refs)),
        "email": sa.select(b.user_ref).where(b.audience_key.in_(keys), b.email == refs[0]),
    }


def _run_kinds(connection: Connection, ids: list[int | None]) -> dict[int, str]:
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    r = m.runs.c
    return dict(connection.execute(sa.select(r.id, r.kind).where(r.id.in_(wanted))).all())


def _value(value: Any, value_json: str | None, trait: bool) -> Any:
    if not trait:
        return bool(value)
    return None if value_json is None else json.loads(value_json)


def _change(value: Any, value_json: str | None, trait: bool) -> str:
    if not trait:
        return "entered" if value else "exited"
    return "cleared" if value_json is None or value_json == "null" else "value"
