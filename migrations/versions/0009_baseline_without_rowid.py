"""baseline on SQLite: a WITHOUT ROWID table, its rows kept in the primary key's order

The diff asks of every staged user whether the baseline has them under the same email
(`state/baseline.py` HAS_MEMBER). In a rowid table that is a search of the primary key's index,
then one of the table for the email; in a WITHOUT ROWID table the key's B-tree holds the row,
and the one search answers (docs/performance.md). PostgreSQL: nothing changes.

The table is copied whole into its new form once, on upgrade.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:10:00
"""

from __future__ import annotations

from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

COLUMNS = "audience_key, user_ref, user_id, email, run_id, told_at, value_json"


def _rebuild(rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("ALTER TABLE baseline RENAME TO baseline_old")
    op.execute("DROP INDEX ix_baseline_email")
    op.execute(
        "CREATE TABLE baseline (audience_key VARCHAR(255) NOT NULL, user_ref VARCHAR(255) NOT NULL, "
        "user_id VARCHAR(255), email VARCHAR(255), run_id INTEGER, told_at DATETIME NOT NULL, "
        "value_json TEXT, CONSTRAINT pk_baseline PRIMARY KEY (audience_key, user_ref))" + ("" if rowid else " WITHOUT ROWID")
    )
    op.execute(
        f"INSERT INTO baseline ({COLUMNS}) SELECT {COLUMNS} FROM baseline_old ORDER BY audience_key, user_ref"
    )
    op.execute("DROP TABLE baseline_old")
    op.execute("CREATE INDEX ix_baseline_email ON baseline (audience_key, email)")


def upgrade() -> None:
    _rebuild(rowid=False)


def downgrade() -> None:
    _rebuild(rowid=True)
