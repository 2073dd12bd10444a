"""A dry run: everything a run would do up to delivery, inside a transaction that is rolled
back, with the counts and a few of the payloads it would send."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..config import AudienceSettings, PlanhatSettings, Settings
from ..errors import AudienceSyncError
from ..planhat.payloads import Contact, build_company, build_enduser, build_messages
from ..snapshot.sources import SourcePool
from ..state import outbox
from ..state.database import database_error
from ..support.clock import iso_timestamp, utcnow
from .delivery import row_value
from .guard import blocked
from .queueing import discard_stage, queue_changes, run_kind, stage_and_measure
from .reports import RunReport, SyncOptions
from .sending import key_meta

SAMPLES = 3


def dry_run(
    engine: Engine, pool: SourcePool, audience: AudienceSettings, options: SyncOptions, settings: Settings
) -> RunReport:
    started = time.monotonic()
    report = RunReport(key=audience.key, name=audience.name, status="dry-run")
    with engine.connect() as connection:
        try:
            report.kind, _trigger = run_kind(connection, audience.key, options)
            counts, report.skipped = stage_and_measure(connection, pool, audience, utcnow(), write=False)
            report.members, report.entered, report.exited = counts.members, counts.entered, counts.exited
            reason = blocked(counts, settings.safety, audience.key, force=options.force)
            if reason:
                report.status, report.error = "blocked", reason
            queue_changes(connection, audience, None, utcnow(), full=report.kind == "full")
            report.pending, report.in_doubt = outbox.count(connection, audience.key)
            report.samples = _samples(connection, audience, settings.planhat)
        except AudienceSyncError as exc:
            report.status, report.error = "failed", str(exc)
        except sa.exc.SQLAlchemyError as exc:
            report.status, report.error = "failed", database_error("state database", engine.url, exc)
        finally:
            discard_stage(connection)
    report.duration = time.monotonic() - started
    return report


def _samples(
    connection: Connection, audience: AudienceSettings, planhat: PlanhatSettings
) -> list[dict[str, Any]]:
    key = audience.key
    meta = key_meta([audience], audience.level == "account")
    payloads: list[dict[str, Any]] = []
    for row in outbox.samples(connection, key, SAMPLES):
        contact = Contact(
            ref=row.user_ref,
            user_id=row.user_id,
            email=row.email,
            name=row.name,
            title=row.title,
            company_id=row.company_id,
            values={key: row_value(row.value, row.value_json)},
            meta=meta,
        )
        if meta.account:  # PUT /companies on either transport
            payloads.append(build_company(contact))
        elif planhat.transport == "segment":
            payloads.extend(build_messages(contact, planhat, iso_timestamp()))
        else:
            payloads.append(build_enduser(contact))
    return payloads
