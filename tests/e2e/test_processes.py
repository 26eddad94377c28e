"""The system as it is deployed: every service its own OS process, started by the `relais` command.

- `relais migrate` + `relais serve NAME` for each service, against one real Redis, configured only through
  RELAIS_* environment variables, as docker-compose runs them;
- `relais up`, which starts its own Redis and SMTP sink, has its services reload the directory on SIGHUP, and
  stops its whole process tree on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import smtplib
import subprocess
import sys
import uuid
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
import yaml

from shared.settings import SERVICES, ServiceName
from shared.testing import TOKENS, clean_env, directory_data, free_port, sha, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90  # generous: a loaded CI machine imports FastAPI, FastStream and SQLAlchemy three times
STOP_TIMEOUT = 60


# --- processes ------------------------------------------------------------------------------------


class Process:
    """A child started in a session of its own, its output kept in a file shown when an assertion fails."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path) -> None:
        self.name, self.log = name, logs / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "relais", *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the whole session if it does not go; used by the cleanup only."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its session is its own: anything it left behind goes too
        except ProcessLookupError:
            pass
        if self.running():
            self.popen.wait(STOP_TIMEOUT)


@pytest.fixture
def processes(tmp_path):
    """start(name, args, env) -> Process; every process started is stopped at the end of the test."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[Process] = []

    def start(name: str, args: list[str], env: dict) -> Process:
        proc = Process(name, args, env, logs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(proc: Process, url: str) -> None:
    assert wait_for(lambda: ready(url) or not proc.running(), START_TIMEOUT, step=0.2) and proc.running(), (
        f"{proc.name} is not ready at {url}:\n{proc.output()}"
    )


def api(url: str, who: str) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {TOKENS[who]}"}, timeout=30)


NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "summary": "Dossier APL bloqué « urgent » 🙂",
    "postal_code": "76000",
    "consent": True,
    "person": {"display_name": "M. D."},
}


# --- /proc: a process tree without psutil ---------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of `root`, as {pid: start time} (the start time tells a reused pid apart)."""
    parent_of: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] != "Z":
            parent_of[int(entry)] = (stat[1], stat[2])
    found, frontier = {}, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in parent_of.items() if ppid in frontier and pid not in found}
        found.update({pid: parent_of[pid][1] for pid in frontier})
    return found


def alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --- relais serve, one process per service --------------------------------------------------------


