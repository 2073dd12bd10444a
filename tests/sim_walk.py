"""A seeded convergence simulation: the real engine against the fake Planhat, through long
random sequences of source changes, faults, crashes and drift.

The promise checked: whatever fails on the way, once the faults stop, one clean
`audience-sync sync` leaves Planhat holding exactly the audiences' truth for every pair that
drift (Planhat edited behind audience-sync's back, on purpose) did not touch; after
`reconcile --fix` every pair, drifted or not, is right. "Every pair" is each contact the fake
holds (whatever identifier it was written under) and each the walk ever produced, and "right"
is exact: `true` for a member, `false` or no value otherwise. Then the outbox is empty, no run
is left 'running', and the history counts no more deliveries than Planhat saw.

A walk is a list of operations (`Op`) generated from the seed alone, before anything runs, so
that the walk of n steps is a prefix of the walk of n + 1 steps, whatever the engine does.
`Simulation.apply` runs one operation; the random walk (`simulate`) and the hypothesis state
machine in tests/test_simulation.py both drive the same `Simulation`.

The engine runs with the production settings that shape its requests (10 segment requests in
flight), so requests arrive at the fake in an order the scheduler picks. Faults are therefore
scripted per *unit* and attempt, not per arrival: a unit is one contact the engine handed to
its client (in the order it handed them, which is deterministic), or one bulk chunk or one read
(these go one at a time). `Fault(at=2)` hits the first attempt of the op's third unit; a second
fault at the same unit hits its retry. (The bulk transport sends one request at a time: there a
fault hits the op's request at its place, retries counted.) The fake serves a faulted request
alone (the others wait at `FaultGate`), so the fault scripted for it meets it and no other. Only
a request scripted to time out has the short client timeout: on a busy machine no other request
times out. What stays to chance at concurrency 10 is what production leaves to it: which other
requests were already on the wire when a run halts (a 2xx without a body) or dies.

Faults come from the fake (tests/fake_planhat.py) and from the HTTP transport the engine's
client is given (`SimTransport`): a `SimulatedCrash` raised there before a request is
forwarded (nothing applied) or after the fake answered (applied, the acknowledgement lost);
after that the process is dead, and no further request of the op leaves it. A crash can also
hit while the source is read (`CrashingSourcePool`: the source's cursor raises mid-stream) or at
the n-th statement the engine runs on the state database (a SQLAlchemy event). In-process the
exception unwinds; the dead process's lease is then expired by hand and the next operation runs
as a new process (new lease holder, new engine).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

import audience_sync
from audience_sync.config import Settings, load_settings
from audience_sync.errors import AudienceSyncError
from audience_sync.planhat import PlanhatClient, PlanhatReader
from audience_sync.snapshot.sources import SourcePool
from audience_sync.state import database
from audience_sync.sync.reconcile import reconcile
from audience_sync.sync.reports import SyncOptions
from audience_sync.sync.run import sync as engine_sync
from tests.fake_planhat import FakePlanhat

TENANT_TOKEN = "sim-tenant-token"
API_TOKEN = "sim-api-token"

USERS = 25
EMAIL_ONLY = frozenset(range(20, 25))  # these users have no id: their email is their identity
HOT_USERS = 4  # u0..u3 change often (and so does whoever else is drawn)
# Every user names a company: Planhat creates no contact without one (it discards the call).
AUDIENCES: dict[str, tuple[str, str]] = {  # key -> (name, query)
    "pro_plan": (
        "Pro Plan",
        "SELECT id AS user_id, email, name, 'acme' AS company_id FROM people WHERE plan = 'pro'",
    ),
    "buyers": ("Buyers", "SELECT id AS user_id, email, 'acme' AS company_id FROM people WHERE orders > 0"),
    "beta_testers": (
        "Beta Testers",
        "SELECT id AS user_id, email, name, 'acme' AS company_id FROM people "
        "WHERE beta = 1 AND plan <> 'free'",
    ),
}
ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "plan": ("pro", "basic", "free"),
    "orders": (0, 1, 3),
    "beta": (0, 1),
}

# The client's timeout for a request scripted to time out (the fake holds it a little longer);
# every other request has WALK_TIMEOUT, so that a busy machine does not time out requests the
# walk did not mean to (the walk would not replay).
CLIENT_TIMEOUT = 0.2
HOLD = CLIENT_TIMEOUT + 0.15
WALK_TIMEOUT = 10
SOURCE_CHUNK = 5  # rows per source fetch, so that a crash can land mid-stream
READ_PAGE = 10  # contacts per page a reconcile asks for (the fake may answer fewer: page_cap)

FAULT_KINDS = (
    "500",
    "502",
    "503",
    "429",
    "timeout_before",
    "timeout_after",
    "reset_before",
    "reset_after",
    "html200",
    "html503",
    "empty200",
    "bad",  # 400 for any request carrying the user at `at` (the user index)
    "partial",  # endusers: 206 naming the user at `at` as not written
)
CRASH_KINDS = ("http_before", "http_after", "source", "state")
FAULT_POSITIONS = 8  # faults land on one of the op's first units (see the module's docstring)
CRASH_AT = {"http_before": 8, "http_after": 8, "source": 4, "state": 60}


def run_seed(run_id: str | None) -> int:
    """This run's seed: AUDIENCE_SYNC_SIM_SEED replays one; else, under pytest-xdist, one drawn
    from the run's id `run_id`, so that every worker collects the same seeded tests and the
    controller can print the seed (tests/conftest.py); else a fresh one per run (printed at the
    end of the run, and in every failing walk's report)."""
    given = os.environ.get("AUDIENCE_SYNC_SIM_SEED", "").strip()
    if given:
        return int(given)
    if run_id:
        return int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 1_000_000
    return secrets.randbelow(1_000_000)


# Read at import: the autouse fixture of conftest clears AUDIENCE_SYNC_* before each test runs.
RUN_SEED = run_seed(os.environ.get("PYTEST_XDIST_TESTRUNUID"))


class SimulatedCrash(BaseException):
    """The process dies here. BaseException: nothing in the engine may catch it."""


# --- operations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SetAttr:
    user: int
    attr: str
    value: Any

    def __str__(self) -> str:
        return f"set u{self.user}.{self.attr}={self.value!r}"


@dataclass(frozen=True)
class DeleteRow:
    user: int

    def __str__(self) -> str:
        return f"delete row u{self.user}"


@dataclass(frozen=True)
class RestoreRow:
    user: int

    def __str__(self) -> str:
        return f"restore row u{self.user}"


@dataclass(frozen=True)
class ChangeEmail:
    user: int

    def __str__(self) -> str:
        return f"change email u{self.user}"


@dataclass(frozen=True)
class Fault:
    at: int  # the op's request index; for bad/partial the user index
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}@{self.at}"


