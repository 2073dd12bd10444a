"""What happened to a chunk of contacts: each accepted, failed, or failed in doubt, once."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import PlanhatError


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)  # refs Planhat accepted
    failed: dict[str, str] = field(default_factory=dict)  # ref -> short error; stays pending
    in_doubt: set[str] = field(default_factory=set)  # of `failed`: Planhat may have written it
    stop: PlanhatError | None = None  # ends the run once this chunk is acknowledged


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one contact of a chunk."""

    ref: str
    error: str | None = None  # None: accepted
    in_doubt: bool = False


def combine(results: Iterable[Result], stop: PlanhatError | None = None) -> Outcome:
    """Each ref once: in doubt if any of its deliveries is, else failed if any failed, else
    accepted."""
    outcome = Outcome(stop=stop)
    accepted: dict[str, None] = {}
    for result in results:
        if result.error is None:
            accepted[result.ref] = None
            continue
        outcome.failed.setdefault(result.ref, result.error)
        if result.in_doubt:
            outcome.in_doubt.add(result.ref)
    outcome.accepted = [ref for ref in accepted if ref not in outcome.failed]
    return outcome
