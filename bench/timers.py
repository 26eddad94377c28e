"""`./dev bench timers`: the need's clock and the coordinator's pages with 1,000,000 open referrals on PostgreSQL.

A fresh database is made with referral's own Alembic migrations (`relais migrate referral`), then N open referrals
(their needs, their four timers, their history) are bulk-loaded with COPY, spread over the test directory's
partners and libraries and recorded over the last 80 hours: the timers already due are fired (or moot once the
partner answered), with the history rows the clock writes, and no bulk timer falls due while the bench runs. A
last COPY adds K referrals whose first reminder falls due inside a window that opens once the service has started
and has been idle for a while. Then the real referral process (`relais serve referral`, its clock included) runs
against that database and a Redis, and the bench measures, from outside:
- the process's CPU while no timer is due (the idle window), from /proc/<pid>/stat;
- the lateness of each of the K timers: `fired_at - due_at` from the rows, and `published_at - due_at` of its
  event in the outbox (on the stream);
- the latency of the referral list (API), the partner inbox and the coordinator's dashboard pages, signed in.
Nothing is judged: the figures are printed. The database is dropped at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import yaml

from bench.pipeline import BenchError, Processes, cpu_seconds, machine_cpu, relais_command, start_redis, tail
from shared.testing import TOKENS, directory_data, free_port

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
HOUR = 3600.0
SPAN_HOURS = 80.0  # referrals recorded over the last 80 h: some reminded, escalated, breached, most still on track
TIMERS = (("reminder", 1, 24.0), ("reminder", 2, 48.0), ("escalation", 0, 60.0), ("breach", 0, 72.0))  # test SLA
QUIET_HOURS = 2.0  # no bulk timer falls due within this long after the load starts
# (partner, its contact, category, share): the test directory's partners (shared.testing.directory_data)
PARTNERS = (
    ("caf-76", "caf-ref", "caf", 0.5),
    ("caf-national", "cafn-ref", "caf", 0.2),
    ("cpam-76", "cpam-ref", "sante", 0.3),
)
LIBRARIES = (("chatelet", "76000", "CHA", 0.6), ("bihorel", "76420", "BIH", 0.4))
STATUSES = (("assigned", 0.6), ("accepted", 0.3), ("responded", 0.1))  # all open
FIRST_NAMES = ("Camille", "Dominique", "Alex", "Sacha", "Claude", "Lou", "Yanis", "Nadia", "Jean", "Inès")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench timers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--referrals", type=int, default=1_000_000, help="open referrals to load (default 1000000)")
    p.add_argument("--due", type=int, default=3000, help="timers falling due in the firing window (default 3000)")
    p.add_argument("--window", type=float, default=60.0, help="seconds over which they fall due (default 60)")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of the idle CPU window (default 30)")
    p.add_argument("--requests", type=int, default=50, help="requests per page measured (default 50)")
    p.add_argument(
        "--settle",
        type=float,
        default=30.0,
        help="seconds from the service's start to the idle window, for its start-up work (default 30)",
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("RELAIS_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL),
        help=f"a PostgreSQL database to connect to for creating the bench's own (default {DEFAULT_ADMIN_URL})",
    )
    p.add_argument("--database", default="relais_timers_bench", help="the database made (and dropped) for the run")
    p.add_argument("--keep", action="store_true", help="keep the database and the work directory")
    p.add_argument(
        "--reuse-database",
        action="store_true",
        help="keep the referrals a previous run loaded (with --keep): migrate it, replace only the window's referrals",
    )
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--no-pages", action="store_true", help="measure the clock only, not the pages")
    args = p.parse_args(argv)
    if args.referrals < 1 or not 0 < args.due <= args.referrals or args.window <= 0 or args.idle <= 0:
        p.error("--referrals, --due, --window and --idle must be positive, and --due at most --referrals")
    return args


# --- the database ---------------------------------------------------------------------------------------------


def conninfo(url: str, database: str | None = None) -> str:
    """A psycopg connection string from a SQLAlchemy-style URL, optionally for another database."""
    url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    if database:
        base, _, query = url.partition("?")
        url = base.rsplit("/", 1)[0] + f"/{database}" + (f"?{query}" if query else "")
    return url


def recreate_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def pick(rng: random.Random, choices: tuple, weights: list[float]) -> tuple:
    return rng.choices(choices, weights)[0]


@dataclass
class Rows:
    """The text lines of one COPY per table, filled referral by referral."""

    needs: list[str]
    referrals: list[str]
    timers: list[str]
    history: list[str]

    @classmethod
    def empty(cls) -> Rows:
        return cls([], [], [], [])


def add_referral(rows: Rows, rng: random.Random, i: int, recorded: float, now: float, window: bool) -> None:
    """One open referral recorded at `recorded`, with its need, timers and history as the service would have
    left them at `now` (`window`: assigned, on track, its first reminder still to fire)."""
    partner, contact, category, _ = pick(rng, PARTNERS, [p[3] for p in PARTNERS])
    library, postal, prefix, _ = pick(rng, LIBRARIES, [lib[3] for lib in LIBRARIES])
    status = "assigned" if window else pick(rng, STATUSES, [s[1] for s in STATUSES])[0]
    need_id = f"{'w' if window else 'b'}{i:031d}"
    referral_id = f"r{i:031d}"
    reference = f"{prefix}-2611-{i:07d}"
    name = f"{rng.choice(FIRST_NAMES)} B{i}"
    respond_by = recorded + TIMERS[-1][2] * HOUR
    answered = recorded + rng.uniform(0.05, min(20.0, (now - recorded) / HOUR)) * HOUR if status != "assigned" else None
    sla = "on_track" if answered is None else "met"
    rows.needs.append(
        f"{need_id}\t{reference}\t{library}\t{category}\tDemande de test {i}\t{postal}\tnormal\t{name}\t\\N\t\\N\t"
        f"none\tfr\t{ts(recorded)}\t{ts(respond_by)}\t\\N\t1\t{reference.lower()} {name.lower()} demande test\n"
    )
    rows.history.append(f"{referral_id}\t{ts(recorded)}\tassigned\tsystem\tbench\n")
    for kind, number, hours in TIMERS:
        due = recorded + hours * HOUR
        if due > now:
            fired, outcome = "\\N", "\\N"
        elif answered is not None and due > answered:
            fired, outcome = ts(due + 0.1), "moot"
        else:
            fired, outcome = ts(due + rng.uniform(0.01, 0.5)), "fired"
            sla = "breached" if kind == "breach" else "at_risk"
            detail = f"{kind} {number}" if number else kind
            rows.history.append(f"{referral_id}\t{fired}\t{kind}\tsystem\t{detail}\n")
        rows.timers.append(f"{need_id}\t{kind}\t{number}\t{ts(due)}\t{fired}\t{outcome}\n")
    if answered is not None:
        rows.history.append(f"{referral_id}\t{ts(answered)}\taccept\top-{partner}\t\\N\n")
    if status == "responded":
        rows.history.append(f"{referral_id}\t{ts(answered + 60)}\trespond\top-{partner}\t\\N\n")  # type: ignore[operator]
    updated = max(recorded, answered or recorded)
    rows.referrals.append(
        f"{referral_id}\t{need_id}\t{partner}\t{contact}\t{library}\t{category}\t{status}\t{sla}\t{ts(respond_by)}\t"
        f"bench\t{ts(recorded)}\t{ts(updated)}\t\\N\n"
    )


COLUMNS = {
    "need_case": "need_id, reference, library_id, category, summary, postal_code, urgency, person_display_name, "
    "person_email, person_phone, preferred_channel, language, recorded_at, respond_by, correlation_id, sequence, "
    "search_text",
    "referral": "id, need_id, partner_id, contact_id, library_id, category, status, sla, respond_by, routed_because, "
    "created_at, updated_at, decline_reason",
    "clock_timer": "need_id, kind, number, due_at, fired_at, outcome",
    "referral_history": "referral_id, at, action, actor, detail",
}


def copy_rows(conn: psycopg.Connection, rows: Rows) -> None:
    with conn.cursor() as cur:
        for table, lines in (
            ("need_case", rows.needs),
            ("referral", rows.referrals),
            ("clock_timer", rows.timers),
            ("referral_history", rows.history),
        ):
            with cur.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
                for start in range(0, len(lines), 5000):
                    copy.write("".join(lines[start : start + 5000]))


def bulk_recorded_times(rng: random.Random, now: float) -> Iterator[float]:
    """Recording instants over the last SPAN_HOURS, none whose unfired timers fall due in the next QUIET_HOURS."""
    while True:
        age = rng.uniform(0.0, SPAN_HOURS)
        if any(hours - QUIET_HOURS <= age < hours for _, _, hours in TIMERS):
            continue  # a timer of it would fall due during the run
        yield now - age * HOUR


def bulk_load(db: str, n: int, seed: int, batch: int = 50_000) -> dict[str, int]:
    """N referrals in batches, one COPY per table per batch, one transaction in all."""
    rng = random.Random(seed)
    now = time.time()
    recorded = bulk_recorded_times(rng, now)
    counts = dict.fromkeys(COLUMNS, 0)
    with psycopg.connect(db) as conn:
        for start in range(0, n, batch):
            rows = Rows.empty()
            for i in range(start, min(n, start + batch)):
                add_referral(rows, rng, i, next(recorded), now, window=False)
            copy_rows(conn, rows)
            for table, lines in zip(COLUMNS, (rows.needs, rows.referrals, rows.timers, rows.history), strict=True):
                counts[table] += len(lines)
        conn.commit()
        conn.execute("ANALYZE")
    return counts


def load_window(db: str, first: int, k: int, window_start: float, window: float, seed: int) -> None:
    """K more referrals whose first reminder falls due between window_start and window_start + window."""
    rng = random.Random(seed + 1)
    rows = Rows.empty()
    now = time.time()
    for j in range(k):
        due = window_start + window * (j + 0.5) / k
        add_referral(rows, rng, first + j, due - TIMERS[0][2] * HOUR, now, window=True)
    with psycopg.connect(db) as conn:
        copy_rows(conn, rows)
        conn.commit()
        conn.execute("ANALYZE clock_timer")


def forget_window(db: str) -> str:
    """Remove a previous run's window referrals and events; say what the reused database holds."""
    with psycopg.connect(db) as conn:
        conn.execute(
            "DELETE FROM referral_history WHERE referral_id IN (SELECT id FROM referral WHERE need_id LIKE 'w%')"
        )
        for table in ("clock_timer", "referral", "need_case"):
            conn.execute(f"DELETE FROM {table} WHERE need_id LIKE 'w%'")
        conn.execute("DELETE FROM outbox")
        referrals = conn.execute("SELECT count(*) FROM referral").fetchone()
        soon = conn.execute(
            "SELECT count(*) FROM clock_timer WHERE fired_at IS NULL AND due_at < now() + interval '15 minutes'"
        ).fetchone()
        conn.commit()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return f"{referrals[0] if referrals else 0:,} referrals; {soon[0] if soon else 0:,} bulk timers due in 15 min"


