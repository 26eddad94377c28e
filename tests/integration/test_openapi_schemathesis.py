"""The OpenAPI documents tell the truth, as judged by a tool no one here wrote: Schemathesis (`st run
<service>/openapi.json --checks all`) against the three services running together over real HTTP, with a token of
each role. Any finding fails the test: a 500, a status the document does not declare, a body that does not match
its schema, a request valid by the schema that the server refuses, or one invalid that it accepts.

What the documents cannot say by themselves is taught in tests/integration/schemathesis_hooks.py (the `phone` format,
the calling desk's own library, a pause that ends in the future). The number of examples is bounded (EXAMPLES) so
the whole file stays within a couple of minutes; the seed is fixed so a failure can be replayed."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.testing import TOKENS, free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("intake", "referral", "notifications")
EXAMPLES = 6  # per operation and phase
SEED = 1
ROLES = {"front_desk": ("desk", "chatelet"), "partner": ("caf", None), "ops": ("ops", None)}


def schemathesis_cli() -> str:
    """`st` next to this interpreter (the project's venv, installed from the lock's test extra), else on PATH."""
    beside = Path(sys.executable).with_name("st")
    found = str(beside) if beside.exists() else shutil.which("st")
    assert found, "Schemathesis' `st` is not installed: install the test extra (pip install -e '.[test]')"
    return found


@pytest.fixture
def relais(tmp_path, redis_url, namespace, directory_file, start_service, mail_sink):
    """The three services on SQLite (the documents do not depend on the database; PostgreSQL's edges are tested in
    test_edges.py)."""
    settings = Settings(
        redis_url=redis_url,
        namespace=namespace,
        directory=directory_file,
        data_dir=tmp_path / "data",
        intake_database_url=f"sqlite:///{tmp_path / 'intake'}.db",
        referral_database_url=f"sqlite:///{tmp_path / 'referral'}.db",
        notifications_database_url=f"sqlite:///{tmp_path / 'notifications'}.db",
        intake_port=free_port(),
        referral_port=free_port(),
        notifications_port=free_port(),
        smtp_url=mail_sink.url,
        claim_idle_ms=500,
        max_deliveries=3,
        poll_ms=50,
        # As production needs: with a weak key the services refuse each other's internal credential, and intake's
        # person export (which reads referral's and notifications' parts) answers 503 by design.
        secret_key=secrets.token_urlsafe(32),
    )
    return {name: start_service(name, settings) for name in SERVICES}


@pytest.mark.parametrize("service", SERVICES)
def test_schemathesis_finds_nothing(relais, service, tmp_path):
    failures = []
    for role, (who, library) in ROLES.items():
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RELAIS_ST_LIBRARY": library or "",
        }
        run = subprocess.run(
            [
                schemathesis_cli(),
                "--no-color",
                "run",
                f"{relais[service].url}/openapi.json",
                "--checks",
                "all",
                "-H",
                f"Authorization: Bearer {TOKENS[who]}",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                str(SEED),
                "--workers",
                "1",
                "--no-shrink",
                "--generation-database",
                "none",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path / role),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if run.returncode != 0:
            failures.append(f"--- {service} as {role}: exit {run.returncode}\n{run.stdout[-6000:]}{run.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