@dataclass(frozen=True)
class Crash:
    where: str  # http_before | http_after | source | state
    at: int  # request index, source fetch index or state statement index

    def __str__(self) -> str:
        return f"crash {self.where}@{self.at}"


@dataclass(frozen=True)
class Sync:
    mode: str = "plain"  # plain | full | force
    faults: tuple[Fault, ...] = ()
    crash: Crash | None = None

    def __str__(self) -> str:
        parts = [f"sync {self.mode}"]
        if self.faults:
            parts.append("faults=[" + ", ".join(map(str, self.faults)) + "]")
        if self.crash:
            parts.append(str(self.crash))
        return " ".join(parts)


@dataclass(frozen=True)
class Drift:
    user: int
    audience: str
    action: str  # true | false | remove | delete (the whole contact)

    def __str__(self) -> str:
        return f"drift u{self.user}.{self.audience} {self.action}"


@dataclass(frozen=True)
class Reconcile:
    faults: tuple[Fault, ...] = ()

    def __str__(self) -> str:
        faults = " faults=[" + ", ".join(map(str, self.faults)) + "]" if self.faults else ""
        return f"reconcile --fix{faults}"


Op = SetAttr | DeleteRow | RestoreRow | ChangeEmail | Sync | Drift | Reconcile


def generate_ops(
    seed: int,
    steps: int,
    transport: str,
    *,
    with_reconcile: bool = True,
    fault_kinds: tuple[str, ...] | None = None,
    crash_kinds: tuple[str, ...] | None = None,
) -> list[Op]:
    """The walk: `steps` operations drawn from a random.Random seeded with (seed, transport)
    and nothing else, so the walk of n steps is the prefix of every longer one."""
    rng = random.Random(f"walk-{seed}-{transport}")
    kinds = fault_kinds if fault_kinds is not None else FAULT_KINDS
    if transport != "endusers":
        kinds = tuple(k for k in kinds if k != "partial")  # the webhook has no partial answer
    crashes = crash_kinds if crash_kinds is not None else CRASH_KINDS
    weights = {
        "set": 34,
        "delete": 4,
        "restore": 4,
        "email": 4,
        "sync": 26,
        "crash": 8 if crashes else 0,
        "flap": 6,  # three operations
        "drift": 5 if with_reconcile else 0,
        "reconcile": 3 if with_reconcile else 0,
    }
    names, chances = zip(*((n, w) for n, w in weights.items() if w), strict=True)

    def position(limit: int) -> int:
        # Mostly the first requests: an incremental run often makes only one or two.
        return min(int(rng.expovariate(0.7)), limit - 1)

    def faults(most: int, chance: float = 0.55) -> tuple[Fault, ...]:
        if not kinds or rng.random() >= chance:
            return ()
        count = rng.randint(1, most)
        return tuple(
            Fault(rng.randrange(USERS) if kind in ("bad", "partial") else position(FAULT_POSITIONS), kind)
            for kind in (rng.choice(kinds) for _ in range(count))
        )

    def crash() -> Crash:
        where = rng.choice(crashes)
        return Crash(
            where, position(CRASH_AT[where]) if where.startswith("http") else rng.randrange(CRASH_AT[where])
        )

    ops: list[Op] = []
    while len(ops) < steps:
        name = rng.choices(names, chances)[0]
        # Half the time one of a few "hot" users: the same user enters and leaves between two
        # runs often enough to hit what only a quick change of mind shows.
        user = rng.randrange(HOT_USERS) if rng.random() < 0.5 else rng.randrange(USERS)
        if name == "set":
            attr = rng.choice(list(ATTRIBUTES))
            ops.append(SetAttr(user, attr, rng.choice(ATTRIBUTES[attr])))
        elif name == "delete":
            ops.append(DeleteRow(user))
        elif name == "restore":
            ops.append(RestoreRow(user))
        elif name == "email":
            ops.append(ChangeEmail(user))
        elif name == "sync":
            mode = rng.choices(("plain", "full", "force"), (8, 1, 1))[0]
            ops.append(Sync(mode, faults(3)))
        elif name == "crash":
            mode = rng.choices(("plain", "full"), (4, 1))[0]
            ops.append(Sync(mode, faults(2), crash()))
        elif name == "flap":
            # A change of mind around a faulty run: a value changes, a run fails somehow while
            # delivering it, the value changes again before the next run.
            attr = rng.choice(list(ATTRIBUTES))
            first, second = rng.sample(ATTRIBUTES[attr], 2)
            if crashes and rng.random() < 0.4:
                trouble = Sync("plain", faults(2), crash())
            else:
                trouble = Sync("plain", faults(3, chance=1.0))
            ops += [SetAttr(user, attr, first), trouble, SetAttr(user, attr, second)]
        elif name == "drift":
            action = rng.choice(("true", "false", "remove", "delete"))
            ops.append(Drift(user, rng.choice(list(AUDIENCES)), action))
        else:
            ops.append(Reconcile(faults(2)))
    return ops[:steps]


