"""`audience-sync check`: whether the setup will work, before anything is sent.

One result per item, in this order, each OK, FAIL (with its fix) or SKIP (with why):

    config             the file loads: every key valid, audience keys distinct (refused at load)
    audience keys      distinct and clear of the contact's own fields
    state database     reachable and at the schema head, or empty (created at head on first use)
    source NAME        reachable
    audience KEY       the query runs, wrapped with a row limit and under a time limit, and
                       returns the contract's columns; its first rows are read as a sync reads
                       them
    planhat token      endusers: the API token is accepted (GET /endusers?limit=1). segment: the
                       tenant token cannot be proven without sending (the webhook has no read),
                       so after checking its form the line is a SKIP that says so
    planhat api token  segment with an API token (reconcile reads with it): as above
    planhat fields     endusers: each audience key is a checkbox custom field on contacts
                       (GET /customfields), when Planhat lists them

Modules: `results` (the lines and their output), `state`, `sources`, `planhat` (the items),
`timebox` (each item in a thread with a time limit), `scrubbing` (secrets out of every line),
and `fields` (`audience-sync fields [--create]`: each key's custom field, created when asked:
the one module here that writes to Planhat).

Nothing is written anywhere: nothing is sent to Planhat, the sources are only read, and the
state database is only read (a SQLite file that does not exist is not created). Each item is
time-boxed: PostgreSQL and SQLite queries get a statement timeout, PostgreSQL and MySQL a connect
timeout, and every item runs in a thread that is given up on after the time limit. Every result
is scrubbed of the configured tokens and database passwords before it is returned.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

from sqlalchemy.engine import Engine

from ..config import CONFIG_ENV, RESERVED_KEYS, Settings, load_settings, resolve_config_path
from ..demo import ensure_demo_source
from ..errors import ConfigError
from .planhat import check_planhat
from .results import CheckResult, fail, line, ok, passed, render, summary, to_json
from .scrubbing import configured_secrets, scrubbed, unloaded_secrets
from .sources import check_sources
from .state import check_state
from .timebox import timeboxed

__all__ = [
    "DEFAULT_TIMEOUT",
    "CheckResult",
    "log_checks",
    "passed",
    "render",
    "run_checks",
    "summary",
    "to_json",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds each item may take
SAMPLE_ROWS = 100  # rows read of each audience's query: enough to see the columns and the data


def run_checks(
    config: Settings | str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    sample_rows: int = SAMPLE_ROWS,
    environ: dict[str, str] | None = None,
    engine: Engine | None = None,
) -> list[CheckResult]:
    """Every check. `config`: loaded settings, or a config path (None: found as the CLI finds
    it). `engine`: the state database's, when the caller has it open (the daemon)."""
    environ = dict(os.environ if environ is None else environ)
    results: list[CheckResult] = []
    if isinstance(config, Settings):
        settings = config
    else:
        loaded, line = _load(config, environ)
        results.append(line)
        if loaded is None:
            return scrubbed(results, unloaded_secrets(config, environ))
        settings = loaded
    results.append(_check_keys(settings))
    state = partial(check_state, settings.database_url, engine, timeout)
    results.append(timeboxed("state database", timeout, state))
    results += check_sources(settings, timeout, sample_rows)
    results += check_planhat(settings, timeout)
    return scrubbed(results, configured_secrets(settings))


def log_checks(
    settings: Settings, engine: Engine | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> list[CheckResult]:
    """The daemon's start: the same checks, one log line each (FAIL at WARNING). It does not
    refuse to start on a FAIL: a source down now may be back by the first run, which then
    reports its own error."""
    results = run_checks(settings, timeout=timeout, engine=engine)
    for result in results:
        level = logging.WARNING if result.failed else logging.INFO
        log.log(level, "check: %s", line(result))
    log.log(logging.WARNING if not passed(results) else logging.INFO, "check: %s", summary(results))
    return results


def _load(config: str | Path | None, environ: dict[str, str]) -> tuple[Settings | None, CheckResult]:
    path, _ = resolve_config_path(config, environ)
    try:
        settings = load_settings(config, environ)
    except ConfigError as exc:
        return None, fail("config", str(exc), _config_fix(str(exc), path))
    if settings.path is None:
        ensure_demo_source()  # part of the embedded demo, as for every other command
        return settings, ok("config", f"no {path}: the embedded demo config and its bundled source")
    counts = f"{len(settings.sources)} source(s), {len(settings.audiences)} audience(s)"
    return settings, ok("config", f"{settings.path} loads: {counts}, transport {settings.planhat.transport}")


# Fixes for the config errors a user meets most; any other names its key and file itself.
_CONFIG_FIXES = (
    ("config file not found", f"pass --config PATH, or set {CONFIG_ENV}, to the config file"),
    (
        "is already the key of audience",
        'give one of the two audiences its own `key = "..."` (a synced key is fixed: keep that one)',
    ),
    (
        "collides with a contact field",
        'set `key = "..."` on that audience to a key that is not a contact field',
    ),
    (
        "environment variable",
        "set that variable in the environment (for the service: in its EnvironmentFile)",
    ),
)


def _config_fix(message: str, path: Path) -> str:
    for fragment, fix in _CONFIG_FIXES:
        if fragment in message:
            return fix
    return f"correct the setting named in {path}; config.example.toml documents every key"


def _check_keys(settings: Settings) -> CheckResult:
    """Loading refuses duplicate and reserved keys; settings built otherwise are checked here."""
    keys = [audience.key for audience in settings.audiences]
    if not keys:
        return fail("audience keys", "no audiences configured", "add an [[audiences]] table to the config")
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    reserved = sorted(set(keys) & RESERVED_KEYS)
    if duplicates or reserved:
        problems = [f"{key!r} is the key of several audiences" for key in duplicates]
        problems += [f"{key!r} collides with a contact field" for key in reserved]
        return fail(
            "audience keys", "; ".join(problems), 'set a distinct `key = "..."` on the audiences named'
        )
    return ok("audience keys", f"{len(keys)} distinct, none a contact field: {', '.join(keys)}")
