"""trigram indexes for the search of needs (q=), PostgreSQL only

Revision ID: c7d2e4a8f913
Revises: 9b3f6c2d1e70
Create Date: 2026-12-01 10:10:00.000000

A search (`q=` on the list API, the inbox's search box) asks that each term be a substring of the need's
`search_text` (`LIKE '%term%'`, shared/search.py), and a partner's search also of its lowered reference: no B-tree
index serves that, so PostgreSQL scanned every need (120-370 ms for a million, docs/benchmarks.md, "Timers at
scale"). On PostgreSQL, the `pg_trgm` extension (a trusted one: a database owner may create it) and two GIN trigram
indexes, on `search_text` and on `lower(coalesce(reference, ''))`, the exact expressions the queries compare
(views.searched), let it find the rows from the index. SQLite keeps its scan: nothing changes there. The models do
not declare these indexes (SQLite would get B-tree ones); `NeedCase`'s table lists them in
`info["postgresql_only_indexes"]`, which Alembic's comparison leaves aside (shared/migrations.py).

The downgrade drops the indexes, not the extension (something else in the database may use it).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c7d2e4a8f913'
down_revision: str | None = '9b3f6c2d1e70'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute('CREATE EXTENSION IF NOT EXISTS pg_trgm')
    op.create_index('ix_need_case_search_trgm', 'need_case', ['search_text'], unique=False,
                    postgresql_using='gin', postgresql_ops={'search_text': 'gin_trgm_ops'})
    op.create_index('ix_need_case_reference_trgm', 'need_case',
                    [sa.text("lower(coalesce(reference, '')) gin_trgm_ops")], unique=False, postgresql_using='gin')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.drop_index('ix_need_case_reference_trgm', table_name='need_case')
    op.drop_index('ix_need_case_search_trgm', table_name='need_case')
