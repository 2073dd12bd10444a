"""The migrations live at the top level of the repository; a wheel must still carry them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    wheel = next(tmp_path.glob("audience_sync-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "audience_sync/migrations/env.py" in names
    assert "audience_sync/migrations/script.py.mako" in names
    versions = {Path(v).name for v in (ROOT / "migrations" / "versions").glob("*.py")}
    assert {f"audience_sync/migrations/versions/{v}" for v in versions} <= names
    # The status page's templates and stylesheet: nothing is fetched at run time.
    page_files = {p.name for p in (ROOT / "audience_sync" / "http" / "templates").iterdir()}
    assert {"status.html", "status.css"} <= page_files
    assert {f"audience_sync/http/templates/{name}" for name in page_files} <= names


def test_migrations_upgrade_from_empty_to_head_on_every_backend(state_url: str, cli: Cli) -> None:
    config = Path("audience_sync.toml")
    config.write_text(f'[database]\nurl = "{state_url}"\n')
    first = cli("--config", str(config), "db", "upgrade")
    assert first.code == 0, first.err
    assert "Upgraded" in first.out
    again = cli("--config", str(config), "db", "upgrade")
    assert again.code == 0 and "up to date" in again.out


def upgraded_config(state_url: str, cli: Cli) -> Path:
    """A config naming only the state database, upgraded to head."""
    config = Path("audience_sync.toml")
    config.write_text(f'[database]\nurl = "{state_url}"\n')
    assert cli("--config", str(config), "db", "upgrade").code == 0
    return config


def test_a_schema_that_is_behind_is_refused_with_the_fix(state_url: str, cli: Cli) -> None:
    import sqlalchemy as sa
    from alembic import command

    from audience_sync.state import migrations

    config = upgraded_config(state_url, cli)
    engine = sa.create_engine(state_url)
    with engine.begin() as connection:
        command.downgrade(migrations.alembic_config(connection), "base")
    engine.dispose()
    result = cli("--config", str(config), "status")
    assert result.code != 0
    assert "audience-sync db upgrade" in result.err and "Traceback" not in result.err
    assert cli("--config", str(config), "db", "upgrade").code == 0
    assert cli("--config", str(config), "status").code == 0


@contextmanager
def state_at(state_url: str, revision: str, *statements: str) -> Iterator[tuple[Path, Any]]:
    """A config naming the state database, which is left at `revision` with `statements` run
    on it; yields the config's path and an engine on the database."""
    from audience_sync.state import database, migrations

    config = Path("audience_sync.toml")
    config.write_text(f'[database]\nurl = "{state_url}"\n')
    engine = database.create_state_engine(state_url)
    try:
        migrations.upgrade(engine, revision)
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
        yield config, engine
    finally:
        engine.dispose()


def test_an_outbox_from_revision_0001_upgrades_with_nothing_in_doubt(state_url: str, cli: Cli) -> None:
    """A state database in use before in-doubt tracking keeps its outbox, none of it in doubt,
    and its runs read with zero in doubt."""
    import sqlalchemy as sa

    outbox = (
        "INSERT INTO pending (audience_key, user_ref, value, queued_at, attempts) "
        "VALUES ('vip', 'u1', TRUE, '2026-11-01 00:00:00', 2)"
    )
    run = (
        "INSERT INTO runs (audience_key, kind, trigger, status, started_at) "
        "VALUES ('vip', 'full', 'cli', 'partial', '2026-11-01 00:00:00')"
    )
    with state_at(state_url, "0001", outbox, run) as (config, engine):
        assert cli("--config", str(config), "db", "upgrade").code == 0
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT user_ref, in_doubt, attempts FROM pending")).all()
            assert [(ref, bool(doubt), attempts) for ref, doubt, attempts in rows] == [("u1", False, 2)]
            assert connection.execute(sa.text("SELECT in_doubt, drift FROM runs")).all() == [(0, None)]
            assert connection.execute(sa.text("SELECT count(*) FROM in_flight")).scalar_one() == 0


