"""URLs fit for logs, messages and reprs: passwords and secret-looking parameters masked.

Kept apart from `store` (which needs Alembic and the models) so that `config` can mask the
URLs it holds without an import cycle.
"""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

import sqlalchemy as sa

MASK = "***"
# A query parameter is secret when its name contains one of these (case-insensitive):
# libpq's sslpassword, ODBC's PWD, cloud drivers' token / api_key / secret, and the like.
SECRET_WORDS = ("password", "passwd", "pwd", "token", "secret", "key")


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def safe_url(url: str | sa.URL) -> str:
    """A database URL with its password and secret-looking query parameters masked.

    Never the raw value: a URL that cannot be parsed is shown as a placeholder, since
    where its password would be cannot be known."""
    try:
        parsed = sa.make_url(url)
        base = parsed.set(query={}).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError, TypeError):
        return "<invalid database URL>"
    pairs = [
        (name, item)
        for name, value in sorted(parsed.query.items())
        for item in ((value,) if isinstance(value, str) else value)
    ]
    return base + _query_string(pairs)


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
