"""Generated event data in Segment's warehouse layout, the same rows on every backend.

Deterministic (seeded). Besides random activity it holds the cases the semantics turn on:
events exactly at and one microsecond either side of window edges and of `as_of`, events
after `as_of`, duplicated rows (same id loaded twice), NULL properties, ties in mode and in
first/last, users with no events, anonymous-only rows, a user_id that was never identified,
identifies whose latest row lacks a trait, and several event tables.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

AS_OF = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
MICRO = timedelta(microseconds=1)
SEED = 19
USERS = 1500

EVENT_COLUMNS = ("id", "user_id", "anonymous_id", "event", "event_text", "timestamp", "received_at")
PROPERTIES: dict[str, dict[str, Any]] = {
    "order_completed": {"revenue": sa.Float, "sku": sa.String, "coupon": sa.String, "gift": sa.Boolean},
    "page_viewed": {"url": sa.String},
    "signed_up": {"source_channel": sa.String},
}
EVENT_NAMES = {"order_completed": "Order Completed", "page_viewed": "Page Viewed", "signed_up": "Signed Up"}
TRAITS = ("email", "plan", "name")
SKUS = ["a", "b", "c", "B", "ä"]
URLS = ["/pricing", "/Pricing", "/docs/intro", "/docs/api", "/blog/why", "/files/report.pdf", None]

Row = dict[str, Any]


@dataclass
class Dataset:
    """The rows of each table as inserted (duplicates included)."""

    identifies: list[Row] = field(default_factory=list)
    users: list[Row] = field(default_factory=list)
    events: dict[str, list[Row]] = field(default_factory=dict)


def generate(seed: int = SEED, users: int = USERS) -> Dataset:
    rng = random.Random(seed)
    data = Dataset(events={table: [] for table in PROPERTIES})
    counter = iter(range(10**9))
    ids = [f"u{i:04d}" for i in range(users)]

    def when(days: float) -> datetime:
        return AS_OF - timedelta(seconds=round(days * 86400), microseconds=rng.randrange(10**6))

    def event(table: str, user: str | None, at: datetime, **properties: Any) -> Row:
        row: Row = {
            "id": f"{table[:2]}{next(counter)}",
            "user_id": user,
            "anonymous_id": f"anon{rng.randrange(10**6)}",
            "event": table,
            "event_text": EVENT_NAMES[table],
            "timestamp": at,
            "received_at": at + timedelta(seconds=rng.randrange(1, 600)),
        }
        row.update({name: properties.get(name) for name in PROPERTIES[table]})
        data.events[table].append(row)
        return row

    # identifies: 1-3 per user; a trait on a later call may be missing (NULL).
    for user in ids:
        email = f"{user}@example.com" if rng.random() < 0.9 else None
        for call in range(rng.randint(1, 3)):
            at = when(rng.uniform(5, 400))
            data.identifies.append(
                {
                    "id": f"id{next(counter)}",
                    "user_id": user,
                    "anonymous_id": f"anon{rng.randrange(10**6)}",
                    "timestamp": at,
                    "received_at": at + timedelta(seconds=rng.randrange(1, 60)),
                    "email": email if call == 0 or rng.random() < 0.5 else None,
                    "plan": rng.choice(["free", "pro", "enterprise", None]),
                    "name": f"User {user}" if rng.random() < 0.7 else None,
                }
            )
    # Two identifies at the same timestamp: received_at decides which is the latest.
    tie = AS_OF - timedelta(days=1)
    for plan, delay in (("pro", 1), ("enterprise", 2)):
        data.identifies.append(
            {"id": f"id{next(counter)}", "user_id": ids[0], "anonymous_id": None, "timestamp": tie,
             "received_at": tie + timedelta(seconds=delay), "email": None, "plan": plan, "name": None}
        )  # fmt: skip
    # Anonymous identifies: never a user.
    for _ in range(20):
        data.identifies.append(
            {"id": f"id{next(counter)}", "user_id": None, "anonymous_id": f"anon{next(counter)}",
             "timestamp": when(3), "received_at": when(3), "email": "anon@example.com", "plan": "pro",
             "name": None}
        )  # fmt: skip
    data.users = latest_traits(data.identifies)

    # Random activity: a fifth of the users never do anything.
    for user in ids:
        if rng.random() < 0.2:
            continue
        for _ in range(rng.randint(0, 12)):
            event(
                "order_completed",
                user,
                when(rng.uniform(-2, 200)),
                revenue=None if rng.random() < 0.1 else rng.randrange(0, 800) / 4,
                sku=None if rng.random() < 0.1 else rng.choice(SKUS),
                coupon=rng.choice(["SAVE10", "WELCOME", None, None]),
                gift=rng.choice([True, False, None]),
            )
        for _ in range(rng.randint(0, 8)):
            event("page_viewed", user, when(rng.uniform(-1, 60)), url=rng.choice(URLS))
        if rng.random() < 0.3:
            event(
                "signed_up", user, when(rng.uniform(0, 400)), source_channel=rng.choice(["ads", "seo", None])
            )

    # Window edges: as_of - 30 days, as_of - 7 days, as_of - 36 hours and as_of itself, each
    # exactly and one microsecond either side.
    edge_users = iter(ids[100:200])
    for edge in (timedelta(days=30), timedelta(days=7), timedelta(hours=36), timedelta(0)):
        for shift in (-MICRO, timedelta(0), MICRO):
            event("order_completed", next(edge_users), AS_OF - edge + shift, revenue=10.0, coupon="EDGE")
            event("page_viewed", next(edge_users), AS_OF - edge + shift, url="/pricing")

    # Mode ties: 'a' and 'b' twice each, 'c' once: 'a' wins; 'B' and 'a' once each: 'B' wins (code point).
    for user, skus in ((ids[300], "abbac"), (ids[301], "aB"), (ids[302], "ccbb")):
        for sku in skus:
            event("order_completed", user, when(rng.uniform(1, 20)), revenue=1.0, sku=sku)
    # first/last ties: same timestamp, received_at decides; then the same received_at, id decides.
    at = AS_OF - timedelta(days=3)
    for user in (ids[303], ids[304]):
        for sku, delay in (("b", 5), ("a", 9)):
            row = event("order_completed", user, at, revenue=2.0, sku=sku)
            row["received_at"] = at + timedelta(seconds=delay if user == ids[303] else 5)

    # Anonymous-only activity and a user_id never identified: both ignored.
    for _ in range(50):
        event("order_completed", None, when(rng.uniform(0, 20)), revenue=500.0, sku="a")
        event("page_viewed", None, when(rng.uniform(0, 20)), url="/pricing")
    for _ in range(5):
        event("order_completed", "ghost", when(rng.uniform(0, 20)), revenue=500.0, sku="a")

    # Duplicated rows: the same event loaded twice (same id and values).
    for table, rows in data.events.items():
        for row in list(rows):
            if rng.random() < 0.06 or (table == "order_completed" and row["user_id"] == ids[300]):
                rows.append(dict(row))
    return data


def latest_traits(identifies: list[Row]) -> list[Row]:
    """Segment's `users` table: per identified user, each trait's latest non-NULL value (by
    timestamp, then received_at, then id)."""
    latest: dict[str, Row] = {}
    for row in sorted(identifies, key=lambda r: (r["timestamp"], r["received_at"], r["id"])):
        if row["user_id"] is None:
            continue
        user = latest.setdefault(row["user_id"], {"id": row["user_id"], **dict.fromkeys(TRAITS)})
        for trait in TRAITS:
            if row[trait] is not None:
                user[trait] = row[trait]
    return sorted(latest.values(), key=lambda r: r["id"])


def tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    ts = sa.DateTime(timezone=True)
    made = {
        "users": sa.Table(
            "users", metadata, sa.Column("id", sa.String), *(sa.Column(t, sa.String) for t in TRAITS)
        ),
        "identifies": sa.Table(
            "identifies",
            metadata,
            sa.Column("id", sa.String),
            sa.Column("user_id", sa.String),
            sa.Column("anonymous_id", sa.String),
            sa.Column("timestamp", ts),
            sa.Column("received_at", ts),
            *(sa.Column(t, sa.String) for t in TRAITS),
        ),
    }
    for table, properties in PROPERTIES.items():
        columns = [
            sa.Column(name, ts if name in ("timestamp", "received_at") else sa.String)
            for name in EVENT_COLUMNS
        ]
        made[table] = sa.Table(
            table, metadata, *columns, *(sa.Column(p, kind) for p, kind in properties.items())
        )
    return made


def load(connection: sa.Connection, data: Dataset, schema: str | None, scratch: Path) -> None:
    """Create the tables in `schema` and insert the rows (DuckDB: through CSV files in
    `scratch`, as its row-by-row inserts take seconds)."""
    metadata = sa.MetaData(schema=schema)
    made = tables(metadata)
    metadata.create_all(connection)
    for name, rows in [("users", data.users), ("identifies", data.identifies), *data.events.items()]:
        table = made[name]
        if connection.dialect.name != "duckdb":
            connection.execute(table.insert(), rows)
            continue
        path = scratch / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            for row in rows:
                writer.writerow([_csv(row[column.name]) for column in table.columns])
        connection.exec_driver_sql(
            f"COPY {table.fullname} FROM '{path}' (FORMAT csv, HEADER false, NULLSTR '\\N')"
        )


def _csv(value: Any) -> Any:
    if value is None:
        return "\\N"
    return value.isoformat() if isinstance(value, datetime) else value
