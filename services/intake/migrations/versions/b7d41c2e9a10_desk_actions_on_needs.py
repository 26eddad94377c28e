"""desk actions on needs: closed by the desk, the last nudge, partner answers read

Revision ID: b7d41c2e9a10
Revises: 60a6ea2a38ac
Create Date: 2026-12-02 10:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.db


revision: str = 'b7d41c2e9a10'
down_revision: str | None = '60a6ea2a38ac'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('need', schema=None) as batch_op:
        batch_op.add_column(sa.Column('closed_by_desk_at', shared.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('partner_nudged_at', shared.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('last_answer_at', shared.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('answers_read_at', shared.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('need', schema=None) as batch_op:
        batch_op.drop_column('answers_read_at')
        batch_op.drop_column('last_answer_at')
        batch_op.drop_column('partner_nudged_at')
        batch_op.drop_column('closed_by_desk_at')
