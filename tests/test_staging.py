"""The bulk paths behind a large sync: member rows, staging, the diff's shortcut, page grouping,
and the helpers that keep them fast (the read-ahead thread, the paused collector)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audience_sync.snapshot import diff, staging
from audience_sync.snapshot.contract import Member, ReadStats, _member, members
from audience_sync.state import database
from audience_sync.state.models import UTCDateTime
from audience_sync.support import collector, threads
from audience_sync.support.collector import frozen_gc
from audience_sync.sync.delivery import coalesce

COLUMNS = {"user_id": 0, "email": 1, "name": 2, "title": 3, "company_id": 4}
NOW = datetime(2026, 11, 23, tzinfo=UTC)


def test_the_fast_path_reads_rows_exactly_as_the_full_contract() -> None:
    rows = [
        ("u1", "a@x.com", "Ann", "CEO", "c1"),
        ("  u2 ", " b@x.com ", "  Bob  ", "", " c2 "),  # trimmed; a blank trait is no trait
        (None, "c@x.com", None, None, None),  # email identifies
        ("", "d@x.com", None, None, None),  # a blank user_id is unusable: skipped
        (None, "", None, None, None),  # nothing usable
        (None, None, "Nobody", None, None),
        ("x" * 256, "e@x.com", None, None, None),  # over-long user_id
        ("u3", "y" * 256, None, None, None),  # over-long email: dropped, user_id identifies
        (42, None, 7, None, 9),  # numbers: the slow path renders them
        (True, "f@x.com", None, None, None),  # a bool is no identifier
        ("u4", None, "N" * 2000, None, "C" * 300),  # traits cut to their limits
    ]
    fast_stats, slow_stats = ReadStats(), ReadStats()
    fast = members(rows, COLUMNS, fast_stats)
    slow = [m for row in rows if (m := _member(row, COLUMNS, slow_stats)) is not None]
    assert fast == slow
    assert (fast_stats.skipped, fast_stats.samples) == (slow_stats.skipped, slow_stats.samples)
    assert fast[0] == ("u1", "a@x.com", "Ann", "CEO", "c1")
    assert fast[1] == ("u2", "b@x.com", "Bob", None, "c2")
    assert ("42", None, "7", None, "9") in fast


def test_staging_keeps_the_first_row_of_a_user_listed_twice(state: sa.Engine) -> None:
    chunks: list[list[Member]] = [
        [("u2", "two@x.com", "First", None, None), ("u1", None, "One", None, None)],
        [(None, "mail@x.com", "Mail", None, None), ("u2", "again@x.com", "Second", None, None)],
    ]
    with state.connect() as connection:
        staging.create_stage(connection)
        assert staging.load_stage(connection, iter(chunks)) == 4
        staged = connection.exec_driver_sql(
            f"SELECT user_ref, email, name FROM {staging.STAGE} ORDER BY user_ref"
        ).all()
        staging.drop_stage(connection)
        connection.commit()
    assert [tuple(row) for row in staged] == [
        ("mail@x.com", "mail@x.com", "Mail"),
        ("u1", None, "One"),
        ("u2", "two@x.com", "First"),
    ]


# user_id or email; non-ASCII too: SQLite orders UTF-8 TEXT by code point, as Python orders str
_KEYS = st.sampled_from(["a", "b", "c", "z", "\u00e9", "\U0001f600"])


def _key(member: Member) -> str:
    key = member[0] if member[0] is not None else member[1]
    assert key is not None  # every drawn member has an email
    return key


@st.composite
def _arrivals(draw: st.DrawFn) -> list[list[Member]]:
    """Members (a computed trait's, with a value, or an audience's), some users listed more
    than once, the first k of them in key order (the rest as drawn), cut into chunks."""
    ids = draw(st.lists(st.one_of(st.none(), _KEYS), min_size=1, max_size=30))
    trait = draw(st.booleans())
    rows: list[Member] = [
        (uid, f"{draw(_KEYS)}@x.com", f"row {i}", None, None) + ((f"{i}",) if trait else ())
        for i, uid in enumerate(ids)
    ]
    k = draw(st.integers(0, len(rows)))
    rows[:k] = sorted(rows[:k], key=_key)  # stable: a user's rows keep their order
    cuts = sorted(draw(st.sets(st.integers(1, len(rows) - 1)))) if len(rows) > 1 else []
    bounds = [0, *cuts, len(rows)]
    return [rows[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=_arrivals())
def test_whatever_the_order_of_arrival_each_user_is_staged_once_with_their_first_row(
    state: sa.Engine, chunks: list[list[Member]]
) -> None:
    trait = len(chunks[0][0]) > len(COLUMNS)
    first: dict[str, tuple[str | None, ...]] = {}
    for member in (member for chunk in chunks for member in chunk):
        first.setdefault(_key(member), (member[1], member[2], member[5] if trait else None))
    with state.connect() as connection:
        staging.create_stage(connection)
        assert staging.load_stage(connection, iter(chunks), with_value=trait) == sum(map(len, chunks))
        staged = connection.exec_driver_sql(f"SELECT user_ref, email, name, value FROM {staging.STAGE}").all()
        staging.drop_stage(connection)
        connection.rollback()
    assert {ref: tuple(row) for ref, *row in staged} == first
    assert len(staged) == len(first)


def test_a_source_in_key_order_is_staged_without_the_heap_until_a_chunk_breaks_it(tmp_path: Path) -> None:
    engine = database.open_state(f"sqlite:///{tmp_path / 'state.db'}")

    def heap_rows(*chunks: list[str]) -> int:
        with engine.connect() as connection:
            staging.create_stage(connection)
            members: list[list[Member]] = [[(ref, None, None, None, None) for ref in c] for c in chunks]
            staging.load_stage(connection, iter(members))
            raw = connection.exec_driver_sql(f"SELECT count(*) FROM {staging.RAW}").scalar_one()
            staged = connection.exec_driver_sql(f"SELECT count(*) FROM {staging.STAGE}").scalar_one()
            assert staged == len({ref for c in chunks for ref in c})
            connection.rollback()
        return int(raw)

    try:
        assert heap_rows(["u1", "u2"], ["u2", "u3"], ["u4", "u5"]) == 0  # in order, a repeat included
        assert heap_rows(["u1", "u2"], ["u3", "u0"], ["u4", "u5"]) == 4  # from the chunk out of order
        assert heap_rows(["u3", "u4"], ["u1", "u2"], ["u5"]) == 3  # before the last chunk's end
    finally:
        engine.dispose()


def _stage(connection: sa.Connection, refs: list[str]) -> None:
    staging.create_stage(connection)
    chunk: list[Member] = [(ref, None, None, None, None) for ref in refs]
    staging.load_stage(connection, iter([chunk]))


def _pending(connection: sa.Connection, key: str) -> list[tuple[str, bool]]:
    rows = connection.execute(
        sa.text("SELECT user_ref, value FROM pending WHERE audience_key = :key ORDER BY user_ref"),
        {"key": key},
    )
    return [(ref, bool(value)) for ref, value in rows]


def test_measure_then_queue_matches_the_plain_diff_and_never_crosses_audiences(state: sa.Engine) -> None:
    with state.begin() as connection:
        for key in ("a", "b"):
            connection.execute(
                sa.text(
                    "INSERT INTO baseline (audience_key, user_ref, told_at) VALUES (:key, 'u1', :now), "
                    "(:key, 'u2', :now)"
                ).bindparams(sa.bindparam("now", type_=UTCDateTime)),
                {"key": key, "now": NOW},
            )
    with state.connect() as connection:
        _stage(connection, ["u2", "u3"])
        counts = diff.measure(connection, "a")
        assert (counts.members, counts.previous, counts.entered, counts.exited) == (2, 2, 1, 1)
        diff.queue_changes(connection, "a", 1, NOW, full=False)  # uses what measure kept aside
        diff.queue_changes(connection, "b", 1, NOW, full=False)  # measured for "a": diffs afresh
        expected = [("u1", False), ("u3", True)]
        assert _pending(connection, "a") == expected and _pending(connection, "b") == expected
        connection.rollback()
        staging.drop_stage(connection)
        connection.commit()


def test_read_ahead_hands_over_errors_and_stops_the_source_when_left_early() -> None:
    def failing() -> Iterator[list[Member]]:
        yield [("u1", None, None, None, None)]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        list(threads.read_ahead(failing()))

    closed = threading.Event()

    def endless() -> Iterator[list[Member]]:
        try:
            while True:
                yield [("u1", None, None, None, None)]
        finally:
            closed.set()

    ahead = threads.read_ahead(endless())
    assert next(ahead) == [("u1", None, None, None, None)]
    ahead.close()
    assert closed.wait(5)


def test_one_audience_pages_group_like_the_general_path() -> None:
    rows = [(n, "k", f"u{n}", n % 2, f"u{n}", None, "Name", None, None, None) for n in range(1, 6)]
    for complete in (True, False):
        fast = coalesce(rows, complete, one_audience=True)
        general = coalesce(rows, complete)
        assert [(c, g) for c, g in fast] == [(c, g) for c, g in general]
    assert len(coalesce(rows, False, one_audience=True)) == 4  # the cut page leaves its last user


class _Cycle:
    """A run's leftovers: objects in a reference cycle, which only the collector frees."""

    def __init__(self) -> None:
        self.me = self