def lateness(db: str) -> tuple[list[float], list[float], int]:
    """(fired_at - due_at, published_at - due_at) of the window's timers, and how many of them are unfired."""
    with psycopg.connect(db) as conn:
        fired = [
            r[0]
            for r in conn.execute(
                "SELECT EXTRACT(EPOCH FROM fired_at - due_at)::float FROM clock_timer"
                " WHERE need_id LIKE 'w%' AND kind = 'reminder' AND number = 1 AND fired_at IS NOT NULL"
            ).fetchall()
        ]
        published = [
            r[0]
            for r in conn.execute(
                "SELECT EXTRACT(EPOCH FROM o.published_at - t.due_at)::float FROM outbox o"
                " JOIN clock_timer t ON t.need_id = (o.payload::json ->> 'need_id')"
                " AND t.kind = 'reminder' AND t.number = 1"
                " WHERE o.type = 'referral.reminder_due' AND o.published_at IS NOT NULL AND t.need_id LIKE 'w%'"
            ).fetchall()
        ]
        unfired = conn.execute(
            "SELECT count(*) FROM clock_timer WHERE need_id LIKE 'w%' AND kind = 'reminder' AND number = 1"
            " AND fired_at IS NULL"
        ).fetchone()
    return fired, published, unfired[0] if unfired else 0