# --- the source ---------------------------------------------------------------------------


class SimSource:
    """The users' SQLite database: a `people` table the walk rewrites, and the model of it."""

    def __init__(
        self, path: Path, rng: random.Random, users: int = USERS, email_only: frozenset[int] = EMAIL_ONLY
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.email_only = email_only
        self.email_version = [0] * users
        self.rows: dict[int, dict[str, Any]] = {}
        self.deleted: dict[int, dict[str, Any]] = {}
        for user in range(users):
            self.rows[user] = {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()}
        with contextlib.closing(sqlite3.connect(path)) as connection, connection:
            connection.execute(
                "CREATE TABLE people (id TEXT, email TEXT, name TEXT, plan TEXT, orders INTEGER, "
                "beta INTEGER)"
            )
        self.write()

    def ref(self, user: int) -> str:
        """The identity audience-sync keys the user on: the id, else the email."""
        return self.email(user) if user in self.email_only else f"u{user}"

    def email(self, user: int) -> str:
        version = self.email_version[user]
        if user in self.email_only:
            return f"e{user}.v{version}@solo.example"
        return f"u{user}.v{version}@example.com"

    def write(self) -> None:
        rows = [
            {
                "id": None if user in self.email_only else f"u{user}",
                "email": self.email(user),
                "name": f"User {user}",
                **attrs,
            }
            for user, attrs in sorted(self.rows.items())
        ]
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as connection, connection:
            connection.execute("DELETE FROM people")
            connection.executemany(
                "INSERT INTO people VALUES (:id, :email, :name, :plan, :orders, :beta)", rows
            )

    def refs(self) -> set[str]:
        return {self.ref(user) for user in self.rows}

    def truth(self) -> dict[str, set[str]]:
        """Each audience's members, by running its query (the source is the truth)."""
        members: dict[str, set[str]] = {}
        with contextlib.closing(sqlite3.connect(self.path)) as connection:
            for key, (_, query) in AUDIENCES.items():
                cursor = connection.execute(query)
                names = [c[0] for c in cursor.description]
                refs = set()
                for row in cursor:
                    values = dict(zip(names, row, strict=True))
                    ref = values.get("user_id") or values.get("email")
                    if ref:
                        refs.add(ref.strip())
                members[key] = refs
        return members


class CrashingSourcePool(SourcePool):
    """Source engines whose SQLite cursor reads SOURCE_CHUNK rows per fetch and can crash."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__(sim.settings.sources)
        self.sim = sim

    def engine(self, name: str) -> sa.Engine:
        if name not in self._engines:
            sim = self.sim

            class Cursor(sqlite3.Cursor):
                def fetchmany(self, size: int | None = None) -> list[Any]:
                    sim.source_fetch()
                    return super().fetchmany(min(size or SOURCE_CHUNK, SOURCE_CHUNK))

            class Connection(sqlite3.Connection):
                def cursor(self, factory: Any = Cursor) -> Any:
                    return super().cursor(factory)

            url = self._sources[name].url
            self._engines[name] = sa.create_engine(url, connect_args={"factory": Connection})
        return self._engines[name]


# --- the HTTP transport -------------------------------------------------------------------


class FaultGate:
    """Requests pass side by side; a faulted one passes alone, so that the fault scripted on
    the fake (whose queue serves requests in arrival order) meets that request and no other."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._passing = 0
        self._alone = False

    @contextlib.contextmanager
    def side_by_side(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone)
            self._passing += 1
        try:
            yield
        finally:
            with self._changed:
                self._passing -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone)
            self._alone = True
            self._changed.wait_for(lambda: self._passing == 0)
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


def unit_key(request: httpx.Request) -> Hashable:
    """What a request carries: the contact of a Segment message, the contacts of a bulk chunk,
    or the read it makes. Its retries carry the same."""
    if request.method in ("POST", "PUT") and request.content:
        try:
            body = json.loads(request.content)
        except ValueError:
            body = None
        if isinstance(body, dict):  # one Segment message
            traits = body.get("traits") or {}
            return ("contact", body.get("userId") or traits.get("email"))
        if isinstance(body, list):  # a bulk chunk
            refs = tuple(str(item.get("externalId") or item.get("email")) for item in body)
            return (request.method, request.url.path, refs)
    return (request.method, request.url.path, request.url.query)


