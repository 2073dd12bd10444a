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

Nothing is written anywhere: nothing is sent to Planhat, the sources are only read, and the
state database is only read (a SQLite file that does not exist is not created). Each item is
time-boxed: PostgreSQL and SQLite queries get a statement timeout, PostgreSQL and MySQL a connect
timeout, and every item runs in a thread that is given up on after the time limit. Every result
is scrubbed of the configured tokens and database passwords before it is returned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import store
from .config import (
    API_TOKEN_ENV,
    CONFIG_ENV,
    DATABASE_URL_ENV,
    RESERVED_KEYS,
    TENANT_TOKEN_ENV,
    AudienceSettings,
    PlanhatSettings,
    Settings,
    load_settings,
    resolve_config_path,
)
from .demo import ensure_demo_source
from .errors import (
    AudienceSyncError,
    ConfigError,
    PlanhatAuthError,
    PlanhatError,
    PlanhatUnavailable,
    SourceError,
)
from .planhat import (
    CUSTOM_FIELDS_PATH,
    ENDUSERS_PATH,
    SEGMENT_PATH,
    PlanhatClient,
    PlanhatReader,
    scrub_secrets,
    secret_forms,
)

# The query contract's own validation, shared with the sync's reads (not a second copy).
from .sources import ReadStats, SourcePool, _column_positions, _members, missing_sqlite_file
from .store import driver_message, first_line, safe_url

log = logging.getLogger("audience_sync.check")

Status = Literal["OK", "FAIL", "SKIP"]
DEFAULT_TIMEOUT = 30.0  # seconds each item may take
SAMPLE_ROWS = 100  # rows read of each audience's query: enough to see the columns and the data
GRACE = 2.0  # seconds past the limit for a driver's own timeout to report before the box gives up
MIN_MASKED_PASSWORD = 6  # shorter database passwords would mask ordinary words in the messages
# Drivers that take `connect_timeout` (seconds) as a URL parameter.
CONNECT_TIMEOUT_DRIVERS = frozenset(
    {"postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+mysqldb", "mysql+pymysql"}
)
CHECKBOX_TYPES = frozenset({"checkbox", "boolean"})


@dataclass(frozen=True)
class CheckResult:
    item: str  # what was checked: "config", "source app", "audience pro_plan", ...
    status: Status
    detail: str  # what was found, one line
    fix: str = ""  # for a FAIL: what to do about it

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def _ok(item: str, detail: str) -> CheckResult:
    return CheckResult(item, "OK", detail)


