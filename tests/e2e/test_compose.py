"""docker-compose.yml ships no secret: compose refuses to start without each mandatory variable, and what it would
run keeps Redis, PostgreSQL and the mail catcher away from the network. Checked with docker-compose itself
(`config`: no Docker engine needed), which .ci/run installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MANDATORY = {
    "RELAIS_SECRET_KEY": "s" * 48,
    "RELAIS_DB_PASSWORD": "dbpassword0",
    "RELAIS_REDIS_PASSWORD": "redispassword0",
    "RELAIS_DIRECTORY_FILE": "/srv/relais/directory.yaml",
}


def compose_config(variables: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is needed for this test: apt-get install docker-compose (.ci/run does)"
    env = {"PATH": "/usr/bin:/bin", **variables}  # nothing else from this environment (no RELAIS_* of the caller)
    return subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("missing", sorted(MANDATORY))
def test_compose_refuses_to_start_without_a_mandatory_variable(missing):
    run = compose_config({k: v for k, v in MANDATORY.items() if k != missing})
    assert run.returncode != 0 and missing in run.stderr, run.stdout + run.stderr


def test_compose_publishes_no_store_and_protects_redis():
    run = compose_config(MANDATORY)
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]
    for port in services["mailpit"].get("ports", []):  # its inbox shows every sign-in link sent
        assert str(port).startswith("127.0.0.1:") or (isinstance(port, dict) and port.get("host_ip") == "127.0.0.1"), (
            port
        )
    assert "--requirepass" in services["redis"]["command"]
    assert MANDATORY["RELAIS_REDIS_PASSWORD"] in services["redis"]["command"]
    for name, service in services.items():
        env = service.get("environment") or {}
        if "RELAIS_REDIS_URL" in env:
            assert env["RELAIS_REDIS_URL"].startswith(f"redis://:{MANDATORY['RELAIS_REDIS_PASSWORD']}@"), name
        if "RELAIS_SECRET_KEY" in env:
            assert env["RELAIS_SECRET_KEY"] == MANDATORY["RELAIS_SECRET_KEY"], name
            assert env["RELAIS_DIRECTORY"] == "/etc/relais/directory.yaml", name
            assert f"{MANDATORY['RELAIS_DIRECTORY_FILE']}:/etc/relais/directory.yaml:ro" in service["volumes"], name
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == MANDATORY["RELAIS_DB_PASSWORD"]
