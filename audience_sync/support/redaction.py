"""Every secret mask in one place: tokens, database and HTTP URLs, texts that may echo them.

    Secret          a token: only `reveal()` gives the value; repr and str are masked
    safe_url        a database URL with its password and secret-looking parameters masked
    safe_http_url   an http(s) URL likewise
    secret_forms    every form a token may be echoed back in (as is, and as Basic credentials)
    scrub           a text with every given secret replaced by a mask
    masked_repr     a dataclass repr that shows chosen fields through a mask (URLs)

Never the raw value: what cannot be parsed is shown as a placeholder, since where its
password would be cannot be known.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

MASK = "***"
TOKEN_MASK = "********"
# A query parameter is secret when its name contains one of these (case-insensitive):
# libpq's sslpassword, ODBC's PWD, cloud drivers' token / api_key / secret, and the like.
SECRET_WORDS = ("password", "passwd", "pwd", "token", "secret", "key")


class Secret:
    """A token. Only `reveal()` gives the value; repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{TOKEN_MASK}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def safe_url(url: object) -> str:
    """A database URL (text or a SQLAlchemy URL) with its password and secret-looking query
    parameters masked."""
    import sqlalchemy as sa  # only where a database URL is shown: --help stays light

    try:
        parsed = sa.make_url(url)  # type: ignore[arg-type]
        base = parsed.set(query={}).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError, TypeError, AttributeError):
        return "<invalid database URL>"
    pairs = [
        (name, item)
        for name, value in sorted(parsed.query.items())
        for item in ((value,) if isinstance(value, str) else value)
    ]
    return base + _query_string(pairs)


def url_password(url: str) -> str | None:
    """The password a database URL carries, or None (none, or the URL does not parse)."""
    import sqlalchemy as sa

    try:
        password = sa.make_url(url).password
    except (sa.exc.ArgumentError, ValueError):
        return None
    return None if password is None else str(password)


def safe_http_url(url: str) -> str:
    """An http(s) URL with the password of its userinfo and secret-looking parameters masked."""
    try:
        parts = urlsplit(url)
        password = parts.password
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{host}"
    masked = SplitResult(parts.scheme, netloc, parts.path, "", parts.fragment).geturl()
    return masked + _query_string(pairs)


def _query_string(pairs: list[tuple[str, str]]) -> str:
    return "?" + "&".join(_parameter(name, value) for name, value in pairs) if pairs else ""


def _parameter(name: str, value: str) -> str:
    if is_secret_name(name):
        return urlencode([(name, "")]) + MASK  # unescaped: reads "***", not "%2A%2A%2A"
    return urlencode([(name, value)])


def basic_credentials(token: str) -> str:
    """HTTP Basic credentials with the token as the user name and an empty password."""
    return base64.b64encode(f"{token}:".encode()).decode("ascii")


def secret_forms(token: str) -> tuple[str, ...]:
    """Every form in which the token could be echoed back: as is, and as Basic credentials."""
    if not token:
        return ()
    encoded = basic_credentials(token)
    return tuple(dict.fromkeys((token, encoded, encoded.rstrip("="))))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by a mask (give the longest first, so no part of one
    is left behind)."""
    for secret in secrets:
        text = text.replace(secret, TOKEN_MASK)
    return text


def masked(mask: Callable[[str], str]) -> dict[str, Callable[[str], str]]:
    """Dataclass field metadata: show the field through `mask` in `masked_repr`."""
    return {"mask": mask}


def masked_repr(self: Any) -> str:
    """A dataclass repr with the fields marked `masked(...)` shown masked (URLs can carry
    passwords, expanded from ${VAR}s)."""
    shown = []
    for item in fields(self):
        if not item.repr:
            continue
        value = getattr(self, item.name)
        mask = item.metadata.get("mask")
        if mask is not None and value is not None:
            value = mask(value)
        shown.append(f"{item.name}={value!r}")
    return f"{type(self).__name__}({', '.join(shown)})"
