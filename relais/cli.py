"""The `relais` command: run the whole system on one machine, one service, migrations, checks and replays.

Run as the `relais` console script or `python -m relais`. This module parses the command line and runs one command;
settings are checked by relais.diagnostics, `relais up` is relais.up, and the embedded Redis and SMTP sink that
`up` and `serve` start without their URLs are shared.devstack's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

from relais.diagnostics import BadSettings, load_settings, print_directory_errors
from relais.up import Up
from shared.devstack import MailSink, start_embedded_redis
from shared.events import STREAMS
from shared.settings import SERVICES, ServiceName, Settings, private_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relais", description=__doc__.partition("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, the three services and an SMTP sink on this machine")
    up.add_argument("--directory", type=Path, help="directory file (default: RELAIS_DIRECTORY or the demo directory)")
    up.add_argument(
        "--data-dir", type=Path, help="where databases, Redis data, received mail and logs go (default ./.relais)"
    )
    up.add_argument(
        "--verbose", "-v", action="store_true", help="every log line on screen (else in DATA_DIR/logs/relais.log)"
    )
    serve = sub.add_parser("serve", help="run one service, configured from the environment")
    serve.add_argument("service", choices=SERVICES)
    migrate = sub.add_parser("migrate", help="create or upgrade one service's database (run before serve)")
    migrate.add_argument("service", choices=SERVICES)
    migrate.add_argument("--new", metavar="MESSAGE", help="(developers) write the next revision from the models")
    directory = sub.add_parser("directory", help="directory file tools")
    directory_sub = directory.add_subparsers(dest="directory_command", required=True)
    check = directory_sub.add_parser("check", help="validate a directory file; prints every error with its path")
    check.add_argument("file", type=Path)
    replay = sub.add_parser("replay", help="put dead-lettered messages back on their stream")
    replay.add_argument("stream", choices=STREAMS, help="stream name without namespace: " + ", ".join(STREAMS))
    replay.add_argument("ids", nargs="*", help="dead-letter entry ids (default: all)")
    keys = sub.add_parser("keys", help="keys of the personal data that events carry (docs/privacy.md)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser(
        "rewrap", help="wrap every person's data key again with the first key of RELAIS_PERSONAL_DATA_KEYS"
    )
    purge = sub.add_parser(
        "purge", help="run the retention purge now (directory's retention block); prints what it removed, per rule"
    )
    purge.add_argument("service", nargs="?", choices=SERVICES, help="one service (default: the three)")
    purge.add_argument("--dry-run", action="store_true", help="count what is due and change nothing")
    args = parser.parse_args(argv)
    from shared import logs

    # JSON lines for the services (collected by the platform); `relais up` and the tools talk to a person.
    default_format = "json" if args.command == "serve" else "text"
    os.umask(0o077)  # databases, mail, Redis files and keys this command (or its children) writes: this user only
    logs.configure(
        service=getattr(args, "service", None),
        fmt=os.environ.get("RELAIS_LOG_FORMAT", default_format),
        level=os.environ.get("RELAIS_LOG_LEVEL", "INFO"),
    )

    try:
        if args.command == "directory":
            return directory_check(args.file)
        if args.command == "serve":
            return serve_one(args.service)
        if args.command == "migrate":
            return migrate_one(args.service, args.new)
        if args.command == "replay":
            return replay_dead_letters(args.stream, args.ids)
        if args.command == "keys":
            return rewrap_keys()
        if args.command == "purge":
            return purge_now([args.service] if args.service else list(SERVICES), args.dry_run)
        return Up(args.directory, args.data_dir, verbose=args.verbose).run()
    except BadSettings as exc:  # the one place a bad RELAIS_* variable ends a command: what to fix, no traceback
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2


def directory_check(path: Path) -> int:
    from shared.directory import check_directory_file

    errors = check_directory_file(path)
    for error in errors:
        print(error)
    if errors:
        print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    return 0


def _service_module(service: ServiceName):
    import importlib

    return importlib.import_module(f"services.{service}.app")


M_ARENA_MAX = -8  # glibc's malloc.h


def fewer_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process, unless MALLOC_ARENA_MAX says otherwise. glibc gives each thread
    that allocates an arena of its own, up to eight per core, and the worker threads of a service (its database
    work) each keep freed memory in theirs: two arenas keep a service's peak RSS about 8-10 MiB lower under load,
    at no CPU cost the bench can see (docs/benchmarks.md). Called before any worker thread starts; a C library
    without mallopt (musl) is left as it is. True when the cap was set."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def serve_one(service: ServiceName) -> int:
    fewer_malloc_arenas()
    settings = load_settings(
        redis=True, databases=(service,), notifications=service == "notifications", production=True
    )
    if settings.demo:
        print(
            f"relais serve {service}: demo mode (RELAIS_DEMO=true): demo tokens and a generated secret key are "
            "accepted; never run it with real people's data",
            file=sys.stderr,
        )
    embedded: list[subprocess.Popen] = []
    sink: MailSink | None = None
    try:
        # The contract's defaults: an embedded Redis, and for notifications an embedded SMTP sink. Only this
        # process uses them, so a service served this way hears nobody else: deployments set the URLs.
        if not settings.redis_configured or (service == "notifications" and not settings.smtp_url):
            private_dir(settings.data_dir.resolve())
        if not settings.redis_configured:
            proc, url = start_embedded_redis(settings.data_dir.resolve() / f"redis-{service}")
            embedded.append(proc)
            settings = settings.model_copy(update={"redis_url": url})
            os.environ["RELAIS_REDIS_URL"] = url  # for anything that reads the environment again
            print(
                f"relais serve {service}: RELAIS_REDIS_URL is not set; started an embedded Redis at {url}, which "
                "only this process uses (other services will not see its events)",
                file=sys.stderr,
            )
        if service == "notifications" and not settings.smtp_url:
            sink = MailSink(settings.data_dir.resolve() / "mail")
            os.environ.update(sink.start())
            settings = settings.model_copy(
                update={"smtp_url": os.environ["RELAIS_SMTP_URL"], "mail_sink_dir": sink.folder}
            )
            print(
                f"relais serve notifications: RELAIS_SMTP_URL is not set; messages are kept in {sink.folder} "
                f"(embedded SMTP sink at {settings.smtp_url})",
                file=sys.stderr,
            )
        return _serve(service, settings)
    finally:
        if sink is not None:
            sink.stop()
        for proc in embedded:
            proc.terminate()
            proc.wait(15)


def _serve(service: ServiceName, settings: Settings) -> int:
    from shared.directory import DirectoryError
    from shared.migrations import MigrationNeeded, check_current

    try:
        svc = _service_module(service).bootstrap(settings)
    except DirectoryError as exc:
        print_directory_errors(settings.directory, exc.errors, "fix these and start again")
        return 2
    try:
        check_current(service, svc.db.engine, svc.db.url)
    except MigrationNeeded as exc:
        print(exc, file=sys.stderr)
        return 2
    freeze_what_start_made()
    serve_app(svc.app, settings.host, settings.port(service))
    return 0


def freeze_what_start_made() -> None:
    """Move every object alive after start (modules, classes, the directory, compiled templates: some 150,000) out
    of the garbage collector's reach. Otherwise each full collection walks them all, a pause of tens of ms in
    whichever request or event it falls on; frozen, a collection walks only what was made since. Open loop at 50
    needs/s: POST -> email p99 156 -> 128 ms, POST -> 201 max 122 -> 42 ms (docs/benchmarks.md)."""
    import gc

    gc.collect()
    gc.freeze()


def serve_app(app, host: str, port: int) -> None:  # noqa: ANN001
    """Serve one service's app in the foreground. log_config=None: uvicorn's own lines (and any traceback it would
    print) go through the JSON logs and their masking (shared.logs), never raw to stderr."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", log_config=None, timeout_graceful_shutdown=10)


