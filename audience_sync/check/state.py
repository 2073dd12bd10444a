"""The `state database` line: reachable and at the schema head, or empty (created at head on
first use). It is only read: a SQLite file is not created, a schema not migrated."""

from __future__ import annotations

import math
import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import DATABASE_URL_ENV
from ..snapshot.sources import missing_sqlite_file
from ..state import migrations
from ..state.database import error_message
from ..support.redaction import safe_url
from .results import CheckResult, fail, ok

# Drivers that take `connect_timeout` (seconds) as a URL parameter.
CONNECT_TIMEOUT_DRIVERS = frozenset(
    {"postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+mysqldb", "mysql+pymysql"}
)


def check_state(url: str, engine: Engine | None, timeout: float) -> CheckResult:
    item, shown = "state database", safe_url(url)
    fix = f"check database.url (or {DATABASE_URL_ENV}) and that the database accepts connections from here"
    head = migrations.head_revision()
    try:
        missing = missing_sqlite_file(sa.make_url(url)) if engine is None else None
        if missing is not None:
            return _new_sqlite_file(missing, shown, head)
        own = engine is None
        engine = engine or sa.create_engine(with_connect_timeout(url, timeout))
        try:
            with engine.connect() as connection:
                revision = migrations.current_revision(connection)
                tables = sa.inspect(connection).get_table_names() if revision is None else []
        finally:
            if own:
                engine.dispose()
    except sa.exc.SQLAlchemyError as exc:
        return fail(item, f"cannot open {shown}: {error_message(exc)}", fix)
    if revision == head:
        return ok(item, f"{shown} is at the schema head ({head})")
    if revision is None and not tables:
        return ok(item, f"{shown} is empty: the schema is created at head ({head}) on first use")
    if revision is None:
        return fail(
            item,
            f"{shown} has tables ({', '.join(sorted(tables)[:5])}) but no audience-sync schema",
            f"point database.url (or {DATABASE_URL_ENV}) at audience-sync's own database",
        )
    if revision not in migrations.known_revisions():
        return fail(
            item,
            f"{shown} is at revision {revision}, unknown to this version (head {head})",
            "run the newer audience-sync that upgraded it",
        )
    return fail(
        item,
        f"{shown} is at revision {revision}, this version needs {head}",
        "run `audience-sync db upgrade`",
    )


def _new_sqlite_file(path: Path, shown: str, head: str) -> CheckResult:
    item, folder = "state database", path.parent
    if not folder.is_dir():
        return fail(
            item,
            f"{shown}: the folder {folder} does not exist",
            f"create {folder}, or point database.url (or {DATABASE_URL_ENV}) elsewhere",
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        return fail(
            item,
            f"{shown}: cannot create files in {folder}",
            "let the user running audience-sync write there, or point database.url elsewhere",
        )
    return ok(item, f"{shown} does not exist yet: created at the schema head ({head}) on first use")


def with_connect_timeout(url: str, seconds: float) -> str:
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
