"""Each service's Alembic history and its models agree: a database brought to the head revision has exactly the
tables, columns, indexes and constraints the models declare (Alembic's own comparison), on SQLite and PostgreSQL.
Several changes add migrations side by side; a forgotten column or a history with two heads fails here."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from services.intake.store import TABLES as INTAKE_TABLES
from services.notifications.store import TABLES as NOTIFICATIONS_TABLES
from services.referral.store import TABLES as REFERRAL_TABLES
from shared import migrations

pytestmark = pytest.mark.postgres  # types, indexes and server defaults differ

TABLES = {"intake": INTAKE_TABLES, "referral": REFERRAL_TABLES, "notifications": NOTIFICATIONS_TABLES}


@pytest.mark.parametrize("service", sorted(TABLES))
def test_the_head_revision_is_what_the_models_declare(service, database_url_factory):
    url = database_url_factory(service)
    heads = ScriptDirectory.from_config(migrations.config(service, url)).get_heads()
    assert len(heads) == 1, f"{service}: the migration history has {len(heads)} heads {heads}; chain them"
    migrations.upgrade(service, url)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            metadata = migrations.metadata_of(TABLES[service])
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "include_object": migrations.leaves_aside(metadata)}
            )
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert not differences, f"{service}: models and migrations differ: {differences}"


TRIGRAM_INDEXES = {"ix_need_case_search_trgm", "ix_need_case_reference_trgm"}


def test_the_search_trigram_indexes_are_on_postgresql_only_serve_the_searches_and_go_with_a_downgrade(
    database_url_factory,
):
    """Migration c7d2e4a8f913: on PostgreSQL, GIN trigram indexes on the very expressions a search compares (the
    plans of the queries the code sends, captured, read them); on SQLite nothing; down and up again on both."""
    from alembic import command
    from sqlmodel import Session, col

    from services.referral import views
    from services.referral.store import NeedCase

    url = database_url_factory("referral")
    migrations.upgrade("referral", url)
    engine = sa.create_engine(url)
    postgres = engine.dialect.name == "postgresql"

    def trigram_indexes() -> set[str]:
        if not postgres:
            return {str(i["name"]) for i in sa.inspect(engine).get_indexes("need_case")} & TRIGRAM_INDEXES
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'need_case'")
            return {name for (name,) in rows} & TRIGRAM_INDEXES

    try:
        assert trigram_indexes() == (TRIGRAM_INDEXES if postgres else set())
        if postgres:
            sent: list[tuple[str, Any]] = []

            def keep(conn, cursor, statement, parameters, context, executemany):
                if "LIKE" in statement:
                    sent.append((statement, parameters))

            sa.event.listen(engine, "before_cursor_execute", keep)
            with Session(engine) as session:
                views.find_referrals(session, limit=50, cursor=None, q="CHA-2611-0042")  # ops: the need's words
                # a partner's search also finds by its reference a need that left it: the clause the query ORs in
                by_reference = views.searched("cha-2611", only_open_cases=True).clauses[-1]
                session.execute(sa.select(col(NeedCase.need_id)).where(by_reference))
            sa.event.remove(engine, "before_cursor_execute", keep)
            assert len(sent) == 2
            with engine.connect() as connection:
                # an empty table: whether the index can serve the query, not what it costs (nothing to scan)
                connection.exec_driver_sql("SET enable_seqscan = off")
                connection.exec_driver_sql("SET enable_indexscan = off")
                for (statement, parameters), index in zip(sent, sorted(TRIGRAM_INDEXES, reverse=True), strict=True):
                    plan = "\n".join(r[0] for r in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
                    assert f"Bitmap Index Scan on {index}" in plan, plan

        config = migrations.config("referral", url)
        command.downgrade(config, "9b3f6c2d1e70")
        assert trigram_indexes() == set()
        command.upgrade(config, "head")
        assert trigram_indexes() == (TRIGRAM_INDEXES if postgres else set())
    finally:
        engine.dispose()
