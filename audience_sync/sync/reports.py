"""What a run is asked to do and what it reports: options, the report per audience, progress."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..support.logs import run_context

log = logging.getLogger("audience_sync.sync")

OK_STATUSES = ("success", "dry-run", "paused")  # paused: not run, on purpose
# Not run, on purpose or because another process runs it: not a failure, logged at INFO.
QUIET_STATUSES = (*OK_STATUSES, "skipped")


class Progress(Protocol):
    """Told how many changes a run delivers and how far it got (a bar, or log lines)."""

    def start(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def finish(self) -> None: ...


@dataclass(frozen=True)
class SyncOptions:
    full: bool = False
    dry_run: bool = False
    force: bool = False  # let a mass exit through the guard
    trigger: str = "cli"  # cli | schedule | resync
    reconcile: bool = False  # the repairing run of a reconcile (kind `reconcile`, a diff of changes)


@dataclass
class RunReport:
    key: str
    name: str
    kind: str = "incremental"
    status: str = "running"
    run_id: int | None = None
    members: int = 0
    entered: int = 0
    exited: int = 0
    skipped: int = 0
    sent: int = 0
    failed: int = 0
    pending: int = 0
    in_doubt: int = 0  # of `pending`: Planhat may hold these values; resent next run
    error: str | None = None
    duration: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    # Work left in the source after the run's outbox commit, run beside its delivery (a planner
    # snapshot's advance, sync/planned.py): it never fails the run, the next run finishes it.
    follow_up: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def log_run(report: RunReport) -> None:
    """The one log line per audience per run: INFO when it succeeded, WARNING when it did not
    (partial, failed, blocked, aborted), so that a failed run stands out at the default level."""
    level = logging.INFO if report.status in QUIET_STATUSES else logging.WARNING
    with run_context(report.run_id):
        _log_run(level, report)


def _log_run(level: int, report: RunReport) -> None:
    log.log(
        level,
        "run audience=%s kind=%s status=%s members=%d entered=%d exited=%d sent=%d failed=%d "
        "skipped=%d pending=%d in_doubt=%d duration=%.2fs%s",
        report.key,
        report.kind,
        report.status,
        report.members,
        report.entered,
        report.exited,
        report.sent,
        report.failed,
        report.skipped,
        report.pending,
        report.in_doubt,
        report.duration,
        f" error={report.error!r}" if report.error else "",
    )
