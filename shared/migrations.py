"""Alembic migrations, one history per service (`services/<name>/migrations/`), run by `relais migrate`.

Each service's history covers only its own tables (and the messaging tables every service has), and
keeps its version in its own database. `relais serve` checks the database is at the newest revision
and refuses to start otherwise, so a forgotten migration is a clear error rather than a missing column;
an empty database (a first start, a test) is brought up to date at start.

That check at start does not import Alembic: importing any of it costs about 10 MiB of memory in every serving
process, kept for its life, for one question. `head_revision` reads the revision ids of the version files (each
file's `revision` and `down_revision` lines, as Alembic writes them) and the database's `alembic_version` row is
read with one SELECT; tests/unit/test_migration_check.py checks that `head_revision` is Alembic's own head for
every service. Migrating (`relais migrate`, an empty database) imports Alembic.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

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
    from alembic.config import Config

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
    from alembic import command

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


_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE)


def head_revision(service: str) -> str:
    """The newest revision of a service's history, read from its version files without Alembic (see the module's
    docstring): the one revision no other revises."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in (ROOT / "services" / service / "migrations" / "versions").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        lines = {match[1]: match[2] for match in _REVISION_LINE.finditer(text)}
        if "revision" not in lines:  # the package's __init__.py
            continue
        revisions.add(ast.literal_eval(lines["revision"]))
        down = ast.literal_eval(lines.get("down_revision", "None"))
        revised.update([down] if isinstance(down, str) else down or ())
    heads = revisions - revised
    if len(heads) != 1:
        raise MigrationNeeded(f"{service}: the migration history has {len(heads)} heads {sorted(heads)}; chain them")
    return heads.pop()


def _state(service: str, engine: sa.Engine) -> str:
    head = head_revision(service)
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        if not names:
            return "empty"
        if "alembic_version" not in names:
            return "unversioned"
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    revision = versions[0] if len(versions) == 1 else None
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

    from alembic import command

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/{service}.db"
        command.upgrade(config(service, url), "head")
        command.revision(config(service, url), message=message, autogenerate=True)
