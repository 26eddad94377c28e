"""the due deliveries' index: the senders' lease reads queued deliveries by channel and due time

Revision ID: e3396417fec3
Revises: b7e3c1d2a9f0
Create Date: 2026-12-01 20:00:00.000000

The lease (handlers.lease_due_deliveries) asks for the queued deliveries of one channel due by now, oldest first.
SQLite answered it from the index on status (every queued delivery, of both channels) and sorted them; the
composite index (status, channel, due time) holds them in the order the lease wants, so it reads the first ones
and stops. The single-column indexes on status and due time go: the first is its prefix, and only the lease read
the second (docs/benchmarks.md).
"""
from collections.abc import Sequence

from alembic import op

revision: str = 'e3396417fec3'
down_revision: str | None = 'b7e3c1d2a9f0'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_delivery_due', 'delivery', ['status', 'channel', 'next_attempt_at'], unique=False)
    op.drop_index('ix_delivery_status', table_name='delivery')
    op.drop_index('ix_delivery_next_attempt_at', table_name='delivery')


def downgrade() -> None:
    op.create_index('ix_delivery_next_attempt_at', 'delivery', ['next_attempt_at'], unique=False)
    op.create_index('ix_delivery_status', 'delivery', ['status'], unique=False)
    op.drop_index('ix_delivery_due', table_name='delivery')