def start_services(processes, env: dict, urls: dict[str, str], replicas: dict[str, int] | None = None) -> list[Process]:
    for service in SERVICES:
        done = subprocess.run(
            [sys.executable, "-m", "relais", "migrate", service],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        assert done.returncode == 0, f"migrate {service}:\n{done.stdout}\n{done.stderr}"
    started = []
    for service in SERVICES:
        for replica in range((replicas or {}).get(service, 1)):
            port = int(urls[service].rsplit(":", 1)[1]) if replica == 0 else free_port()
            replica_env = {**env, f"RELAIS_{service.upper()}_PORT": str(port)}
            proc = processes(f"{service}-{replica}", ["serve", service], replica_env)
            started.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in started:
        wait_ready(proc, url)
    return [proc for proc, _ in started]


@pytest.fixture
def served_env(tmp_path, redis_url, namespace, directory_file, database_url_factory, mail_sink):
    """The environment of a deployment of three `relais serve` processes, and the services' URLs."""
    ports = {service: free_port() for service in SERVICES}
    env = clean_env(
        redis_url=redis_url,
        namespace=namespace,
        directory=directory_file,
        data_dir=tmp_path / "data",
        smtp_url=mail_sink.url,
        secret_key=secrets.token_urlsafe(32),
        poll_ms=50,
        claim_idle_ms=1000,
        log_level="WARNING",
        **{f"{s}_database_url": database_url_factory(s) for s in SERVICES},
        **{f"{s}_port": port for s, port in ports.items()},
    )
    return env, {service: f"http://127.0.0.1:{port}" for service, port in ports.items()}


def test_three_service_processes_hand_a_need_to_the_partner(processes, served_env, mail_sink):
    env, urls = served_env
    procs = start_services(processes, env, urls)

    for url in urls.values():
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/openapi.json", timeout=60).json()["openapi"]  # built at its first request
        assert "relais_http_requests" in httpx.get(f"{url}/metrics").text

    r = api(urls["intake"], "desk").post("/needs", json=NEED)
    assert r.status_code == 201, r.text
    need = r.json()

    mails = wait_for(lambda: mail_sink.to("referent@caf.test.example"), START_TIMEOUT)
    assert len(mails) == 1, "\n".join(p.output() for p in procs)
    assert "nouvelle demande" in mails[0]["subject"].lower()

    referrals = api(urls["referral"], "ops").get("/referrals", params={"need_id": need["id"]}).json()["items"]
    assert [(x["partner_id"], x["status"]) for x in referrals] == [("caf-76", "assigned")]

    def sent():
        items = api(urls["notifications"], "ops").get("/deliveries", params={"need_id": need["id"]}).json()["items"]
        return [d for d in items if d["kind"] == "handoff" and d["status"] == "sent"]

    [delivery] = wait_for(sent, START_TIMEOUT)
    assert delivery["referral_id"] == referrals[0]["id"] and delivery["recipient_role"] == "partner_contact"

    seen = wait_for(
        lambda: (n := api(urls["intake"], "desk").get(f"/needs/{need['id']}").json())["status"] == "referred" and n,
        START_TIMEOUT,
    )
    assert seen and seen["partner_id"] == "caf-76" and seen["summary"] == NEED["summary"]

    for proc in procs:  # each stops on SIGTERM, as docker stop asks
        proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        # uvicorn shuts down gracefully, then raises the signal it caught again: -SIGTERM is a clean stop
        assert proc.popen.wait(STOP_TIMEOUT) in (0, -signal.SIGTERM), proc.output()
        assert "Traceback" not in proc.output(), proc.output()


@pytest.mark.postgres  # replicas share the work through row locks
def test_replicas_share_the_work_and_each_need_is_handled_once(processes, served_env, mail_sink):
    """Two referral and two notifications processes in the same consumer groups: one referral, one email a need."""
    env, urls = served_env
    procs = start_services(processes, env, urls, replicas={"referral": 2, "notifications": 2})
    desk = api(urls["intake"], "desk")
    needs = []
    for i in range(12):
        r = desk.post("/needs", json=NEED | {"summary": f"besoin {i}"})
        assert r.status_code == 201, r.text
        needs.append(r.json()["id"])

    assert wait_for(lambda: len(mail_sink.to("referent@caf.test.example")) >= len(needs), START_TIMEOUT), "\n".join(
        p.output() for p in procs
    )
    ops = api(urls["referral"], "ops")
    for need_id in needs:
        assert len(ops.get("/referrals", params={"need_id": need_id}).json()["items"]) == 1
    assert wait_for(lambda: all(desk.get(f"/needs/{n}").json()["status"] == "referred" for n in needs), START_TIMEOUT)
    deliveries = api(urls["notifications"], "ops").get("/deliveries", params={"limit": 200}).json()["items"]
    handoffs = [d for d in deliveries if d["kind"] == "handoff"]
    assert sorted(d["need_id"] for d in handoffs) == sorted(needs)
    assert len(mail_sink.to("referent@caf.test.example")) == len(needs)


def test_relais_serve_alone_uses_an_embedded_redis_and_mail_sink_as_the_settings_default(processes, tmp_path):
    # The contract's defaults for RELAIS_REDIS_URL and RELAIS_SMTP_URL are embedded ones: one service served alone
    # starts its own, says so, and stops them after itself, even when its whole process group is signalled (a
    # Ctrl-C in a terminal) — no "connection closed" error while it stops.
    port = free_port()
    env = clean_env(
        namespace=f"e2e{uuid.uuid4().hex[:10]}", data_dir=tmp_path / "alone", notifications_port=port, demo="true"
    )  # the demo directory and a generated key: production would refuse both
    served = processes("notifications-alone", ["serve", "notifications"], env)
    wait_ready(served, f"http://127.0.0.1:{port}")
    assert "started an embedded Redis" in served.output() and "messages are kept in" in served.output()
    tree = descendants(served.pid)
    assert "redis-server" in sorted(command_name(pid) for pid in tree)

    os.killpg(served.pid, signal.SIGINT)  # the whole group, as a terminal does; Redis has a session of its own
    assert served.popen.wait(STOP_TIMEOUT) in (0, -signal.SIGINT), served.output()
    assert "Traceback" not in served.output() and " ERROR " not in served.output(), served.output()
    assert wait_for(lambda: not [pid for pid, started in tree.items() if alive(pid, started)], STOP_TIMEOUT)


# --- relais up ------------------------------------------------------------------------------------


def test_relais_up_runs_everything_and_stops_its_whole_tree(processes, tmp_path, directory_file):
    data_dir = tmp_path / "up"
    ports = {service: free_port() for service in SERVICES}
    urls = {service: f"http://127.0.0.1:{port}" for service, port in ports.items()}
    env = clean_env(namespace=f"e2e{uuid.uuid4().hex[:10]}", **{f"{s}_port": p for s, p in ports.items()})
    assert "RELAIS_REDIS_URL" not in env and "RELAIS_SMTP_URL" not in env

    up = processes("relais-up", ["up", "--directory", str(directory_file), "--data-dir", str(data_dir)], env)
    for service in SERVICES:
        wait_ready(up, urls[service])
    assert wait_for(lambda: "Relais is running" in up.output() or not up.running(), START_TIMEOUT), up.output()
    for url in urls.values():
        assert url in up.output()
    for service in SERVICES:  # the SQLite databases under the data dir, as URLs
        assert f"sqlite:///{(data_dir / f'{service}.db').resolve()}" in up.output()

    tree = descendants(up.pid)
    names = sorted(command_name(pid) for pid in tree)
    assert "redis-server" in names, names
    assert len(tree) >= 4, names  # redis-server and the three services

    r = api(urls["intake"], "desk").post("/needs", json=NEED)
    assert r.status_code == 201, r.text

    def handoff_mail():
        for path in sorted((data_dir / "mail").glob("*.eml")):
            msg = message_from_bytes(path.read_bytes(), policy=policy.default)
            if "referent@caf.test.example" in str(msg["to"]):
                return msg
        return None

    msg = wait_for(handoff_mail, START_TIMEOUT)
    assert msg is not None, up.output()
    assert "nouvelle demande" in str(msg["subject"]).lower()
    assert (data_dir / "intake.db").exists() and (data_dir / "referral.db").exists()

    # The partner answers by replying to the handoff: `relais up` listens for replies and says where.
    listener = re.search(r"inbound smtp\s+smtp://127\.0\.0\.1:(\d+)", up.output())
    assert listener, up.output()
    assert str(msg["reply-to"]).startswith("reponse+"), msg["reply-to"]
    answer = EmailMessage()
    answer["From"], answer["To"], answer["Subject"] = "referent@caf.test.example", str(msg["reply-to"]), "Re: demande"
    answer.set_content("Je prends.\n\nLe lundi, Relais a écrit :\n> Nouvelle demande")
    with smtplib.SMTP("127.0.0.1", int(listener.group(1)), timeout=30) as smtp:
        smtp.send_message(answer)
    accepted = wait_for(
        lambda: (
            api(urls["referral"], "ops")
            .get("/referrals", params={"need_id": r.json()["id"]})
            .json()["items"][0]["status"]
            == "accepted"
        ),
        START_TIMEOUT,
    )
    assert accepted, up.output()

    # SIGHUP: the directory is checked, then each service loads it again; nothing stops.
    need_id = r.json()["id"]
    new_token = "test-ops-after-reload"
    calls: dict[ServiceName, str] = {
        "intake": f"/needs/{need_id}",
        "referral": "/referrals",
        "notifications": "/deliveries",
    }

    def status_with(token: str) -> dict[str, int] | None:
        try:
            return {
                s: httpx.get(
                    f"{urls[s]}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30
                ).status_code
                for s, path in calls.items()
            }
        except httpx.HTTPError:  # a service gone: the assertion says so, with relais up's output
            return None

    assert status_with(new_token) == dict.fromkeys(SERVICES, 401)
    bad = directory_data()
    bad["partners"][0]["contacts"][0]["email"] = "not-an-email"
    directory_file.write_text(yaml.safe_dump(bad, allow_unicode=True))
    up.popen.send_signal(signal.SIGHUP)
    assert (
        wait_for(
            lambda: "partners[0].contacts[0].email: not an email address" in up.output() or not up.running(),
            START_TIMEOUT,
        )
        and up.running()
    ), up.output()
    assert status_with(TOKENS["ops"]) == dict.fromkeys(SERVICES, 200), up.output()  # the previous one still serves

    changed = directory_data()
    changed["users"].append(
        {"id": "ops-2", "role": "ops", "token_sha256": sha(new_token), "email": "ops2@coordination.test.example"}
    )
    directory_file.write_text(yaml.safe_dump(changed, allow_unicode=True))
    up.popen.send_signal(signal.SIGHUP)
    assert (
        wait_for(lambda: status_with(new_token) == dict.fromkeys(SERVICES, 200) or not up.running(), START_TIMEOUT)
        and up.running()
    ), up.output()
    assert all(alive(pid, started) for pid, started in tree.items()), up.output()

    up.popen.send_signal(signal.SIGTERM)
    try:
        code = up.popen.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"relais up did not stop within {STOP_TIMEOUT} s of SIGTERM:\n{up.output()}")
    assert code == 0, up.output()
    # the services stop before the Redis they read from: no "connection closed" errors while stopping
    assert "Traceback" not in up.output() and " ERROR " not in up.output(), up.output()
    gone = wait_for(lambda: not [pid for pid, started in tree.items() if alive(pid, started)], STOP_TIMEOUT)
    assert gone, "still running after relais up stopped: " + ", ".join(
        f"{pid} ({command_name(pid)})" for pid, started in tree.items() if alive(pid, started)
    )
    assert not any(ready(url) for url in urls.values())