# --- the service ----------------------------------------------------------------------------------------------


class Referral:
    """`relais migrate referral` and `relais serve referral` on the bench's database, the other services absent."""

    def __init__(self, procs: Processes, workdir: Path, redis_url: str, database_url: str) -> None:
        self.procs, self.workdir = procs, workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.namespace = f"bench-{uuid.uuid4().hex[:10]}"
        self.secret = secrets.token_urlsafe(48)
        directory = workdir / "directory.yaml"
        directory.write_text(yaml.safe_dump(directory_data(), allow_unicode=True, sort_keys=False))
        nobody = f"http://127.0.0.1:{free_port()}"  # intake and notifications do not run: refused at once
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAIS_")}
        env.update(
            RELAIS_REDIS_URL=redis_url,
            RELAIS_NAMESPACE=self.namespace,
            RELAIS_DIRECTORY=str(directory),
            RELAIS_DATA_DIR=str(workdir / "data"),
            RELAIS_SECRET_KEY=self.secret,
            RELAIS_LOG_LEVEL=os.environ.get("RELAIS_LOG_LEVEL", "INFO"),
            RELAIS_REFERRAL_DATABASE_URL=database_url,
            RELAIS_REFERRAL_PORT=str(self.port),
            RELAIS_INTAKE_URL=nobody,
            RELAIS_NOTIFICATIONS_URL=nobody,
        )
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"

    def migrate(self) -> None:
        log = self.logs / "migrate-referral.log"
        with open(log, "ab") as out:
            rc = subprocess.run(
                [*relais_command(), "migrate", "referral"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ).returncode
        if rc != 0:
            raise BenchError(f"`relais migrate referral` exited with {rc}; see {log}:\n{tail(log)}")

    def start(self, timeout: float = 120.0) -> int:
        log = self.logs / "referral.log"
        proc = self.procs.spawn("referral", [*relais_command(), "serve", "referral"], self.env, log)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5, trust_env=False) as client:
            while True:
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return proc.pid
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise BenchError(f"referral exited with {proc.returncode} while starting; see {log}:\n{tail(log)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"referral not ready after {timeout:.0f} s; see {log}")
                time.sleep(0.2)

    async def page_cookie(self, user_id: str) -> dict[str, str]:
        """A signed-in session of `user_id` on referral's pages, as the sign-in link would open it."""
        import redis.asyncio as aioredis

        from shared.sessions import open_session
        from shared.settings import Settings
        from shared.signin import session_cookie, sign

        settings = Settings(redis_url=self.env["RELAIS_REDIS_URL"], namespace=self.namespace, secret_key=self.secret)
        client = aioredis.Redis.from_url(self.env["RELAIS_REDIS_URL"])
        try:
            session_id = await open_session(client, settings, "referral", user_id)
        finally:
            await client.aclose()
        value = sign(settings, "session:referral", {"u": user_id, "c": secrets.token_urlsafe(24), "s": session_id})
        return {session_cookie("referral"): value}


# --- the measures ---------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def spread_s(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 50) * 1000:.0f} ms  p99 {percentile(values, 99) * 1000:.0f} ms"
        f"  max {max(values) * 1000:.0f} ms  (n={len(values)})"
    )


