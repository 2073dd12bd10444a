"""Every line a check returns is scrubbed of the configured tokens and database passwords,
also when the config failed to load (its type errors may quote a value)."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from ..config import API_TOKEN_ENV, DATABASE_URL_ENV, TENANT_TOKEN_ENV, Settings, resolve_config_path
from ..support.redaction import scrub, secret_forms, url_password
from .results import CheckResult

MIN_MASKED_PASSWORD = 6  # shorter database passwords would mask ordinary words in the messages


def configured_secrets(settings: Settings) -> list[str]:
    planhat = settings.planhat
    tokens = [token.reveal() for token in (planhat.tenant_token, planhat.api_token) if token is not None]
    urls = [settings.database_url, *(source.url for source in settings.sources.values())]
    return _secret_forms(tokens, urls)


def unloaded_secrets(config: str | Path | None, environ: dict[str, str]) -> list[str]:
    """The secrets a config that failed to load may hold: the environment's tokens and, when the
    file parses as TOML, any token and URL in it (a type error's message quotes the value)."""
    tokens = [environ[name] for name in (TENANT_TOKEN_ENV, API_TOKEN_ENV) if environ.get(name)]
    urls = [environ[DATABASE_URL_ENV]] if environ.get(DATABASE_URL_ENV) else []
    path, _ = resolve_config_path(config, environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return _secret_forms(tokens, urls)
    tables = [data.get(name) for name in ("planhat", "metrics", "database")]
    tables += list(data.get("sources", {}).values()) if isinstance(data.get("sources"), dict) else []
    for table in (t for t in tables if isinstance(t, dict)):
        tokens += [str(v) for k, v in table.items() if "token" in k and v not in (None, "")]
        urls += [v for k, v in table.items() if k == "url" and isinstance(v, str)]
    return _secret_forms(tokens, urls)


def _secret_forms(tokens: list[str], urls: list[str]) -> list[str]:
    """Every form of the tokens, and the URLs' passwords; longest first, so no part of one is left."""
    secrets = {form for token in tokens for form in secret_forms(token.strip())}
    for url in urls:
        password = url_password(url)
        if password is not None and len(password) >= MIN_MASKED_PASSWORD:
            secrets.add(password)
    return sorted(secrets, key=len, reverse=True)


def scrubbed(results: list[CheckResult], secrets: list[str]) -> list[CheckResult]:
    return [replace(r, detail=scrub(r.detail, secrets), fix=scrub(r.fix, secrets)) for r in results]
