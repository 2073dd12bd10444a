"""computed traits: a normalised value (canonical JSON text) beside the audience boolean

baseline.value_json   the value Planhat was last told (NULL for an audience: membership)
pending.value_json    the value to send; JSON `null` clears the field (an exit)
changes.value_json    the value a change carried
ix_baseline_email     finds the user Planhat knows under an email (a user who changed identity)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

TABLES = ('baseline', 'pending', 'changes')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('value_json', sa.Text(), nullable=True))
    with op.batch_alter_table('baseline', schema=None) as batch_op:
        batch_op.create_index('ix_baseline_email', ['audience_key', 'email'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('baseline', schema=None) as batch_op:
        batch_op.drop_index('ix_baseline_email')
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('value_json')
