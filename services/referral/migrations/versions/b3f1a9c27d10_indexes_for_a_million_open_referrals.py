"""indexes for a million open referrals: the clock's unfired timers, the list's and the inbox's pages, the alerts

Revision ID: b3f1a9c27d10
Revises: 5c1d0e7a9b42
Create Date: 2026-12-01 06:00:00.000000

The clock reads the unfired timers by due time from a partial index (fired timers, nearly every row in time, are not
in it) instead of the index of every timer's due time. The list (newest first, filtered by partner, status or SLA
state) and the inbox (first answer awaited, then deadline) read their pages off composite indexes; the single-column
indexes on partner, status and SLA state are their prefixes and go. `./dev bench timers` measured why
(docs/benchmarks.md, "Timers at scale").
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b3f1a9c27d10'
down_revision: str | None = '5c1d0e7a9b42'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFIRED = sa.text('fired_at IS NULL')
REFERRAL_INDEXES = {
    'ix_referral_partner_created': ['partner_id', 'created_at', 'id'],
    'ix_referral_status_created': ['status', 'created_at', 'id'],
    'ix_referral_sla_created': ['sla', 'created_at', 'id'],
    'ix_referral_inbox': ['status', 'respond_by', 'created_at', 'id'],
    'ix_referral_partner_inbox': ['partner_id', 'status', 'respond_by', 'created_at', 'id'],
}


def upgrade() -> None:
    op.create_index('ix_clock_timer_unfired_due', 'clock_timer', ['due_at', 'id'], unique=False,
                    postgresql_where=UNFIRED, sqlite_where=UNFIRED)
    op.drop_index('ix_clock_timer_due_at', table_name='clock_timer')
    for name, columns in REFERRAL_INDEXES.items():
        op.create_index(name, 'referral', columns, unique=False)
    for column in ('partner_id', 'status', 'sla'):
        op.drop_index(f'ix_referral_{column}', table_name='referral')
    op.create_index('ix_referral_history_action_at', 'referral_history', ['action', 'at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_referral_history_action_at', table_name='referral_history')
    for column in ('partner_id', 'status', 'sla'):
        op.create_index(f'ix_referral_{column}', 'referral', [column], unique=False)
    for name in REFERRAL_INDEXES:
        op.drop_index(name, table_name='referral')
    op.create_index('ix_clock_timer_due_at', 'clock_timer', ['due_at'], unique=False)
    op.drop_index('ix_clock_timer_unfired_due', table_name='clock_timer')
