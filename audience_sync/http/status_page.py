"""The status page: a read-only HTML view of the state database, served at `/`.

    GET  /              every audience (status, members, `true` in Planhat, pending, last and
                        next run, last error), charts of each audience's runs, and the recent
                        runs with their details (counts, error, a sample of their changes).
                        ?days=N: the charts' window (default 30); ?audience=KEY: one audience;
                        ?runs=N: how many recent runs (default 50)
    GET  /users/<id>    one user's story (a user_id or an email): per audience and trait, member
                        now or not, what Planhat was last told and when, what is pending or in
                        doubt, the recent changes (`state.explain`); 404 when nothing is known.
                        /users?user=ID (the page's search box) redirects there
    GET  /status.css    the page's stylesheet, shipped in the package
    GET  /login         a form for the access token; POST /login checks it and sets a cookie
    GET  /logout        forgets that cookie

The daemon serves it next to /metrics and /healthz (`metrics.MetricsServer`), with a banner
when /healthz would answer 503; `audience-sync serve` serves it from the state database alone,
without a daemon to ask about health. Both show a banner when the schema is not this version's.

Rendered on the server by Jinja2 with autoescaping on for every template: audience names,
query errors and Planhat's answers are untrusted text and only ever become text. Charts are
inline SVG (`charts`); the page runs no script and its Content-Security-Policy forbids any.

With `[metrics] token` set, the page needs it: an `Authorization: Bearer TOKEN` header, or the
cookie that POST /login sets (an expiry and an HMAC of it under the token, never the token).
A host other than loopback without a token is refused at start (`require_token`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import Message
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import sqlalchemy as sa
from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy.engine import Connection, Engine

from ..config import Settings
from ..state import changes, explain, history, migrations, pauses, resyncs, runs
from ..state.database import database_error
from ..support.clock import format_utc, utcnow
from ..support.redaction import safe_url
from . import charts
from .auth import MAX_FORM, SESSION_COOKIE, SESSION_TTL, authorized, safe_next, session_cookie

log = logging.getLogger(__name__)

DEFAULT_DAYS, MAX_DAYS = 30, 366
DEFAULT_RUNS, MAX_RUNS = 50, 500
SAMPLE_CHANGES = 10  # changes shown per run
USERS = "/users"  # /users/<user_id or email>: one user's story
MAX_USER = 255  # a user_ref's length in the state database
CHARTS_INLINE = 30  # audiences in view up to which the page draws their charts inline
CHART_KINDS = ("full", "incremental")  # runs that measure the audience (not reconcile, retire)
STATUS_CLASS = {"success": "ok", "partial": "warn", "blocked": "warn", "running": "info"}

HEADERS = (
    # Nothing but this server's stylesheet may load; no script may run, inline or not.
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; form-action 'self'; "
     "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)  # fmt: skip


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Health = Callable[[], tuple[bool, dict[str, Any]]]


# --- the page's data ----------------------------------------------------------------------


class PageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    days: int = DEFAULT_DAYS
    audience: str | None = None
    runs: int = DEFAULT_RUNS

    @classmethod
    def parse(cls, raw: str) -> Query:
        values = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        return cls(
            days=_int_param(values, "days", DEFAULT_DAYS, MAX_DAYS),
            audience=values.get("audience") or None,
            runs=_int_param(values, "runs", DEFAULT_RUNS, MAX_RUNS),
        )

    def link(self, **changes: Any) -> str:
        """This view's query string with `changes` (defaults left out)."""
        merged = {"days": self.days, "audience": self.audience, "runs": self.runs, **changes}
        defaults = {"days": DEFAULT_DAYS, "audience": None, "runs": DEFAULT_RUNS}
        kept = {k: v for k, v in merged.items() if v != defaults[k]}
        return "?" + urlencode(kept) if kept else "/"


def _int_param(values: dict[str, str], name: str, default: int, high: int) -> int:
    raw = values.get(name)
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise PageError(400, f"{name} must be a whole number from 1 to {high}")
    return int(raw)


@dataclass(frozen=True)
class Schema:
    current: str | None
    head: str
    state: str  # current | behind | ahead | empty

    @property
    def usable(self) -> bool:
        return self.state == "current"