class SimTransport(httpx.BaseTransport):
    """The real HTTP transport, with the op's scripted faults and crash: a crash before
    forwarding a request or after its answer, and nothing sent once the process is dead."""

    def __init__(self, sim: Simulation) -> None:
        self.inner = httpx.HTTPTransport()
        self.sim = sim

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sim = self.sim
        slot = sim.slot_of(unit_key(request))
        sim.maybe_crash("http_before", slot)
        fault = sim.fault_at(slot)
        with sim.gate.alone() if fault else sim.gate.side_by_side():
            if fault:
                sim.script_fault(fault)
                if fault.startswith("timeout"):
                    request.extensions["timeout"] = httpx.Timeout(CLIENT_TIMEOUT).as_dict()
            response = self.inner.handle_request(request)
        try:
            sim.maybe_crash("http_after", slot)
        except SimulatedCrash:
            response.read()  # the fake has written and answered; the answer is lost
            response.close()
            raise
        return response

    def close(self) -> None:
        self.inner.close()


class SimSender:
    """The engine's client, telling the simulation which contacts it is handed, in order."""

    def __init__(self, sim: Simulation, client: PlanhatClient) -> None:
        self.sim = sim
        self.client = client
        self.chunk_size = client.chunk_size

    @property
    def exhausted(self) -> bool:
        return self.client.exhausted

    def send(self, contacts: Sequence[Any]) -> Any:
        self.sim.hand_out(contacts)
        return self.client.send(contacts)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SimSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()


def _describe(report: Any) -> str:
    """A reconcile report in a few words, whatever its exact shape."""
    words = [f"{getattr(report, 'key', '?')}:{getattr(report, 'status', '?')}"]
    for name in ("unexpected_true", "missing_true", "missing_contact", "in_doubt"):
        if getattr(report, name, 0):
            words.append(f"{name}={getattr(report, name)}")
    return "/".join(words)


def _no_sleep(_seconds: float) -> None:
    """The client's sleep: no rate-limit or backoff waits (timeouts stay real)."""


# --- results ------------------------------------------------------------------------------


@dataclass
class SimResult:
    seed: int
    steps: int
    transport: str
    backend: str
    ops: list[str] = field(default_factory=list)
    # (ref, key, expected, what Planhat held, after which clean command)
    mismatches: list[tuple[str, str, bool, Any, str]] = field(default_factory=list)
    # "[category] text": exit (the clean run failed), belief (see Simulation.diverged),
    # pending, running, accounting (runs.sent), phantom (delivered but never written)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unexpected exceptions out of the engine
    first_divergence: tuple[int, list[str]] | None = None  # (step, pairs) see Simulation.diverged
    drift_injected: bool = False
    crashes: int = 0
    elapsed: float = 0.0
    final_output: str = ""

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.violations or self.errors)

    @property
    def categories(self) -> set[str]:
        """What failed: convergence, error, and the violations' categories."""
        found = {v[1 : v.index("]")] for v in self.violations}
        if self.mismatches:
            found.add("convergence")
        if self.errors:
            found.add("error")
        return found

    def replay(self) -> str:
        return (
            f"AUDIENCE_SYNC_SIM_SEED={self.seed} AUDIENCE_SYNC_SIM_STEPS={self.steps} "
            f"pytest tests/test_simulation.py -k 'walk and {self.backend} and {self.transport}'"
        )

    def report(self, last: int = 30) -> str:
        lines = [
            f"simulation seed={self.seed} steps={self.steps} transport={self.transport} "
            f"backend={self.backend}: {'ok' if self.ok else 'FAILED'} "
            f"({self.crashes} crashes, drift {'injected' if self.drift_injected else 'none'}, "
            f"{self.elapsed:.1f}s; audience_sync from {Path(audience_sync.__file__).parent})",
        ]
        if self.mismatches:
            lines.append(f"Planhat differs from the audiences' truth ({len(self.mismatches)} pairs):")
            lines += [
                f"  {ref} {key}: expected {expected}, Planhat {held!r} (after the clean {after})"
                for ref, key, expected, held, after in self.mismatches[:40]
            ]
        if self.violations:
            lines.append("violations:")
            lines += [f"  {v}" for v in self.violations]
        if self.errors:
            lines.append("unexpected exceptions:")
            lines += [f"  {e}" for e in self.errors]
        shown = self.ops[-last:]
        lines.append(f"last {len(shown)} of {len(self.ops)} operations:")
        lines += [f"  {line}" for line in shown]
        if self.final_output.strip():
            lines.append("final clean run output:")
            lines += [f"  {line}" for line in self.final_output.strip().splitlines()[-20:]]
        lines.append("replay: " + self.replay())
        return "\n".join(lines)


# --- the simulation -----------------------------------------------------------------------

_template_lock = threading.Lock()
_templates: dict[str, Path] = {}


def fresh_sqlite_state(path: Path) -> str:
    """A migrated SQLite state database at `path`, copied from a per-process template
    (migrating from scratch costs more than a whole short walk)."""
    with _template_lock:
        template = _templates.get("sqlite")
        if template is None or not template.exists():
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="audience-sync-sim-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            template = folder / "template.db"
            engine = database.open_state(f"sqlite:///{template}")
            engine.dispose()
            _templates["sqlite"] = template
        path.write_bytes(template.read_bytes())
    return f"sqlite:///{path}"


