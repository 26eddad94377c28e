"""Each service's Alembic history and its models agree: a database brought to the head revision has exactly the
tables, columns, indexes and constraints the models declare (Alembic's own comparison), on SQLite and PostgreSQL.
Several changes add migrations side by side; a forgotten column or a history with two heads fails here."""

from __future__ import annotations

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
