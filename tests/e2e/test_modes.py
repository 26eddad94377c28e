"""Demo and production are two modes (docs/security.md, "Modes, secrets and files at rest").

- `relais serve` is production unless RELAIS_DEMO=true: with a secret key anyone could know, or a directory
  whose tokens are public, it exits 2 naming the variable and what to do, before anything starts.
- `relais up` is the demo: it loads the demo directory and generates what it needs; its embedded Redis (and
  `relais serve`'s embedded fallback) wants a password generated into the data dir, carried by the printed URL.
- Files at rest: the data dir 0700; databases, received mail, Redis's files and the secret key 0600.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from shared.settings import DEMO_TOKENS, SERVICES
from shared.testing import clean_env, directory_data, free_port, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90  # a refusal comes at once; should it start instead, the run ends here
START_TIMEOUT = 90
STOP_TIMEOUT = 60
COMPOSE_DEFAULT_KEY = "dev-only-insecure-secret-override-in-production"  # what docker-compose.yml used to default to
CI_DUMMY_KEY = "ci-compose-validation-only-not-a-real-secret-0000"  # .ci/run's, for `docker-compose config` only


def good_key() -> str:
    return secrets.token_urlsafe(32)


def directory_with_a_demo_token(tmp_path: Path) -> Path:
    """Our own directory, but its ops user was given the demo's ops token (copied from the demo file)."""
    data = directory_data()
    demo_hash = "283678568245545316ceb381170fbcb6e94949f0b917c1e141f15b8fc8a96c39"  # sha256("demo-ops")
    [ops] = [u for u in data["users"] if u["id"] == "ops"]
    ops["token_sha256"] = demo_hash
    path = tmp_path / "copied-token.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def own_directory(tmp_path: Path) -> Path:
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(directory_data(), allow_unicode=True))
    return path


REFUSED = [  # (id, variables given besides a reachable-looking Redis, the variable named, what its line says)
    ("no-secret-key", lambda tmp: {"directory": own_directory(tmp)}, "SECRET_KEY", "is not set"),
    (
        "short-secret-key",
        lambda tmp: {"directory": own_directory(tmp), "secret_key": "x" * 31},
        "SECRET_KEY",
        "shorter than 32 characters",
    ),
    (
        "compose-default-key",
        lambda tmp: {"directory": own_directory(tmp), "secret_key": COMPOSE_DEFAULT_KEY},
        "SECRET_KEY",
        "a value the Relais repository ships",
    ),
    (
        "ci-dummy-key",
        lambda tmp: {"directory": own_directory(tmp), "secret_key": CI_DUMMY_KEY},
        "SECRET_KEY",
        "a value the Relais repository ships",
    ),
    ("demo-directory", lambda tmp: {"secret_key": good_key()}, "DIRECTORY", "is the demo directory"),
    (
        "demo-token-hash",
        lambda tmp: {"directory": directory_with_a_demo_token(tmp), "secret_key": good_key()},
        "DIRECTORY",
        "user 'ops'",
    ),
    (
        "short-internal-token",
        lambda tmp: {"directory": own_directory(tmp), "secret_key": good_key(), "internal_token": "short"},
        "INTERNAL_TOKEN",
        "shorter than 32",
    ),
]


