"""Convergence under faults, crashes and drift: the real engine driven through long seeded random
walks and a hypothesis state machine (tests/sim_walk.py), the minimal sequences they found kept
as regression tests, and the fake Planhat's read endpoint, drift helpers and faults.

Default run (about two minutes): one walk of 64 steps per state backend (SQLite, PostgreSQL)
and transport, and one on a planner source, its seed drawn afresh per run (RUN_SEED, printed at
the run's end: each CI run walks new ground, and the long mode below walks far); the pinned
sequences; 6 hypothesis examples of 20 steps per
transport, without shrinking, seeded with the same RUN_SEED. Long runs:

    AUDIENCE_SYNC_SIM_SEEDS=50 AUDIENCE_SYNC_SIM_STEPS=400 pytest tests/test_simulation.py -k walk
    AUDIENCE_SYNC_SIM_SEED=7 AUDIENCE_SYNC_SIM_STEPS=120 pytest tests/test_simulation.py -k walk
    (a given AUDIENCE_SYNC_SIM_SEED replays that walk alone, and the hypothesis examples of
    that run; with AUDIENCE_SYNC_SIM_SEEDS=n too, the n walks from that seed on)
    AUDIENCE_SYNC_SIM_EXAMPLES=300 pytest tests/test_simulation.py -k hypothesis   # and shrinks
    (AUDIENCE_SYNC_SIM_HYPOTHESIS_STEPS sets the machine's steps; AUDIENCE_SYNC_SIM_SHRINK=1
    shrinks with the default number of examples; shrinking can take minutes)

A walk's failure prints the seed, the last operations, the mismatching pairs and a replay line;
the hypothesis variant prints the (shrunk) sequence of operations.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

try:  # the walks run without it; only the state machine needs it (the `test` extra should have it)
    from hypothesis import HealthCheck, Phase, seed, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
        run_state_machine_as_test,
    )
except ImportError:  # pragma: no cover
    settings = None  # type: ignore[assignment,misc]

from audience_sync.state import outbox
from tests.conftest import API_TOKEN, query
from tests.fake_planhat import FakePlanhat
from tests.sim_walk import (
    ATTRIBUTES,
    AUDIENCES,
    CRASH_AT,
    CRASH_KINDS,
    FAULT_KINDS,
    FAULT_POSITIONS,
    RUN_SEED,
    ChangeEmail,
    Crash,
    DeleteRow,
    Drift,
    Fault,
    Op,
    Reconcile,
    RestoreRow,
    SetAttr,
    SimResult,
    Simulation,
    Sync,
    fresh_sqlite_state,
    simulate,
)

TRANSPORTS = ("segment", "endusers")


@pytest.fixture(autouse=True)
def reclaim_after_every_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL, every delivery of the walks ends by truncating or vacuuming the outbox
    (production waits for 100,000 removed rows): a truncate that took a pending row, or a crash
    there that lost one, would leave a pair wrong."""
    monkeypatch.setattr(outbox, "RECLAIM_FROM", 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# Read at import: the autouse fixture of conftest clears AUDIENCE_SYNC_* before each test runs.
SEEDS = [RUN_SEED + n for n in range(_env_int("AUDIENCE_SYNC_SIM_SEEDS", 1))]
STEPS = _env_int("AUDIENCE_SYNC_SIM_STEPS", 64)  # drift and reconcile run too; fresh seeds each run add up
LONG = any(
    os.environ.get(name)
    for name in ("AUDIENCE_SYNC_SIM_SEED", "AUDIENCE_SYNC_SIM_SEEDS", "AUDIENCE_SYNC_SIM_STEPS")
)
EXAMPLES = _env_int("AUDIENCE_SYNC_SIM_EXAMPLES", 6)
HYPOTHESIS_STEPS = _env_int("AUDIENCE_SYNC_SIM_HYPOTHESIS_STEPS", 20)
SHRINK = "AUDIENCE_SYNC_SIM_EXAMPLES" in os.environ or os.environ.get("AUDIENCE_SYNC_SIM_SHRINK") == "1"


# --- the random walk ----------------------------------------------------------------------


@pytest.mark.timeout(0 if LONG else 120)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("walk_seed", SEEDS, ids=lambda walk_seed: f"seed{walk_seed}")
def test_walk_converges(state_url: str, transport: str, walk_seed: int, tmp_path: Path) -> None:
    result = simulate(walk_seed, STEPS, state_url, transport, tmp_path)
    assert result.ok, "\n" + result.report()


@pytest.mark.timeout(0 if LONG else 120)
@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"seed{seed}")
def test_walk_converges_with_the_source_diffed_in_its_planner_schema(
    state_url: str, seed: int, tmp_path: Path
) -> None:
    """The same walk on a source with `planner_schema` (SQLite's `main`, so that the walk's
    crashes mid-read still hit it): kills before, during and after the hand-off converge."""
    result = simulate(seed, STEPS, state_url, "endusers", tmp_path, planner=True)
    assert result.ok, "\n" + result.report()
    # it ran the planner: each audience's committed snapshot is in the source, and no other table
    source = tmp_path / f"sim-{seed}-endusers" / "source.db"
    with contextlib.closing(sqlite3.connect(source)) as connection:
        tables = {
            name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    generations = dict(query(state_url, "SELECT audience_key, generation FROM planner_snapshots"))
    assert generations and min(generations.values()) > 1
    assert tables == {"people"} | {f"as_snap_{key}_{n}" for key, n in generations.items()}


def test_a_walk_is_a_function_of_its_seed_and_longer_walks_extend_shorter_ones() -> None:
    from tests.sim_walk import generate_ops

    short = generate_ops(11, 40, "endusers")
    assert short == generate_ops(11, 40, "endusers")
    assert generate_ops(11, 90, "endusers")[:40] == short
    assert short != generate_ops(12, 40, "endusers")
    kinds = {type(op).__name__ for op in generate_ops(3, 400, "segment")}
    assert {"SetAttr", "DeleteRow", "RestoreRow", "ChangeEmail", "Sync"} <= kinds
    assert {"Drift", "Reconcile"} <= kinds  # never dropped from a walk


def test_the_report_carries_seed_operations_pairs_and_replay_line() -> None:
    result = SimResult(seed=5, steps=3, transport="endusers", backend="sqlite")
    result.ops = ["   1 set u4.plan='pro' -> member of ['pro_plan']", "   2 sync plain -> ..."]
    result.mismatches = [("u4", "pro_plan", False, True, "sync")]
    text = result.report()
    assert "seed=5" in text and "u4 pro_plan: expected False, Planhat True (after the clean sync)" in text
    assert "set u4.plan='pro'" in text
    assert (
        "AUDIENCE_SYNC_SIM_SEED=5 AUDIENCE_SYNC_SIM_STEPS=3 pytest tests/test_simulation.py "
        "-k 'walk and sqlite and endusers'" in text
    )


MACHINE_USERS = 6  # a small population: examples are short, so shrinking gets far
MACHINE_EMAIL_ONLY = frozenset({4, 5})


# --- pinned sequences: what the walk and hypothesis found, as regression tests ------------

# u0 ends in no audience and out of the baseline; then enters pro_plan alone: one change, one
# request, so that a fault or crash scripted at request 0 hits exactly that change.
_QUIET_U0: list[Op] = [
    Sync(),
    SetAttr(0, "plan", "free"),
    SetAttr(0, "orders", 0),
    SetAttr(0, "beta", 0),
    Sync(),
]
_TROUBLE: dict[str, Op] = {
    "timeout_after": Sync("plain", (Fault(0, "timeout_after"),)),
    "reset_after": Sync("plain", (Fault(0, "reset_after"),)),
    "crash_after": Sync("plain", (), Crash("http_after", 0)),
}
PINNED: dict[str, list[Op]] = {
    # Planhat applied u0 = true, audience-sync never learnt it; u0 leaves before the next run:
    # the stale pending `true` is dropped and, u0 never having been in the baseline, no false
    # is queued. Planhat keeps u0 = true.
    **{
        f"stale-true-after-{name}": [
            *_QUIET_U0,
            SetAttr(0, "plan", "pro"),
            trouble,
            SetAttr(0, "plan", "free"),
        ]
        for name, trouble in _TROUBLE.items()
    },
    # The mirror: u0 leaves, Planhat applies false unseen, u0 comes back before the next run:
    # the stale pending `false` is dropped, u0 is still in the baseline, nothing is queued.
    "lost-true-after-crash_after": [
        Sync(),
        SetAttr(0, "plan", "pro"),
        Sync(),
        SetAttr(0, "plan", "free"),
        _TROUBLE["crash_after"],
        SetAttr(0, "plan", "pro"),
    ],
    # A 2xx that is no Planhat answer (a proxy page, an empty body) counted as delivered.
    "html-200-counted-as-delivered": [
        *_QUIET_U0,
        SetAttr(0, "plan", "pro"),
        Sync("plain", (Fault(0, "html200"),)),
    ],
    "empty-200-counted-as-delivered": [
        *_QUIET_U0,
        SetAttr(0, "plan", "pro"),
        Sync("plain", (Fault(0, "empty200"),)),
    ],
    # A run killed after its first chunk was acknowledged: its `changes` say delivered, its
    # run record says sent = 0.
    "aborted-run-counts-its-deliveries": [Sync("plain", (), Crash("http_before", 1))],
}
_PINNED_CASES = [
    pytest.param(name, transport, id=f"{name}-{transport}")
    for name in PINNED
    for transport in TRANSPORTS
    if transport == "endusers" or not name.startswith("aborted")
]


@pytest.mark.parametrize(("name", "transport"), _PINNED_CASES)
def test_pinned_sequence_converges(name: str, transport: str, tmp_path: Path) -> None:
    ops = PINNED[name]
    result = simulate(
        0,
        len(ops),
        fresh_sqlite_state(tmp_path / "state.db"),
        transport,
        tmp_path,
        ops=ops,
        max_attempts=1,
        batch_size=2,
        users=MACHINE_USERS,
        email_only=MACHINE_EMAIL_ONLY,
    )
    assert result.ok, "\n" + result.report()


# --- the hypothesis state machine ---------------------------------------------------------


def machine_class(
    transport: str,
    workroot: Path,
    *,
    fault_kinds: tuple[str, ...] = FAULT_KINDS,
    crash_kinds: tuple[str, ...] = CRASH_KINDS,
    ignored: frozenset[str] = frozenset(),
    with_reconcile: bool = True,
) -> type[RuleBasedStateMachine]:
    """The walk's operations as rules of a state machine, the final clean run and its checks at
    teardown, the belief check (Simulation.diverged) after every step. `ignored` names result
    categories not to fail on, for a search aimed at one bug."""
    users = st.integers(0, MACHINE_USERS - 1)
    kinds = [k for k in fault_kinds if transport == "endusers" or k != "partial"]
    fault = st.sampled_from(kinds).flatmap(
        lambda kind: st.builds(
            Fault,
            users if kind in ("bad", "partial") else st.integers(0, FAULT_POSITIONS - 1),
            st.just(kind),
        )
    )
    faults = st.lists(fault, max_size=3).map(tuple) if kinds else st.just(())
    crashes = st.sampled_from(crash_kinds or ("http_before",)).flatmap(
        lambda where: st.builds(Crash, st.just(where), st.integers(0, CRASH_AT[where] - 1))
    )
    attributes = st.sampled_from([(attr, value) for attr, values in ATTRIBUTES.items() for value in values])
    examples = itertools.count()
    reconciling = with_reconcile

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sim: Simulation | None = None
            self.steps = 0

        @initialize(max_attempts=st.sampled_from((1, 2)), batch_size=st.sampled_from((2, 3)))
        def start(self, max_attempts: int, batch_size: int) -> None:
            work = workroot / f"example-{next(examples)}"
            work.mkdir(parents=True)
            self.sim = Simulation(
                seed=0,
                transport=transport,
                state_url=fresh_sqlite_state(work / "state.db"),
                workdir=work,
                max_attempts=max_attempts,
                batch_size=batch_size,
                users=MACHINE_USERS,
                email_only=MACHINE_EMAIL_ONLY,
            )
            self.sim.log.append(f"   0 start max_attempts={max_attempts} batch_size={batch_size}")

        def _apply(self, op: Any) -> None:
            assert self.sim is not None
            self.steps += 1
            self.sim.apply(self.steps, op)

        @rule(user=users, change=attributes)
        def set_attribute(self, user: int, change: tuple[str, Any]) -> None:
            self._apply(SetAttr(user, *change))

        @rule(user=users)
        def delete_row(self, user: int) -> None:
            self._apply(DeleteRow(user))

        @rule(user=users)
        def restore_row(self, user: int) -> None:
            self._apply(RestoreRow(user))

        @rule(user=users)
        def change_email(self, user: int) -> None:
            self._apply(ChangeEmail(user))

        @rule(mode=st.sampled_from(("plain", "full", "force")), faults=faults)
        def sync(self, mode: str, faults: tuple[Fault, ...]) -> None:
            self._apply(Sync(mode, faults))

        @precondition(lambda _self: bool(crash_kinds))
        @rule(mode=st.sampled_from(("plain", "full")), crash=crashes, faults=faults)
        def crashing_sync(self, mode: str, crash: Crash, faults: tuple[Fault, ...]) -> None:
            self._apply(Sync(mode, faults, crash))

        @precondition(lambda _self: reconciling)
        @rule(
            user=users,
            audience=st.sampled_from(list(AUDIENCES)),
            action=st.sampled_from(("true", "false", "remove", "delete")),
        )
        def drift(self, user: int, audience: str, action: str) -> None:
            self._apply(Drift(user, audience, action))

        @precondition(lambda _self: reconciling)
        @rule(faults=faults)
        def reconcile(self, faults: tuple[Fault, ...]) -> None:
            self._apply(Reconcile(faults))

        @invariant()
        def believes_what_planhat_holds(self) -> None:
            # Fails at the step that broke it, so that failing examples stay short.
            sim = self.sim
            if sim is not None and sim.first_divergence is not None and "belief" not in ignored:
                raise AssertionError("\n" + self._result(final=False).report(last=60))

        def _result(self, final: bool) -> SimResult:
            assert self.sim is not None
            result = SimResult(seed=0, steps=self.steps, transport=transport, backend="sqlite")
            if final:
                self.sim.final_check(result)
            elif self.sim.first_divergence is not None:
                step, pairs = self.sim.first_divergence
                result.violations.append(f"[belief] after step {step}: {', '.join(pairs[:8])}")
            result.ops = self.sim.log
            result.errors = self.sim.errors
            result.crashes = self.sim.crashes
            result.drift_injected = self.sim.drift_injected
            return result

        def teardown(self) -> None:
            if self.sim is None:
                return
            try:
                if self.sim.first_divergence is None or "belief" in ignored:
                    result = self._result(final=True)
                    assert not result.categories - ignored, "\n" + result.report(last=60)
            finally:
                self.sim.close()

    Machine.__name__ = f"SimulationMachine_{transport}"
    return Machine


def machine_settings(examples: int, steps: int, shrink: bool) -> settings:
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        derandomize=False,  # a fresh seed per run: RUN_SEED, given to each machine (@seed)
        database=None,
        deadline=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@pytest.mark.timeout(0 if SHRINK else 120)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hypothesis_state_machine_converges(transport: str, tmp_path: Path) -> None:
    if settings is None:
        pytest.skip("hypothesis is not installed")
    machine = seed(RUN_SEED)(machine_class(transport, tmp_path))
    try:
        run_state_machine_as_test(machine, settings=machine_settings(EXAMPLES, HYPOTHESIS_STEPS, SHRINK))
    except BaseException as failure:
        failure.add_note(
            f"replay: AUDIENCE_SYNC_SIM_SEED={RUN_SEED} pytest tests/test_simulation.py -k hypothesis"
        )
        raise


# --- the fake's read endpoint, drift helpers and faults ----------------------------------


def _client(fake: FakePlanhat, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=timeout)


def _put(fake: FakePlanhat, items: list[dict[str, Any]], timeout: float = 5.0) -> httpx.Response:
    with _client(fake, timeout) as client:  # a new contact needs a company, as in Planhat
        return client.put("/endusers", json=[{"companyExternalId": "acme", **item} for item in items])


def _read_all(client: httpx.Client, limit: int) -> tuple[list[dict[str, Any]], int]:
    found: list[dict[str, Any]] = []
    pages = 0
    while page := client.get("/endusers", params={"limit": limit, "offset": len(found)}).json():
        found += page
        pages += 1
    return found, pages


def test_get_endusers_pages_in_creation_order_with_ids(fake_planhat: FakePlanhat) -> None:
    items = [
        {"externalId": f"u{n}", "email": f"u{n}@x.com", "custom": {"vip": n % 2 == 0}} for n in range(12)
    ]
    assert _put(fake_planhat, items).status_code == 200
    fake_planhat.add_contact(email="solo@x.com", custom={"vip": True})
    with _client(fake_planhat) as client:
        found, pages = _read_all(client, 5)
        assert pages == 3
        assert [c["externalId"] for c in found] == [f"u{n}" for n in range(12)] + [None]
        assert found[-1]["email"] == "solo@x.com" and found[3]["custom"] == {"vip": False}
        assert len({c["_id"] for c in found}) == 13
        again, _ = _read_all(client, 100)
        assert [c["_id"] for c in again] == [c["_id"] for c in found]  # stable
        default = client.get("/endusers").json()
        assert len(default) == 13
        assert client.get("/endusers", params={"offset": 13}).json() == []
        fake_planhat.page_cap = 4  # Planhat may answer fewer than asked
        capped, pages = _read_all(client, 10)
        assert pages == 4 and [c["_id"] for c in capped] == [c["_id"] for c in found]
        assert client.get("/endusers", params={"limit": "x"}).status_code == 400
    with httpx.Client(base_url=fake_planhat.url) as anonymous:
        assert anonymous.get("/endusers").status_code == 401
    assert [(r.method, r.query) for r in fake_planhat.requests if r.method == "GET"][:1] == [
        ("GET", "limit=5&offset=0")
    ]


def test_get_endusers_answers_at_most_5000_pages_at_scale() -> None:
    """(How fast it pages is measured by benchmarks/bench_fake.py, not asserted here.)"""
    with FakePlanhat(keep_bodies=False) as fake:
        for n in range(100_000):
            fake.add_contact(f"u{n}", None, {"a": True})
        with _client(fake, timeout=30) as client:
            first = client.get("/endusers", params={"limit": 9000, "offset": 0}).json()
            for offset in range(5000, 100_000, 25_000):  # each page a slice, not a copy of all
                assert len(client.get("/endusers", params={"limit": 5000, "offset": offset}).json()) == 5000
            last = client.get("/endusers", params={"limit": 5000, "offset": 95_000}).json()
        assert len(first) == 5000 and len(last) == 5000 and last[-1]["externalId"] == "u99999"


def test_drift_helpers_keep_the_email_index_and_the_order(fake_planhat: FakePlanhat) -> None:
    assert (
        _put(fake_planhat, [{"externalId": "u1", "email": "a@x.com", "custom": {"k": True}}]).status_code
        == 200
    )
    fake_planhat.set_value("a@x.com", "k", False)
    assert fake_planhat.value("u1", "k") is False
    fake_planhat.set_value("u1", "k", None)
    assert "k" not in fake_planhat.contact("u1")["custom"]
    fake_planhat.set_value("u2", "k", True)  # a contact that does not exist yet
    key = fake_planhat.add_contact("u3", "c@x.com", {"k": True})
    assert key == "u3" and fake_planhat.value("c@x.com", "k") is True
    assert fake_planhat.delete_contact("a@x.com") and not fake_planhat.delete_contact("u1")
    assert fake_planhat.find("a@x.com") is None and fake_planhat.value("u1", "k") is None
    with _client(fake_planhat) as client:
        assert [c["externalId"] for c in client.get("/endusers").json()] == ["u2", "u3"]
    del fake_planhat.contacts["u2"]  # a test may edit the contacts directly
    fake_planhat.contacts["u9"] = {"externalId": "u9", "custom": {}}
    with _client(fake_planhat) as client:
        assert [c["externalId"] for c in client.get("/endusers").json()] == ["u3", "u9"]
    assert fake_planhat.applied_items == 1  # drift is not a write the client made


@pytest.mark.parametrize("applied", [True, False])
def test_timeout_next_holds_then_writes_only_when_applied(fake_planhat: FakePlanhat, applied: bool) -> None:
    fake_planhat.timeout_next(1, applied=applied, seconds=0.4)
    with pytest.raises(httpx.ReadTimeout):
        _put(fake_planhat, [{"externalId": "u1", "custom": {"k": True}}], timeout=0.1)
    assert fake_planhat.wait_idle(5)
    assert fake_planhat.value("u1", "k") is (True if applied else None)
    assert fake_planhat.applied_items == (1 if applied else 0)
    assert fake_planhat.requests[-1].fault == ("timeout after apply" if applied else "timeout before apply")
    assert (
        _put(fake_planhat, [{"externalId": "u2", "custom": {"k": True}}]).status_code == 200
    )  # one request only


@pytest.mark.parametrize("applied", [True, False])
def test_reset_next_closes_without_an_answer(fake_planhat: FakePlanhat, applied: bool) -> None:
    fake_planhat.reset_next(1, applied=applied)
    with pytest.raises(httpx.TransportError):
        _put(fake_planhat, [{"externalId": "u1", "custom": {"k": True}}])
    assert fake_planhat.value("u1", "k") is (True if applied else None)
    assert fake_planhat.state()["applied_items"] == (1 if applied else 0)
    with _client(fake_planhat) as client:  # faults apply to reads too
        fake_planhat.reset_next(1)
        with pytest.raises(httpx.TransportError):
            client.get("/endusers")
        assert client.get("/endusers").status_code == 200


def test_html_and_empty_answers_write_nothing(fake_planhat: FakePlanhat) -> None:
    fake_planhat.html_next(1)
    fake_planhat.html_next(1, status=503, body="<html>maintenance</html>")
    fake_planhat.empty_next(1)
    item = [{"externalId": "u1", "custom": {"k": True}}]
    first, second, third = (_put(fake_planhat, item) for _ in range(3))
    assert first.status_code == 200 and first.headers["content-type"] == "text/html"
    assert "nginx" in first.text
    assert (second.status_code, second.text) == (503, "<html>maintenance</html>")
    assert (third.status_code, third.content) == (200, b"")
    assert fake_planhat.contacts == {} and fake_planhat.applied_items == 0
    assert [r.fault for r in fake_planhat.requests] == ["html 200", "html 503", "empty 200"]
    assert _put(fake_planhat, item).status_code == 200 and fake_planhat.value("u1", "k") is True


def test_applied_counts_every_written_value_and_state_reports_them(fake_planhat: FakePlanhat) -> None:
    fake_planhat.partial_fail({"u2"})
    items = [
        {"externalId": "u1", "custom": {"a": True, "b": False}},
        {"externalId": "u2", "custom": {"a": True}},
    ]
    assert _put(fake_planhat, items).status_code == 206
    assert _put(fake_planhat, items[:1]).status_code == 200
    assert fake_planhat.applied_items == 2 and fake_planhat.applied_values == 4
    assert fake_planhat.applied[("u1", "a", True)] == 2 and fake_planhat.applied[("u2", "a", True)] == 0
    with urllib.request.urlopen(f"{fake_planhat.url}/_state?applied=1", timeout=5) as response:
        state = json.load(response)
    assert state["applied_items"] == 2 and state["applied_values"] == 4
    with urllib.request.urlopen(f"{fake_planhat.url}/_state", timeout=5) as response:
        assert "applied_items" not in json.load(response)  # the plain answer is unchanged