def test_baselines_from_revision_0005_upgrade_with_their_counts_kept(state_url: str, cli: Cli) -> None:
    """0006 fills audiences.baseline_count, so `status` shows the right "in Planhat" at once."""
    import json

    audiences = [
        f"INSERT INTO audiences (key, name, created_at) VALUES ('{key}', '{key}', '2026-11-01 00:00:00')"
        for key in ("vip", "churned")
    ]
    members = [
        "INSERT INTO baseline (audience_key, user_ref, told_at) "
        f"VALUES ('vip', 'u{n}', '2026-11-01 00:00:00')"
        for n in range(3)
    ]
    with state_at(state_url, "0005", *audiences, *members) as (config, engine):
        assert cli("--config", str(config), "db", "upgrade").code == 0
        with engine.connect() as connection:
            kept = connection.exec_driver_sql("SELECT key, baseline_count FROM audiences ORDER BY key").all()
        assert kept == [("churned", 0), ("vip", 3)]
    shown = json.loads(cli("--config", str(config), "status", "--json").out)
    assert {e["key"]: e["baseline"] for e in shown} == {"churned": 0, "vip": 3}


def test_a_baseline_from_revision_0008_keeps_its_rows_in_its_new_form(state_url: str, cli: Cli) -> None:
    """0009 rebuilds the SQLite baseline WITHOUT ROWID: every row and the email index carry over,
    and a downgrade gives the rowid table back with them."""
    from alembic import command

    from audience_sync.state import migrations

    members = [
        "INSERT INTO baseline (audience_key, user_ref, email, told_at, value_json) "
        f"VALUES ('vip', 'u{n}', 'u{n}@example.com', '2026-11-01 00:00:00', {value})"
        for n, value in enumerate(("'7'", "NULL", "NULL"))
    ]
    rows = "SELECT user_ref, email, value_json FROM baseline ORDER BY user_ref"
    expected = [("u0", "u0@example.com", "7"), ("u1", "u1@example.com", None), ("u2", "u2@example.com", None)]
    with state_at(state_url, "0008", *members) as (config, engine):
        assert cli("--config", str(config), "db", "upgrade").code == 0
        with engine.connect() as connection:
            assert connection.exec_driver_sql(rows).all() == expected
            indexes = {ix["name"] for ix in sa.inspect(connection).get_indexes("baseline")}
            assert "ix_baseline_email" in indexes
            if engine.dialect.name == "sqlite":
                with pytest.raises(sa.exc.OperationalError, match="no such column: rowid"):
                    connection.exec_driver_sql("SELECT rowid FROM baseline")
        with engine.begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0008")
        with engine.connect() as connection:
            assert connection.exec_driver_sql(rows).all() == expected
            if engine.dialect.name == "sqlite":
                assert len(connection.exec_driver_sql("SELECT rowid FROM baseline").all()) == 3


def test_the_schema_revision_constant_is_alembics_head() -> None:
    """Opening the state database compares its revision with models.SCHEMA_REVISION instead of
    asking Alembic for the head (which costs every command ~0.3 s): a new migration must bump it."""
    from alembic.script import ScriptDirectory

    from audience_sync.state import migrations, models

    script = ScriptDirectory(str(migrations.migrations_dir()))
    assert script.get_heads() == [models.SCHEMA_REVISION]
    assert migrations.head_revision() == models.SCHEMA_REVISION


def test_the_current_revision_is_read_as_alembic_reads_it(state_url: str) -> None:
    """migrations.current_revision (a plain SELECT) agrees with Alembic's MigrationContext with no
    version table, at each revision, and with the table left empty by a downgrade to base."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from audience_sync.state import database, migrations

    def both(engine: sa.Engine) -> tuple[str | None, str | None]:
        with engine.connect() as connection:
            ours = migrations.current_revision(connection)
            return ours, MigrationContext.configure(connection).get_current_revision()

    engine = database.create_state_engine(state_url)
    try:
        assert both(engine) == (None, None)
        revisions = [s.revision for s in ScriptDirectory(str(migrations.migrations_dir())).walk_revisions()]
        for revision in reversed(revisions):
            migrations.upgrade(engine, revision)
            assert both(engine) == (revision, revision)
        with engine.begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "base")
        assert both(engine) == (None, None)
    finally:
        engine.dispose()


def test_a_schema_from_a_newer_version_is_refused_with_one_line(state_url: str, cli: Cli) -> None:
    import sqlalchemy as sa

    from audience_sync.state import migrations
    from audience_sync.support import redaction

    config = upgraded_config(state_url, cli)
    engine = sa.create_engine(state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    for command in ("status", "history"):
        result = cli("--config", str(config), command)
        assert result.code == 1 and result.out == ""
        assert result.err.strip().splitlines() == [
            f"State database error: state database {redaction.safe_url(state_url)} is at revision 0099, "
            f"this version needs {migrations.head_revision()}: run `audience-sync db upgrade`"
        ]
