"""paused_audiences: audiences paused with `audience-sync pause` (who, when, why); a paused
audience is not run by the daemon or by `sync` until `audience-sync resume`. run_requests:
runs asked for over the HTTP API (`POST /api/runs`), which the daemon picks up

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "paused_audiences",
        sa.Column("audience_key", sa.String(255), nullable=False),
        sa.Column("paused_at", sa.DateTime(), nullable=False),
        sa.Column("paused_by", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("audience_key", name=op.f("pk_paused_audiences")),
    )
    op.create_table(
        "run_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("audiences", sa.Text(), nullable=False),
        sa.Column("full", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("run_ids", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_requests")),
    )
    with op.batch_alter_table("run_requests") as batch:
        batch.create_index("ix_run_requests_status", ["status"], unique=False)


def downgrade() -> None:
    op.drop_table("run_requests")
    op.drop_table("paused_audiences")
