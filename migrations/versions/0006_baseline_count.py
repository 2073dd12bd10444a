"""audiences.baseline_count: the rows of the audience's baseline, kept so that `status` and the
metrics need not count a million-row baseline per audience on every call

NULL while a delivery may be changing the baseline (set so before its first acknowledgement,
recounted when it ends): readers count those audiences' rows themselves. Filled here for the
audiences already synced.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(sa.Column("baseline_count", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE audiences SET baseline_count = "
        "(SELECT count(*) FROM baseline b WHERE b.audience_key = audiences.key)"
    )


def downgrade() -> None:
    with op.batch_alter_table("audiences") as batch:
        batch.drop_column("baseline_count")