def pages_to_measure(ops: dict[str, str], caf: dict[str, str]) -> list[tuple[str, str, dict, dict]]:
    """(label, path, headers, cookies) of each page measured."""
    bearer_ops = {"Authorization": f"Bearer {TOKENS['ops']}"}
    bearer_caf = {"Authorization": f"Bearer {TOKENS['caf']}"}
    return [
        ("API list, ops, newest 50", "/api/v1/referrals", bearer_ops, {}),
        ("API list, ops, partner + status", "/api/v1/referrals?partner_id=caf-76&status=assigned", bearer_ops, {}),
        ("API list, ops, sla=breached", "/api/v1/referrals?sla=breached&limit=50", bearer_ops, {}),
        ("API list, partner caf-76", "/api/v1/referrals", bearer_caf, {}),
        ("API list, search q=", "/api/v1/referrals?q=CHA-2611-0004242", bearer_ops, {}),
        ("API list, search q= a name", "/api/v1/referrals?q=B4242", bearer_ops, {}),
        ("API list, partner caf-76, q=", "/api/v1/referrals?q=CHA-2611-000424", bearer_caf, {}),
        ("inbox /boite, ops (open)", "/boite", {}, ops),
        ("inbox /boite, ops, page 20", "/boite?page=20", {}, ops),
        ("inbox /boite, partner caf-76", "/boite", {}, caf),
        ("inbox /boite?q=, ops", "/boite?q=CHA-2611-0004242", {}, ops),
        ("inbox /boite?q= a name, partner caf-76", "/boite?q=B4242", {}, caf),
        ("/tableau-de-bord", "/tableau-de-bord", {}, ops),
        ("/tableau-de-bord/technique", "/tableau-de-bord/technique", {}, ops),
        ("/tableau-de-bord/chiffres (refresh)", "/tableau-de-bord/chiffres", {}, ops),
    ]


