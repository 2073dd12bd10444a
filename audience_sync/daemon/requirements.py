"""What the daemon needs before it starts (and a reload before it takes over)."""

from __future__ import annotations

from ..config import API_TOKEN_ENV, Settings
from ..errors import ConfigError
from ..http.auth import require_token as require_page_token


def require_token(settings: Settings) -> None:
    """A daemon without a token would dry-run forever without anyone noticing: refuse; and
    refuse what it could not do later (reconcile without the API token, a status page off
    loopback without its access token, nothing to run)."""
    if settings.planhat.token is None:
        raise ConfigError(
            f"no Planhat token set: set {settings.planhat.token_setting}; "
            "the daemon does not start without one"
        )
    if settings.reconcile.interval is not None and settings.planhat.api_token is None:
        raise ConfigError(
            "reconcile.interval is set, and reading Planhat back needs the API token: "
            f"set planhat.api_token (or {API_TOKEN_ENV})"
        )
    if not settings.audiences:
        raise ConfigError("no audiences configured: add [[audiences]] to the config")
    if settings.metrics.port is not None:  # the status page beyond loopback needs its token
        require_page_token(settings.metrics.host, settings.metrics.token)
