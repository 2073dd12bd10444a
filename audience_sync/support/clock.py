"""Time: the one `utcnow`, and the two ways a time is shown."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, aware, in UTC (the state database stores UTC)."""
    return datetime.now(UTC)


def format_utc(value: datetime | None) -> str:
    """'2026-11-23 10:00:00 UTC' for tables, logs and pages; '' for no time."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_timestamp(value: datetime | None = None) -> str:
    """'2026-11-23T10:00:00.000Z', the Segment spec's timestamp (now when none is given)."""
    moment = value or utcnow()
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
