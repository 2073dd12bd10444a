"""Loading the config: a TOML file, validated on load, with environment overrides.

Every problem is a `ConfigError` whose message names the file and the key, in one line.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigError
from ..support.redaction import Secret, safe_http_url, safe_url
from .definitions import DEFINITION_FIELDS, EVENT_LAYOUTS, compile_definitions
from .keys import RESERVED_KEYS, derive_key
from .settings import (
    API_TOKEN_ENV,
    BASE_URL_ENV,
    CONFIG_ENV,
    DATABASE_URL_ENV,
    DEFAULT_CONFIG_NAME,
    LEVELS,
    MAX_BULK_BATCH,
    MIN_STATUS_TOKEN,
    ON_EXIT,
    SEND_AS,
    STATE_DRIVERS,
    STATE_DRIVERS_HINT,
    STATUS_TOKEN_ENV,
    SUBDOMAINS,
    TENANT_TOKEN_ENV,
    TRAIT_FIELD_TYPES,
    TRANSPORTS,
    AudienceSettings,
    DaemonSettings,
    HistorySettings,
    MetricsSettings,
    PlanhatSettings,
    ReconcileSettings,
    SafetySettings,
    ScheduleSettings,
    Settings,
    SourceSettings,
)

# --- durations ----------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> timedelta:
    """'45s', '90m', '2h', '1d' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '90m' or '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as '90m' or '2h', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return timedelta(seconds=seconds)


# --- loading ------------------------------------------------------------------------------


