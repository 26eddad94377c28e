"""The Procfile as a PaaS runs it: one app per service (RELAIS_SERVICE), each command through bash with the
platform's $PORT; `web` migrates the app's database then serves on $PORT, and the three apps hand a need to its
partner through one Redis."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from alembic import command
from alembic.script import ScriptDirectory

from shared import migrations
from shared.settings import SERVICES
from shared.testing import TOKENS, clean_env, free_port, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90  # a loaded CI machine imports FastAPI, FastStream and SQLAlchemy in each process
# How Heroku-style platforms read a Procfile: `type: command`, one a line; anything else is ignored.
PROCESS_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {m[1]: m[2] for line in lines if (m := PROCESS_LINE.match(line))}


def test_the_procfile_reads_the_same_as_a_line_parser_and_as_yaml():
    processes = procfile()
    assert set(processes) == {"web", "worker"}
    assert yaml.safe_load((ROOT / "Procfile").read_text()) == processes


class LoggedProcess(subprocess.Popen[bytes]):
    """A Procfile command running, with the file its output goes to."""

    log: Path


class App:
    """One PaaS app of one service: its environment, and its Procfile commands run as the platforms run them,
    through `bash -c`."""

    def __init__(self, service: str, env: dict, logs: Path) -> None:
        self.service, self.logs, self.port = service, logs, free_port()
        # The buildpack puts the project's console scripts on PATH; here they are beside this Python.
        path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.env = {**env, "RELAIS_SERVICE": service, "PORT": str(self.port), "PATH": path}
        self.running: list[LoggedProcess] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.env[f"RELAIS_{self.service.upper()}_DATABASE_URL"]

    def start(self, process: str) -> LoggedProcess:
        log = self.logs / f"{self.service}-{process}.log"
        with log.open("wb") as out:
            proc = LoggedProcess(
                ["bash", "-c", procfile()[process]],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log = log
        self.running.append(proc)
        return proc

    def wait_ready(self, proc: LoggedProcess) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(lambda: ready() or proc.poll() is not None, START_TIMEOUT, step=0.2) and proc.poll() is None, (
            f"{self.service} web is not ready at {self.url}:\n{proc.log.read_text(errors='replace')}"
        )

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the platform's stop: to the process, whatever the shell did
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(60)


@pytest.fixture
def apps(tmp_path, redis_url, namespace, directory_file, database_url_factory, mail_sink):
    """The three apps of one deployment, as a PaaS would hold them: the same settings except the service and
    its database; every process they start is stopped at the end."""
    logs = tmp_path / "logs"
    logs.mkdir()
    common = clean_env(
        redis_url=redis_url,
        namespace=namespace,
        directory=directory_file,
        smtp_url=mail_sink.url,
        secret_key=secrets.token_urlsafe(32),
        poll_ms=50,
        claim_idle_ms=1000,
        log_level="WARNING",
    )
    made = {}
    for service in SERVICES:
        env = {
            **common,
            f"RELAIS_{service.upper()}_DATABASE_URL": database_url_factory(service),
            "RELAIS_DATA_DIR": str(tmp_path / f"data-{service}"),
        }
        made[service] = App(service, env, logs)
    yield made
    for app in made.values():
        app.stop()


def test_three_apps_from_the_procfile_hand_a_need_to_the_partner(apps, mail_sink):
    for app in apps.values():
        app.wait_ready(app.start("web"))  # on $PORT, the only port the platform routes to

    answer = httpx.post(
        f"{apps['intake'].url}/api/v1/needs",
        headers={"Authorization": f"Bearer {TOKENS['desk']}"},
        json={
            "library_id": "chatelet",
            "category": "caf",
            "summary": "Dossier APL bloqué",
            "postal_code": "76000",
            "consent": True,
        },
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    mails = wait_for(lambda: mail_sink.to("referent@caf.test.example"), START_TIMEOUT)
    assert len(mails) == 1, "no handoff email reached the partner's référent"
    assert "nouvelle demande" in mails[0]["subject"].lower()


@pytest.mark.postgres  # migrations on the production database
def test_web_brings_a_database_left_behind_by_the_previous_release_to_the_newest_schema(apps):
    # A platform starts the new release's containers on the previous release's database.
    intake = apps["intake"]
    previous = ScriptDirectory.from_config(migrations.config("intake", intake.database_url)).get_revision("head")
    assert isinstance(previous.down_revision, str), "intake needs two revisions for this test (not a merge)"
    command.upgrade(migrations.config("intake", intake.database_url), previous.down_revision)
    web = intake.start("web")
    intake.wait_ready(web)
    assert "intake: database at the newest schema" in web.log.read_text()


def test_a_worker_serves_the_same_service_beside_web(apps):
    referral = apps["referral"]
    # A worker gets no routed port: it keeps the service's own (RELAIS_REFERRAL_PORT), here a free one.
    referral.env["RELAIS_REFERRAL_PORT"] = str(referral.port)
    referral.wait_ready(referral.start("worker"))
