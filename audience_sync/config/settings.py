"""The settings audience-sync runs on: one frozen dataclass per config section.

Built and validated by `loading.load_settings`; every other module takes them as given.
Secrets are held in `Secret`, whose repr and str never show the value; URLs, which can carry
passwords (often expanded from ${VAR}), show masked in the settings' reprs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from ..support.redaction import Secret, masked, masked_repr, safe_http_url, safe_url

DEFAULT_CONFIG_NAME = "audience_sync.toml"
CONFIG_ENV = "AUDIENCE_SYNC_CONFIG"
DATABASE_URL_ENV = "AUDIENCE_SYNC_DATABASE_URL"
TENANT_TOKEN_ENV = "PLANHAT_TENANT_TOKEN"
API_TOKEN_ENV = "PLANHAT_API_TOKEN"
BASE_URL_ENV = "PLANHAT_BASE_URL"
STATUS_TOKEN_ENV = "AUDIENCE_SYNC_STATUS_TOKEN"
MIN_STATUS_TOKEN = 16  # characters: the token guards a page reachable from the network

# Planhat's regional API hosts. A select, never free text: the host is built from it.
SUBDOMAINS = ("api", "api-eu", "api-eu2", "api-eu3", "api-us2", "api-us4")
TRANSPORTS = ("segment", "endusers")
MAX_BULK_BATCH = 5000
# Planhat: soft quota 200 calls/min, hard limit 150 req/s (bursts of 50 in parallel).
DEFAULT_RPS = {"segment": 100.0, "endusers": 3.0}

Transport = Literal["segment", "endusers"]

# The state database's dialects and drivers: the code relies on their behaviour (ON CONFLICT,
# RETURNING, BEGIN IMMEDIATE, the SQLite pragmas). Sources accept any SQLAlchemy URL.
STATE_DRIVERS = frozenset({"sqlite", "sqlite+pysqlite", "postgresql+psycopg"})
STATE_DRIVERS_HINT = "sqlite:///PATH (pysqlite) or postgresql:// / postgresql+psycopg:// (psycopg 3)"

__all__ = ["Secret"]  # re-exported: a setting's type


@dataclass(frozen=True)
class PlanhatSettings:
    __repr__ = masked_repr

    transport: Transport = "segment"
    subdomain: str = "api"
    tenant_token: Secret | None = None
    api_token: Secret | None = None
    base_url: str | None = field(default=None, metadata=masked(safe_http_url))
    source_marker: str = "Segment"
    batch_size: int = MAX_BULK_BATCH
    max_requests_per_second: float | None = None
    concurrency: int = 10
    timeout_seconds: float = 30.0
    max_attempts: int = 6
    retry_budget_seconds: float = 300.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0

    @property
    def origin(self) -> str:
        return (self.base_url or f"https://{self.subdomain}.planhat.com").rstrip("/")

    @property
    def requests_per_second(self) -> float:
        return self.max_requests_per_second or DEFAULT_RPS[self.transport]

    @property
    def token(self) -> Secret | None:
        """The token the chosen transport authenticates with."""
        return self.tenant_token if self.transport == "segment" else self.api_token

    @property
    def token_setting(self) -> str:
        if self.transport == "segment":
            return f"planhat.tenant_token (or {TENANT_TOKEN_ENV})"
        return f"planhat.api_token (or {API_TOKEN_ENV})"


@dataclass(frozen=True)
class ScheduleSettings:
    min_interval: timedelta = timedelta(hours=2)
    max_interval: timedelta = timedelta(hours=3)


@dataclass(frozen=True)
class SafetySettings:
    max_exit_fraction: float = 0.5
    min_members: int = 100


@dataclass(frozen=True)
class ReconcileSettings:
    interval: timedelta | None = None  # the daemon reconciles (with --fix) this often; None: never
    page_size: int = 5000  # contacts per read request
    max_requests_per_second: float = 3.0  # Planhat's soft quota is 200 calls/minute


@dataclass(frozen=True)
class HistorySettings:
    retention_days: int = 90


@dataclass(frozen=True)
class DaemonSettings:
    grace_seconds: float = 10.0
    resync_poll_seconds: float = 5.0
    lease_seconds: float = 60.0
    log_format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class MetricsSettings:
    port: int | None = None
    host: str = "127.0.0.1"
    health_margin: timedelta = timedelta(minutes=30)
    token: Secret | None = None  # gates the status page; required off loopback


@dataclass(frozen=True)
class SourceSettings:
    __repr__ = masked_repr

    name: str
    url: str = field(metadata=masked(safe_url))
    # The warehouse layout its events are in (segment | rudderstack), for audiences and traits
    # defined by `condition` / `value`; and the schema they live in (None: the default one).
    events: str | None = None
    schema: str | None = None


LEVELS = ("user", "account")
SEND_AS = ("property", "events", "both")
ON_EXIT = ("clear", "keep")
# The Planhat custom field types a trait may declare (`type`), for `audience-sync fields --create`.
TRAIT_FIELD_TYPES = ("number", "text", "date", "list", "multipicklist", "checkbox")


@dataclass(frozen=True)
class AudienceSettings:
    """One `[[audiences]]` or `[[traits]]` entry: both run, diff and deliver the same way."""

    name: str
    key: str
    source: str
    query: str  # the SQL; "" for one defined on events (`definition`)
    kind: str = "audience"  # audience | trait (a computed trait: the query returns `value`)
    level: str = "user"  # user (contacts) | account (Planhat companies, keyed on company_id)
    send_as: str = "property"  # property | events | both
    on_exit: str = "clear"  # traits: clear (send null) | keep (the last value stays)
    field_type: str | None = None  # traits: the Planhat field type declared (`type`); None: inferred
    # Defined on events instead of SQL: the `condition` (audience) or `value` (trait) as written,
    # and its compiled form (events.EventQuery), made when the config loads.
    definition: str | None = None
    compiled: Any = field(default=None, compare=False, repr=False)

    @property
    def trait(self) -> bool:
        return self.kind == "trait"

    @property
    def noun(self) -> str:
        return "trait" if self.trait else "audience"


@dataclass(frozen=True)
class Settings:
    __repr__ = masked_repr

    path: Path | None
    database_url: str = field(default="sqlite:///audience_sync.db", metadata=masked(safe_url))
    planhat: PlanhatSettings = field(default_factory=PlanhatSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    sources: dict[str, SourceSettings] = field(default_factory=dict)
    audiences: tuple[AudienceSettings, ...] = ()

    def audience(self, key: str) -> AudienceSettings:
        for audience in self.audiences:
            if audience.key == key:
                return audience
        known = ", ".join(a.key for a in self.audiences) or "none"
        raise ConfigError(f"unknown audience {key!r} (configured: {known})")

    def select(self, keys: list[str] | tuple[str, ...] | None) -> list[AudienceSettings]:
        """The named audiences, or all of them when no key is given."""
        if not keys:
            return list(self.audiences)
        return [self.audience(key) for key in dict.fromkeys(keys)]
