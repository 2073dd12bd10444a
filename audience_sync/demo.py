"""The bundled demo: a small SQLite source and a config that syncs two audiences from it.

Used when no config file exists and none was named, so `audience-sync sync` works on a fresh
machine with no account (a dry run, since no Planhat token is set).
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


def demo_config(source: Path = DEMO_SOURCE) -> dict[str, Any]:
    return {
        "database": {"url": "sqlite:///audience_sync.db"},
        "sources": {"demo": {"url": f"sqlite:///{source}"}},
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
                "query": "SELECT id AS user_id, email, name, title, company_id FROM users "
                "WHERE last_order_at >= datetime('now', '-30 days')",
            },
        ],
    }


def ensure_demo_source(path: Path = DEMO_SOURCE, users: int = DEMO_USERS) -> bool:
    """Create the demo source database unless it exists. Returns True when created."""
    if path.exists():
        return False
    rng = random.Random(20261123)
    now = datetime.now(UTC).replace(microsecond=0)
    rows = [_user(rng, number, now) for number in range(1, users + 1)]
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, title TEXT, "
            "company_id TEXT, plan TEXT, last_order_at TEXT)"
        )
        connection.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    connection.close()
    return True


def _user(rng: random.Random, number: int, now: datetime) -> tuple[str, ...]:
    # Orders spread over the last 60 days, so "last 30 days" membership drifts day by day.
    last_order = now - timedelta(minutes=rng.randrange(60 * 24 * 60))
    return (
        f"u{number:05d}",
        f"user{number}@example.com",
        f"Demo User {number}",
        rng.choice(("CEO", "CTO", "Engineer", "Analyst", "Buyer")),
        f"c{rng.randrange(1, 60):03d}",
        rng.choices(PLANS, weights=(6, 3, 1))[0],
        last_order.strftime("%Y-%m-%d %H:%M:%S"),
    )
