"""Access to the status page: the token it needs off loopback, Bearer headers and the login
cookie (an expiry and an HMAC of it under the token, never the token itself)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from datetime import timedelta
from email.message import Message
from http.cookies import CookieError, SimpleCookie

from ..config import STATUS_TOKEN_ENV, Secret
from ..errors import ConfigError

MAX_FORM = 4096  # bytes of a POST /login body
SESSION_COOKIE = "audience_sync_session"
SESSION_TTL = timedelta(days=7)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def require_token(host: str, token: Secret | None, setting: str = "metrics.host") -> None:
    """Refuse to serve the page beyond this machine without an access token."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"{setting} is {host or '(every interface)'!s}, not loopback: the status page needs an "
            f"access token there; set metrics.token (or {STATUS_TOKEN_ENV}), or bind to 127.0.0.1"
        )


def _session_mac(token: Secret, expires: int) -> str:
    return hmac.new(token.reveal().encode(), f"status-page:{expires}".encode(), hashlib.sha256).hexdigest()


def session_cookie(token: Secret, now: float) -> str:
    expires = int(now + SESSION_TTL.total_seconds())
    return f"{expires}.{_session_mac(token, expires)}"


def authorized(token: Secret | None, headers: Message, now: float) -> bool:
    """No token configured, a matching Bearer header, or a valid unexpired session cookie."""
    if token is None:
        return True
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given:
        return hmac.compare_digest(given.strip().encode(), token.reveal().encode())
    try:
        morsel = SimpleCookie(headers.get("Cookie", "")).get(SESSION_COOKIE)
    except CookieError:
        return False
    expires, _, mac = (morsel.value if morsel else "").partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(mac.encode(), _session_mac(token, int(expires)).encode())


def safe_next(target: str) -> str:
    """A path on this server to go back to after login: never another site, and nothing that
    could end the Location header (it is printable ASCII without spaces)."""
    printable = all(33 <= ord(char) <= 126 for char in target)
    local = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if printable and local else "/"
