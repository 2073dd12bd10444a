"""The one error hierarchy of audience-sync.

    AudienceSyncError            every expected failure; the CLI prints it as one line
    ├── ConfigError              the config file is missing, unreadable or invalid
    ├── StateDatabaseError       the state database cannot be reached or used
    │   └── SchemaOutdatedError  the state database needs `audience-sync db upgrade`
    ├── SourceError              an audience's source or query failed
    ├── PlanhatError             delivery to Planhat failed
    │   ├── PlanhatAuthError     Planhat rejected the token (401/403): stop, never retry
    │   └── PlanhatUnavailable   retries exhausted (timeouts, 5xx, 429)
    └── AlreadyRunningError      another process holds an audience's lease

Lower-level errors (SQLAlchemy, httpx, tomllib) are converted at the module that meets
them, with `raise ... from exc`, so callers only ever catch these.
"""

from __future__ import annotations


class AudienceSyncError(Exception):
    """Base of every expected failure. `str(err)` is the one line a user sees."""

    kind = "Error"


class ConfigError(AudienceSyncError):
    kind = "Config error"


class StateDatabaseError(AudienceSyncError):
    kind = "State database error"


class SchemaOutdatedError(StateDatabaseError):
    kind = "State database error"


class SourceError(AudienceSyncError):
    kind = "Source error"


class PlanhatError(AudienceSyncError):
    kind = "Planhat error"


class PlanhatAuthError(PlanhatError):
    """Planhat answered 401/403: the token is wrong. Never retried."""


class PlanhatUnavailable(PlanhatError):
    """Planhat kept failing after the retry budget was spent."""


class AlreadyRunningError(AudienceSyncError):
    kind = "Already running"