@dataclass
class AudienceView:
    key: str
    name: str
    configured: bool
    status: str  # the last run's status, or why there is none
    status_class: str
    members: int | None = None
    in_planhat: int = 0
    pending: int = 0
    in_doubt: int = 0
    last_run: dict[str, Any] | None = None
    last_success_at: datetime | None = None
    next_run_at: datetime | None = None
    resync_requested: bool = False
    paused: pauses.Pause | None = None  # `audience-sync pause`: who, when, why
    last_error: dict[str, Any] | None = None  # the newest run in the window with an error
    overdue: bool = False  # the daemon's health says so
    runs_in_window: int = 0
    charts: tuple[charts.Chart, ...] = ()

    @property
    def recovered(self) -> bool:
        """The last error is older than the last run, which succeeded."""
        last, error = self.last_run, self.last_error
        return bool(last and error and last["status"] == "success" and error["id"] != last["id"])


@dataclass
class PageData:
    now: datetime
    query: Query
    database: str
    served_by: str  # daemon | serve
    schema: Schema | None = None
    healthy: bool | None = None  # None: no daemon to ask
    health_limit: str = ""
    overdue: list[tuple[str, datetime | None]] = field(default_factory=list)  # (name, last success)
    audiences: list[AudienceView] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # the state database could not be read
    charted: bool = True  # the audiences' charts are drawn (few enough audiences in view)
    retention_days: int = 90


