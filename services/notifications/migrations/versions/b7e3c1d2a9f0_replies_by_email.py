"""replies by email: reply routes, inbound mail, the person's id on need references

Revision ID: b7e3c1d2a9f0
Revises: 24f929e70865
Create Date: 2026-12-01 06:10:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes  # AutoString's module: `import sqlmodel` alone does not make it an attribute for mypy
from alembic import op

import shared.db


revision: str = 'b7e3c1d2a9f0'
down_revision: str | None = '24f929e70865'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('reply_route',
    sa.Column('referral_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('need_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('partner_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('contact_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('library_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('category', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('referral_id')
    )
    with op.batch_alter_table('reply_route', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reply_route_need_id'), ['need_id'], unique=False)
    op.create_table('inbound_mail',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('received_at', shared.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('referral_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('need_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=False),
    sa.Column('contact_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('text', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('intent', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inbound_mail', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inbound_mail_received_at'), ['received_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_mail_referral_id'), ['referral_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_mail_need_id'), ['need_id'], unique=False)
    with op.batch_alter_table('need_reference', schema=None) as batch_op:
        batch_op.add_column(sa.Column('person_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('need_reference', schema=None) as batch_op:
        batch_op.drop_column('person_id')
    with op.batch_alter_table('inbound_mail', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_mail_need_id'))
        batch_op.drop_index(batch_op.f('ix_inbound_mail_referral_id'))
        batch_op.drop_index(batch_op.f('ix_inbound_mail_received_at'))
    op.drop_table('inbound_mail')
    with op.batch_alter_table('reply_route', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reply_route_need_id'))
    op.drop_table('reply_route')
