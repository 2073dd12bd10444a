"""in-doubt deliveries: pending.in_doubt, in_flight, runs.in_doubt and runs.drift

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pending', schema=None) as batch_op:
        batch_op.add_column(sa.Column('in_doubt', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index(
            'ix_pending_in_doubt',
            ['audience_key', 'user_ref'],
            unique=False,
            sqlite_where=sa.text('in_doubt'),
            postgresql_where=sa.text('in_doubt'),
        )

    op.create_table('in_flight',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('after_ref', sa.String(length=255), nullable=False),
    sa.Column('last_ref', sa.String(length=255), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_in_flight'))
    )
    with op.batch_alter_table('in_flight', schema=None) as batch_op:
        batch_op.create_index('ix_in_flight_audience_key', ['audience_key'], unique=False)

    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('in_doubt', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('drift', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('drift')
        batch_op.drop_column('in_doubt')

    with op.batch_alter_table('in_flight', schema=None) as batch_op:
        batch_op.drop_index('ix_in_flight_audience_key')

    op.drop_table('in_flight')
    with op.batch_alter_table('pending', schema=None) as batch_op:
        batch_op.drop_index('ix_pending_in_doubt', sqlite_where=sa.text('in_doubt'), postgresql_where=sa.text('in_doubt'))
        batch_op.drop_column('in_doubt')