class Simulation:
    """One state database, one fake Planhat, one source; operations applied one by one."""

    def __init__(
        self,
        *,
        seed: int,
        transport: str,
        state_url: str,
        workdir: Path,
        max_attempts: int | None = None,
        batch_size: int | None = None,
        track_divergence: bool = True,
        users: int = USERS,
        email_only: frozenset[int] = EMAIL_ONLY,
        planner: bool = False,
    ) -> None:
        self.seed = seed
        self.planner = planner  # the source diffs in its own `main` schema (planner_schema)
        self.transport = transport
        self.state_url = state_url
        self.workdir = workdir
        rng = random.Random(f"setup-{seed}")
        self.max_attempts = max_attempts or rng.choice((1, 2))
        self.batch_size = batch_size or rng.choice((2, 3, 5))
        self.fake = FakePlanhat(tenant_token=TENANT_TOKEN, api_token=API_TOKEN).start()
        self.fake.page_cap = rng.choice((None, 4, 7))  # Planhat may answer shorter pages
        self.source = SimSource(workdir / "source.db", rng, users, email_only)
        self.config = workdir / "audience_sync.toml"
        self._write_config(self.config, walk=True)
        self.clean_config = workdir / "audience_sync.clean.toml"
        self._write_config(self.clean_config, walk=False)
        self.settings: Settings = load_settings(self.config, environ={})
        self.engine = self._open_engine()
        self.holder_number = 0
        self.holder = self._new_holder()
        self.ever_seen: set[str] = set(self.source.refs())
        self.drifted: set[tuple[str, str]] = set()
        self.drift_injected = False
        self.track_divergence = track_divergence
        self.log: list[str] = []
        self.errors: list[str] = []
        self.crashes = 0
        self.first_divergence: tuple[int, list[str]] | None = None
        self.first_miscount: tuple[int, list[str]] | None = None  # see Simulation.miscounted
        # The plan of the operation running now.
        self._lock = threading.Lock()
        self._crash: Crash | None = None
        self._dead = False
        self._fetches = 0
        self._statements = 0
        self.gate = FaultGate()
        self._units: dict[Hashable, int] = {}
        self._attempts: Counter[Hashable] = Counter()
        self._arrivals = 0
        self._slots: dict[tuple[int, int], str] = {}  # (unit, attempt) -> fault kind

    # --- setup ----------------------------------------------------------------------------

    def _write_config(self, path: Path, *, walk: bool) -> None:
        """The walk's config (short timeouts, one or two attempts: faults end runs) or, with
        walk=False, the final clean run's: production's timeouts and retries, so that a busy
        machine does not fail the run that must succeed. Both leave `concurrency` at
        production's default."""
        retries = [
            f"timeout_seconds = {WALK_TIMEOUT}",
            f"max_attempts = {self.max_attempts}",
            "backoff_base_seconds = 0.001",
            "backoff_max_seconds = 0.01",
            "retry_budget_seconds = 1",
        ]
        lines = [
            "[database]",
            f'url = "{self.state_url}"',
            "",
            "[planhat]",
            f'transport = "{self.transport}"',
            f'base_url = "{self.fake.url}"',
            f'tenant_token = "{TENANT_TOKEN}"',
            f'api_token = "{API_TOKEN}"',
            *(retries if walk else ["backoff_base_seconds = 0.05", "backoff_max_seconds = 0.5"]),
            "max_requests_per_second = 150",
            f"batch_size = {self.batch_size}",
            "",
            "[safety]",
            "min_members = 1000000",  # the mass-exit guard never blocks the walk
            "",
            "[sources.app]",
            f'url = "{self.source.url}"',
            *(['planner_schema = "main"'] if self.planner else []),
            "",
        ]
        lines += ["[reconcile]", f"page_size = {READ_PAGE}", "max_requests_per_second = 150", ""]
        for key, (name, query) in AUDIENCES.items():
            lines += ["[[audiences]]", f'name = "{name}"', f'key = "{key}"', 'source = "app"']
            lines += [f'query = "{query}"', ""]
        path.write_text("\n".join(lines))

    def _open_engine(self) -> sa.Engine:
        engine = database.open_state(self.state_url)
        sa.event.listen(engine, "before_cursor_execute", self._before_statement)
        return engine

    def _new_holder(self) -> str:
        self.holder_number += 1
        return f"sim:{self.seed}:{self.holder_number}"

    def close(self) -> None:
        self.engine.dispose()
        self.fake.stop()

    # --- crash points ---------------------------------------------------------------------

    def maybe_crash(self, where: str, at: int | tuple[int, int]) -> None:
        """Die here if the op's crash is scripted here; an HTTP crash point is the first
        attempt of a unit. Once dead, no request leaves the process."""
        with self._lock:
            if self._dead and where == "http_before":
                raise SimulatedCrash("the process is dead")
            crash = self._crash
            if (
                crash is None
                or crash.where != where
                or (crash.at, 0) != (at if isinstance(at, tuple) else (at, 0))
            ):
                return
            self._crash = None  # a process dies once
            self._dead = True
        raise SimulatedCrash(f"{where} at {crash.at}")

    def source_fetch(self) -> None:
        with self._lock:
            index = self._fetches
            self._fetches += 1
        self.maybe_crash("source", index)

    def _before_statement(self, *_args: Any) -> None:
        with self._lock:
            index = self._statements
            self._statements += 1
        self.maybe_crash("state", index)

    # --- the client the engine is given ---------------------------------------------------

    def sender_factory(self, planhat: Any) -> SimSender:
        return SimSender(self, PlanhatClient(planhat, transport=SimTransport(self), sleep=_no_sleep))

    def hand_out(self, contacts: Sequence[Any]) -> None:
        """The engine hands these contacts to its client, in this order: each is a unit."""
        with self._lock:
            for contact in contacts:
                self._units.setdefault(("contact", contact.ref), len(self._units))

    def slot_of(self, key: Hashable) -> tuple[int, int]:
        """(unit, attempt) of a request: which unit it carries (a unit not handed out before
        is numbered on arrival: reads and bulk chunks go one at a time) and how many requests
        carried it before in this op. The bulk transport sends one request at a time, so
        there a request's slot is simply its place in the op's requests, retries counted."""
        with self._lock:
            if self.transport == "endusers":
                self._arrivals += 1
                return self._arrivals - 1, 0
            unit = self._units.setdefault(key, len(self._units))
            attempt = self._attempts[key]
            self._attempts[key] += 1
            return unit, attempt

    def fault_at(self, slot: tuple[int, int]) -> str | None:
        with self._lock:
            return self._slots.pop(slot, None)

    # --- operations -----------------------------------------------------------------------

    def apply(self, step: int, op: Op) -> str:
        """Run one operation; returns (and logs) a line saying what happened."""
        if isinstance(op, SetAttr | DeleteRow | RestoreRow | ChangeEmail):
            outcome = self._change_source(op)
        elif isinstance(op, Sync):
            outcome = self._run(op.faults, op.crash, lambda pool: self._sync(op, pool))
        elif isinstance(op, Drift):
            outcome = self._drift(op)
        else:
            outcome = self._run(op.faults, None, self._reconcile)
        line = f"{step:4d} {op} -> {outcome.replace(self.fake.url, '<planhat>')}"  # same text every run
        self.log.append(line)
        if self.track_divergence and self.first_divergence is None:
            pairs = self.diverged()
            if pairs:
                self.first_divergence = (step, pairs)
        if self.first_miscount is None and (wrong := self.miscounted()):
            self.first_miscount = (step, wrong)
        return line

    def _change_source(self, op: SetAttr | DeleteRow | RestoreRow | ChangeEmail) -> str:
        source = self.source
        if isinstance(op, SetAttr):
            attrs = source.rows.get(op.user) or source.deleted.get(op.user)
            assert attrs is not None
            attrs[op.attr] = op.value
            outcome = "" if op.user in source.rows else "(row deleted: kept for its return)"
        elif isinstance(op, DeleteRow):
            if op.user not in source.rows:
                return "no row"
            source.deleted[op.user] = source.rows.pop(op.user)
            outcome = ""
        elif isinstance(op, RestoreRow):
            if op.user not in source.deleted:
                return "row present"
            source.rows[op.user] = source.deleted.pop(op.user)
            outcome = ""
        else:
            source.email_version[op.user] += 1
            outcome = source.email(op.user)
        source.write()
        self.ever_seen |= source.refs()
        members = [k for k, refs in source.truth().items() if source.ref(op.user) in refs]
        return f"{outcome} member of {members or 'none'}".strip()

    def _run(self, faults: tuple[Fault, ...], crash: Crash | None, body: Callable[[SourcePool], str]) -> str:
        self._script(faults)
        with self._lock:
            self._crash, self._dead, self._fetches, self._statements = crash, False, 0, 0
        pool = CrashingSourcePool(self)
        died = False
        try:
            outcome = body(pool)
        except SimulatedCrash as crashed:
            outcome, died = f"CRASHED ({crashed})", True
            self._after_crash()
        except AudienceSyncError as exc:  # an expected failure, one line in the CLI
            outcome = f"FAILED {type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug: recorded, then the next op is a new process
            error = f"{type(exc).__name__}: {exc}"
            self.errors.append(f"step {len(self.log) + 1}: {error}")
            outcome, died = f"RAISED {error}", True
            self._after_crash()
        finally:
            pool.close()
            if died or self._dead:
                # What the dead process held goes with it. In-process, a run crashed by a
                # BaseException leaves its source cursor open (SQLAlchemy takes the exception for
                # a disconnect and invalidates the connection without closing the cursor), and
                # its read would keep a SQLite source locked until the frames are collected.
                gc.collect()
            with self._lock:
                fired_not = self._crash
                self._crash = None
            self.fake.wait_idle(timeout=10)  # a held request writes (or not) before what follows
            self.fake.clear_faults()
        if crash is not None and fired_not is not None:
            outcome += " (crash point not reached)"
        return outcome

    def _script(self, faults: tuple[Fault, ...]) -> None:
        """The op's faults: per contact on the fake (bad, partial), per (unit, attempt) for the
        rest, scripted on the fake when the request carrying them comes (`script_fault`)."""
        slots: dict[tuple[int, int], str] = {}
        for fault in faults:
            if fault.kind == "bad":
                self.fake.bad_items({self.source.ref(fault.at)})
            elif fault.kind == "partial":
                self.fake.partial_fail({self.source.ref(fault.at)})
            else:
                unit, attempt = fault.at, 0
                while (unit, attempt) in slots:  # a second fault on a unit hits its retry
                    if self.transport == "endusers":
                        unit += 1  # ... its next request, there
                    else:
                        attempt += 1
                slots[(unit, attempt)] = fault.kind
        with self._lock:
            self._slots = slots
            self._units = {}
            self._attempts = Counter()
            self._arrivals = 0

    def script_fault(self, kind: str) -> None:
        """Script one fault on the fake, for the request about to pass alone."""
        fake = self.fake
        if kind in ("500", "502", "503"):
            fake.fail_next(1, status=int(kind))
        elif kind == "429":
            fake.fail_next(1, status=429, retry_after="0")
        elif kind.startswith("timeout"):
            fake.timeout_next(1, applied=kind.endswith("after"), seconds=HOLD)
        elif kind.startswith("reset"):
            fake.reset_next(1, applied=kind.endswith("after"))
        elif kind.startswith("html"):
            fake.html_next(1, status=int(kind[4:]))
        elif kind == "empty200":
            fake.empty_next(1, status=200)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _sync(self, op: Sync, pool: SourcePool) -> str:
        options = SyncOptions(full=op.mode == "full", force=op.mode == "force")
        reports = engine_sync(
            self.settings,
            self.engine,
            None,
            options,
            sources=pool,
            sender_factory=self.sender_factory,
            holder=self.holder,
        )
        return " ".join(
            f"{r.key}:{r.status}/sent={r.sent},failed={r.failed},pending={r.pending}" for r in reports
        )

    def _reconcile(self, pool: SourcePool) -> str:
        def reader(settings: Settings) -> PlanhatReader:
            return PlanhatReader(
                settings.planhat, page_size=READ_PAGE, transport=SimTransport(self), sleep=_no_sleep
            )

        reports = reconcile(
            self.settings,
            self.engine,
            None,
            fix=True,
            sources=pool,
            reader_factory=reader,
            sender_factory=self.sender_factory,
            holder=self.holder,
        )
        if all(getattr(report, "status", None) in ("agree", "fixed") for report in reports):
            self.drifted.clear()  # repaired: what Planhat holds is known again
        return " ".join(_describe(report) for report in reports)[:400]

    def _drift(self, op: Drift) -> str:
        ref = self.source.ref(op.user)
        self.drift_injected = True
        self.ever_seen.add(ref)
        if op.action == "delete":
            gone = self.fake.delete_contact(ref)
            self.drifted |= {(ref, key) for key in AUDIENCES}
            return "contact deleted" if gone else "no contact"
        value = {"true": True, "false": False, "remove": None}[op.action]
        self.fake.set_value(ref, op.audience, value)
        self.drifted.add((ref, op.audience))
        return ""

    def _after_crash(self) -> None:
        """The process died: its lease expires, and the next operation is a new process."""
        self.crashes += 1
        past = datetime.now(UTC) - timedelta(hours=1)
        self.engine.dispose()
        engine = sa.create_engine(self.state_url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE leases SET expires_at = :past"), {"past": past.replace(tzinfo=None)}
                )
        finally:
            engine.dispose()
        self.engine = self._open_engine()
        self.holder = self._new_holder()

    # --- checks ---------------------------------------------------------------------------

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.state_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.exec_driver_sql(sql)]
        finally:
            engine.dispose()

    def diverged(self) -> list[str]:
        """Pairs where audience-sync is wrong about Planhat with nothing left to correct it:
        Planhat's value differs from the baseline (what audience-sync believes Planhat holds)
        and no outbox row exists for the pair. Drift (injected on purpose) is left out."""
        with self.engine.connect() as connection:
            baseline = {
                (r, k) for k, r in connection.exec_driver_sql("SELECT audience_key, user_ref FROM baseline")
            }
            pending = {
                (r, k) for k, r in connection.exec_driver_sql("SELECT audience_key, user_ref FROM pending")
            }
        pairs = []
        for ref in sorted(self.ever_seen):
            for key in AUDIENCES:
                if (ref, key) in self.drifted or (ref, key) in pending:
                    continue
                held = self.fake.value(ref, key) is True
                if held != ((ref, key) in baseline):
                    pairs.append(f"{ref}.{key} Planhat={held} baseline={not held}")
        return pairs

    def _clean_run(self, command: list[str], output: io.StringIO, result: SimResult) -> None:
        from audience_sync.cli import main

        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main(["--config", str(self.clean_config), *command])
        if code != 0:
            result.violations.append(f"[exit] `audience-sync {' '.join(command)}` exited {code}")
        self.fake.wait_idle()

    def compare(self, result: SimResult, *, after: str, skip: set[tuple[str, str]]) -> None:
        """Planhat against the audiences' truth, exactly: a member's value is `true`, anyone
        else's `false` or absent. Every contact the fake holds is looked at (whatever
        identifier it was written under), and every identifier the walk ever produced."""
        truth = self.source.truth()
        held: dict[str, dict[str, Any]] = {ref: {} for ref in self.ever_seen}
        for contact in list(self.fake.contacts.values()):
            ref = contact.get("externalId") or contact.get("email") or f"<no identifier: {contact}>"
            held[str(ref)] = contact.get("custom") or {}
        for ref in sorted(held):
            for key in AUDIENCES:
                if (ref, key) in skip:
                    continue
                value = held[ref].get(key)
                member = ref in truth[key]
                if not (value is True if member else value is False or value is None):
                    result.mismatches.append((ref, key, member, value, after))

    def miscounted(self) -> list[str]:
        """Audiences whose kept baseline_count (what `status` shows as "in Planhat") is not
        the rows of their baseline; a count not kept (NULL) is counted live, never wrong."""
        with self.engine.connect() as connection:
            kept = connection.exec_driver_sql(
                "SELECT a.key, a.baseline_count, (SELECT count(*) FROM baseline b "
                "WHERE b.audience_key = a.key) FROM audiences a WHERE a.baseline_count IS NOT NULL"
            ).all()
        return [f"{key} kept {count}, has {rows}" for key, count, rows in kept if count != rows]

    def final_check(self, result: SimResult) -> None:
        """Clear the faults and run one clean `audience-sync sync` through the CLI: every pair
        drift did not touch must then be right. Then `reconcile --fix` (after drift): every
        pair must be right. Then the bookkeeping."""
        self.fake.clear_faults()
        self.engine.dispose()
        output = io.StringIO()
        self._clean_run(["sync"], output, result)
        self.compare(result, after="sync", skip=self.drifted)
        if self.drift_injected:
            self._clean_run(["reconcile", "--fix"], output, result)
            self.compare(result, after="reconcile --fix", skip=set())
        result.final_output = output.getvalue()
        if self.track_divergence and self.first_divergence is None and (pairs := self.diverged()):
            self.first_divergence = (len(self.log) + 1, pairs)  # the clean run itself
        if self.first_divergence is not None:
            step, pairs = self.first_divergence
            result.violations.append(
                f"[belief] after step {step} the state database was wrong about Planhat with "
                f"nothing pending to correct it (baseline = what Planhat was told and holds): "
                f"{', '.join(pairs[:8])}"
            )

        if self.first_miscount is None and (wrong := self.miscounted()):
            self.first_miscount = (len(self.log) + 1, wrong)
        if self.first_miscount is not None:
            step, wrong = self.first_miscount
            result.violations.append(f"[count] after step {step} a kept baseline count was wrong: {wrong}")

        pending = self._query("SELECT audience_key, user_ref, value FROM pending ORDER BY 1, 2")
        if pending:
            shown = ", ".join(f"{r}.{k}={bool(v)}" for k, r, v in pending[:10])
            result.violations.append(f"[pending] {len(pending)} rows left in pending: {shown}")
        running = self._query("SELECT id, audience_key FROM runs WHERE status = 'running'")
        if running:
            result.violations.append(f"[running] runs left 'running': {running}")
        sent = self._query("SELECT coalesce(sum(sent), 0) FROM runs")[0][0]
        delivered_rows = self._query(
            "SELECT user_ref, audience_key, value, count(*) FROM changes "
            "WHERE outcome = 'delivered' GROUP BY user_ref, audience_key, value"
        )
        delivered = sum(row[3] for row in delivered_rows)
        if sent != delivered:
            per_status = self._query(
                "SELECT r.status, sum(r.sent), (SELECT count(*) FROM changes c WHERE c.outcome = "
                "'delivered' AND c.run_id IN (SELECT id FROM runs WHERE status = r.status)) "
                "FROM runs r GROUP BY r.status ORDER BY 1"
            )
            result.violations.append(
                f"[accounting] sum(runs.sent) = {sent} but {delivered} changes are 'delivered' "
                f"(per run status: (status, sent, delivered) {per_status})"
            )
        # A `false` to a contact Planhat does not have (and cannot create) is done unwritten.
        done = Counter({k: n for k, n in getattr(self.fake, "declined", {}).items() if k[2] is False})
        applied = self.fake.applied + done
        if delivered > self.fake.applied_values + sum(done.values()):
            result.violations.append(
                f"[phantom] {delivered} changes 'delivered' but Planhat wrote only "
                f"{self.fake.applied_values} values"
            )
        over = [
            f"{ref}.{key}={bool(value)}: delivered {count}, written {applied[(ref, key, bool(value))]}"
            for ref, key, value, count in delivered_rows
            if count > applied[(ref, key, bool(value))]
        ]
        if over:
            result.violations.append(
                f"[phantom] changes 'delivered' more often than Planhat wrote them ({len(over)}): "
                + "; ".join(over[:10])
            )


