"""`relais up`: the whole system on one machine, for a demo or a developer.

Starts an embedded Redis and SMTP sink unless their URLs are set (shared.devstack), migrates the three services'
databases, runs each service as a child process (`python -m relais serve NAME`), prints where everything is, passes
SIGHUP on as a directory reload once the file is checked, and stops everything, Redis last, on Ctrl-C or when a
child dies. The children's logs (JSON lines, read from their pipes) all go to `<data dir>/logs/relais.log`; the
terminal shows warnings, errors and one line per need as it moves (relais.console), or everything with `--verbose`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from relais.console import Console
from relais.diagnostics import hide_password, load_settings, print_directory_errors
from shared import logs
from shared.devstack import MailSink, die_with_parent, free_port, start_embedded_redis
from shared.settings import DEMO_DIRECTORY, DEMO_TOKENS, SERVICES, private_dir


class Up:
    """The supervisor of `relais up`: its children, in the order they start and stop."""

    def __init__(self, directory: Path | None, data_dir: Path | None, verbose: bool = False) -> None:
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
        self.verbose = verbose
        self.readers: list[threading.Thread] = []
        self.log_path = self.data_dir / "logs" / "relais.log"
        self.console: Console | None = None

    def run(self) -> int:
        from shared.directory import DirectoryError, load_directory

        try:
            directory = load_directory(self.settings.directory)
        except DirectoryError as exc:
            print_directory_errors(self.settings.directory, exc.errors, "fix these and start again")
            return 2
        private_dir(self.data_dir)
        private_dir(self.log_path.parent)
        log_file = logs.LogFile(self.log_path)
        # This process's own lines (the mail sink, its HTTP checks) go to the file; warnings to the terminal too.
        logs.configure(
            "up",
            fmt="text",
            level=logging.getLevelName(logging.getLogger().level),
            screen_level="INFO" if self.verbose else "WARNING",
            file=log_file,
        )
        self.console = Console(log_file, directory, self.verbose)
        _ = self.settings.signing_key  # generated once here, before three services race to write it
        env = {**os.environ, "RELAIS_DATA_DIR": str(self.data_dir), "RELAIS_DIRECTORY": str(self.settings.directory)}
        env["RELAIS_LOG_FORMAT"] = "json"  # read from their pipes: to the log file, and what matters to the terminal
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
            # Partners' replies by email: notifications listens for them (docs/inbound-mail.md).
            env["RELAIS_INBOUND_SMTP_PORT"] = str(self.settings.inbound_smtp_port or free_port())
            for service in SERVICES:
                if not self._migrate(service, env):
                    return 2  # the migration said why
            for service in SERVICES:
                self._spawn(service, [sys.executable, "-m", "relais", "serve", service], env)
            if not self._wait_ready():
                return 1
            self._announce(env, directory)
            while not self.stopping:
                for name, proc in self.children:
                    if proc.poll() is not None:
                        print(
                            f"relais: {name} exited with status {proc.returncode}; stopping everything", file=sys.stderr
                        )
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
        if self.console is not None:  # the names it shows come from the new file
            from shared.directory import load_directory

            self.console.directory = load_directory(path)
            self.console.say(f"relais: directory {path} checked; intake, referral and notifications reload it")

    def _migrate(self, service: str, env: dict) -> bool:
        """`relais migrate SERVICE`: its lines to the log file; to the terminal too when it fails."""
        assert self.console is not None  # set by run()
        done = subprocess.run(
            [sys.executable, "-m", "relais", "migrate", service],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        for line in done.stdout.splitlines():
            if done.returncode == 0:
                self.console.keep_plain(service, line)
            else:
                self.console.say(line)
        return done.returncode == 0

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, env=env, preexec_fn=die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.children.append((name, proc))
        reader = threading.Thread(target=self._read, args=(name, proc), name=f"relais-up-{name}", daemon=True)
        reader.start()
        self.readers.append(reader)
        return proc

    def _read(self, name: str, proc: subprocess.Popen) -> None:
        """A child's output, line by line, until it exits: to the log file and, what matters, to the terminal."""
        assert proc.stdout is not None and self.console is not None  # piped by _spawn, set by run()
        for raw in proc.stdout:
            self.console.child_line(name, raw.decode("utf-8", errors="replace"))

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
                print(f"relais: a process exited during start-up; see above, and {self.log_path}", file=sys.stderr)
                return False
            time.sleep(0.2)
        if pending:
            print(f"relais: not ready after 60 s: {', '.join(sorted(pending))}", file=sys.stderr)
        return not pending

    def _announce(self, env: dict, directory) -> None:
        lines = ["", "Relais is running. Ctrl-C stops everything.", ""]
        for service in SERVICES:
            lines.append(
                f"  {service:<14} {self.settings.base_url(service)}   "
                f"(API docs: {self.settings.base_url(service)}/docs)"
            )
        lines.append(
            f"  {'desk pages':<14} {self.settings.base_url('intake')}/   (front desks sign in by emailed link)"
        )
        lines.append(f"  {'partner inbox':<14} {self.settings.base_url('referral')}/boite")
        lines.append(f"  {'dashboard':<14} {self.settings.base_url('referral')}/tableau-de-bord   (ops)")
        lines.append(f"  {'redis':<14} {env.get('RELAIS_REDIS_URL') or 'Sentinels ' + env['RELAIS_REDIS_SENTINELS']}")
        if self.sink:
            lines.append(f"  {'smtp sink':<14} {env['RELAIS_SMTP_URL']}   (messages kept in {self.sink.folder})")
            lines.append(
                f"  {'outbox page':<14} {self.settings.base_url('notifications')}/envois   (what Relais sends, "
                "as recipients see it; for ops: the sign-in link arrives in the folder above)"
            )
        else:
            lines.append(f"  {'smtp':<14} {env['RELAIS_SMTP_URL']}")
        lines.append(
            f"  {'inbound smtp':<14} smtp://{self.settings.host}:{env['RELAIS_INBOUND_SMTP_PORT']}   "
            "(partners' replies to handoff emails: their reponse+...@ Reply-To)"
        )
        lines.append(f"  {'data':<14} {self.data_dir}")
        lines.append(f"  {'logs':<14} {self.log_path}   (every service's full logs, JSON lines)")
        for service in SERVICES:
            lines.append(f"  {service + ' db':<14} {hide_password(self.settings.database_url(service))}")
        lines.append(f"  {'directory':<14} {self.settings.directory}")
        if Path(self.settings.directory).resolve() == DEMO_DIRECTORY.resolve():
            lines += ["", "Demo tokens (Authorization: Bearer TOKEN), from the demo directory:"]
            for user in directory.users:
                if user.id in DEMO_TOKENS:
                    lines.append(f"  {user.id:<22} {user.role:<11} {DEMO_TOKENS[user.id]}")
            lines += [
                "",
                "Try it:",
                f"  curl -s -X POST {self.settings.base_url('intake')}/api/v1/needs \\",
                "    -H 'Authorization: Bearer demo-desk-chatelet' -H 'Content-Type: application/json' \\",
                '    -d \'{"library_id": "rouen-chatelet", "category": "caf", "summary": "Dossier APL bloqué", '
                '"postal_code": "76000", "consent": true}\'',
            ]
        if self.verbose:
            lines += ["", f"Every log line follows (--verbose); they are kept in {self.log_path} too.", ""]
        else:
            lines += [
                "",
                "Below: each need as it moves, warnings and errors. Everything else is in the log file above "
                "(relais up --verbose shows it here).",
                "",
            ]
        assert self.console is not None  # set by run()
        self.console.say("\n".join(lines))

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
        for reader in self.readers:  # the children's last lines, written before they exited
            reader.join(5)
        self.readers.clear()
        if self.sink:
            self.sink.stop()
        self.children.clear()
