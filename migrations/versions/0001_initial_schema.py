"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 18:42:02.520569
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audiences',
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=1024), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('baseline_at', sa.DateTime(), nullable=True),
    sa.Column('next_run_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_audiences'))
    )
    op.create_table('baseline',
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('user_ref', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=True),
    sa.Column('email', sa.String(length=255), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('told_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('audience_key', 'user_ref', name=op.f('pk_baseline'))
    )
    op.create_table('changes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('user_ref', sa.String(length=255), nullable=False),
    sa.Column('value', sa.Boolean(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_changes'))
    )
    with op.batch_alter_table('changes', schema=None) as batch_op:
        batch_op.create_index('ix_changes_at', ['at'], unique=False)
        batch_op.create_index('ix_changes_audience_user', ['audience_key', 'user_ref'], unique=False)
        batch_op.create_index('ix_changes_run_id', ['run_id'], unique=False)

    op.create_table('leases',
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('acquired_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('audience_key', name=op.f('pk_leases'))
    )
    op.create_table('pending',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('user_ref', sa.String(length=255), nullable=False),
    sa.Column('value', sa.Boolean(), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=True),
    sa.Column('email', sa.String(length=255), nullable=True),
    sa.Column('name', sa.String(length=1024), nullable=True),
    sa.Column('title', sa.String(length=1024), nullable=True),
    sa.Column('company_id', sa.String(length=255), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('queued_at', sa.DateTime(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pending'))
    )
    with op.batch_alter_table('pending', schema=None) as batch_op:
        batch_op.create_index('ix_pending_user_ref', ['user_ref', 'audience_key'], unique=False)
        batch_op.create_index('uq_pending_audience_user', ['audience_key', 'user_ref'], unique=True)

    op.create_table('resync_requests',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('requested_at', sa.DateTime(), nullable=False),
    sa.Column('requested_by', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('done_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_resync_requests'))
    )
    with op.batch_alter_table('resync_requests', schema=None) as batch_op:
        batch_op.create_index('ix_resync_requests_status', ['status', 'audience_key'], unique=False)

    op.create_table('runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('audience_key', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('members', sa.Integer(), nullable=True),
    sa.Column('entered', sa.Integer(), server_default='0', nullable=False),
    sa.Column('exited', sa.Integer(), server_default='0', nullable=False),
    sa.Column('sent', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('skipped', sa.Integer(), server_default='0', nullable=False),
    sa.Column('pending', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('holder', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_audience_started', ['audience_key', 'started_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_audience_started')

    op.drop_table('runs')
    with op.batch_alter_table('resync_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_resync_requests_status')

    op.drop_table('resync_requests')
    with op.batch_alter_table('pending', schema=None) as batch_op:
        batch_op.drop_index('uq_pending_audience_user')
        batch_op.drop_index('ix_pending_user_ref')

    op.drop_table('pending')
    op.drop_table('leases')
    with op.batch_alter_table('changes', schema=None) as batch_op:
        batch_op.drop_index('ix_changes_run_id')
        batch_op.drop_index('ix_changes_audience_user')
        batch_op.drop_index('ix_changes_at')

    op.drop_table('changes')
    op.drop_table('baseline')
    op.drop_table('audiences')