@pytest.mark.parametrize(
    ("variables", "variable", "says"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_relais_serve_refuses_what_production_must_not_run_with(tmp_path, variables, variable, says):
    given = variables(tmp_path)
    env = clean_env(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:9/0", **given)
    run = subprocess.run(
        [sys.executable, "-m", "relais", "serve", "intake"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 2 and "Traceback" not in run.stderr, output
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"RELAIS_{variable}: ")]
    assert len(lines) == 1, output
    [line] = lines
    assert says in line, output
    assert "RELAIS_DEMO=true" in line or "openssl rand" in line, output  # what to do about it
    assert given.get("secret_key", "\0") not in run.stderr  # a refused key is not printed back


# --- processes started by these tests, stopped at the end whatever happens ---------------------------------


@pytest.fixture
def spawn(tmp_path):
    """spawn(name, args, env) -> (Popen, log path): a `relais` child in its own session, with the umask most
    machines have (022), so the modes it gives its files are its own doing."""
    started: list[subprocess.Popen] = []

    def start(name: str, args: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relais", *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: os.umask(0o022),
            )
        started.append(proc)
        return proc, log

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its session
        except ProcessLookupError:
            pass


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def redis_url_in(output: str) -> str | None:
    found = re.search(r"rediss?://[^\s,]+", output)
    return found.group(0) if found else None


def assert_redis_wants_the_password(url: str) -> None:
    """The URL printed works; the same Redis without the password answers nothing but NOAUTH."""
    with redis.Redis.from_url(url) as client:
        assert client.ping()
    parsed = httpx.URL(url)
    assert parsed.host == "127.0.0.1" and parsed.port is not None and parsed.password, url
    with redis.Redis(host=parsed.host, port=parsed.port) as stranger:
        with pytest.raises(redis.AuthenticationError):
            stranger.xrange("relais:needs")


def test_relais_serve_in_demo_mode_runs_the_demo_with_a_redis_that_wants_a_password(spawn, tmp_path):
    # RELAIS_DEMO=true: no secret key, the demo directory, and the embedded Redis of the contract's default.
    port, data_dir = free_port(), tmp_path / "data"
    env = clean_env(demo="true", data_dir=data_dir, intake_port=port, namespace=f"e2e{uuid.uuid4().hex[:10]}")
    proc, log = spawn("intake-demo", ["serve", "intake"], env)
    assert (
        wait_for(lambda: ready(f"http://127.0.0.1:{port}") or proc.poll() is not None, START_TIMEOUT, 0.2)
        and proc.poll() is None
    ), log.read_text()
    output = log.read_text()
    assert "demo mode (RELAIS_DEMO=true)" in output, output

    r = httpx.get(
        f"http://127.0.0.1:{port}/api/v1/needs",
        headers={"Authorization": f"Bearer {DEMO_TOKENS['desk-chatelet']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text  # the demo directory's tokens work, in the demo only
    url = redis_url_in(output)
    assert url, output
    assert_redis_wants_the_password(url)

    redis_dir = data_dir / "redis-intake"
    assert mode(data_dir) == 0o700 and mode(redis_dir) == 0o700
    assert (redis_dir / "password").read_text().strip() == httpx.URL(url).password
    for name in ("password", "redis.conf", "appendonly.aof"):
        assert mode(redis_dir / name) == 0o600, name
    assert mode(data_dir / "intake.db") == 0o600


def test_relais_up_is_the_demo_and_keeps_its_files_private(spawn, tmp_path):
    # No RELAIS_SECRET_KEY, no --directory: the demo directory, a generated key, a Redis with a password.
    data_dir = tmp_path / "up"
    ports = {service: free_port() for service in SERVICES}
    env = clean_env(namespace=f"e2e{uuid.uuid4().hex[:10]}", **{f"{s}_port": p for s, p in ports.items()})
    proc, log = spawn("relais-up", ["up", "--data-dir", str(data_dir)], env)
    assert (
        wait_for(lambda: "Relais is running" in log.read_text() or proc.poll() is not None, START_TIMEOUT, 0.2)
        and proc.poll() is None
    ), log.read_text()
    output = log.read_text()
    [redis_line] = [line for line in output.splitlines() if line.strip().startswith("redis ")]
    url = redis_url_in(redis_line)
    assert url and "@127.0.0.1:" in url, redis_line  # the printed URL carries the password
    assert_redis_wants_the_password(url)

    need = {
        "library_id": "rouen-chatelet",
        "category": "caf",
        "summary": "Dossier APL bloqué",
        "postal_code": "76000",
        "consent": True,
        "person": {"display_name": "M. D."},
    }
    r = httpx.post(
        f"http://127.0.0.1:{ports['intake']}/api/v1/needs",
        json=need,
        timeout=30,
        headers={"Authorization": f"Bearer {DEMO_TOKENS['desk-chatelet']}"},
    )
    assert r.status_code == 201, r.text
    mails = wait_for(lambda: sorted((data_dir / "mail").glob("*.eml")), START_TIMEOUT)
    assert mails, log.read_text()

    private_dirs = [data_dir, data_dir / "mail", data_dir / "redis", data_dir / "logs"]
    private_files = [
        *mails,
        data_dir / "logs" / "relais.log",
        data_dir / "secret_key",
        data_dir / "redis" / "password",
        data_dir / "redis" / "redis.conf",
        data_dir / "redis" / "appendonly.aof",
        *(path for service in SERVICES for path in data_dir.glob(f"{service}.db*")),
    ]
    assert {f"{service}.db" for service in SERVICES} <= {path.name for path in private_files}
    assert {str(path): oct(mode(path)) for path in private_dirs} == {str(path): "0o700" for path in private_dirs}
    assert {str(path): oct(mode(path)) for path in private_files} == {str(path): "0o600" for path in private_files}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_TIMEOUT) == 0, log.read_text()
