"""The second half of a run: deliver the outbox of every audience in it together, so a user's
changes across audiences coalesce, and put the outcome into each audience's report."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import AudienceSettings, PlanhatSettings
from ..errors import PlanhatError
from ..planhat import AUDIENCES, KeyMeta, PlanhatClient
from ..state import outbox
from ..state.database import database_error
from .delivery import DeliveryCounts, Sender, deliver
from .reports import Progress, RunReport

SenderFactory = Callable[[PlanhatSettings], Any]


def sender_for(settings: PlanhatSettings) -> PlanhatClient:
    return PlanhatClient(settings)


def deliver_runs(
    engine: Engine,
    planhat: PlanhatSettings,
    ready: dict[str, RunReport],
    sender_factory: SenderFactory,
    progress: Progress | None,
    should_stop: Callable[[], bool],
    audiences: dict[str, AudienceSettings] | None = None,
) -> None:
    """Deliver the pending changes of these runs' audiences, and count in each report what was
    sent and what failed; an error that ends the delivery is the reports' error (what was
    acknowledged stays acknowledged, the rest stays pending)."""
    run_ids = {key: report.run_id for key, report in ready.items() if report.run_id}
    with engine.connect() as connection:
        total = outbox.total(connection, list(run_ids))
    if not total:
        return
    if progress:
        progress.start(total)
    counts: dict[str, DeliveryCounts] = {}
    exhausted: list[str] = []  # the keys whose sender spent its retry budget
    try:
        with contextlib.ExitStack() as stack:
            senders: dict[PlanhatSettings, Sender] = {}
            for level_ids, meta in _by_level(run_ids, audiences or {}):
                # Companies go to PUT /companies with the API token on either transport (the
                # webhook ignores group calls): on `segment`, a client of their own.
                chosen = planhat.for_companies if meta.account else planhat
                reports = [ready[key] for key in level_ids]
                try:
                    if chosen not in senders:
                        senders[chosen] = stack.enter_context(sender_factory(chosen))
                    sender = senders[chosen]
                    advance = progress.advance if progress else None
                    deliver(engine, sender, level_ids, counts, advance, should_stop, meta=meta)
                except PlanhatError as exc:  # this level's keys only: the other may use another token
                    for report in reports:
                        report.error = str(exc)
                if chosen in senders and senders[chosen].exhausted:
                    exhausted += level_ids
    except sa.exc.SQLAlchemyError as exc:  # what was acknowledged stays; the rest stays pending
        for report in ready.values():
            report.error = database_error("state database", engine.url, exc)
    finally:
        if progress:
            progress.finish()
    for key, tally in counts.items():
        report = ready[key]
        report.sent, report.failed = tally.sent, tally.failed
        if tally.failed and not report.error:
            doubt = f" ({tally.in_doubt} in doubt)" if tally.in_doubt else ""
            report.error = f"Planhat did not accept {tally.failed} changes{doubt}, e.g. {tally.errors[0]}"
    for key in exhausted:
        ready[key].error = ready[key].error or "Planhat unavailable: retry budget spent"


def _by_level(
    run_ids: dict[str, int], audiences: dict[str, AudienceSettings]
) -> list[tuple[dict[str, int], KeyMeta]]:
    """The run's keys split into user level (contacts) and account level (companies), each
    with how its keys go out. Company ids and user refs are separate spaces: never coalesced."""
    groups = []
    for account in (False, True):
        chosen = [
            a for k in run_ids if (a := audiences.get(k)) is not None and (a.level == "account") == account
        ]
        if not account:
            chosen += [AudienceSettings(k, k, "", "") for k in run_ids if k not in audiences]
        if chosen:
            groups.append(({a.key: run_ids[a.key] for a in chosen}, key_meta(chosen, account)))
    return groups


def key_meta(chosen: list[AudienceSettings], account: bool = False) -> KeyMeta:
    """How these keys go out; the plain default when they are user-level audiences only."""
    meta = KeyMeta(
        traits=frozenset(a.key for a in chosen if a.trait),
        events=frozenset(a.key for a in chosen if a.send_as != "property"),
        events_only=frozenset(a.key for a in chosen if a.send_as == "events"),
        account=account,
    )
    return AUDIENCES if meta == AUDIENCES else meta