def _leftover() -> weakref.ref[_Cycle]:
    return weakref.ref(_Cycle())


@pytest.fixture
def collect_every_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector, "COLLECT_SECONDS", 0.0)


@pytest.mark.usefixtures("collect_every_phase")
def test_a_phase_leaves_no_garbage_behind_it() -> None:
    """Garbage made just before a phase is freed once it ends (the freeze hid it for good: the
    daemon's memory grew with every run)."""
    gc.collect()
    gone = _leftover()
    with frozen_gc():
        assert gone() is not None  # frozen with the rest: the phase's collections skip it
    assert gone() is None
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collect_every_phase")
def test_overlapping_phases_in_threads_share_one_freeze_and_end_thawed() -> None:
    entered, release = threading.Barrier(3), threading.Event()

    def phase() -> None:
        with frozen_gc(), frozen_gc():  # nested too
            entered.wait(5)
            release.wait(5)

    workers = [threading.Thread(target=phase) for _ in range(2)]
    for worker in workers:
        worker.start()
    entered.wait(5)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    release.set()
    for worker in workers:
        worker.join(5)
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collect_every_phase")
def test_phases_that_never_stop_overlapping_still_free_what_the_freeze_hid() -> None:
    """A daemon of many audiences may always have a phase running: a phase that ends thaws and
    collects all the same, and freezes again for the ones still running."""
    gc.collect()
    with frozen_gc():
        gone = _leftover()
        with frozen_gc():
            pass
        assert gone() is None
        assert gc.get_freeze_count() > 0  # the outer phase is frozen again
    assert gc.get_freeze_count() == 0


