"""The schema check at start (shared.migrations.check_current) answers without importing Alembic, which would cost
every serving process about 10 MiB for its life: its head revision, read from the version files, is Alembic's own;
a database behind it is refused with what to run. Checked in a child process, whose modules are its own."""

import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from shared import migrations

SERVICES = ("intake", "referral", "notifications")

CHILD = textwrap.dedent(
    """
    import importlib, sys
    import sqlalchemy as sa
    from shared.migrations import MigrationNeeded, check_current

    service, url = sys.argv[1], sys.argv[2]
    importlib.import_module(f"services.{service}.app")  # what `relais serve` imports
    engine = sa.create_engine(url)
    try:
        check_current(service, engine, url)
        print("current")
    except MigrationNeeded as exc:
        print(exc)
    print(sorted(name for name in sys.modules if name == "alembic" or name.startswith("alembic.")))
    """
)


def check_in_a_child(service: str, url: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CHILD, service, url], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


@pytest.mark.parametrize("service", SERVICES)
def test_the_head_read_from_the_version_files_is_alembics(service: str) -> None:
    script = ScriptDirectory.from_config(migrations.config(service, "sqlite://"))
    assert migrations.head_revision(service) == script.get_current_head()


@pytest.mark.parametrize("service", SERVICES)
def test_the_check_at_start_imports_no_alembic_and_refuses_a_database_behind(service: str, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/{service}.db"
    migrations.upgrade(service, url)
    assert check_in_a_child(service, url) == ["current", "[]"]

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'older'"))
    engine.dispose()
    said, imported = check_in_a_child(service, url)
    head = migrations.head_revision(service)
    assert said == (
        f"{service}: the database is not at the newest schema (at older, newest is {head}); "
        f"run `relais migrate {service}` first"
    )
    assert imported == "[]"
