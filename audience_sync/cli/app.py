"""The `audience-sync` commands: a thin layer over sync, state and daemon.

Every expected failure is an AudienceSyncError, printed by `main` as one line
`Kind: message` on stderr with a non-zero exit; nothing else reports errors.

Each command imports what it uses when it runs: `status` and `history` need only the state
database (SQLAlchemy), not the sync, Alembic or httpx, and `--help` not even those.
tests/test_cli_imports.py keeps it that way.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import AudienceSyncError, StateDatabaseError
from ..support.clock import format_utc
from ..support.logs import configure_logging
from .output import err, json_default, print_columns

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.engine import Engine

    from ..config import Settings
    from ..state.history import AudienceStatus
    from ..sync.reports import Progress, RunReport

app = typer.Typer(
    name="audience-sync",
    help="Sync SQL-defined audiences to Planhat contacts as boolean properties.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the state database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

AudienceOption = Annotated[
    list[str] | None,
    typer.Option("--audience", "-a", help="Audience key; repeat for several (default: all)."),
]
LOG_LEVELS = ("debug", "info", "warning", "error")
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
CHECK_TIMEOUT = 30.0  # check.DEFAULT_TIMEOUT (a test holds them equal): `check` loads httpx and Alembic


@dataclass
class CliContext:
    config: Path | None
    log_level: str

    def settings(self) -> Settings:
        from ..config import load_settings

        settings = load_settings(self.config)
        if settings.path is None:
            from ..demo import ensure_demo_source

            ensure_demo_source()
        return settings


def _context(ctx: typer.Context) -> CliContext:
    return ctx.ensure_object(CliContext)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Config file (default: $AUDIENCE_SYNC_CONFIG or ./audience_sync.toml; "
            "the bundled demo when neither exists).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "",
) -> None:
    if log_level and log_level.lower() not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        raise typer.BadParameter(f"{log_level!r} is not one of {choices}", param_hint="--log-level")
    ctx.obj = CliContext(config=config, log_level=log_level)


def _open(cli: CliContext, default_level: str = "warning") -> tuple[Settings, Engine]:
    from ..state.database import open_state

    settings = cli.settings()
    configure_logging(cli.log_level or default_level, settings.daemon.log_format)
    return settings, open_state(settings.database_url)


# --- db -----------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Upgrade the state database schema to this version's head."""
    from ..state import migrations
    from ..state.database import create_state_engine
    from ..support.redaction import safe_url

    cli = _context(ctx)
    settings = cli.settings()
    configure_logging(cli.log_level or "warning", settings.daemon.log_format)
    engine = create_state_engine(settings.database_url)
    try:
        before, after = migrations.upgrade(engine)
    finally:
        engine.dispose()
    where = safe_url(settings.database_url)
    if before == after:
        typer.echo(f"State database {where} is up to date (revision {after}).")
    else:
        typer.echo(f"Upgraded state database {where} from {before or 'empty'} to {after}.")


# --- sync ---------------------------------------------------------------------------------


