"""What a check finds, one line per item (OK, FAIL with its fix, WARN with its fix: it works but
loses something, SKIP with why), and how the
lines are printed: as text, as JSON, or logged by the daemon."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["OK", "WARN", "FAIL", "SKIP"]


@dataclass(frozen=True)
class CheckResult:
    item: str  # what was checked: "config", "source app", "audience pro_plan", ...
    status: Status
    detail: str  # what was found, one line
    fix: str = ""  # for a FAIL or a WARN: what to do about it

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    @property
    def warned(self) -> bool:
        return self.status == "WARN"


def ok(item: str, detail: str) -> CheckResult:
    return CheckResult(item, "OK", detail)


def fail(item: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(item, "FAIL", detail, fix)


def warn(item: str, detail: str, fix: str) -> CheckResult:
    """Not a failure (the exit code stays 0): what is checked works, but something is lost."""
    return CheckResult(item, "WARN", detail, fix)


def skip(item: str, detail: str) -> CheckResult:
    return CheckResult(item, "SKIP", detail)


def passed(results: list[CheckResult]) -> bool:
    return not any(result.failed for result in results)


def line(result: CheckResult) -> str:
    return f"{result.status} {result.item}: {result.detail}{_fix(result)}"


def _fix(result: CheckResult) -> str:
    return f"; fix: {result.fix}" if (result.failed or result.warned) and result.fix else ""


def summary(results: list[CheckResult]) -> str:
    failed = sum(result.failed for result in results)
    skipped = sum(result.status == "SKIP" for result in results)
    warned = sum(result.warned for result in results)
    notes = [f"{warned} warning{'s' if warned > 1 else ''}"] if warned else []
    notes += [f"{skipped} skipped"] if skipped else []
    noted = f" ({', '.join(notes)})" if notes else ""
    if failed:
        return f"{failed} of {len(results)} checks failed{noted}: fix them before syncing."
    return f"All {len(results)} checks passed{noted}."


def render(results: list[CheckResult]) -> str:
    """One line per item: status, item, what was found, and for a FAIL the fix; then a summary."""
    width = max((len(result.item) for result in results), default=0)
    lines = []
    for result in results:
        lines.append(f"{result.status:<4}  {result.item:<{width}}  {result.detail}{_fix(result)}")
    return "\n".join([*lines, summary(results)])


def to_json(results: list[CheckResult]) -> str:
    return json.dumps({"ok": passed(results), "checks": [asdict(r) for r in results]}, indent=2)
