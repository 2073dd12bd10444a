"""The bundled demo: a small SQLite source and a config that syncs from it.

Used when no config file exists and none was named, so `audience-sync sync` works on a fresh
machine with no account (a dry run, since no Planhat token is set). The source holds a `users`
table and, in Segment's warehouse layout, the `Order Completed` events of the last 200 days
(`order_completed`, `tracks`, `identifies`), so the demo has an audience defined by SQL, one
defined on events, and a computed trait.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DEMO_SOURCE = Path("audience_sync_demo.db")
DEMO_USERS = 500
PLANS = ("free", "pro", "enterprise")
EVENTS_TABLE = "order_completed"  # its absence marks a demo source made by an older version
# SQLAlchemy's SQLite format for timestamps: what the compiled event queries compare with.
TIMESTAMP = "%Y-%m-%d %H:%M:%S.%f"


def demo_config(source: Path = DEMO_SOURCE) -> dict[str, Any]:
    return {
        "database": {"url": "sqlite:///audience_sync.db"},
        "sources": {"demo": {"url": f"sqlite:///{source}", "events": "segment"}},
        "audiences": [
            {
                "name": "Enterprise Plan",
                "source": "demo",
                "query": "SELECT id AS user_id, email, name, title, company_id "
                "FROM users WHERE plan = 'enterprise'",
            },
            {
                "name": "Order Completed Last 30days",
                "source": "demo",
                "condition": "event('Order Completed').within(30 days).count() >= 1",
            },
        ],
        "traits": [
            {
                "name": "Total Revenue 180 Days",
                "source": "demo",
                "value": "event('Order Completed').within(180 days).sum(property('revenue'))",
            },
        ],
    }


def ensure_demo_source(path: Path = DEMO_SOURCE, users: int = DEMO_USERS) -> bool:
    """Create the demo source database unless it exists (one made by an older version, without
    the events, is made again). Returns True when created."""
    if path.exists():
        with sqlite3.connect(path) as connection:
            current = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (EVENTS_TABLE,)
            ).fetchone()
        connection.close()
        if current:
            return False
        path.unlink()
    rng = random.Random(20261123)
    now = datetime.now(UTC).replace(microsecond=0)
    people = [_user(rng, number) for number in range(1, users + 1)]
    orders = [order for person in people for order in _orders(rng, person[0], now)]
    with sqlite3.connect(path) as connection:
        connection.executescript(
            """
            CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, title TEXT,
                                company_id TEXT, plan TEXT);
            CREATE TABLE identifies (id TEXT PRIMARY KEY, user_id TEXT, anonymous_id TEXT,
                                     email TEXT, plan TEXT, timestamp TEXT, received_at TEXT);
            CREATE TABLE tracks (id TEXT PRIMARY KEY, user_id TEXT, anonymous_id TEXT, event TEXT,
                                 event_text TEXT, timestamp TEXT, received_at TEXT);
            CREATE TABLE order_completed (id TEXT PRIMARY KEY, user_id TEXT, anonymous_id TEXT,
                                          event TEXT, event_text TEXT, timestamp TEXT,
                                          received_at TEXT, revenue REAL, order_id TEXT);
            """
        )
        connection.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", people)
        first_seen = (now - timedelta(days=365)).strftime(TIMESTAMP)
        connection.executemany(
            "INSERT INTO identifies VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(f"i{p[0]}", p[0], f"anon-{p[0]}", p[1], p[5], first_seen, first_seen) for p in people],
        )
        connection.executemany("INSERT INTO order_completed VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", orders)
        connection.executemany("INSERT INTO tracks VALUES (?, ?, ?, ?, ?, ?, ?)", [o[:7] for o in orders])
    connection.close()
    return True


def _user(rng: random.Random, number: int) -> tuple[str, ...]:
    return (
        f"u{number:05d}",
        f"user{number}@example.com",
        f"Demo User {number}",
        rng.choice(("CEO", "CTO", "Engineer", "Analyst", "Buyer")),
        f"c{rng.randrange(1, 60):03d}",
        rng.choices(PLANS, weights=(6, 3, 1))[0],
    )


def _orders(rng: random.Random, user_id: str, now: datetime) -> list[tuple[Any, ...]]:
    """Up to six orders over the last 200 days, so "last 30 days" membership drifts day by day."""
    orders = []
    for index in range(rng.choice((0, 0, 1, 2, 3, 6))):
        at = now - timedelta(minutes=rng.randrange(60 * 24 * 200))
        stamp = at.strftime(TIMESTAMP)
        orders.append(
            (f"o-{user_id}-{index}", user_id, f"anon-{user_id}", "order_completed", "Order Completed",
             stamp, stamp, rng.randrange(10, 400), f"{user_id}-{index}")
        )  # fmt: skip
    return orders
