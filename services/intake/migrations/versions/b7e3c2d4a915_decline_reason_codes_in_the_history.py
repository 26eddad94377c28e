"""a decline in the need's history keeps its reason code

Revision ID: b7e3c2d4a915
Revises: b7d41c2e9a10
Create Date: 2026-12-02 10:00:00.000000

No backfill: declines recorded before it keep their text (the label the partner pages wrote, or the API's words).
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes  # AutoString's module: `import sqlmodel` alone does not make it an attribute for mypy
from alembic import op

revision: str = 'b7e3c2d4a915'
down_revision: str | None = 'b7d41c2e9a10'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('need_history', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reason_code', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('need_history', schema=None) as batch_op:
        batch_op.drop_column('reason_code')
