"""The person says whether they were contacted (issue 16): the question's time and the answer on the referral, and
the referral a contact_question timer is about.

Revision ID: 9b3f6c2d1e70
Revises: b3f1a9c27d10
Create Date: 2026-12-01 06:20:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes  # AutoString's module: `import sqlmodel` alone does not make it an attribute for mypy
from alembic import op

import shared.db

# revision identifiers, used by Alembic.
revision: str = '9b3f6c2d1e70'
down_revision: str | None = 'b3f1a9c27d10'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('referral', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contact_question_at', shared.db.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('person_contacted', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=True))
        batch_op.add_column(sa.Column('person_contacted_at', shared.db.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('clock_timer', schema=None) as batch_op:
        batch_op.add_column(sa.Column('referral_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('clock_timer', schema=None) as batch_op:
        batch_op.drop_column('referral_id')
    with op.batch_alter_table('referral', schema=None) as batch_op:
        batch_op.drop_column('person_contacted_at')
        batch_op.drop_column('person_contacted')
        batch_op.drop_column('contact_question_at')