def measure_pages(base: str, pages: list, requests: int, cap: float = 90.0) -> list[tuple[str, list[float], str]]:
    results = []
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
        for label, path, headers, cookies in pages:
            client.cookies.clear()
            client.cookies.update(cookies)
            times: list[float] = []
            problem = ""
            first: float | None = None
            started = time.monotonic()
            for n in range(requests + 2):  # two warm-ups, not counted
                t0 = time.perf_counter()
                try:
                    response = client.get(path, headers=headers)
                except httpx.TimeoutException:
                    problem = f"no answer in {client.timeout.read:.0f} s"
                    break
                elapsed = time.perf_counter() - t0
                if n == 0:
                    first = elapsed
                if response.status_code != 200:
                    problem = f"HTTP {response.status_code}"
                    break
                if n >= 2:
                    times.append(elapsed)
                if time.monotonic() - started > cap:
                    problem = f"stopped after {cap:.0f} s"
                    break
            results.append((label, times, problem))
            cold = f"  first {first * 1000:.0f} ms" if first is not None else ""
            print(f"  {label:<38} {spread_s(times)}{cold} {problem}", flush=True)
    return results


def dashboard_at_start(service: Referral, settle_until: float) -> None:
    """The dashboard page right after the start, timed, then again every second while the month's figures are being
    computed (a service that computes them behind answers without them at once), until they are there or until
    `settle_until` (time.time()), so that computation stays out of the idle window."""
    cookie = asyncio.run(service.page_cookie("ops"))
    with httpx.Client(base_url=service.url, timeout=120, trust_env=False, cookies=cookie) as client:
        started = time.perf_counter()
        times: list[float] = []
        while True:
            t0 = time.perf_counter()
            page = client.get("/tableau-de-bord")
            times.append(time.perf_counter() - t0)
            pending = page.status_code == 200 and "en cours de calcul" in page.text
            if len(times) == 1:
                print(
                    f"  /tableau-de-bord right after the start: HTTP {page.status_code} in {times[0] * 1000:.0f} ms, "
                    + ("figures being computed (the notice)" if pending else "with the figures"),
                    flush=True,
                )
            if not pending or time.time() >= settle_until:
                break
            time.sleep(1)
        after = time.perf_counter() - started
        if pending:
            print(f"  the figures were still being computed {after:.0f} s after the first request (see --settle)")
        elif len(times) > 1:
            print(
                f"  the figures computed in the background were there {after:.0f} s after the first request; the"
                f" {len(times) - 1} requests meanwhile (one a second): {spread_s(times[:-1])}",
                flush=True,
            )


def backends(db: str) -> list[int]:
    """The PostgreSQL server processes connected to the bench's database (the service's pool), but this one."""
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [r[0] for r in rows]


@dataclass
class Cpu:
    service: float  # CPU seconds of the referral process
    database: float  # of the PostgreSQL backends serving it
    machine: float | None  # the whole machine's busy share

    def line(self, seconds: float) -> str:
        busy = f"; the machine was {self.machine:.0%} busy" if self.machine is not None else ""
        return (
            f"referral {self.service:.2f} CPU s = {self.service / seconds:.1%} of a core, its PostgreSQL backends"
            f" {self.database:.2f} CPU s = {self.database / seconds:.1%}{busy}"
        )


def cpu_share(pid: int, db: str, seconds: float) -> Cpu:
    """The CPU the service and its database backends used over the next `seconds`."""
    pg = backends(db)
    before, machine_before = cpu_seconds(pid), machine_cpu()
    pg_before = {p: cpu_seconds(p) for p in pg}
    time.sleep(seconds)
    after, machine_after = cpu_seconds(pid), machine_cpu()
    pg_used = sum((cpu_seconds(p) or b or 0.0) - (b or 0.0) for p, b in pg_before.items())
    busy = None
    if machine_before and machine_after:
        busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    return Cpu((after or 0.0) - (before or 0.0), pg_used, busy)


