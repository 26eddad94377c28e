"""a declined referral keeps its reason code

Revision ID: 5c1d0e7a9b42
Revises: eea3ff738d5f
Create Date: 2026-12-02 10:00:00.000000

Backfill: referrals declined before the codes get the code of the label the partner pages wrote at the start of the
history's text ("Capacité atteinte : ..."), and "other" for the rest (a decline through the API, free text only).
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
import sqlmodel.sql.sqltypes  # AutoString's module: `import sqlmodel` alone does not make it an attribute for mypy
from alembic import op

revision: str = '5c1d0e7a9b42'
down_revision: str | None = 'eea3ff738d5f'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The labels of the pages' reasons before the codes (templates/_labels.html then) -> the code they meant.
OLD_LABELS = {
    'Hors de notre champ': 'out_of_scope',
    'Hors de notre territoire': 'out_of_territory',
    'Capacité atteinte': 'capacity',
    'Doublon': 'already_followed',
}


def upgrade() -> None:
    with op.batch_alter_table('referral', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decline_reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))

    referral = sa.table('referral', sa.column('id', sa.String), sa.column('status', sa.String),
                        sa.column('decline_reason', sa.String))
    history = sa.table('referral_history', sa.column('referral_id', sa.String), sa.column('action', sa.String),
                       sa.column('detail', sa.String))
    for label, code in OLD_LABELS.items():
        declined_so = sa.select(history.c.referral_id).where(
            history.c.action == 'decline',
            sa.or_(history.c.detail == label, history.c.detail.like(label + ' : %')),
        )
        op.execute(
            referral.update()
            .where(referral.c.status == 'declined', referral.c.decline_reason.is_(None),
                   referral.c.id.in_(declined_so))
            .values(decline_reason=code)
        )
    op.execute(
        referral.update()
        .where(referral.c.status == 'declined', referral.c.decline_reason.is_(None))
        .values(decline_reason='other')
    )


def downgrade() -> None:
    with op.batch_alter_table('referral', schema=None) as batch_op:
        batch_op.drop_column('decline_reason')
