"""The schema's revisions: reading the database's own, and upgrading it with Alembic.

Migrations ship inside the package (a wheel maps the top-level `migrations/` folder to
`audience_sync/migrations`); Alembic is configured in code, so `audience-sync db upgrade`
works from any directory with no alembic.ini. Reading the revision does not import Alembic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import StateDatabaseError
from . import models

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

VERSION_TABLE = "alembic_version"  # Alembic's default; migrations/env.py keeps it


def migrations_dir() -> Path:
    """Shipped inside the package in a wheel; the top-level folder in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise StateDatabaseError("migrations folder not found: the installation is incomplete")


def alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this version's schema is at: the head of migrations/versions (a test holds
    the constant to Alembic's own head, so the two cannot drift)."""
    return models.SCHEMA_REVISION


def known_revisions() -> set[str]:
    """Every revision of this version's migrations (a database at another one is newer)."""
    from alembic.script import ScriptDirectory  # only when the database is not at the head

    return {script.revision for script in ScriptDirectory(str(migrations_dir())).walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None: no version table, or no row in it), read as
    Alembic's MigrationContext reads it but without importing Alembic."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num"))
    revisions = sorted(connection.execute(sa.select(version.c.version_num)).scalars())
    # Migrations are linear, so there is at most one row; several would read as a revision
    # this version does not know (refused like any other), where Alembic raised.
    return ", ".join(revisions) or None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the schema; returns (revision before, revision after)."""
    from alembic import command

    from .database import translate_errors

    with translate_errors("cannot upgrade state database", str(engine.url)), engine.begin() as connection:
        before = current_revision(connection)
        command.upgrade(alembic_config(connection), revision)
        after = current_revision(connection)
    assert after is not None
    return before, after
