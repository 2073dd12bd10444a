"""Audience keys and user identities.

An audience key is Engage's snake_cased audience name: transliterated to ASCII, lowercased,
every run of characters other than a-z0-9 replaced with `_`, `_` trimmed at the ends.
"""

from __future__ import annotations

import re

from anyascii import anyascii

_NOT_KEY = re.compile(r"[^a-z0-9]+")

# Longest identifier accepted from a source; longer ones are skipped as bad data.
MAX_IDENTIFIER_LENGTH = 255


def derive_key(name: str) -> str:
    """'Order Completed Last 30days' -> 'order_completed_last_30days'."""
    return _NOT_KEY.sub("_", anyascii(name).lower()).strip("_")


def clean_identifier(value: object) -> str | None:
    """A usable identifier as text, or None when the value cannot identify a user.

    Integers are accepted (ids are often numeric) and rendered as text; anything else that is
    not a non-empty string of at most MAX_IDENTIFIER_LENGTH characters is refused.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if not text or len(text) > MAX_IDENTIFIER_LENGTH:
        return None
    return text