class StatusPage:
    """Builds and renders the page from the state database; `handle` answers its paths.

    `settings` is called for each page, so a daemon that reloads its config shows the new
    audiences; the access token is read once, at construction, like the host and port."""

    def __init__(
        self,
        engine: Engine,
        settings: Callable[[], Settings],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.token = settings().metrics.token
        self._clock = clock
        self._head = migrations.head_revision()
        self._templates = _environment()

    # --- HTTP -----------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Message, body: bytes = b"", health: Health | None = None
    ) -> Response | None:
        """The answer for a page path, or None when the path is not one of the page's."""
        parts = urlsplit(target)
        path = parts.path
        if path == "/status.css" and method == "GET":
            css = files("audience_sync.http").joinpath("templates", "status.css").read_bytes()
            cache = (("Cache-Control", "max-age=3600"), ("X-Content-Type-Options", "nosniff"))
            return Response(200, css, "text/css; charset=utf-8", cache)
        if path == "/login":
            return self._login(method, parts.query, body)
        if path == "/logout":
            cookie = f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
            return Response(303, b"", headers=(("Location", "/login"), ("Set-Cookie", cookie)))
        if method != "GET" or not (path == "/" or path == USERS or path.startswith(USERS + "/")):
            return None
        if not authorized(self.token, headers, time.time()):
            return self._login_page(401, target, "")
        if path == USERS:  # the search box
            wanted = parse_qs(parts.query).get("user", [""])[-1].strip()
            return Response(303, b"", headers=(("Location", user_link(wanted) if wanted else "/"),))
        if path.startswith(USERS + "/"):
            return self._user(unquote(path[len(USERS) + 1 :]))
        try:
            query = Query.parse(parts.query)
            data = self.build(query, health)
        except PageError as exc:
            return self._text(exc.status, str(exc))
        status = 503 if data.error else 404 if data.query.audience and not data.audiences else 200
        return Response(status, self.render(data).encode(), headers=HEADERS)

    def _user(self, user: str) -> Response:
        """One user's story, or 404 when the state database knows nothing of them."""
        if not user or len(user) > MAX_USER:
            return self._text(400, f"a user is a user_id or an email of 1 to {MAX_USER} characters")
        settings = self.settings()
        configured = {a.key: (a.name, a.kind) for a in settings.audiences}
        story: explain.UserStory | None = None
        error = None
        try:
            with self.engine.connect() as connection:
                story = explain.explain(connection, user, explain.audiences(connection, configured))
        except sa.exc.SQLAlchemyError as exc:
            error = database_error("cannot read the state database", self.engine.url, exc)
            log.warning("status page: %s", error)
        status = 503 if error else 200 if story and story.known else 404
        html = self._templates.get_template("user.html").render(
            user=user, story=story, error=error, now=self._clock(), database=safe_url(settings.database_url)
        )
        return Response(status, html.encode(), headers=HEADERS)

    def _login(self, method: str, raw_query: str, body: bytes) -> Response:
        back = safe_next(parse_qs(raw_query).get("next", ["/"])[-1])
        if self.token is None:
            return Response(303, b"", headers=(("Location", back),))
        if method == "GET":
            return self._login_page(200, back, "")
        if method != "POST":
            return self._text(405, "use GET or POST")
        if len(body) > MAX_FORM:
            return self._text(413, "the form is too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        given = form.get("token", [""])[-1].strip()
        back = safe_next(form.get("next", [back])[-1])
        if not hmac.compare_digest(given.encode(), self.token.reveal().encode()):
            return self._login_page(401, back, "That is not the access token.")
        cookie = session_cookie(self.token, time.time())
        max_age = int(SESSION_TTL.total_seconds())
        set_cookie = f"{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
        return Response(303, b"", headers=(("Location", back), ("Set-Cookie", set_cookie)))

    def _login_page(self, status: int, back: str, message: str) -> Response:
        html = self._templates.get_template("login.html").render(next=safe_next(back), message=message)
        extra = (("WWW-Authenticate", 'Bearer realm="audience-sync"'),) if status == 401 else ()
        return Response(status, html.encode(), headers=HEADERS + extra)

    def _text(self, status: int, message: str) -> Response:
        return Response(status, (message + "\n").encode(), "text/plain; charset=utf-8", HEADERS)

    # --- data -----------------------------------------------------------------------------

    def build(self, query: Query, health: Health | None = None) -> PageData:
        settings = self.settings()
        now = self._clock()
        data = PageData(
            now=now,
            query=query,
            database=safe_url(settings.database_url),
            served_by="daemon" if health else "serve",
            retention_days=settings.history.retention_days,
        )
        configured = {a.key: a.name for a in settings.audiences}
        overdue: dict[str, datetime | None] = {}
        if health is not None:
            data.healthy, details = health()
            data.health_limit = charts.seconds(details.get("limit_seconds", 0))
            for key, entry in details.get("audiences", {}).items():
                if not entry.get("healthy", True):
                    last = entry.get("last_success_at")
                    overdue[key] = datetime.fromisoformat(last) if last else None
            data.overdue = [(configured.get(k, k), at) for k, at in sorted(overdue.items())]
        try:
            with self.engine.connect() as connection:
                if connection.dialect.name == "postgresql":  # one snapshot for the whole page
                    connection.execution_options(isolation_level="REPEATABLE READ")
                data.schema = self._schema(connection)
                if data.schema.usable:
                    self._read(connection, data, configured, overdue)
        except sa.exc.SQLAlchemyError as exc:
            data.error = database_error("cannot read the state database", self.engine.url, exc)
            log.warning("status page: %s", data.error)
        return data

    def _schema(self, connection: Connection) -> Schema:
        current = migrations.current_revision(connection)
        if current == self._head:
            return Schema(current, self._head, "current")
        if current is None:
            empty = not sa.inspect(connection).get_table_names()
            return Schema(None, self._head, "empty" if empty else "behind")
        known = migrations.known_revisions()
        return Schema(current, self._head, "behind" if current in known else "ahead")

    def _read(
        self, connection: Connection, data: PageData, configured: dict[str, str], overdue: Mapping[str, Any]
    ) -> None:
        rows = history.audience_overview(connection)
        keys = list(configured) + sorted(k for k in rows if k not in configured)
        if data.query.audience is not None:
            keys = [k for k in keys if k == data.query.audience]
        counts = history.planhat_counts(connection)
        since = data.now - timedelta(days=data.query.days)
        summary = runs.window_summary(connection, keys, since, CHART_KINDS)
        wanted = [row["last_run_id"] for row in rows.values()]
        wanted += [s[column] for s in summary.values() for column in ("error_run_id", "measured_run_id")]
        by_id = runs.by_id(connection, [i for i in wanted if i is not None])
        # Charts for a handful of audiences; with many, each audience's own view has them.
        data.charted = len(keys) <= CHARTS_INLINE
        window: dict[str, list[dict[str, Any]]] = {}
        for run in runs.since(connection, keys if data.charted else [], since):
            window.setdefault(run["audience"], []).append(run)
        requested = set(resyncs.pending_keys(connection))
        held_back = pauses.paused(connection)
        for key in keys:
            row = rows.get(key, {})
            seen = summary.get(key, {})
            view = _audience(key, configured, row, by_id.get(row.get("last_run_id") or -1))
            view.in_planhat, view.pending, view.in_doubt = counts.get(key, (0, 0, 0))
            view.resync_requested = key in requested
            view.paused = held_back.get(key)
            view.overdue = key in overdue
            view.runs_in_window = seen.get("runs", 0)
            view.last_error = by_id.get(seen.get("error_run_id") or -1)
            if view.last_error is None and view.last_run and view.last_run["error"]:
                view.last_error = view.last_run
            measured = by_id.get(seen.get("measured_run_id") or -1)
            view.members = measured["members"] if measured else view.members
            if data.charted:
                view.charts = _charts(window.get(key, []), since, data.now)
            data.audiences.append(view)
        data.runs = runs.recent(connection, data.query.audience, data.query.runs)
        samples = changes.samples(connection, data.runs, SAMPLE_CHANGES)
        names = {key: row["name"] for key, row in rows.items()} | configured
        for run in data.runs:
            run["name"] = names.get(run["audience"], run["audience"])
            run["changes"] = samples.get(run["id"], [])

    # --- rendering ------------------------------------------------------------------------

    def render(self, data: PageData) -> str:
        return self._templates.get_template("status.html").render(page=data, q=data.query)


def _audience(
    key: str, configured: dict[str, str], row: dict[str, Any], last_run: dict[str, Any] | None
) -> AudienceView:
    if key in configured:
        status = last_run["status"] if last_run else "never run"
    elif row.get("retired_at") is not None:
        status = "retired"
    else:
        status = "not in the config"
    members = last_run["members"] if last_run and last_run["kind"] in CHART_KINDS else None
    return AudienceView(
        key=key,
        name=configured.get(key) or row.get("name") or key,
        configured=key in configured,
        status=status,
        status_class=STATUS_CLASS.get(status, "bad" if last_run and key in configured else "muted"),
        members=members,
        last_run=last_run,
        last_success_at=row.get("last_success_at"),
        next_run_at=row.get("next_run_at"),
    )


def _charts(runs: list[dict[str, Any]], start: datetime, end: datetime) -> tuple[charts.Chart, ...]:
    """Members; entered and exited; run durations (failures marked) over [start, end]."""
    measured = [r for r in runs if r["kind"] in CHART_KINDS and r["members"] is not None]
    finished = [r for r in runs if r["duration_seconds"] is not None]
    dotted = len(runs) <= charts.DOTS_UP_TO  # else only flagged points get a dot, and a label

    def series(name: str, column: str) -> charts.Series:
        return charts.Series(
            name,
            name,
            [
                charts.Point(r["started_at"], r[column], _label(r, f"{r[column]:,} {name}") if dotted else "")
                for r in measured
            ],
        )

    durations = []
    for r in finished:
        flag = "" if r["status"] == "success" else "failed"
        took = f"{r['kind']}, {r['status']}, {charts.seconds(r['duration_seconds'])}"
        durations.append(
            charts.Point(
                r["started_at"], r["duration_seconds"], _label(r, took) if dotted or flag else "", flag
            )
        )
    return (
        charts.line_chart("Members", start, end, [series("members", "members")]),
        charts.line_chart(
            "Entered and exited", start, end, [series("entered", "entered"), series("exited", "exited")]
        ),
        charts.line_chart(
            "Run duration",
            start,
            end,
            [charts.Series("duration", "duration", durations)],
            unit=charts.seconds,
        ),
    )


def _label(run: dict[str, Any], shown: str) -> str:
    return f"run {run['id']}, {run['started_at']:%Y-%m-%d %H:%M} UTC: {shown}"


# --- templates ----------------------------------------------------------------------------


def user_link(user: str) -> str:
    """/users/<user>, every character that is not plain quoted (an email's @, a slash)."""
    return f"{USERS}/{quote(user, safe='')}"


def _environment() -> Environment:
    # autoescape=True for every template, whatever its name: no text ever becomes markup.
    env = Environment(
        loader=PackageLoader("audience_sync.http", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_utc
    env.filters["ago"] = _ago
    env.filters["count"] = lambda n: "" if n is None else f"{n:,}"
    env.filters["seconds"] = lambda s: "" if s is None else charts.seconds(s)
    env.globals["status_class"] = lambda status: STATUS_CLASS.get(status, "bad")
    env.filters["user_link"] = user_link
    env.filters["shown"] = _shown
    return env


def _shown(value: Any, kind: str) -> str:
    """An audience's true/false, a trait's value as JSON (null: no value)."""
    if kind != "trait":
        return "true" if value else "false"
    return "null" if value is None else json.dumps(value)


def _ago(value: datetime | None, now: datetime) -> str:
    """'now', '5 min ago', 'in 2.5 h', '6 d ago'."""
    if value is None:
        return ""
    delta = (value - now).total_seconds()
    size = abs(delta)
    if size < 30:
        return "now"
    if size < 3600:
        span = f"{size / 60:.0f} min"
    elif size < 48 * 3600:
        span = f"{size / 3600:.2g} h" if size < 36000 else f"{size / 3600:.0f} h"
    else:
        span = f"{size / 86400:.0f} d"
    return f"in {span}" if delta > 0 else f"{span} ago"