def migrate_one(service: ServiceName, new_revision: str | None = None) -> int:
    from shared import migrations

    if new_revision:
        migrations.new_revision(service, new_revision)
        return 0
    settings = load_settings(databases=(service,))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        migrations.upgrade(service, settings.database_url(service))
    except migrations.MigrationNeeded as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{service}: database at the newest schema")
    return 0


def rewrap_keys() -> int:
    """Key rotation: every data key wrapped again with the current key-encryption key, so older ones can go."""
    from shared.personal_data import PersonalData, PersonalDataError

    settings = load_settings(redis=True)
    if not settings.redis_configured:
        print("RELAIS_REDIS_URL (or RELAIS_REDIS_SENTINELS) is not set", file=sys.stderr)
        return 2
    personal_data = PersonalData(settings)
    try:
        done = personal_data.rewrap()
    except PersonalDataError as exc:  # a data key no configured key opens: nothing after it was rewrapped
        print(f"relais keys rewrap: {exc}", file=sys.stderr)
        return 1
    finally:
        personal_data.client.close()
    print(
        f"rewrapped {done.rewrapped} data key(s) with key {done.key_id} in {personal_data.hash} "
        f"({done.current} already wrapped with it, {done.erased} erased person(s))"
    )
    return 0


def replay_dead_letters(stream: str, ids: list[str]) -> int:
    from shared.messaging import replay
    from shared.redis_clients import async_client

    settings = load_settings(redis=True)
    if not settings.redis_configured:
        print("RELAIS_REDIS_URL (or RELAIS_REDIS_SENTINELS) is not set", file=sys.stderr)
        return 2

    async def run() -> int:
        client = async_client(settings)
        try:
            return await replay(client, settings.key(stream), ids or None)
        finally:
            await client.aclose()

    count = asyncio.run(run())
    print(f"replayed {count} message(s) from {settings.key(stream)}.dlq")
    return 0


def purge_now(services: list[ServiceName], dry_run: bool) -> int:
    """`relais purge`: each service's retention rules, now, against its database (what the daily run does)."""
    import importlib
    from datetime import timedelta

    from shared.db import Database
    from shared.directory import DirectoryError, load_directory
    from shared.events import utcnow
    from shared.migrations import MigrationNeeded, check_current
    from shared.retention import run_purge, technical_rules

    settings = load_settings(databases=tuple(services))
    try:
        directory = load_directory(settings.directory)
    except DirectoryError as exc:
        print_directory_errors(settings.directory, exc.errors, "fix these and run the purge again")
        return 2
    status = 0
    for service in services:
        store = importlib.import_module(f"services.{service}.store")
        db = Database(settings.database_url(service), store.TABLES)
        try:
            check_current(service, db.engine, db.url)
            rules = [*technical_rules(timedelta(seconds=settings.stream_max_age_s)), *store.PURGE_RULES]
            report = run_purge(
                db,
                service,
                rules,
                directory,
                utcnow(),
                technical_fallback=settings.technical_retention,
                dry_run=dry_run,
            )
        except MigrationNeeded as exc:
            print(exc, file=sys.stderr)
            status = 2
            continue
        finally:
            db.dispose()
        for line in report.lines():
            print(line)
        if report.skipped:
            status = max(status, 1)
    return status