def run(args: argparse.Namespace, procs: Processes, workdir: Path) -> int:
    admin = conninfo(args.postgres)
    db = conninfo(args.postgres, args.database)
    print(
        f"Timers at scale, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(f"  database {args.database} on {admin.rsplit('/', 1)[0].split('@')[-1]}, work dir {workdir}")
    with psycopg.connect(admin) as conn:
        print(f"  PostgreSQL {conn.info.server_version // 10000}.{conn.info.server_version % 10000}")
    if not args.reuse_database:
        recreate_database(admin, args.database)
    redis_url = os.environ.get("RELAIS_REDIS_URL") or start_redis(procs, workdir / "redis")
    service = Referral(procs, workdir, redis_url, "postgresql+psycopg://" + db.split("://", 1)[1])
    t0 = time.monotonic()
    service.migrate()
    print(f"  migrations: {time.monotonic() - t0:.1f} s", flush=True)
    bulk = args.referrals - args.due
    if args.reuse_database:
        print(f"  reusing the referrals loaded before: {forget_window(db)}", flush=True)
    else:
        t0 = time.monotonic()
        counts = bulk_load(db, bulk, args.seed)
        load_seconds = time.monotonic() - t0
        rows = sum(counts.values())
        print(
            f"  bulk load (COPY, one transaction, then ANALYZE): {bulk:,} referrals, "
            + ", ".join(f"{n:,} {t}" for t, n in counts.items())
            + f": {load_seconds:.0f} s ({rows / load_seconds:,.0f} rows/s)",
            flush=True,
        )
    window_start = time.time() + args.settle + args.idle + 15  # start, settle, the idle window, a margin
    load_window(db, bulk, args.due, window_start, args.window, args.seed)
    print(f"  + {args.due:,} referrals whose first reminder falls due over {args.window:.0f} s", flush=True)
    t0 = time.monotonic()
    pid = service.start()
    print(f"  referral ready in {time.monotonic() - t0:.1f} s (pid {pid})", flush=True)
    time.sleep(5)  # start-up work (first queries, the relay's first poll) out of the idle window
    dashboard_at_start(service, window_start - args.idle - 15)
    if time.time() + args.idle > window_start:
        print("  (the start took long: the idle window overlaps the firing window)")
    idle = cpu_share(pid, db, args.idle)
    print(f"\nidle (no timer due), {args.idle:.0f} s: {idle.line(args.idle)}", flush=True)
    time.sleep(max(0.0, window_start - time.time()))
    firing = cpu_share(pid, db, args.window + 5)
    fired, published, unfired = lateness(db)
    print(
        f"firing window, {args.window:.0f} s (+5 s): {len(fired):,} of {args.due:,} timers fired, {unfired:,} not;"
        f" {firing.line(args.window + 5)}"
    )
    print(f"  lateness due -> fired_at (the row)        {spread_s(fired)}")
    print(f"  lateness due -> event published (outbox)  {spread_s(published)}")
    results = []
    if not args.no_pages:
        print(f"\npages, {args.requests} requests each after 2 warm-ups, one at a time:", flush=True)
        ops = asyncio.run(service.page_cookie("ops"))
        caf = asyncio.run(service.page_cookie("op-caf"))
        results = measure_pages(service.url, pages_to_measure(ops, caf), args.requests)
    print(f"\nidle again, 10 s: {cpu_share(pid, db, 10).line(10)}")
    if dead := procs.dead():
        print(f"bench: {dead[0][0]} died (exit {dead[0][1]}); see {dead[0][2]}", file=sys.stderr)
        return 1
    return 1 if unfired or any(problem.startswith("HTTP") for _, _, problem in results) else 0


def main(argv: list[str]) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-timers-"))
    procs = Processes()
    status = 1
    try:
        status = run(args, procs, workdir)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything it started", file=sys.stderr)
        status = 130
    except (BenchError, psycopg.Error) as exc:
        print(f"bench: {exc}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop(["referral"])  # before its Redis, or it logs the lost connection as an error
        procs.stop()
        if not args.keep:
            try:
                drop_database(conninfo(args.postgres), args.database)
            except psycopg.Error as exc:
                print(f"bench: could not drop {args.database}: {exc}", file=sys.stderr)
        if args.keep or status != 0:
            print(f"bench: kept {workdir} (logs/, directory.yaml)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status