@app.command()
def sync(
    ctx: typer.Context,
    audience: AudienceOption = None,
    full: Annotated[bool, typer.Option("--full", help="Send every member, not only changes.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be sent; change nothing.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Let a mass exit through the safety guard.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the audiences once now: full on first sync, changes only afterwards."""
    from ..sync.reports import SyncOptions
    from ..sync.run import sync as run_sync

    settings, engine = _open(_context(ctx))
    try:
        if audience and not dry_run:
            from ..sync.run import refuse_paused

            refuse_paused(engine, [a.key for a in settings.select(audience)])
        if not dry_run and settings.planhat.token is None:
            dry_run = True
            err(
                f"No Planhat token set: set {settings.planhat.token_setting}. "
                "Dry run: nothing is sent or recorded."
            )
        options = SyncOptions(full=full, dry_run=dry_run, force=force)
        progress = _progress() if not as_json and not dry_run else None
        reports = run_sync(settings, engine, audience, options, progress=progress)
    finally:
        engine.dispose()
    _print_reports(reports, as_json, dry_run)
    _exit_unless(all(report.ok for report in reports))


def _progress() -> Progress:
    from .progress import make_progress

    return make_progress()


def _print_reports(reports: list[RunReport], as_json: bool, dry_run: bool) -> None:
    if as_json:
        typer.echo(json.dumps([asdict(report) for report in reports], indent=2, default=str))
        return
    columns: tuple[str, ...] = ("audience", "kind", "status", "members", "entered", "exited")
    columns += ("to send",) if dry_run else ("sent", "failed", "pending")
    columns += ("skipped", "seconds")
    rows = []
    for r in reports:
        counts = (r.pending,) if dry_run else (r.sent, r.failed, r.pending)
        rows.append(
            (
                r.key,
                r.kind,
                r.status,
                *map(str, (r.members, r.entered, r.exited, *counts, r.skipped)),
                f"{r.duration:.2f}",
            )
        )
    if dry_run:
        typer.echo("Dry run: nothing sent")
    print_columns(columns, rows, right=columns[3:])
    for r in reports:
        if dry_run and r.samples:
            typer.echo(f"Sample payloads for {r.key}:")
            for sample in r.samples:
                typer.echo("  " + json.dumps(sample))
        if r.status == "paused":
            typer.echo(f"{r.key}: skipped: {r.error}")
        elif r.error:
            err(f"{r.key}: {r.error}")


# --- explain ------------------------------------------------------------------------------


@app.command()
def explain(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="A user_id or an email.")],
    audience: Annotated[str | None, typer.Option("--audience", "-a", help="One audience key.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Why a user has a value: per audience and trait, member now or not (by the last snapshot),
    what Planhat was last told and when, what is pending or in doubt, and the recent changes.
    Exits 1 when the state database knows nothing of the user."""
    from ..state import explain as explaining
    from ..state.database import translate_errors

    settings, engine = _open(_context(ctx))
    try:
        reading = translate_errors("cannot read state database", settings.database_url)
        with reading, engine.connect() as connection:
            known = explaining.audiences(connection, {a.key: (a.name, a.kind) for a in settings.audiences})
            if audience is not None:
                if audience not in known:
                    configured = ", ".join(a.key for a in settings.audiences) or "none"
                    raise AudienceSyncError(f"unknown audience {audience!r} (configured: {configured})")
                known = {audience: known[audience]}
            story = explaining.explain(connection, user, known)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(asdict(story), indent=2, default=json_default))
    else:
        _print_story(story)
    if not story.known:
        where = f"audience {audience}" if audience else "any audience"
        err(f"The state database has no record of {user!r} in {where}.")
    _exit_unless(story.known)


def _print_story(story: Any) -> None:
    other = [ref for ref in story.refs if ref != story.user]
    known_as = f"; known as {', '.join(other)}" if other else ""
    typer.echo(f"User {story.user}" + (f" (email {story.email}{known_as})" if story.email else known_as))
    for a in story.audiences:
        shown = _shown(a.value, a.kind)
        now = (f"value now {shown}" if a.member else "no value now") if a.kind == "trait" else (
            "member now" if a.member else "not a member now")  # fmt: skip
        typer.echo(f"{a.key} ({a.kind} {a.name!r}): {now}")
        if not a.known:
            typer.echo("  nothing recorded for this user")
            continue
        if a.told:
            run = f", run {a.told.run_id} ({a.told.kind})" if a.told.run_id is not None else ""
            typer.echo(
                f"  Planhat was last told {_shown(a.told.value, a.kind)} at {format_utc(a.told.at)}{run}"
            )
        else:
            typer.echo("  Planhat was never told (no delivered change recorded)")
        if a.pending:
            p = a.pending
            doubt = "in doubt (Planhat may hold either value), " if p.in_doubt else ""
            error = f", last error: {p.last_error}" if p.last_error else ""
            typer.echo(
                f"  pending: {_shown(p.value, a.kind)}, queued {format_utc(p.queued_at)}, {doubt}"
                f"{p.attempts} attempt{'' if p.attempts == 1 else 's'}{error}"
            )
        if a.changes:
            typer.echo("  recent changes, newest first:")
            rows = [
                (
                    format_utc(c.at),
                    "" if c.run_id is None else str(c.run_id),
                    c.kind or "",
                    c.change,
                    _shown(c.value, a.kind),
                    c.outcome,
                    c.error or "",
                )
                for c in a.changes
            ]
            print_columns(("    at", "run", "kind", "change", "value", "outcome", "error"),
                          [("    " + r[0], *r[1:]) for r in rows], right=("run",))  # fmt: skip


def _shown(value: Any, kind: str) -> str:
    if kind != "trait":
        return "true" if value else "false"
    return "null" if value is None else json.dumps(value)


# --- pause and resume ---------------------------------------------------------------------

KeysArgument = Annotated[
    list[str], typer.Argument(help="Audience keys (configured or in the state database).")
]


@app.command()
def pause(
    ctx: typer.Context,
    keys: KeysArgument,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why, shown in status and on the page.")
    ] = None,
) -> None:
    """Pause audiences: the daemon and `sync` do not run them (their pending changes and baseline
    stay) until `audience-sync resume`. Recorded in the state database for every daemon."""
    from ..state import pauses

    settings, engine = _open(_context(ctx))
    try:
        known = _known_keys(settings, engine, keys)
        with engine.begin() as connection:
            fresh = pauses.pause(connection, known, reason, pauses.operator())
            found = pauses.paused(connection, known)
    finally:
        engine.dispose()
    for key in known:
        state = "paused" if key in fresh else "already paused"
        typer.echo(f"{key}: {state} ({found[key].describe()})")
    typer.echo("Running daemons skip them from their next run on; `audience-sync resume KEY` ends a pause.")


@app.command()
def resume(ctx: typer.Context, keys: KeysArgument) -> None:
    """Resume paused audiences: each runs at its next planned time (a `sync` runs it now)."""
    from ..state import pauses

    settings, engine = _open(_context(ctx))
    try:
        known = _known_keys(settings, engine, keys)
        with engine.begin() as connection:
            was = pauses.resume(connection, known)
    finally:
        engine.dispose()
    for key in known:
        typer.echo(
            f"{key}: {'resumed; it runs at its next planned time' if key in was else 'was not paused'}"
        )


def _known_keys(settings: Settings, engine: Engine, keys: list[str]) -> list[str]:
    """The keys, each configured or known to the state database; else one line naming it."""
    from ..state import audiences
    from ..state.database import translate_errors

    with (
        translate_errors("cannot read state database", settings.database_url),
        engine.connect() as connection,
    ):
        stored = set(audiences.rows(connection))
    configured = [a.key for a in settings.audiences]
    unknown = [key for key in keys if key not in stored and key not in configured]
    if unknown:
        named = ", ".join(map(repr, unknown))
        raise AudienceSyncError(f"unknown audience {named} (configured: {', '.join(configured) or 'none'})")
    return list(dict.fromkeys(keys))


# --- resync -------------------------------------------------------------------------------


@app.command()
def resync(
    ctx: typer.Context,
    audience: AudienceOption = None,
    now: Annotated[bool, typer.Option("--now", help="Run the full resync here and now.")] = False,
) -> None:
    """Request a full resync; the daemon picks it up within seconds (or --now runs it here)."""
    from ..state import audiences, resyncs
    from ..sync.reports import SyncOptions
    from ..sync.run import sync as run_sync

    settings, engine = _open(_context(ctx))
    try:
        keys = [a.key for a in settings.select(audience)]
        with engine.begin() as connection:
            audiences.register(connection, settings.select(keys))
            ids = resyncs.request(connection, keys, requested_by="cli")
        if not now:
            typer.echo(
                f"Full resync requested for {', '.join(keys)} (request ids "
                f"{', '.join(map(str, ids))}); a running daemon picks it up within seconds."
            )
            return
        if settings.planhat.token is None:
            raise AudienceSyncError(
                f"no Planhat token set ({settings.planhat.token_setting}): cannot resync --now; "
                "the request stays recorded"
            )
        options = SyncOptions(full=True, trigger="resync")
        reports = run_sync(settings, engine, keys, options, progress=_progress())
    finally:
        engine.dispose()
    _print_reports(reports, False, False)
    _exit_unless(all(report.ok for report in reports))


# --- reconcile ----------------------------------------------------------------------------


@app.command()
def reconcile(
    ctx: typer.Context,
    audience: AudienceOption = None,
    fix: Annotated[
        bool, typer.Option("--fix", help="Repair: make Planhat hold the truth (changes are recorded).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --fix: let a mass exit through the guard.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Read Planhat's contacts back and compare each audience's field with the state database.

    Exits 1 when Planhat disagrees (without --fix) or when the repair did not complete."""
    from ..sync import reconcile as reconciling

    settings, engine = _open(_context(ctx), default_level="info" if fix else "warning")
    try:
        progress = _progress() if fix and not as_json else None
        reports = reconciling.reconcile(settings, engine, audience, fix=fix, force=force, progress=progress)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([_reconcile_record(r) for r in reports], indent=2, default=str))
    else:
        _print_reconcile(reports, fix)
    _exit_unless(all(r.ok for r in reports))


def _reconcile_record(report: Any) -> dict[str, Any]:
    record = asdict(report)
    record["drift"] = report.drift
    return record


def _print_reconcile(reports: list[Any], fix: bool) -> None:
    typer.echo(f"Planhat read back: {reports[0].contacts if reports else 0} contacts")
    columns: tuple[str, ...] = ("audience", "status", "members", "agree", "true, not member",
                                "member, not true", "contact missing", "in doubt")  # fmt: skip
    columns += ("sent", "pending") if fix else ()
    rows = []
    for r in reports:
        counts = (r.members, r.agree, r.unexpected_true, r.missing_true, r.missing_contact, r.in_doubt)
        counts += (r.run.sent, r.run.pending) if fix and r.run else ("", "") if fix else ()
        rows.append((r.key, r.status, *map(str, counts)))
    print_columns(columns, rows, right=columns[2:])
    for r in reports:
        for category, refs in r.samples.items():
            if refs:
                typer.echo(f"{r.key}: {category.replace('_', ' ')}, e.g. {', '.join(refs)}")
        if r.error:
            err(f"{r.key}: {r.error}")
    if not fix and any(r.drift for r in reports):
        err("Planhat has drifted; run `audience-sync reconcile --fix` to repair it.")


# --- preview ------------------------------------------------------------------------------


@app.command()
def preview(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key of an audience or trait.")],
    as_json: JsonOption = False,
) -> None:
    """Show an audience or trait as its source sees it now: the SQL it runs (for one defined on
    events, compiled for the source's database), its members and a few of them. Changes nothing."""
    from ..snapshot.preview import preview as previewing
    from ..snapshot.sources import SourcePool
    from ..support.clock import utcnow

    cli = _context(ctx)
    settings = cli.settings()
    configure_logging(cli.log_level or "warning", settings.daemon.log_format)
    with SourcePool(settings.sources) as pool:
        found = previewing(pool, settings.audience(key), utcnow())
    if as_json:
        typer.echo(json.dumps(asdict(found), indent=2, default=json_default))
        return
    what = f"{found.kind} {found.name!r}, source {found.source} ({found.dialect})"
    typer.echo(f"{found.key}: {what}, as of {format_utc(found.as_of)}")
    typer.echo(f"{'users with a value' if found.kind == 'trait' else 'members'}: {found.members}")
    typer.echo("SQL:")
    typer.echo("\n".join("  " + line for line in found.sql.strip().splitlines()))
    for name, at in found.parameters.items():
        typer.echo(f"  -- :{name} = {format_utc(at)}")
    if found.values:
        typer.echo("most frequent values:")
        print_columns(
            ("value", "users"),
            [(value, str(n)) for value, n in found.values],
            right=("users",),
        )
    if found.samples:
        typer.echo("sample:")
        columns = tuple(found.samples[0])
        print_columns(
            columns, [tuple("" if s[c] is None else str(s[c]) for c in columns) for s in found.samples]
        )


# --- retire -------------------------------------------------------------------------------


@app.command()
def retire(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key of an audience removed from the config.")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Send the `false` values and retire it (default: a dry run).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Retire an audience gone from the config: tell `false` to every user Planhat has (or may
    have) as `true` for it. A dry run unless --yes; exits 1 until it is retired."""
    from ..sync import retire as retiring

    settings, engine = _open(_context(ctx), default_level="info" if yes else "warning")
    try:
        progress = _progress() if yes and not as_json else None
        report = retiring.retire(settings, engine, key, confirm=yes, progress=progress)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=2, default=json_default))
    else:
        _print_retire(report)
    _exit_unless(report.ok)


def _print_retire(r: Any) -> None:
    doubt = f" ({r.users_in_doubt} of them in doubt)" if r.users_in_doubt else ""
    if r.warning:
        err(f"Warning: {r.warning}")
    if r.status == "already-retired":
        typer.echo(f"{r.key} is already retired (at {format_utc(r.retired_at)}); nothing to do.")
    elif r.status == "dry-run":
        typer.echo(f"Dry run: retiring {r.key} would tell {r.users} users `false` in Planhat{doubt}.")
        for sample in r.samples:
            typer.echo("  " + json.dumps(sample))
        typer.echo(f"Nothing sent. Run `audience-sync retire {r.key} --yes` to send them and retire it.")
    elif r.status == "retired":
        typer.echo(
            f"Retired {r.key}: run {r.run_id} told {r.sent} users `false` in Planhat{doubt}; "
            "its runs and history stay."
        )
    else:
        left = f"{r.pending} left ({r.in_doubt} in doubt)"
        typer.echo(f"{r.key}: not retired: sent {r.sent} of {r.users}, {left}.")
        err(f"{r.key}: {r.error}. Run `audience-sync retire {r.key} --yes` again to finish.")


# --- check --------------------------------------------------------------------------------


@app.command()
def check(
    ctx: typer.Context,
    as_json: JsonOption = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds each item may take (connect, query, reads).")
    ] = CHECK_TIMEOUT,
) -> None:
    """Check the setup before anything is sent: config, state database, sources, each audience's
    query, keys, Planhat token and fields. One line per item; exits 1 on any FAIL."""
    from .. import check as setup_check

    cli = _context(ctx)
    configure_logging(cli.log_level or "error")  # the lines say it all; retries would repeat them
    results = setup_check.run_checks(cli.config, timeout=timeout)
    typer.echo(setup_check.to_json(results) if as_json else setup_check.render(results))
    _exit_unless(setup_check.passed(results))


# --- fields -------------------------------------------------------------------------------


@app.command()
def fields(
    ctx: typer.Context,
    create: Annotated[
        bool, typer.Option("--create", help="Create each missing field (never changes an existing one).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Per audience and trait: does Planhat have its custom field (on contacts or companies, per
    `level`) and of the right type? --create makes the missing ones. Exits 1 while one is
    missing, of the wrong type, or could not be created."""
    from ..check import fields as checking

    cli = _context(ctx)
    settings = cli.settings()
    configure_logging(cli.log_level or "warning", settings.daemon.log_format)
    lines = checking.fields(settings, create=create)
    if as_json:
        typer.echo(json.dumps([{**asdict(line), "ok": line.ok} for line in lines], indent=2))
    else:
        rows = [(li.key, li.kind, li.parent, li.type, li.found_type or "", li.status) for li in lines]
        print_columns(("key", "kind", "on", "needs", "in Planhat", "status"), rows)
        for line in lines:
            if line.status in ("missing", "created") or not line.ok:
                typer.echo(
                    f"{line.key}: {line.detail}" + ("" if line.status == "created" else f"; type {line.how}")
                )
    _exit_unless(all(line.ok for line in lines))


# --- daemon -------------------------------------------------------------------------------


@app.command()
def run(ctx: typer.Context) -> None:
    """Run as a daemon: every audience on schedule (default each 2-3 h), resyncs within seconds."""
    from ..daemon.process import run_daemon
    from ..daemon.requirements import require_token
    from ..state.database import open_state

    cli = _context(ctx)
    settings = cli.settings()
    require_token(settings)  # before touching the state database
    configure_logging(cli.log_level or "info", settings.daemon.log_format)
    engine = open_state(settings.database_url)
    try:
        code = run_daemon(settings, engine)
    finally:
        engine.dispose()
    raise typer.Exit(code)


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind (default: metrics.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Port (default: metrics.port, else 8080; 0: any)."),
    ] = None,
) -> None:
    """Serve the status page from the state database, without running the daemon."""
    from ..http import serve as serving
    from ..support.redaction import safe_url

    cli = _context(ctx)
    settings = cli.settings()
    configure_logging(cli.log_level or "warning", settings.daemon.log_format)
    bind = settings.metrics.host if host is None else host
    chosen = port if port is not None else settings.metrics.port
    chosen = serving.DEFAULT_PORT if chosen is None else chosen
    where = safe_url(settings.database_url)

    def ready(url: str) -> None:
        typer.echo(f"Status page of {where} on {url}/ (Ctrl-C to stop)")

    setting = "metrics.host" if host is None else "--host"
    code = serving.serve(settings, bind, chosen, ready=ready, setting=setting)
    raise typer.Exit(code)


# --- history and status -------------------------------------------------------------------


@app.command()
def history(
    ctx: typer.Context,
    audience: Annotated[str | None, typer.Option("--audience", "-a", help="Audience key.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs.")] = 20,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only runs that ended so (failed, partial, ...); repeatable."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only runs started since: a duration ago (24h, 7d) or a UTC date/time."),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", "-k", help="Only runs of this kind (full, incremental, ...); repeatable."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Sync history: one record per audience per run, newest first."""
    from ..state import runs
    from ..state.database import translate_errors

    statuses = _choices("--status", status, runs.STATUSES)
    kinds = _choices("--kind", kind, runs.KINDS)
    start = _since(since) if since else None
    settings, engine = _open(_context(ctx))
    try:
        reading = translate_errors("cannot read state database", settings.database_url)
        with reading, engine.connect() as connection:
            records = runs.recent(connection, audience, limit, statuses=statuses, kinds=kinds, since=start)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(records, indent=2, default=json_default))
        return
    counts = ("members", "entered", "exited", "sent", "failed", "in_doubt", "skipped")
    rows = [
        (
            str(r["id"]),
            r["audience"],
            r["kind"],
            r["status"],
            format_utc(r["started_at"]),
            "" if r["duration_seconds"] is None else f"{r['duration_seconds']:.1f}",
            *("" if r[k] is None else str(r[k]) for k in counts),
            r["error"] or "",
        )
        for r in records
    ]
    columns = ("id", "audience", "kind", "status", "started", "seconds", "members", "entered", "exited",
               "sent", "failed", "in doubt", "skipped", "error")  # fmt: skip
    print_columns(columns, rows, right=("id", "seconds", *columns[6:-1]))


def _choices(option: str, given: list[str] | None, known: tuple[str, ...]) -> list[str]:
    wrong = [value for value in given or [] if value not in known]
    if wrong:
        raise typer.BadParameter(f"{wrong[0]!r} is not one of {', '.join(known)}", param_hint=option)
    return list(given or [])


def _since(value: str) -> datetime:
    """'24h' or '7d' ago, or a date/time ('2026-12-01', '2026-12-01 09:30'), taken as UTC."""
    from datetime import UTC, datetime

    from ..config.loading import parse_duration
    from ..support.clock import utcnow

    try:
        return utcnow() - parse_duration(value)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (24h, 7d) nor a date/time (2026-12-01 09:30)",
            param_hint="--since",
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Per audience: members, last run, pending changes, last error, next scheduled run."""
    from ..state import history
    from ..state.database import translate_errors

    settings, engine = _open(_context(ctx))
    try:
        reading = translate_errors("cannot read state database", settings.database_url)
        with reading, engine.connect() as connection:
            entries = history.status(connection, {a.key: a.name for a in settings.audiences})
    finally:
        engine.dispose()
    if as_json:
        records = [{**asdict(e), "hint": _retire_hint(e)} for e in entries]
        typer.echo(json.dumps(records, indent=2, default=json_default))
        return
    rows = []
    for e in entries:
        last = e.last_run or {}
        rows.append(
            (
                e.key + ("" if e.configured else " (retired)" if e.retired_at else " (not configured)"),
                "" if e.members is None else str(e.members),
                str(e.baseline),
                str(e.pending),
                str(e.in_doubt),
                format_utc(last.get("started_at")),
                "paused" if e.paused else last.get("status", "never"),
                "paused"
                if e.paused
                else "resync requested"
                if e.resync_requested
                else format_utc(e.next_run_at),
                e.last_error or "",
            )
        )
    columns = ("audience", "members", "in Planhat", "pending", "in doubt", "last run", "status", "next run",
               "last error")  # fmt: skip
    print_columns(columns, rows, right=columns[1:5])
    for e in entries:
        if e.paused:
            typer.echo(f"{e.key} is {e.paused.describe()}; `audience-sync resume {e.key}` to run it again")
        hint = _retire_hint(e)
        if hint:
            doubt = f", {e.in_doubt} more in doubt" if e.in_doubt else ""
            typer.echo(
                f"{e.key} is no longer in the config; Planhat has {e.baseline} users as `true` for it"
                f"{doubt}. To tell them `false` and retire it: {hint}"
            )


def _next_run(entry: AudienceStatus) -> str:
    if entry.paused:
        return "paused"
    return "resync requested" if entry.resync_requested else format_utc(entry.next_run_at)


def _retire_hint(entry: AudienceStatus) -> str | None:
    """The command for an audience in the state database, gone from the config, not retired."""
    if entry.configured or entry.retired_at is not None:
        return None
    return f"audience-sync retire {entry.key}"


# --- entry point --------------------------------------------------------------------------


def _exit_unless(ok: bool) -> None:
    if not ok:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Expected failures print one line, no traceback."""
    try:
        app(args=argv, prog_name="audience-sync")
    except SystemExit as exc:  # typer's standalone mode ends every command this way
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except AudienceSyncError as exc:
        err(f"{exc.kind}: {exc}")
        return 1
    except Exception as exc:
        import sqlalchemy as sa  # imported already by whatever raised a SQLAlchemy error

        if not isinstance(exc, sa.exc.SQLAlchemyError):
            raise
        from ..state.database import error_message  # one a command did not translate: still one line

        err(f"{StateDatabaseError.kind}: {exc.__class__.__name__}: {error_message(exc)}")
        return 1
    return 0


def entrypoint() -> None:
    code = main()
    # The process ends here: spare the interpreter's closing garbage collections a walk over
    # every object the imports made (0.1 s of each `status`, with SQLAlchemy and psycopg).
    # Not while a thread still runs (a stopped daemon's check, still in a SQLite query):
    # finalizing under it then crashed now and then (SIGSEGV).
    if threading.active_count() == 1:
        gc.freeze()
    sys.exit(code)