class _Table:
    """One TOML table being read: typed getters that name the key on error."""

    def __init__(self, data: dict[str, Any], where: str, origin: str) -> None:
        self.data = dict(data)
        self.where = where
        self.origin = origin

    def error(self, key: str, problem: str) -> ConfigError:
        dotted = f"{self.where}.{key}" if self.where else key
        return ConfigError(f"{self.origin}: {dotted}: {problem}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(key, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def take_str(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self.take(key, str, default)
        if required and not value:
            raise self.error(key, "is required")
        return value

    def take_number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = float(self.take(key, (int, float), default))
        if not low <= value <= high:
            raise self.error(key, f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    def take_int(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.take(key, int, default)
        if not low <= value <= high:
            raise self.error(key, f"must be between {low} and {high}, got {value}")
        return value

    def take_duration(self, key: str, default: timedelta) -> timedelta:
        if key not in self.data:
            return default
        raw = self.data.pop(key)
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def take_choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.take(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def table(self, key: str) -> _Table:
        value = self.take(key, dict, {})
        return _Table(value, f"{self.where}.{key}" if self.where else key, self.origin)

    def finish(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise self.error(unknown, "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", dict: "a table", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: str, table: _Table, key: str, environ: dict[str, str]) -> str:
    """Replace ${NAME} with the environment variable, so passwords stay out of the file."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise table.error(key, f"environment variable {name} is not set")
        return environ[name]

    return _ENV_REF.sub(replace, value)


def normalize_database_url(url: str) -> str:
    """Plain postgresql:// URLs use psycopg 3, the driver this project ships."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def resolve_config_path(explicit: str | Path | None, environ: dict[str, str]) -> tuple[Path, bool]:
    """The config path and whether the user named it (explicitly or through the env)."""
    if explicit:
        return Path(explicit), True
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), True
    return Path(DEFAULT_CONFIG_NAME), False


def load_settings(explicit: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Load the config file, or the embedded demo defaults when none exists and none was named."""
    environ = dict(os.environ if environ is None else environ)
    path, named = resolve_config_path(explicit, environ)
    if not path.exists():
        if named:
            raise ConfigError(f"{path}: config file not found")
        from ..demo import demo_config

        data, origin_path = demo_config(), None
    else:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc}") from None
        origin_path = path
    return parse_settings(data, origin_path, environ)


def parse_settings(data: dict[str, Any], path: Path | None, environ: dict[str, str]) -> Settings:
    origin = str(path) if path else "embedded demo config"
    root = _Table(data, "", origin)
    database = root.table("database")
    url = environ.get(DATABASE_URL_ENV) or database.take_str("url", "sqlite:///audience_sync.db")
    database.data.pop("url", None)
    database_url = normalize_database_url(_expand_env(url, database, "url", environ))
    _check_state_driver(database_url, database, from_env=bool(environ.get(DATABASE_URL_ENV)))
    database.finish()

    settings = Settings(
        path=path,
        database_url=database_url,
        planhat=_parse_planhat(root.table("planhat"), environ),
        schedule=_parse_schedule(root.table("schedule")),
        safety=_parse_safety(root.table("safety")),
        history=_parse_history(root.table("history")),
        reconcile=_parse_reconcile(root.table("reconcile")),
        daemon=_parse_daemon(root.table("daemon")),
        metrics=_parse_metrics(root.table("metrics"), environ),
        sources=_parse_sources(root.table("sources"), environ),
        audiences=(),
    )
    audiences = _parse_audiences(root, settings.sources, settings.planhat)
    root.finish()
    return Settings(**{**settings.__dict__, "audiences": audiences})


def _check_state_driver(url: str, table: _Table, *, from_env: bool) -> None:
    """Refuse, at load, a state database the code cannot drive (it would fail mid-run)."""
    try:
        driver = sa.make_url(url).drivername
    except (sa.exc.ArgumentError, ValueError):
        driver = None
    if driver not in STATE_DRIVERS:
        where = f" (from {DATABASE_URL_ENV})" if from_env else ""
        raise table.error(
            "url", f"unsupported state database {safe_url(url)}{where}: use {STATE_DRIVERS_HINT}"
        )


def _parse_planhat(table: _Table, environ: dict[str, str]) -> PlanhatSettings:
    transport = table.take_choice("transport", "segment", TRANSPORTS)
    subdomain = table.take_choice("subdomain", "api", SUBDOMAINS)
    # Stripped: a token pasted with a trailing newline would otherwise break the auth header.
    tenant = (environ.get(TENANT_TOKEN_ENV) or table.take_str("tenant_token") or "").strip()
    api = (environ.get(API_TOKEN_ENV) or table.take_str("api_token") or "").strip()
    table.data.pop("tenant_token", None)
    table.data.pop("api_token", None)
    base_url = environ.get(BASE_URL_ENV) or table.take_str("base_url")
    table.data.pop("base_url", None)
    if base_url and not re.match(r"^https?://[^/\s]+", base_url):
        raise table.error("base_url", f"must be an http(s) URL, got {safe_http_url(base_url)!r}")
    settings = PlanhatSettings(
        transport=transport,  # type: ignore[arg-type]
        subdomain=subdomain,
        tenant_token=Secret(tenant) if tenant else None,
        api_token=Secret(api) if api else None,
        base_url=base_url,
        source_marker=table.take_str("source", "Segment"),
        batch_size=table.take_int("batch_size", MAX_BULK_BATCH, low=1, high=MAX_BULK_BATCH),
        max_requests_per_second=table.take_number("max_requests_per_second", 0, low=0, high=150) or None,
        concurrency=table.take_int("concurrency", 10, low=1, high=50),
        timeout_seconds=table.take_number("timeout_seconds", 30, low=0.1, high=600),
        max_attempts=table.take_int("max_attempts", 6, low=1, high=100),
        retry_budget_seconds=table.take_number("retry_budget_seconds", 300, low=0, high=86400),
        backoff_base_seconds=table.take_number("backoff_base_seconds", 1, low=0, high=600),
        backoff_max_seconds=table.take_number("backoff_max_seconds", 60, low=0, high=3600),
    )
    table.finish()
    return settings


def _parse_schedule(table: _Table) -> ScheduleSettings:
    low = table.take_duration("min_interval", timedelta(hours=2))
    high = table.take_duration("max_interval", timedelta(hours=3))
    if high < low:
        raise table.error("max_interval", "must not be shorter than schedule.min_interval")
    table.finish()
    return ScheduleSettings(min_interval=low, max_interval=high)


def _parse_safety(table: _Table) -> SafetySettings:
    settings = SafetySettings(
        max_exit_fraction=table.take_number("max_exit_fraction", 0.5, low=0, high=1),
        min_members=table.take_int("min_members", 100, low=0, high=2**62),
    )
    table.finish()
    return settings


def _parse_history(table: _Table) -> HistorySettings:
    settings = HistorySettings(retention_days=table.take_int("retention_days", 90, low=1, high=36500))
    table.finish()
    return settings


def _parse_reconcile(table: _Table) -> ReconcileSettings:
    interval = table.take_duration("interval", timedelta(0)) if "interval" in table.data else None
    settings = ReconcileSettings(
        interval=interval,
        page_size=table.take_int("page_size", 5000, low=1, high=5000),
        max_requests_per_second=table.take_number("max_requests_per_second", 3, low=0.01, high=150),
    )
    table.finish()
    return settings


def _parse_daemon(table: _Table) -> DaemonSettings:
    settings = DaemonSettings(
        grace_seconds=table.take_duration("grace", timedelta(seconds=10)).total_seconds(),
        resync_poll_seconds=table.take_duration("resync_poll", timedelta(seconds=5)).total_seconds(),
        lease_seconds=table.take_duration("lease", timedelta(seconds=60)).total_seconds(),
        log_format=table.take_choice("log_format", "text", ("text", "json")),  # type: ignore[arg-type]
    )
    table.finish()
    return settings


def _parse_metrics(table: _Table, environ: dict[str, str]) -> MetricsSettings:
    port = table.take("port", int, None)
    if port is not None and not 0 <= port <= 65535:
        raise table.error("port", f"must be between 0 and 65535, got {port}")
    token = (environ.get(STATUS_TOKEN_ENV) or table.take_str("token") or "").strip()
    table.data.pop("token", None)
    if token and len(token) < MIN_STATUS_TOKEN:
        where = f" (from {STATUS_TOKEN_ENV})" if environ.get(STATUS_TOKEN_ENV) else ""
        raise table.error("token", f"must be at least {MIN_STATUS_TOKEN} characters{where}")
    settings = MetricsSettings(
        port=port,
        host=table.take_str("host", "127.0.0.1"),
        health_margin=table.take_duration("health_margin", timedelta(minutes=30)),
        token=Secret(token) if token else None,
    )
    table.finish()
    return settings


def _parse_sources(table: _Table, environ: dict[str, str]) -> dict[str, SourceSettings]:
    sources: dict[str, SourceSettings] = {}
    for name in list(table.data):
        source = table.table(name)
        url = _expand_env(source.take_str("url", required=True), source, "url", environ)
        events = source.take_choice("events", "segment", EVENT_LAYOUTS) if "events" in source.data else None
        schema = source.take_str("schema")
        if schema is not None and not events:
            raise source.error("schema", "is the schema of the source's events: set events as well")
        source.finish()
        sources[name] = SourceSettings(
            name=name, url=normalize_database_url(url), events=events, schema=schema or None
        )
    return sources


def _parse_audiences(
    root: _Table, sources: dict[str, SourceSettings], planhat: PlanhatSettings
) -> tuple[AudienceSettings, ...]:
    """`[[audiences]]` then `[[traits]]`; keys are unique across both."""
    entries: list[AudienceSettings] = []
    seen: dict[str, str] = {}
    for section, kind in (("audiences", "audience"), ("traits", "trait")):
        for index, item in enumerate(root.take(section, list, [])):
            where = f"{section}[{index}]"
            if not isinstance(item, dict):
                raise root.error(where, f"expected a table ([[{section}]])")
            table = _Table(item, where, root.origin)
            entry = _parse_entry(table, section, kind, sources, planhat)
            if entry.key in seen:
                raise table.error("key", f"{entry.key!r} is already the key of {seen[entry.key]}")
            seen[entry.key] = f"{kind} {entry.name!r}"
            entries.append(entry)
    return tuple(compile_definitions(entries, sources, root.origin))


def _parse_entry(
    table: _Table, section: str, kind: str, sources: dict[str, SourceSettings], planhat: PlanhatSettings
) -> AudienceSettings:
    name = table.take_str("name", required=True)
    explicit_key = table.take_str("key")
    key = explicit_key or derive_key(name)
    if not key:
        raise table.error("name", f"{name!r} yields an empty key; set {section}.key")
    if explicit_key and derive_key(explicit_key) != explicit_key:
        raise table.error("key", f"{explicit_key!r} is not a snake_case key")
    if key in RESERVED_KEYS:
        field_name = "key" if explicit_key else "name"
        raise table.error(field_name, f"key {key!r} collides with a contact field; set {section}.key")
    source = table.take_str("source", required=True)
    if source not in sources:
        known = ", ".join(sources) or "none"
        raise table.error("source", f"unknown source {source!r} (configured: {known})")
    query, definition = _query_or_definition(table, kind, sources[source], name)
    level = table.take_choice("level", "user", LEVELS)
    if definition is not None and level == "account":
        raise table.error(
            "level", "an account-level key is defined by a SQL query (event definitions are per user)"
        )
    send_as = table.take_choice("send_as", "property", SEND_AS)
    if send_as != "property" and planhat.transport != "segment":
        raise table.error(
            "send_as", f'{send_as!r} needs planhat.transport = "segment" (the bulk transport has no events)'
        )
    if send_as != "property" and level == "account":
        raise table.error("send_as", f"{send_as!r} is for user-level keys (a company has no track events)")
    on_exit = table.take_choice("on_exit", "clear", ON_EXIT) if kind == "trait" else "clear"
    field_type = table.take_str("type") if kind == "trait" else ""
    if field_type and field_type not in TRAIT_FIELD_TYPES:
        raise table.error("type", f"must be one of {', '.join(TRAIT_FIELD_TYPES)}; got {field_type!r}")
    table.finish()
    return AudienceSettings(
        name=name,
        key=key,
        source=source,
        query=query,
        kind=kind,
        level=level,
        send_as=send_as,
        on_exit=on_exit,
        field_type=field_type or None,
        definition=definition,
    )


def _query_or_definition(
    table: _Table, kind: str, source: SourceSettings, name: str
) -> tuple[str, str | None]:
    """The entry's SQL `query`, or its definition on events (`condition` for an audience,
    `value` for a trait), parsed here so a syntax error stops the load with its position."""
    field_name = DEFINITION_FIELDS[kind]
    query = table.take_str("query")
    definition = table.take_str(field_name)
    if not query and not definition:
        raise table.error("query", f"is required (or a {field_name}, defined on the events of its source)")
    if query and definition:
        raise table.error("query", f"give either a SQL query or a {field_name} (the events it is defined on)")
    if not definition:
        return query, None
    if source.events is None:
        raise table.error(
            field_name,
            f"{field_name} is read from the events of source {source.name!r}: set "
            f'sources.{source.name}.events = "segment" (or "rudderstack", the layout of its tables)',
        )
    from ..events import parse_condition, parse_value

    try:
        (parse_condition if kind == "audience" else parse_value)(definition)
    except ConfigError as exc:
        raise table.error(field_name, f"{name!r}: {_without_prefix(str(exc), field_name)}") from None
    return "", definition


def _without_prefix(message: str, field_name: str) -> str:
    return message.removeprefix(f"{field_name}: ")
