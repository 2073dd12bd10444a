"""Audience keys: Engage's snake_cased audience name, and the names a key may not take.

A key is the name transliterated to ASCII, lowercased, every run of characters other than
a-z0-9 replaced with `_`, `_` trimmed at the ends.
"""

from __future__ import annotations

import re

from anyascii import anyascii

_NOT_KEY = re.compile(r"[^a-z0-9]+")

# Keys that collide with contact traits or identity fields on the identify / enduser payload.
RESERVED_KEYS = frozenset(
    {"id", "user_id", "userid", "email", "name", "title", "company_id", "companyid", "externalid", "custom"}
)


def derive_key(name: str) -> str:
    """'Order Completed Last 30days' -> 'order_completed_last_30days'."""
    return _NOT_KEY.sub("_", anyascii(name).lower()).strip("_")
