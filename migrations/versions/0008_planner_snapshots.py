"""planner_snapshots: per audience of a source with `planner_schema`, the generation of its
snapshot in the warehouse that its outbox was last computed from (issue 20)

Self-contained: one new table, nothing else touched.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "planner_snapshots",
        sa.Column("audience_key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("planner_schema", sa.String(255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("members", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("committed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("audience_key", name="pk_planner_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("planner_snapshots")
