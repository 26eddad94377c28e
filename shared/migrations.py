"""Alembic migrations, one history per service (`services/<name>/migrations/`), run by `relais migrate`.

Each service's history covers only its own tables (and the messaging tables every service has), and
keeps its version in its own database. `relais serve` checks the database is at the newest revision
and refuses to start otherwise, so a forgotten migration is a clear error rather than a missing column;
an empty database (a first start, a test) is brought up to date at start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parents[1]


class MigrationNeeded(RuntimeError):
    pass


# A table's `info` key listing indexes made by a migration on PostgreSQL only (an extension's operator class, such as
# pg_trgm's): the models cannot declare them without SQLite getting an index too, so Alembic's comparison leaves
# them aside (`leaves_aside`).
POSTGRESQL_ONLY_INDEXES = "postgresql_only_indexes"


def leaves_aside(metadata: sa.MetaData) -> Callable[..., bool]:
    """Alembic's `include_object` for `metadata`: everything but the indexes its tables list under
    POSTGRESQL_ONLY_INDEXES."""
    names = {name for table in metadata.tables.values() for name in table.info.get(POSTGRESQL_ONLY_INDEXES, ())}

    def include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        return not (type_ == "index" and name in names)

    return include


def metadata_of(tables: Sequence[sa.Table]) -> sa.MetaData:
    """A MetaData holding only a service's tables (and the messaging tables), for Alembic to compare against."""
    from shared.db import MESSAGING_TABLES

    metadata = sa.MetaData()
    for table in [*tables, *MESSAGING_TABLES]:
        table.to_metadata(metadata)
    return metadata


def config(service: str, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "services" / service / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["service"] = service
    return cfg


def upgrade(service: str, url: str) -> None:
    """Bring the service's database to the newest revision (creates it from nothing, too)."""
    engine = sa.create_engine(url)
    try:
        state = _state(service, engine)
    finally:
        engine.dispose()
    if state == "unversioned":
        raise MigrationNeeded(
            f"{service}: the database at {_safe(url)} has tables but no migration history (it was made by a "
            "version of Relais before its first release); delete it, or the data dir, and start again"
        )
    command.upgrade(config(service, url), "head")


def check_current(service: str, engine: sa.Engine, url: str) -> None:
    """At start: migrate an empty database; refuse one that is behind, with what to run."""
    state = _state(service, engine)
    if state == "empty":
        upgrade(service, url)
    elif state != "current":
        raise MigrationNeeded(
            f"{service}: the database is not at the newest schema ({state}); run `relais migrate {service}` first"
        )


def _state(service: str, engine: sa.Engine) -> str:
    head = ScriptDirectory.from_config(config(service, str(engine.url))).get_current_head()
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        if not names:
            return "empty"
        if "alembic_version" not in names:
            return "unversioned"
        revision = MigrationContext.configure(conn).get_current_revision()
    return "current" if revision == head else f"at {revision}, newest is {head}"


def _safe(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def run_env(context, tables: Sequence[sa.Table]) -> None:  # noqa: ANN001 - Alembic's context module
    """The body of every service's migrations/env.py, given the service's tables (shared/ imports no service)."""
    cfg = context.config
    metadata = metadata_of(tables)
    engine = sa.create_engine(cfg.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            include_object=leaves_aside(metadata),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def new_revision(service: str, message: str) -> None:
    """Write the next revision of `service` from the difference between its tables and its history."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/{service}.db"
        command.upgrade(config(service, url), "head")
        command.revision(config(service, url), message=message, autogenerate=True)