def test_phases_in_quick_succession_share_one_full_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full collection walks every object: the daemon, ending a phase every second or so, pays
    one per COLLECT_SECONDS, not one per phase; what the freeze hid waits for it, thawed."""
    monkeypatch.setattr(collector, "COLLECT_SECONDS", 3600.0)
    monkeypatch.setattr(collector, "_collected_at", time.monotonic())
    full = gc.get_stats()[2]["collections"]
    gone = _leftover()
    gc.disable()  # no automatic collection either, to count frozen_gc's own
    try:
        for _ in range(3):
            with frozen_gc():
                pass
    finally:
        gc.enable()
    assert gc.get_stats()[2]["collections"] == full
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_statistics_are_refreshed_after_a_write_that_would_mislead_the_planner_only(
    postgres_url: str,
) -> None:
    """ANALYZE after more than ANALYZE_AFTER rows written, unless they are at most a tenth of
    what the statistics counted (at 10M members, a run's 100,000 changes)."""
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE written (n integer)")

        def write(rows: int) -> float:
            connection.execute(
                sa.text("INSERT INTO written SELECT generate_series(1, :rows)"), {"rows": rows}
            )
            database.analyze(connection, "written", rows)
            return float(
                connection.exec_driver_sql(
                    "SELECT reltuples FROM pg_class WHERE relname = 'written'"
                ).scalar_one()
            )

        assert write(database.ANALYZE_AFTER) == -1  # not more than the threshold: never analyzed
        assert write(10_001) == 20_001  # never analyzed: any write above the threshold
        assert write(200_000) == 220_001
        assert write(20_000) == 220_001  # under a tenth of 220,001: the statistics stand
        assert write(25_000) == 265_001
    engine.dispose()
