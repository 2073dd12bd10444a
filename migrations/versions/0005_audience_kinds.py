"""what each audience key is: audiences.kind (audience | trait) and audiences.level (user | account)

Written from the config whenever a command or the daemon registers its audiences, so that a
key gone from the config (`audience-sync retire`) is still known for what it was. NULL on rows
registered before this revision: those are user-level audiences, the only kind there was.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 03:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("level", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.drop_column("level")
        batch.drop_column("kind")
