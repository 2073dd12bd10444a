"""paused_audiences: audiences paused with `audience-sync pause` (who, when, why); a paused
audience is not run by the daemon or by `sync` until `audience-sync resume`

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


def downgrade() -> None:
    op.drop_table("paused_audiences")