def test_relais_up_shows_each_need_as_it_moves_and_keeps_the_full_logs_in_a_file(processes, tmp_path, directory_file):
    """The first screen a newcomer sees: the banner, then one line per need as it moves (recorded, routed to the
    partner by name, emailed), warnings and errors; no INFO flood (migrations, HTTP client lines, every event). The
    full JSON logs are in <data dir>/logs/relais.log, which the banner names."""
    data_dir = tmp_path / "up"
    ports = {service: free_port() for service in SERVICES}
    urls = {service: f"http://127.0.0.1:{port}" for service, port in ports.items()}
    env = clean_env(namespace=f"e2e{uuid.uuid4().hex[:10]}", **{f"{s}_port": p for s, p in ports.items()})
    up = processes("relais-up", ["up", "--directory", str(directory_file), "--data-dir", str(data_dir)], env)
    for service in SERVICES:
        wait_ready(up, urls[service])
    assert wait_for(lambda: "Relais is running" in up.output() or not up.running(), START_TIMEOUT), up.output()
    log_file = (data_dir / "logs" / "relais.log").resolve()
    assert str(log_file) in up.output()

    r = api(urls["intake"], "desk").post("/needs", json=NEED)
    assert r.status_code == 201, r.text
    short = r.json()["id"][:8]
    lines = lambda: [line for line in up.output().splitlines() if f"need {short}" in line]  # noqa: E731
    assert wait_for(lambda: len(lines()) >= 3 or not up.running(), START_TIMEOUT), up.output()
    steps = [line.split(f"need {short}  ", 1)[1] for line in lines()]
    assert steps[0] == "recorded at Bibliothèque du Châtelet: Allocations familiales (CAF)", steps
    assert steps[1].startswith("routed to CAF de la Seine-Maritime, answer due "), steps
    # the person gave no channel (NEED): only the partner's contact is emailed
    assert steps[2:] == ["emailed the handoff to the partner's contact"], steps

    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(STOP_TIMEOUT) == 0, up.output()
    screen = up.output()
    assert " INFO " not in screen and "alembic" not in screen and "HTTP Request" not in screen, screen
    assert "demo mode" not in screen  # relais up is the demo: `serve`'s warning about it is noise here
    assert len(screen.splitlines()) < 60, screen  # the banner and this need's lines

    records = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line is JSON
    loggers = {r["logger"] for r in records}
    # the libraries' lines too (FastStream's broker, httpx), which the screen leaves out
    assert {"relais.intake.broker", "httpx", "relais.events", "relais.http"} <= loggers, loggers
    need_id = r.json()["id"]
    emitted = [x for x in records if x.get("event_type") == "referral.assigned" and x.get("need_id") == need_id]
    assert emitted and emitted[0]["partner_id"] == "caf-76" and emitted[0]["service"] == "referral"
    assert {r["service"] for r in records} >= {"intake", "referral", "notifications", "up"}


def test_relais_up_verbose_shows_every_line(processes, tmp_path, directory_file):
    data_dir = tmp_path / "up"
    ports = {service: free_port() for service in SERVICES}
    env = clean_env(namespace=f"e2e{uuid.uuid4().hex[:10]}", **{f"{s}_port": p for s, p in ports.items()})
    up = processes(
        "relais-up", ["up", "--verbose", "--directory", str(directory_file), "--data-dir", str(data_dir)], env
    )
    wait_ready(up, f"http://127.0.0.1:{ports['intake']}")
    assert wait_for(lambda: "Relais is running" in up.output() or not up.running(), START_TIMEOUT), up.output()
    up.popen.send_signal(signal.SIGTERM)
    assert up.popen.wait(STOP_TIMEOUT) == 0, up.output()
    assert " INFO relais.intake.broker: " in up.output() and "Every log line follows" in up.output()
    assert (data_dir / "logs" / "relais.log").stat().st_size > 0