@contextlib.contextmanager
def simulation(
    seed: int, transport: str, state_url: str, workdir: Path, **options: Any
) -> Iterator[Simulation]:
    workdir.mkdir(parents=True, exist_ok=True)
    sim = Simulation(seed=seed, transport=transport, state_url=state_url, workdir=workdir, **options)
    try:
        yield sim
    finally:
        sim.close()


def backend_of(state_url: str) -> str:
    return "postgresql" if state_url.startswith("postgresql") else "sqlite"


def simulate(
    seed: int,
    steps: int,
    state_url: str,
    transport: str,
    tmp_path: Path,
    *,
    ops: list[Op] | None = None,
    **options: Any,
) -> SimResult:
    """Run the walk of `seed` for `steps` operations, then the final clean run and checks."""
    started = time.monotonic()
    walk = ops if ops is not None else generate_ops(seed, steps, transport)
    result = SimResult(seed=seed, steps=len(walk), transport=transport, backend=backend_of(state_url))
    with simulation(seed, transport, state_url, tmp_path / f"sim-{seed}-{transport}", **options) as sim:
        for step, op in enumerate(walk, start=1):
            sim.apply(step, op)
        sim.final_check(result)
        result.ops = sim.log
        result.errors = sim.errors
        result.crashes = sim.crashes
        result.drift_injected = sim.drift_injected
        result.first_divergence = sim.first_divergence
    result.elapsed = time.monotonic() - started
    return result