def _fail(item: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(item, "FAIL", detail, fix)


def _skip(item: str, detail: str) -> CheckResult:
    return CheckResult(item, "SKIP", detail)


# --- the checks, in order -------------------------------------------------------------------


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
            return _scrubbed(results, _unloaded_secrets(config, environ))
        settings = loaded
    results.append(_check_keys(settings))
    state = partial(_check_state, settings.database_url, engine, timeout)
    results.append(_timeboxed("state database", timeout, state))
    results += _check_sources(settings, timeout, sample_rows)
    results += _check_planhat(settings, timeout)
    return _scrubbed(results, _secrets(settings))


def passed(results: list[CheckResult]) -> bool:
    return not any(result.failed for result in results)


def log_checks(
    settings: Settings, engine: Engine | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> list[CheckResult]:
    """The daemon's start: the same checks, one log line each (FAIL at WARNING). It does not
    refuse to start on a FAIL: a source down now may be back by the first run, which then
    reports its own error."""
    results = run_checks(settings, timeout=timeout, engine=engine)
    for result in results:
        level = logging.WARNING if result.failed else logging.INFO
        log.log(level, "check: %s", _line(result))
    log.log(logging.WARNING if not passed(results) else logging.INFO, "check: %s", summary(results))
    return results


def _load(config: str | Path | None, environ: dict[str, str]) -> tuple[Settings | None, CheckResult]:
    path, _ = resolve_config_path(config, environ)
    try:
        settings = load_settings(config, environ)
    except ConfigError as exc:
        return None, _fail("config", str(exc), _config_fix(str(exc), path))
    if settings.path is None:
        ensure_demo_source()  # part of the embedded demo, as for every other command
        return settings, _ok("config", f"no {path}: the embedded demo config and its bundled source")
    counts = f"{len(settings.sources)} source(s), {len(settings.audiences)} audience(s)"
    return settings, _ok("config", f"{settings.path} loads: {counts}, transport {settings.planhat.transport}")


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
        return _fail("audience keys", "no audiences configured", "add an [[audiences]] table to the config")
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    reserved = sorted(set(keys) & RESERVED_KEYS)
    if duplicates or reserved:
        problems = [f"{key!r} is the key of several audiences" for key in duplicates]
        problems += [f"{key!r} collides with a contact field" for key in reserved]
        return _fail(
            "audience keys", "; ".join(problems), 'set a distinct `key = "..."` on the audiences named'
        )
    return _ok("audience keys", f"{len(keys)} distinct, none a contact field: {', '.join(keys)}")


# --- the state database ---------------------------------------------------------------------


def _check_state(url: str, engine: Engine | None, timeout: float) -> CheckResult:
    item, shown = "state database", safe_url(url)
    fix = f"check database.url (or {DATABASE_URL_ENV}) and that the database accepts connections from here"
    head = store.head_revision()
    try:
        missing = missing_sqlite_file(sa.make_url(url)) if engine is None else None
        if missing is not None:
            return _new_sqlite_file(missing, shown, head)
        own = engine is None
        engine = engine or sa.create_engine(_with_connect_timeout(url, timeout))
        try:
            with engine.connect() as connection:
                revision = store.current_revision(connection)
                tables = sa.inspect(connection).get_table_names() if revision is None else []
        finally:
            if own:
                engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        return _fail(item, f"cannot open {shown}: {store.error_message(exc)}", fix)
    if revision == head:
        return _ok(item, f"{shown} is at the schema head ({head})")
    if revision is None and not tables:
        return _ok(item, f"{shown} is empty: the schema is created at head ({head}) on first use")
    if revision is None:
        return _fail(
            item,
            f"{shown} has tables ({', '.join(sorted(tables)[:5])}) but no audience-sync schema",
            f"point database.url (or {DATABASE_URL_ENV}) at audience-sync's own database",
        )
    if revision not in _known_revisions():
        return _fail(
            item,
            f"{shown} is at revision {revision}, unknown to this version (head {head})",
            "run the newer audience-sync that upgraded it",
        )
    return _fail(
        item,
        f"{shown} is at revision {revision}, this version needs {head}",
        "run `audience-sync db upgrade`",
    )


def _new_sqlite_file(path: Path, shown: str, head: str) -> CheckResult:
    item, folder = "state database", path.parent
    if not folder.is_dir():
        return _fail(
            item,
            f"{shown}: the folder {folder} does not exist",
            f"create {folder}, or point database.url (or {DATABASE_URL_ENV}) elsewhere",
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        return _fail(
            item,
            f"{shown}: cannot create files in {folder}",
            "let the user running audience-sync write there, or point database.url elsewhere",
        )
    return _ok(item, f"{shown} does not exist yet: created at the schema head ({head}) on first use")


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory  # only for a revision other than the head

    return {script.revision for script in ScriptDirectory(str(store.migrations_dir())).walk_revisions()}


def _with_connect_timeout(url: str, seconds: float) -> str:
    """The URL with a connect timeout where its driver takes one as a parameter (the time box
    covers the others)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url  # the engine reports it
    if parsed.drivername not in CONNECT_TIMEOUT_DRIVERS or "connect_timeout" in parsed.query:
        return url
    limited = parsed.update_query_dict({"connect_timeout": str(max(2, math.ceil(seconds)))})
    return limited.render_as_string(hide_password=False)


# --- sources and audience queries ---------------------------------------------------------


def _check_sources(settings: Settings, timeout: float, sample_rows: int) -> list[CheckResult]:
    """One line per source, then one per audience (a SKIP when its source is not reachable)."""
    timed = {
        name: replace(s, url=_with_connect_timeout(s.url, timeout)) for name, s in settings.sources.items()
    }
    results: list[CheckResult] = []
    reachable: set[str] = set()
    with SourcePool(timed) as pool:
        for name, source in settings.sources.items():
            result = _timeboxed(f"source {name}", timeout, partial(_check_source, pool, name, source.url))
            results.append(result)
            if result.status == "OK":
                reachable.add(name)
        for index, audience in enumerate(settings.audiences):
            item = f"audience {audience.key}"
            if audience.source not in reachable:
                results.append(_skip(item, f"source {audience.source!r} is not reachable (above)"))
                continue
            query = partial(_check_query, pool, audience, index, timeout, sample_rows)
            results.append(_timeboxed(item, timeout, query))
    return results


def _check_source(pool: SourcePool, name: str, url: str) -> CheckResult:
    item, shown = f"source {name}", safe_url(url)
    fix = f"check sources.{name}.url and that the database accepts connections from here"
    try:
        engine = pool.engine(name)
    except SourceError as exc:  # an unparsable URL, or its driver is not installed
        return _fail(item, str(exc), f"correct sources.{name}.url, or install the SQLAlchemy driver it names")
    missing = missing_sqlite_file(engine.url)
    if missing is not None:
        return _fail(
            item,
            f"{shown}: the SQLite file {missing} does not exist",
            f"correct sources.{name}.url (a relative path starts in {Path.cwd()})",
        )
    try:
        with engine.connect() as connection:
            connection.execute(sa.select(sa.literal(1)))
    except sa.exc.SQLAlchemyError as exc:
        return _fail(item, f"cannot connect to {shown}: {store.error_message(exc)}", fix)
    return _ok(item, f"{shown} answers ({engine.dialect.name})")


def _check_query(
    pool: SourcePool, audience: AudienceSettings, index: int, timeout: float, sample_rows: int
) -> CheckResult:
    item = f"audience {audience.key}"
    where = f"audience {audience.key!r} (source {audience.source!r})"
    deadline = time.monotonic() + timeout
    try:
        with pool.engine(audience.source).connect() as connection, _statement_timeout(connection, deadline):
            keys, rows = _first_rows(connection, audience.query, sample_rows)
    except (sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
        if time.monotonic() >= deadline:
            return _fail(
                item,
                f"{where}: no rows within {timeout:g}s (limit {sample_rows} rows; stopped)",
                "a sync runs the query in full: check its plan (EXPLAIN; an ORDER BY, DISTINCT or "
                "GROUP BY over a large table reads it all first), or allow longer with --timeout",
            )
        message = driver_message(exc) if isinstance(exc, sa.exc.DBAPIError) else first_line(exc)
        return _fail(
            item,
            f"{where}: the query failed: {message}",
            f"run audiences[{index}].query by hand on source {audience.source!r} and correct it",
        )
    try:
        columns = _column_positions(keys, where)
    except SourceError as exc:
        return _fail(
            item,
            str(exc),
            "return a column named user_id or email, e.g. `SELECT id AS user_id, "
            "email ...` (README: the query contract)",
        )
    stats = ReadStats()
    usable = len(_members(rows, columns, stats))
    found = f"columns {', '.join(keys)}"
    if not rows:
        return _ok(item, f"{found}; no rows: the audience is empty")
    skipped = f" ({stats.skipped} skipped, e.g. {stats.samples[0]})" if stats.skipped else ""
    return _ok(item, f"{found}; {usable} of the first {len(rows)} rows usable{skipped}")


def _first_rows(connection: Connection, query: str, limit: int) -> tuple[list[str], list[Any]]:
    """The query's columns and at most `limit` rows, the database told so: the query wrapped as
    a subquery under LIMIT (or the dialect's TOP / FETCH FIRST), so it stops early where it can."""
    inner = sa.text(query.strip().rstrip(";")).columns().subquery("audience_sync_check")
    result = connection.execute(sa.select(sa.literal_column("*")).select_from(inner).limit(limit))
    return list(result.keys()), list(result.fetchmany(limit))


@contextmanager
def _statement_timeout(connection: Connection, deadline: float) -> Iterator[None]:
    """Stop the query at `deadline` inside the database, where the driver allows it: PostgreSQL's
    statement_timeout (for this transaction only), SQLite's progress handler. Elsewhere only the
    time box applies (the query then runs on in the background until the process ends)."""
    left = max(0.001, deadline - time.monotonic())
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {math.ceil(left * 1000)}")
        yield
    elif connection.dialect.driver == "pysqlite":
        raw = connection.connection.driver_connection
        # Every million VM steps (some milliseconds): each call needs the GIL, and asking more
        # often starves the daemon's runs, which share the process, while a slow query runs.
        raw.set_progress_handler(lambda: int(time.monotonic() >= deadline), 1_000_000)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)
    else:
        yield


# --- Planhat ----------------------------------------------------------------------------------


def _check_planhat(settings: Settings, timeout: float) -> list[CheckResult]:
    planhat = settings.planhat
    # A check asks once more at most, and within the time limit.
    quick = replace(
        planhat,
        timeout_seconds=min(planhat.timeout_seconds, timeout),
        max_attempts=min(planhat.max_attempts, 2),
        retry_budget_seconds=min(planhat.retry_budget_seconds, timeout / 2),
    )
    if planhat.transport == "segment":
        results = [_check_tenant_token(quick)]
        if planhat.api_token is not None or settings.reconcile.interval is not None:
            api = partial(_check_api_token, "planhat api token", quick)
            results.append(_timeboxed("planhat api token", timeout, api))
        return results
    token = _timeboxed("planhat token", timeout, partial(_check_api_token, "planhat token", quick))
    if token.status != "OK":
        return [token, _skip("planhat fields", "needs the API token to be accepted (above)")]
    keys = [audience.key for audience in settings.audiences]
    return [token, _timeboxed("planhat fields", timeout, partial(_check_fields, quick, keys))]


def _check_tenant_token(planhat: PlanhatSettings) -> CheckResult:
    item = "planhat token"
    if planhat.tenant_token is None:
        return _fail(item, "no tenant token set: nothing can be sent", f"set {planhat.token_setting}")
    problem = _token_form_problem(planhat)
    if problem is not None:
        return _fail(item, problem, f"check {planhat.token_setting}")
    return _skip(
        item,
        f"tenant token set, not verifiable without sending: POST {SEGMENT_PATH}, the "
        "only endpoint that takes it, has no read; the first delivery proves it "
        "(a 401/403 stops that run at once, nothing is lost)",
    )


def _check_api_token(item: str, planhat: PlanhatSettings) -> CheckResult:
    setting = f"planhat.api_token (or {API_TOKEN_ENV})"
    if planhat.api_token is None:
        why = "the endusers transport" if planhat.transport == "endusers" else "reconcile.interval"
        return _fail(item, f"no API token set, and {why} needs it", f"set {setting}")
    reading = replace(planhat, transport="endusers")
    problem = _token_form_problem(reading)
    if problem is not None:
        return _fail(item, problem, f"check {setting}")
    where = f"GET {reading.origin}{ENDUSERS_PATH}?limit=1"
    try:
        with PlanhatReader(reading, page_size=1) as reader:
            next(reader.pages(), None)
    except PlanhatAuthError as exc:
        return _fail(item, f"{where}: {exc}", f"set {setting} to a valid API token")
    except PlanhatError as exc:
        return _fail(
            item, str(exc), "check planhat.subdomain (or base_url) and that this host reaches Planhat"
        )
    return _ok(item, f"API token accepted: {where} answered 200 (a read; nothing sent)")


def _token_form_problem(planhat: PlanhatSettings) -> str | None:
    """What the client refuses before sending (a token with spaces, an invalid base_url)."""
    try:
        PlanhatClient(planhat).close()
    except PlanhatError as exc:
        return str(exc)
    return None


def _check_fields(planhat: PlanhatSettings, keys: list[str]) -> CheckResult:
    """Bulk upserts write `custom.<key>`: each key must be a checkbox field on contacts."""
    item, where = "planhat fields", f"GET {planhat.origin}{CUSTOM_FIELDS_PATH}"
    try:
        with PlanhatReader(planhat) as reader:
            fields = reader.custom_fields()
    except PlanhatAuthError:
        return _skip(
            item, f"not checked: Planhat refused {where} to the API token (it may lack that permission)"
        )
    except PlanhatUnavailable as exc:
        return _fail(item, str(exc), "check that this host reaches Planhat, then check again")
    except PlanhatError as exc:
        return _skip(item, f"not checked: {exc}")
    if fields is None:
        return _skip(item, f"not checked: Planhat does not list custom fields here ({where} answered 404)")
    on_contacts = {str(f.get("name")): f for f in fields if _on_contacts(f)}
    missing = [key for key in keys if key not in on_contacts]
    wrong = [(key, on_contacts[key].get("type")) for key in keys if key in on_contacts]
    wrong = [
        (key, kind) for key, kind in wrong if kind is not None and str(kind).lower() not in CHECKBOX_TYPES
    ]
    if not missing and not wrong:
        return _ok(item, f"a checkbox field on contacts for each audience: {', '.join(keys)}")
    problems = [f"no custom field on contacts named {', '.join(missing)}"] if missing else []
    problems += [f"{key} is a {kind!r} field, not a checkbox" for key, kind in wrong]
    return _fail(
        item,
        "; ".join(problems),
        "in Planhat, create a checkbox custom field on contacts (End Users) named exactly as "
        "each audience key: bulk upserts write custom.<key> = true/false",
    )


def _on_contacts(field: dict[str, Any]) -> bool:
    """A field of Planhat's contact model (parent EndUser); one naming no parent is not ruled out."""
    parent = field.get("parent")
    return parent is None or re.sub(r"[^a-z]", "", str(parent).lower()) in ("enduser", "endusers")


# --- time boxes, secrets, output ------------------------------------------------------------


def _timeboxed(item: str, seconds: float, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check in a thread, waiting at most `seconds` (and a grace for the driver's own
    timeout to report first). A thread given up on finishes in the background; it is a daemon
    thread, so it never holds the process open."""
    outcome: list[CheckResult] = []

    def run() -> None:
        try:
            outcome.append(check())
        except AudienceSyncError as exc:
            outcome.append(_fail(item, str(exc), "see the message"))
        except Exception as exc:  # a check reports; it never takes the others down
            log.debug("check %s raised", item, exc_info=True)
            outcome.append(_fail(item, f"{exc.__class__.__name__}: {first_line(exc)}", "see the message"))

    thread = threading.Thread(target=run, name=f"check {item}", daemon=True)
    thread.start()
    thread.join(seconds + GRACE)
    if outcome:
        return outcome[0]
    return _fail(
        item,
        f"no answer within {seconds:g}s",
        "check that the host answers from here (network, firewall), or allow longer with --timeout",
    )


def _secrets(settings: Settings) -> list[str]:
    planhat = settings.planhat
    tokens = [token.reveal() for token in (planhat.tenant_token, planhat.api_token) if token is not None]
    urls = [settings.database_url, *(source.url for source in settings.sources.values())]
    return _secret_forms(tokens, urls)


def _unloaded_secrets(config: str | Path | None, environ: dict[str, str]) -> list[str]:
    """The secrets a config that failed to load may hold: the environment's tokens and, when the
    file parses as TOML, any token and URL in it (a type error's message quotes the value)."""
    tokens = [environ[name] for name in (TENANT_TOKEN_ENV, API_TOKEN_ENV) if environ.get(name)]
    urls = [environ[DATABASE_URL_ENV]] if environ.get(DATABASE_URL_ENV) else []
    path, _ = resolve_config_path(config, environ)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return _secret_forms(tokens, urls)
    tables = [data.get(name) for name in ("planhat", "metrics", "database")]
    tables += list(data.get("sources", {}).values()) if isinstance(data.get("sources"), dict) else []
    for table in (t for t in tables if isinstance(t, dict)):
        tokens += [str(v) for k, v in table.items() if "token" in k and v not in (None, "")]
        urls += [v for k, v in table.items() if k == "url" and isinstance(v, str)]
    return _secret_forms(tokens, urls)


def _secret_forms(tokens: list[str], urls: list[str]) -> list[str]:
    """Every form of the tokens, and the URLs' passwords; longest first, so no part of one is left."""
    secrets = {form for token in tokens for form in secret_forms(token.strip())}
    for url in urls:
        try:
            password = sa.make_url(url).password
        except (sa.exc.ArgumentError, ValueError):
            continue
        if password is not None and len(str(password)) >= MIN_MASKED_PASSWORD:
            secrets.add(str(password))
    return sorted(secrets, key=len, reverse=True)


def _scrubbed(results: list[CheckResult], secrets: list[str]) -> list[CheckResult]:
    return [
        replace(r, detail=scrub_secrets(r.detail, secrets), fix=scrub_secrets(r.fix, secrets))
        for r in results
    ]


def _line(result: CheckResult) -> str:
    return f"{result.status} {result.item}: {result.detail}{_fix(result)}"


def _fix(result: CheckResult) -> str:
    return f"; fix: {result.fix}" if result.failed and result.fix else ""


def summary(results: list[CheckResult]) -> str:
    failed = sum(result.failed for result in results)
    skipped = sum(result.status == "SKIP" for result in results)
    noted = f" ({skipped} skipped)" if skipped else ""
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
